"""Checkpoints are data: loading one (export, resume) never runs code, even a crafted one.

The crafted checkpoint holds a pickle payload whose only effect, if it ran, is creating a marker file.

    python -m pytest tests/test_checkpoint_trust.py -q
"""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import arithmetic_args, run_cli

from trgrpo.export import main as export_main


class MarkerPayload:
    """Unpickling this object calls ``open(path, "w")``: the file appears only if the loader ran code."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"policy": {}}, "payload": MarkerPayload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_export_refuses_a_crafted_checkpoint(tmp_path):
    path, marker = _crafted(tmp_path)
    with pytest.raises(ValueError, match=r"--ckpt .*crafted.ckpt: refused.*weights_only=True"):
        export_main(["--ckpt", str(path), "--out", str(tmp_path / "out")])
    assert not marker.exists()


def test_weights_only_false_loads_a_trusted_checkpoint_file(tmp_path):
    # the opt-out reaches the loader for a file path too: a real checkpoint plus a pickled object resumes
    args = [
        *arithmetic_args(),
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
    ]
    run_cli(tmp_path, *args, "--trainer.max_steps=1")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["payload"] = MarkerPayload(marker)
    torch.save(checkpoint, tmp_path / "trusted.ckpt")
    cli = run_cli(
        tmp_path,
        *args,
        "--trainer.max_steps=2",
        f"--ckpt_path={tmp_path / 'trusted.ckpt'}",
        "--weights_only=false",
    )
    assert cli.trainer.global_step == 2 and marker.exists()  # resumed, the pickled object unpickled


def test_resume_refuses_a_crafted_checkpoint_whatever_the_environment(tmp_path, monkeypatch):
    path, marker = _crafted(tmp_path)
    monkeypatch.setenv(
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1"
    )  # torch's own default would then be to unpickle
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_cli(tmp_path, *arithmetic_args(), "--trainer.max_steps=1", f"--ckpt_path={path}")
    assert not marker.exists()
