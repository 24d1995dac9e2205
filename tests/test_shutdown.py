"""Stopping a run: SIGTERM stops it promptly with a resumable checkpoint and status 143; a kill leaves no
temporary files behind.

The runs are the real CLI in subprocesses (tiny model, CPU).  The file is also the subprocess script:
``python tests/test_shutdown.py MODE CLI_ARGS...`` with MODE ``run`` (plain), or ``kill-on-publish`` (SIGKILL
itself when a checkpoint file is about to be moved into the checkpoint folder: written, not yet published).
With ``TRGRPO_TEST_HANG_AT=N`` in the environment, the ``hang_at`` reward never returns from its N-th call.

    python -m pytest tests/test_shutdown.py -q
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from helpers import TINY, arithmetic_args, run_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_calls = 0


def hang_at(prompts, completions, **_):
    """The share of digits in 4 characters; never returns from call ``TRGRPO_TEST_HANG_AT``."""
    global _calls
    _calls += 1
    if os.environ.get("TRGRPO_TEST_HANG_AT") == str(_calls):
        print("HANGING", flush=True)
        time.sleep(3600)
    return [sum(ch.isdigit() for ch in c) / 4.0 for c in completions]


def _run_args(tmp: Path, max_steps: int) -> list[str]:
    return [
        *arithmetic_args(),
        "--data.task.init_args.train_size=12",
        f"--trainer.max_steps={max_steps}",
        "--model.rewards=[{fn: test_shutdown.hang_at}]",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=10",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
    ]


def _command(tmp: Path, mode: str, max_steps: int) -> list[str]:
    return [
        sys.executable,
        str(HERE / "test_shutdown.py"),
        mode,
        "fit",
        *TINY,
        *_run_args(tmp, max_steps),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp}",
        f"--trainer.default_root_dir={tmp}",
    ]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1", **extra}


def test_sigterm_while_a_reward_hangs_stops_at_once_with_a_resumable_checkpoint(tmp_path):
    # the reward hangs in the third RL step (its default 60 s timeout is far off):
    # SIGTERM must not wait for it
    proc = subprocess.Popen(
        _command(tmp_path, "run", 4),
        env=_env(TRGRPO_TEST_HANG_AT="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        states = []
        for line in proc.stdout:
            states += [line.split()[1]] if line.startswith("RNG ") else []
            if line.startswith("HANGING"):
                break
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143, proc.stderr.read()[-3000:]
        assert time.monotonic() - signalled < 15
    finally:
        proc.kill()
    assert "SIGTERM: stopping now (nothing of the current step was applied)" in proc.stderr.read()
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # the two finished steps; the abandoned one left no trace ...
    rng = saved["trgrpo"]["rng"][0]["torch"]
    assert hashlib.sha256(rng.numpy().tobytes()).hexdigest() == states[2]  # ... not even in the random state
    assert not list((tmp_path / "ckpt").glob(".*"))
    cli = run_cli(tmp_path / "resumed", *_run_args(tmp_path, 4), "--ckpt_path=last")  # resumes and finishes
    assert cli.trainer.global_step == 4


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_kill_during_a_checkpoint_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    killed = subprocess.run(
        _command(tmp_path, "kill-on-publish", 2),
        env=_env(TMPDIR=str(tmpdir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _files(tmpdir) == []  # nothing staged in the system temp folder ...
    assert _files(tmp_path / "ckpt") == [".last.ckpt.partial"]  # ... but next to the target, hidden
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    run_cli(tmp_path, *_run_args(tmp_path, 2))  # the next run's first save removes the stale partial file
    assert _files(tmp_path / "ckpt") == ["last.ckpt"] and _files(tmpdir) == []


if __name__ == "__main__":
    mode, cli_args = sys.argv[1], sys.argv[2:]
    import trgrpo.module
    from trgrpo.cli import main

    step = trgrpo.module.GRPOModule.training_step

    def announced_step(self, *args, **kwargs):
        print("RNG", hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(), flush=True)
        return step(self, *args, **kwargs)

    trgrpo.module.GRPOModule.training_step = announced_step
    if mode == "kill-on-publish":
        target = next(a.split("=", 1)[1] for a in cli_args if a.startswith("--trainer.callbacks.dirpath="))

        def killing(move):
            def move_then_die(src, dst, *args, **kwargs):
                if Path(dst).resolve().parent == Path(target).resolve():
                    os.kill(os.getpid(), signal.SIGKILL)
                return move(src, dst, *args, **kwargs)

            return move_then_die

        os.replace, shutil.move = killing(os.replace), killing(shutil.move)
    main(cli_args)
