"""The command line: every config parses, runs a smoke step, round-trips through --print_config; one run per
log folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import arithmetic_args, recipe_params, run_cli

from trgrpo.cli import main
from trgrpo.log_folder import LOCK_NAME, holder_alive, process_start

ROOT = Path(__file__).resolve().parents[1]
TOP_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def test_every_recipe_is_named_in_the_readme():
    # a recipe nobody can find is one nobody runs; a renamed one leaves the README's commands broken
    readme = (ROOT / "README.md").read_text()
    assert TOP_CONFIGS, "no recipes under configs/: the parametrized tests below would run nothing"
    missing = [p.name for p in TOP_CONFIGS if f"configs/{p.name}" not in readme]
    assert not missing, f"recipes the README never names: {missing}"


@pytest.mark.parametrize("config", recipe_params(TOP_CONFIGS, lambda p: p.name))
def test_every_config_parses(config):
    # GPU recipes keep their accelerator in the file; building the Trainer here needs the CPU one
    cli = main(["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.slow
def test_demo_config_smoke_step(tmp_path):
    cli = run_cli(
        tmp_path,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--data.val_batch_size=4",
        "--data.batch_size=2",
        "--model.sampling.group_size=2",
        "--trainer.callbacks+=trgrpo.callbacks.RewardPlot",
        config=str(ROOT / "configs" / "demo.yaml"),
    )
    assert cli.trainer.global_step == 2
    log_dir = Path(cli.trainer.log_dir)
    metrics = (log_dir / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for key in [
        "train/reward",
        "train/reward_std",
        "train/frac_reward_zero_std",
        "train/completion_length",
        "train/truncated_ratio",
        "train/clip_ratio/low",
        "train/clip_ratio/high",
        "train/entropy",
        "train/grad_norm",
        "train/weight/mean",
        "train/weight/min",
        "train/weight/max",
        "train/weight/at_lower",
        "train/weight/at_upper",
        "train/rewards/exact_match",
        "val/accuracy",
    ]:
        assert key in header, key
    assert (log_dir / "reward_accuracy.png").stat().st_size > 1000


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                "--model.weighting=AdvantageReweighting",
                "--model.weighting.init_args.alpha=0.3",
                "--print_config",
            ]
        )
    text = capsys.readouterr().out
    parsed = yaml.safe_load(text)
    assert parsed["model"]["weighting"]["class_path"] == "trgrpo.weighting.AdvantageReweighting"
    assert parsed["model"]["weighting"]["init_args"]["alpha"] == 0.3
    dumped = tmp_path / "full.yaml"
    dumped.write_text(text)
    with pytest.raises(SystemExit):  # the printed YAML loads back and prints the same configuration
        main(["fit", "--config", str(dumped), "--print_config"])
    assert capsys.readouterr().out == text


def test_help_documents_options_from_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--model.loss.clip_high" in out and "clip-higher" in out
    assert "--model.sampling.group_size" in out and "completions sampled per prompt" in out


def test_weighting_swaps_by_short_name():
    cli = main(
        ["--config", str(ROOT / "configs" / "demo.yaml"), "--model.weighting=UniformWeighting"], run=False
    )
    assert type(cli.model.weighting).__name__ == "UniformWeighting"


def test_validate_subcommand_runs(tmp_path):
    cli = run_cli(
        tmp_path,
        "--data.task=trgrpo.tasks.ArithmeticTask",
        "--data.task.init_args.train_size=20",
        "--data.task.init_args.val_size=4",
        "--data.task.init_args.max_value=9",
        "--data.val_batch_size=4",
        "--model.sampling.max_new_tokens=3",
        subcommand="validate",
    )
    assert "val/accuracy" in cli.trainer.callback_metrics


# --------------------------------------------------------------------------- one run per log folder

VERSION = "--trainer.logger.init_args.version=shared"


def _versioned_fit(tmp_path, *extra: str):
    """A one-step run with a checkpoint, logged to the explicit version folder ``lightning_logs/shared``."""
    return run_cli(
        tmp_path,
        *arithmetic_args(),
        VERSION,
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        *extra,
    )


def test_a_second_run_into_a_used_version_folder_is_refused_unless_it_resumes(tmp_path):
    _versioned_fit(tmp_path, "--trainer.max_steps=1")
    folder = tmp_path / "lightning_logs" / "shared"
    before = {name: (folder / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    assert not (folder / LOCK_NAME).exists()  # released at the end of the run
    with pytest.raises(
        ValueError, match=r"init_args.version: the log folder .*shared holds an earlier run's logs"
    ):
        _versioned_fit(tmp_path, "--trainer.max_steps=2")
    assert {name: (folder / name).read_bytes() for name in before} == before  # nothing overwritten
    cli = _versioned_fit(tmp_path, "--trainer.max_steps=2", "--ckpt_path=last")  # resuming it is allowed
    assert cli.trainer.global_step == 2 and Path(cli.trainer.log_dir) == folder
    steps = [row.split(",")[0] for row in (folder / "metrics.csv").read_text().splitlines()]
    assert len(steps) > len(before["metrics.csv"].splitlines())  # the resumed run's rows follow the first's


def test_a_folder_locked_by_a_live_process_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    folder = tmp_path / "lightning_logs" / "shared"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"pid": holder.pid, "host": socket.gethostname(), "start": process_start(holder.pid)}
        (folder / LOCK_NAME).write_text(json.dumps(record))
        args = [*arithmetic_args(), VERSION, "--data.val_batch_size=4", "--trainer.limit_val_batches=1"]
        with pytest.raises(
            ValueError, match=rf"the log folder .*shared is in use by a running process \(pid {holder.pid}"
        ):
            run_cli(tmp_path, *args, subcommand="validate")
    finally:
        holder.kill()
        holder.wait()
    cli = run_cli(tmp_path, *args, subcommand="validate")  # its holder was killed: the lock is stale
    assert "val/accuracy" in cli.trainer.callback_metrics and not (folder / LOCK_NAME).exists()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale():
    me = {"pid": os.getppid(), "host": socket.gethostname(), "start": process_start(os.getppid())}
    assert holder_alive(me)
    assert not holder_alive({**me, "start": "1"})  # same pid, another start time: reused
    assert not holder_alive({})  # an empty lock file: its writer died before writing
    assert holder_alive({**me, "host": "another-machine"})  # unknowable there: treated as in use
