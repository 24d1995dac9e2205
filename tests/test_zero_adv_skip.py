"""Skipping zero-advantage sequences (``optim.skip_zero_advantage``) leaves the update unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from trgrpo.config import LossConfig, OptimConfig
from trgrpo.module import GRPOModule
from trgrpo.policy import PolicyConfig, TinyModelConfig
from trgrpo.rewards import RewardSpec
from trgrpo.rollout import SamplingConfig

G = 4


def parity_reward(prompts, completions, dead, **kwargs):
    """Live groups: parity of the characters' code sum (varies inside a group); dead groups: always 0."""
    return [0.0 if d else float(sum(map(ord, c)) % 2) for c, d in zip(completions, dead, strict=True)]


def _rows(dead_pattern: list[list[bool]]) -> list[dict]:
    return [
        {"prompt": f"{i}+{j}=", "dead": d} for i, step in enumerate(dead_pattern) for j, d in enumerate(step)
    ]


def _train(skip: bool, dead_pattern, monkeypatch=None, **loss):
    module = GRPOModule(
        policy=PolicyConfig(
            tiny=TinyModelConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            )
        ),
        sampling=SamplingConfig(group_size=G, max_new_tokens=6, temperature=1.5),
        loss=LossConfig(**loss),
        optim=OptimConfig(lr=1e-3, skip_zero_advantage=skip),
        rewards=[RewardSpec(fn=parity_reward)],
    )
    scored = []
    score = module.scorer.score

    def spy(model, rollout, idx, entropy=None, **kwargs):
        if torch.is_grad_enabled():  # the policy's training passes (not the reference model's scoring)
            scored.append(len(idx))
        return score(model, rollout, idx, entropy, **kwargs)

    module.scorer.score = spy
    L.seed_everything(0, verbose=False)
    rows = _rows(dead_pattern)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(dead_pattern),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(
        rows,
        batch_size=len(dead_pattern[0]),
        shuffle=False,
        collate_fn=lambda b: {k: [r[k] for r in b] for k in b[0]},
    )
    trainer.fit(module, train_dataloaders=loader)
    return {k: v.detach().clone() for k, v in module.policy_model.state_dict().items()}, scored


def _initial():
    module = GRPOModule(
        policy=PolicyConfig(
            tiny=TinyModelConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            )
        )
    )
    module.configure_model()
    return {k: v.detach().clone() for k, v in module.policy_model.state_dict().items()}


# step 1: two of four groups have no reward spread; step 2: none has any (a zero-gradient optimiser step)
PATTERN = [[True, False, True, False], [True, True, True, True]]


def test_skipping_gives_the_same_weights_and_trains_fewer_sequences():
    full, scored_full = _train(False, PATTERN)
    skipped, scored_skip = _train(True, PATTERN)
    init = _initial()
    moved = max((full[k] - init[k]).abs().max().item() for k in full)
    assert moved > 1e-4  # the steps really changed the weights
    # The two runs sum the gradients over different batch shapes; AdamW divides each gradient by its own size,
    # so the float noise of near-zero gradients becomes noise of the order of the step (lr 1e-3), whatever the
    # weight: measured 7e-7.  Absolute tolerance of 1% of a step; a gradient off by 2x (a wrong normaliser)
    # moves the weights by ~3e-4.
    for k in full:
        torch.testing.assert_close(skipped[k], full[k], rtol=0, atol=1e-5, msg=k)
    assert sum(scored_full) == 2 * len(PATTERN[0]) * G
    assert sum(scored_skip) == 2 * G  # only the two live groups of step 1 went through forward/backward


@pytest.mark.parametrize("loss", [{"entropy_coef": 0.01}, {"beta": 0.1}], ids=["entropy_bonus", "kl"])
def test_no_skipping_when_another_term_needs_the_sequences(loss):
    _, scored = _train(True, PATTERN[:1], **loss)
    assert sum(scored) == len(PATTERN[0]) * G


def test_a_step_that_trains_nothing_logs_nan_not_the_last_steps_values(tmp_path):
    """When every group has equal rewards nothing is trained, so entropy and the gradient shares have no value
    that step; Lightning would write the previous step's values again, which reads as a healthy policy."""
    import csv

    import helpers
    from helpers import arithmetic_args, run_cli

    helpers.SPREAD_CALLS[0] = 0
    cli = run_cli(
        tmp_path,
        *arithmetic_args(4, 4, 4),
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        "--model.rewards=[{fn: helpers.spread_once}]",
        "--model.sampling.temperature=1.5",
    )
    path = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    rows = [r for r in csv.DictReader(path.open()) if r.get("train/rl_step")]
    assert [float(r["train/rl_step"]) for r in rows] == [1.0, 2.0, 3.0]
    first, later = rows[0], rows[1:]
    assert float(first["train/frac_reward_zero_std"]) < 1 and float(first["train/entropy"]) > 0
    for row in later:
        assert float(row["train/frac_reward_zero_std"]) == 1.0 and float(row["train/grad_norm"]) == 0.0
        for key in ("train/entropy", "train/grad_share/p<0.1"):
            if key in first and first[key] != "":
                assert row[key] in ("", "nan") or math.isnan(float(row[key])), (key, row[key], first[key])
