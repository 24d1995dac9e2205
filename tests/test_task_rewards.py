"""A task that brings its own rewards (``Task.rewards()``): used when ``model.rewards`` is empty, never over
rewards the config names."""

from __future__ import annotations

from helpers import arithmetic_args, run_cli

from trgrpo.rewards import RewardSpec
from trgrpo.tasks import ArithmeticTask


def starts_with_digit(prompts, completions, **_):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


class ArithmeticWithOwnRewards(ArithmeticTask):
    def rewards(self):
        return [RewardSpec(fn=starts_with_digit, weight=0.5, name="digit_first")]


TASK = f"--data.task={__name__}.ArithmeticWithOwnRewards"


def test_the_tasks_rewards_are_used_when_the_config_names_none(tmp_path):
    cli = run_cli(
        tmp_path, *arithmetic_args(), TASK, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"
    )
    assert [(r.label, r.weight) for r in cli.model.rewards] == [("digit_first", 0.5)]
    assert cli.model.evaluator.rewards == cli.model.rewards
    logged = cli.trainer.logged_metrics
    assert "train/rewards/digit_first" in logged and "train/rewards/exact_match" not in logged


def test_configured_rewards_win_over_the_tasks(tmp_path):
    cli = run_cli(
        tmp_path,
        *arithmetic_args(),
        TASK,
        "--model.rewards=[{fn: trgrpo.rewards.exact_match}]",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
    )
    assert [r.label for r in cli.model.rewards] == ["exact_match"]
