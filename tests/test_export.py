"""Hugging Face export: at the end of fit (``HFExport``) and from a checkpoint (``trgrpo.export``).

Both must load with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and compute what the trained policy
computes.  Export from DeepSpeed ZeRO shards is covered in ``test_strategy_configs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import arithmetic_args, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from trgrpo.export import main as export_main

TRAIN = [
    *arithmetic_args(),
    "--trainer.max_steps=2",
    "--model.optim.lr=0.01",
    '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": ".*[0-9].*"}}]',
]


def _logits(model, tokenizer, text="12+7="):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run with a checkpoint and the end-of-fit export."""
    tmp = tmp_path_factory.mktemp("run")
    cli = run_cli(
        tmp,
        *TRAIN,
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=trgrpo.callbacks.HFExport",
        f"--trainer.callbacks.dirpath={tmp / 'hf'}",
    )
    return tmp, cli


def test_end_of_fit_export_loads_with_transformers_and_matches_the_policy(trained):
    tmp, cli = trained
    out = tmp / "hf"
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    policy = cli.model.policy_model.eval()
    assert (
        tok.get_vocab() == cli.model.tokenizer.get_vocab() and tok.eos_token == cli.model.tokenizer.eos_token
    )
    torch.testing.assert_close(_logits(model, tok), _logits(policy, tok), rtol=0, atol=1e-6)
    # and it is the trained policy, not the initial one
    initial = AutoModelForCausalLM.from_config(model.config)
    assert not torch.allclose(_logits(initial, tok), _logits(model, tok))


def test_model_card_holds_the_resolved_run_config(trained):
    tmp, cli = trained
    card = (tmp / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "2 optimiser steps" in card and "AutoModelForCausalLM.from_pretrained" in card
    # the usage the card gives loads the character tokenizer as trained: spaces kept, same ids
    assert 'tokenizer = PreTrainedTokenizerFast.from_pretrained("' in card
    tok = PreTrainedTokenizerFast.from_pretrained(tmp / "hf")
    text = "What is 12 + 3? 15"
    assert tok(text).input_ids == cli.model.tokenizer(text).input_ids
    assert tok.decode(tok(text).input_ids) == text
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["model"]["optim"]["lr"] == 0.01  # the CLI's saved config, with every section
    assert config["data"]["batch_size"] == 2 and config["trainer"]["max_steps"] == 2


def test_export_from_checkpoint_gives_the_same_model(trained, tmp_path):
    tmp, _ = trained
    out = export_main(["--ckpt", str(tmp / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "from-ckpt")])
    a = AutoModelForCausalLM.from_pretrained(out)
    b = AutoModelForCausalLM.from_pretrained(tmp / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)  # the same saved float32 values: exact
    assert "2 optimiser steps" in (out / "README.md").read_text()
    assert tok("3+4=").input_ids == AutoTokenizer.from_pretrained(tmp / "hf")("3+4=").input_ids


def test_export_can_cast_to_bfloat16(trained, tmp_path):
    tmp, _ = trained
    out = export_main(
        ["--ckpt", str(tmp / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    )
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_export_refuses_a_checkpoint_that_is_not_a_trgrpo_run(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a trgrpo GRPOModule checkpoint"):
        export_main(["--ckpt", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "x")])


def test_the_readme_names_no_weights_only_switch_the_export_lacks(tmp_path, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    claim = readme[readme.index("**Checkpoints never run code.**") :].split("\n- ", 1)[0]
    assert "fit --weights_only=false" in claim and "the export has no opt-out" in claim
    with pytest.raises(SystemExit):  # and indeed it has none: the option is refused, not ignored
        export_main(["--ckpt", "x.ckpt", "--out", str(tmp_path), "--weights_only=false"])
    assert "unrecognized arguments: --weights_only=false" in capsys.readouterr().err
