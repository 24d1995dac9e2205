"""Modules that moved into sub-packages still import by their old paths, and a checkpoint written before the
move (``tests/fixtures/agentic_tiny_before_rooms.ckpt``: one RL step of ``configs/agentic_tiny_cpu.yaml`` at
a tiny size, whose hyper-parameters name ``trgrpo.retrieval.SearchEnvironment``) still loads and exports.

    python -m pytest tests/test_moved_paths.py -q
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trgrpo.moved import MOVED

FIXTURE = Path(__file__).parent / "fixtures" / "agentic_tiny_before_rooms.ckpt"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_module_at_its_new_home(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported before by another test: import it afresh
    with pytest.warns(FutureWarning, match=MOVED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # the alias does not overwrite the real module's spec


def test_yaml_class_paths_users_have_still_resolve():
    from jsonargparse import ArgumentParser

    from trgrpo.agent.retrieval import SearchEnvironment
    from trgrpo.agent.tools import ToolEnvironment

    parser = ArgumentParser()
    parser.add_argument("--env", type=ToolEnvironment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg = parser.parse_args(["--env", '{"class_path": "trgrpo.retrieval.SearchEnvironment"}'])
        env = parser.instantiate_classes(cfg).env
    assert isinstance(env, SearchEnvironment)


def test_a_checkpoint_from_before_the_move_loads_and_exports(tmp_path):
    from trgrpo.agent.retrieval import SearchEnvironment
    from trgrpo.export import main as export
    from trgrpo.module import GRPOModule

    saved = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    assert (
        saved["hyper_parameters"]["sampling"]["agent"]["environment"]["class_path"]
        == "trgrpo.retrieval.SearchEnvironment"
    )  # the fixture really holds an old path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = GRPOModule.load_from_checkpoint(FIXTURE, map_location="cpu", weights_only=True)
    assert isinstance(module.sampling.agent.environment, SearchEnvironment)
    module.configure_model()
    module.load_state_dict(saved["state_dict"])
    for name, tensor in module.policy_model.state_dict().items():
        torch.testing.assert_close(tensor, saved["state_dict"][f"policy_model.{name}"], rtol=0, atol=0)

    out = export(["--ckpt", str(FIXTURE), "--out", str(tmp_path / "hf")])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, saved["state_dict"][f"policy_model.{name}"], rtol=0, atol=0)
