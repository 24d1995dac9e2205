"""Settings that would fail late fail (or warn) at start-up, naming the key, before any model is loaded.

Every case runs the real CLI in-process with model and tokenizer loading replaced by a function that fails
the test, so an error that comes only after a model load shows up as that failure.

    python -m pytest tests/test_startup_checks.py -q
"""

from __future__ import annotations

import logging

import pytest
from helpers import arithmetic_args, run_cli


def wrong_column(prompts, completions, solution):  # the arithmetic task has "answer", not "solution"
    return [0.0] * len(completions)


def wrong_signature(completion):  # TRL's name is "completions"
    return [0.0]


def limited(prompts, completions, limit: int = 10, **_):
    return [0.0] * len(completions)


def strict_limited(prompts, completions, limit: int = 10):
    return [0.0] * len(completions)


def _fit(tmp_path, *args):
    return run_cli(tmp_path, *arithmetic_args(), "--trainer.max_steps=2", *args)


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("{fn: test_startup_checks.wrong_column}", r"'wrong_column'.*needs the column 'solution'.*'answer'"),
        ("{fn: test_startup_checks.wrong_signature}", r"'wrong_signature'.*needs the column 'completion'"),
        (
            "{fn: test_startup_checks.strict_limited, kwargs: {limt: 3}}",
            r"'strict_limited'.*kwargs \['limt'\]",
        ),
    ],
)
def test_rewards_are_checked_against_a_task_row_before_any_model(tmp_path, no_model, reward, message):
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, f"--model.rewards=[{reward}]")


def test_a_reward_that_fits_the_task_passes_the_check(tmp_path, no_model):
    with pytest.raises(AssertionError, match="loaded before"):  # past the checks, at the model load
        _fit(tmp_path, "--model.rewards=[{fn: test_startup_checks.limited, kwargs: {limit: 3}}]")


def test_negative_top_k_is_refused(tmp_path, no_model):
    with pytest.raises(ValueError, match=r"model.sampling.top_k must be >= 0 \(0 = off\), got -1"):
        _fit(tmp_path, "--model.sampling.top_k=-1")


def test_missing_local_model_folder_is_named(tmp_path, no_model):
    missing = tmp_path / "models" / "qwen-local"
    with pytest.raises(
        ValueError, match=rf"model.policy.name_or_path: the local folder '{missing}' does not exist"
    ):
        _fit(tmp_path, f"--model.policy.name_or_path={missing}")


def test_unwritable_output_folders_fail_at_start_up(tmp_path, no_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"dirpath: cannot write to the folder .*a_file/ckpt"):
        _fit(
            tmp_path,
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
            f"--trainer.callbacks.dirpath={blocker / 'ckpt'}",
        )
    with pytest.raises(ValueError, match=r"trainer.logger \(CSVLogger\).init_args.save_dir: cannot write"):
        run_cli(
            tmp_path,
            *arithmetic_args(),
            "--trainer.max_steps=2",
            f"--trainer.logger.init_args.save_dir={blocker / 'logs'}",
        )


def test_intervals_longer_than_the_run_are_reported_at_start_up(tmp_path, no_model, caplog):
    with caplog.at_level(logging.WARNING, logger="trgrpo.cli"), pytest.raises(AssertionError, match="loaded"):
        _fit(
            tmp_path,
            "--trainer.val_check_interval=50",
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
            "--trainer.callbacks.every_n_train_steps=10",
        )
    assert "trainer.val_check_interval=50 exceeds trainer.max_steps=2" in caplog.text
    assert "every_n_train_steps=10 exceeds trainer.max_steps=2" in caplog.text


def test_val_check_interval_longer_than_an_epoch_counts_rl_steps_across_epochs(tmp_path):
    # 8 prompts, 2 a step: 4 steps an epoch; an evaluation at RL step 5 is in the second epoch
    cli = run_cli(
        tmp_path,
        *arithmetic_args(),
        "--data.task.init_args.train_size=8",
        "--trainer.max_steps=5",
        "--trainer.val_check_interval=5",
        "--trainer.limit_val_batches=1",
    )
    steps = [step for step, _ in cli.model.eval_history]  # before RL, the in-run evaluation, after RL
    assert cli.trainer.global_step == 5 and steps == [0, 5, 5]
