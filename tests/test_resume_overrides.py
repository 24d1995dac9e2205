"""Resume keeps the command line: ``--ckpt_path`` with changed settings, through the real CLI.

The rule (README, "Resuming: which settings may change"): the configuration given is the one that runs and
is saved as ``config.yaml``; settings that cannot change on resume (the model, the optimiser updates per RL
step) are refused before training, naming the key and both values.  Each test trains the tiny model for one
step with a checkpoint, then resumes from it, from the file path and from ``last``.

    python -m pytest tests/test_resume_overrides.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import arithmetic_args, run_cli

from trgrpo.resume import apply_group_settings


def _checkpointed(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *arithmetic_args(),
        "--model.optim.lr=0.01",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        *extra,
    ]


def _trained(tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """One RL step with a checkpoint; returns the arguments used and the checkpoint file."""
    args = _checkpointed(tmp_path, *extra)
    run_cli(tmp_path, *args, "--trainer.max_steps=1")
    return args, tmp_path / "ckpt" / "last.ckpt"


def _ckpt_arg(ckpt: Path, form: str) -> str:
    return f"--ckpt_path={ckpt if form == 'file' else 'last'}"


@pytest.mark.parametrize("form", ["file", "last"])
def test_resume_trains_and_saves_the_command_lines_settings(tmp_path, form):
    args, ckpt = _trained(tmp_path)
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["optim"]["lr"] == 0.01
    cli = run_cli(
        tmp_path,
        *args,
        "--trainer.max_steps=2",
        "--model.optim.lr=0.1",
        "--model.sampling.temperature=0.7",
        _ckpt_arg(ckpt, form),
    )
    assert cli.trainer.global_step == 2  # resumed, not started again
    assert cli.model.optim_cfg.lr == 0.1 and cli.model.sampling.temperature == 0.7
    # the optimiser restored from the checkpoint trains with the new rate, not the checkpoint's 0.01
    assert [g["lr"] for g in cli.trainer.optimizers[0].param_groups] == [0.1]
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["optim"]["lr"] == 0.1 and saved["model"]["sampling"]["temperature"] == 0.7


@pytest.mark.parametrize("form", ["file", "last"])
def test_resume_with_another_model_shape_fails_naming_both_values(tmp_path, form):
    args, ckpt = _trained(tmp_path)
    with pytest.raises(
        ValueError, match=r"model.policy.tiny=.*'hidden_size': 32.*this run has .*'hidden_size': 16"
    ):
        run_cli(
            tmp_path,
            *args,
            "--trainer.max_steps=2",
            "--model.policy.tiny.hidden_size=16",
            _ckpt_arg(ckpt, form),
        )


def test_resume_refuses_a_group_size_that_changes_the_updates_per_rl_step(tmp_path):
    # 2 prompts x 2 completions in mini-batches of 4: 1 update per RL step; group size 4 would make 2
    args, ckpt = _trained(tmp_path, "--model.sampling.group_size=2", "--model.optim.mini_batch_size=4")
    with pytest.raises(
        ValueError,
        match=r"model.sampling.group_size=4 \(the checkpoint has 2\): that makes 2 optimiser updates per RL "
        r"step where the checkpoint made 1",
    ):
        run_cli(
            tmp_path, *args, "--trainer.max_steps=4", "--model.sampling.group_size=4", f"--ckpt_path={ckpt}"
        )


def test_resume_takes_a_new_group_size_that_keeps_the_update_layout(tmp_path):
    args, ckpt = _trained(tmp_path)  # no mini-batches: one update per RL step whatever the group size
    cli = run_cli(
        tmp_path, *args, "--trainer.max_steps=2", "--model.sampling.group_size=2", f"--ckpt_path={ckpt}"
    )
    assert cli.trainer.global_step == 2 and cli.model.sampling.group_size == 2


def test_validate_from_a_checkpoint_file_reports_the_requested_eval(tmp_path):
    args, ckpt = _trained(tmp_path)
    cli = run_cli(
        tmp_path,
        *arithmetic_args(),
        "--model.eval.k=2",
        f"--ckpt_path={ckpt}",
        subcommand="validate",
    )
    assert {"val/accuracy", "val/mean@2", "val/pass@2"} <= set(cli.trainer.callback_metrics)


def test_a_new_learning_rate_keeps_the_warm_up_fraction():
    # a warm-up of 4 steps, 1 done: the restored group runs at 1/4 of its base rate 0.01; the new base 0.2
    # continues at 1/4 of 0.2 (the schedule's lambda is the fresh one, its base rate is fixed on resume)
    restored = {"lr": 0.0025, "initial_lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.0}
    fresh = {"lr": 0.05, "initial_lr": 0.2, "betas": (0.8, 0.9), "weight_decay": 0.1}
    apply_group_settings(restored, fresh)
    assert restored == {
        "lr": pytest.approx(0.05),
        "initial_lr": 0.2,
        "betas": (0.8, 0.9),
        "weight_decay": 0.1,
    }
    same = {"lr": 0.0025, "initial_lr": 0.01}
    apply_group_settings(same, {"lr": 0.0025 * 1.0000001, "initial_lr": 0.01})
    assert same == {"lr": 0.0025, "initial_lr": 0.01}  # unchanged settings come back bit for bit
