"""Dynamic sampling (``data.dynamic_sampling``): which groups are kept, the metrics, and an exact resume.

python -m pytest tests/test_dynamic_sampling.py -q
"""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from helpers import DENSE_REWARD, arithmetic_args, run_cli

from trgrpo.dynamic_sampling import (
    DynamicSampling,
    GroupFilter,
    apply_dynamic_sampling,
    keep_groups,
    select_groups,
)
from trgrpo.rewards import RewardResult
from trgrpo.rollout import Rollout


def test_groups_with_spread_are_kept_first_in_drawn_order_then_fillers():
    # G = 2, four groups: [1, 1] flat, [0, 1] spread, [0, 0] flat, [1, 0] spread
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert select_groups(rewards, 2, keep=2, min_spread=1e-6).tolist() == [1, 3]
    # keep 3: both spread groups, then the first flat group (0) fills the batch; kept in drawn order
    assert select_groups(rewards, 2, keep=3, min_spread=1e-6).tolist() == [0, 1, 3]
    # a spread of 0.5 is not more than min_spread=0.5: group [0.5, 1] counts as flat
    assert select_groups(torch.tensor([0.5, 1.0, 0.0, 1.0]), 2, keep=1, min_spread=0.5).tolist() == [1]


def _rollout(n: int, t: int = 3) -> Rollout:
    ids = torch.arange(n).unsqueeze(1).expand(n, 2 + t).clone()  # row i is all i: the row's identity
    return Rollout(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        completion_mask=torch.ones(n, t),
        truncated=torch.arange(n) % 2 == 0,
        prompt_len=2,
        completions=[str(i) for i in range(n)],
        sampler_logp=-torch.arange(n).float().unsqueeze(1).expand(n, t),
    )


def test_keep_groups_slices_every_rollout_field_and_counts():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    result = RewardResult(rewards, {"term": rewards * 2}, errors=1)
    rollout, kept, counts = keep_groups(_rollout(8), result, group_size=2, keep=3, min_spread=1e-6)
    rows = [0, 1, 2, 3, 6, 7]  # groups 0 (filler), 1 and 3
    assert rollout.input_ids[:, 0].tolist() == rows and rollout.completions == [str(i) for i in rows]
    assert rollout.truncated.tolist() == [i % 2 == 0 for i in rows]
    assert rollout.sampler_logp[:, 0].tolist() == [-float(i) for i in rows]
    assert torch.equal(rollout.trainable_mask, rollout.completion_mask) and rollout.trainable_mask.shape == (
        6,
        3,
    )
    assert (
        kept.total.tolist() == rewards[rows].tolist()
        and kept.per_term["term"].tolist() == (2 * rewards[rows]).tolist()
    )
    assert (counts.drawn, counts.dropped, counts.filled) == (4, 1, 1)
    # nothing to drop: the same objects
    same = keep_groups(_rollout(4), RewardResult(rewards[:4], {}, 0), 2, keep=2, min_spread=1e-6)
    assert same[2] == (2, 0, 0)


def test_the_group_filter_keeps_batch_size_groups_and_none_keeps_all():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    result = RewardResult(rewards, {}, errors=0)
    group_filter = DynamicSampling(min_spread=0.5).group_filter(batch_size=3)
    assert group_filter == GroupFilter(keep=3, min_spread=0.5)
    rollout, kept, counts = apply_dynamic_sampling(group_filter, _rollout(8), result, group_size=2)
    assert rollout.input_ids[:, 0].tolist() == [0, 1, 2, 3, 6, 7] and counts == (4, 1, 1)
    everything = _rollout(8)
    same, same_rewards, no_counts = apply_dynamic_sampling(None, everything, result, group_size=2)
    assert same is everything and same_rewards is result and no_counts is None  # off: every group, as drawn


def test_oversample_must_draw_more_than_the_batch():
    assert (
        DynamicSampling(oversample=1.5).draw_size(3) == 5 and DynamicSampling(oversample=2).draw_size(4) == 8
    )
    with pytest.raises(ValueError, match="data.dynamic_sampling.oversample must be > 1"):
        DynamicSampling(oversample=1.0)


class PromptRecorder(L.Callback):
    """The prompts of every training batch and the size of every trained rollout."""

    def __init__(self) -> None:
        self.prompts: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompts[trainer.global_step] = list(batch["prompt"])


# 12 prompts, 2 trained per step, 4 drawn: an epoch is 3 RL steps
RUN = [
    *arithmetic_args(batch_size=2, group_size=4, max_new_tokens=3),
    "--data.task.init_args.train_size=12",
    '--data.dynamic_sampling={"oversample": 2.0}',
    DENSE_REWARD,
    "--model.sampling.temperature=1.5",
    "--model.optim.lr=0.01",
    "--trainer.callbacks+=test_dynamic_sampling.PromptRecorder",
    "--trainer.val_check_interval=null",
    "--trainer.check_val_every_n_epoch=100",
]


def _metrics(folder) -> dict[int, dict[str, float]]:
    (path,) = folder.glob("**/metrics.csv")
    with open(path) as f:
        return {
            int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("train/") and v}
            for r in csv.DictReader(f)
            if r.get("train/loss")
        }


def _recorder(cli) -> PromptRecorder:
    return next(c for c in cli.trainer.callbacks if isinstance(c, PromptRecorder))


def test_dynamic_sampling_trains_full_batches_and_resumes_at_the_exact_data_position(tmp_path):
    ckpt = [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
    ]
    full = run_cli(tmp_path / "full", *RUN, *ckpt, "--trainer.max_steps=5")
    assert full.model.group_filter == GroupFilter(keep=2, min_spread=1e-6)  # handed over once by the CLI
    assert full.model.plan.sequences == 2 * 4  # every update trains on batch_size groups
    prompts = _recorder(full).prompts
    assert all(len(p) == 4 for p in prompts.values())  # ... out of 2 * batch_size drawn
    expected = _metrics(tmp_path / "full")
    assert all(
        row["train/dynamic_sampling/drawn"] == 4 and row["train/dynamic_sampling/dropped"] == 2
        for row in expected.values()
    )
    assert len(expected) == 5

    (step2,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    resumed = run_cli(tmp_path / "resumed", *RUN, "--trainer.max_steps=5", f"--ckpt_path={step2}")
    assert _recorder(resumed).prompts == {
        s: prompts[s] for s in (2, 3, 4)
    }  # same prompts, across the epoch end
    got = _metrics(tmp_path / "resumed")
    assert sorted(got) == [2, 3, 4]
    for step, row in got.items():
        for key, value in row.items():
            if not key.startswith("train/time/"):
                assert value == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9, nan_ok=True), (
                    step,
                    key,
                )
