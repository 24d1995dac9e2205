"""Learning test: a tiny random policy learns a dense reward in about a minute of CPU.

The reward is the share of digits in a 4-token completion; a random policy over ~110 characters
starts near 0.1.  If the update had the wrong sign or no effect, the reward would not rise.
"""

from __future__ import annotations

import csv
from pathlib import Path

from helpers import DENSE_REWARD, run_cli


def _reward_curve(log_dir: Path) -> list[float]:
    with open(log_dir / "metrics.csv") as fh:
        return [float(r["train/reward"]) for r in csv.DictReader(fh) if r.get("train/reward")]


def test_reward_rises_on_a_learnable_task(tmp_path):
    cli = run_cli(
        tmp_path,
        "--seed_everything=0",
        "--trainer.max_steps=40",
        "--trainer.limit_val_batches=0",
        "--data.task=trgrpo.tasks.ArithmeticTask",
        "--data.task.init_args.train_size=64",
        "--data.task.init_args.val_size=8",
        "--data.batch_size=8",
        "--model.sampling.group_size=8",
        "--model.sampling.max_new_tokens=4",
        "--model.optim.lr=0.003",
        DENSE_REWARD,
        "--model.weighting=TokenRegulatedWeighting",
    )
    curve = _reward_curve(Path(cli.trainer.log_dir))
    assert len(curve) == 40
    start, end = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert start < 0.3, curve[:5]
    assert end > start + 0.3, (start, end)
