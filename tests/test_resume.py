"""Long runs: ``--ckpt_path last`` after a SIGKILL continues exactly; checkpoints are never half-written.

The kill test runs the real CLI in subprocesses (tiny model, CPU): one uninterrupted run, and one run that
is killed with SIGKILL by the test in the middle of an RL step, then resumed from the last checkpoint.  The
resumed run must log the same metrics, step for step, as the uninterrupted one: same prompts (sampler
position), same samples (torch RNG), same mini-batch order (the module's generator), same optimiser and
schedule.  The file is also the subprocess script: ``python tests/test_resume.py STOP_AT CLI_ARGS...``
(``STOP_AT`` >= 0: at that global step, announce it on stdout and wait to be killed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, arithmetic_args, run_cli, train_rows
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trgrpo.checkpointing import AtomicModelCheckpoint, partial_path, write_atomically
from trgrpo.random_streams import RandomStreams

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# 12 prompts, 2 per step: an epoch is 6 RL steps; 2 mini-batches per step, so global_step advances by 2
RUN = [
    *arithmetic_args(batch_size=2, group_size=4, max_new_tokens=3),
    "--data.task.init_args.train_size=12",
    "--model.optim.mini_batch_size=4",
    "--model.optim.lr=0.01",
    "--model.loss.beta=0.05",
    "--model.sampling.temperature=1.5",
    # the random tiny model never answers right: reward containing a digit, so groups differ
    '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": ".*[0-9].*"}}]',
    "--trainer.max_steps=18",
    "--trainer.enable_checkpointing=true",
]


def checkpointing(dirpath: Path, every: int = 8) -> list[str]:
    return [
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={dirpath}",
        f"--trainer.callbacks.every_n_train_steps={every}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
    ]


def _cli_command(tmp: Path, logs: str, stop_at: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "test_resume.py"),
        str(stop_at),
        "fit",
        *TINY,
        *RUN,
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp / logs}",
        f"--trainer.default_root_dir={tmp}",
        *checkpointing(tmp / "ckpt"),
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_last_gives_the_uninterrupted_metrics(tmp_path):
    full = subprocess.run(
        _cli_command(tmp_path / "full", "logs", -1), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stderr[-5000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli_command(run, "logs1", 12),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for (
            line
        ) in proc.stdout:  # the child reaches global step 12: inside the 7th RL step, after checkpoint 8
            if line.startswith("STOPPED AT 12"):
                break
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    saved = torch.load(run / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 8

    resumed = subprocess.run(
        _cli_command(run, "logs2", -1, "--ckpt_path=last"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]

    expected, got = train_rows(tmp_path / "full" / "logs"), train_rows(run / "logs2")
    assert len(expected) == 9 and sorted(got) == sorted(expected)[4:]  # RL steps 5..9, across the epoch end
    for step, row in got.items():
        assert row.keys() == expected[step].keys()
        for key, value in row.items():
            if key.startswith("train/time/"):  # wall-clock seconds of each phase: never reproducible
                continue
            assert value == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9, nan_ok=True), (step, key)
    rewards = {round(r["train/reward"], 6) for r in got.values()}
    assert len(rewards) > 1 and max(rewards) > 0  # the compared steps sampled different things


def _draws(generator: torch.Generator) -> tuple:
    """One value from every stream a resumed run must continue."""
    return (
        torch.rand(2).tolist(),
        random.random(),
        float(np.random.rand()),
        torch.rand(2, generator=generator).tolist(),
    )


def test_random_streams_continue_every_stream_from_a_state_and_once_after_resume():
    shuffle = torch.Generator().manual_seed(0)
    streams = RandomStreams(shuffle=shuffle)
    (state,) = streams.gather(world=1)  # no process group: this process's entry alone
    first = _draws(shuffle)
    streams.restore(state)
    assert _draws(shuffle) == first
    streams.resume_from([state, streams.capture()], rank=0, world=2)  # rank 0's entry is queued ...
    assert _draws(shuffle) != first  # ... and nothing is restored before restore_pending
    streams.restore_pending()
    assert _draws(shuffle) == first
    streams.restore_pending()  # once only
    assert _draws(shuffle) != first


def test_random_streams_set_aside_and_put_back_leave_them_as_they_were():
    shuffle = torch.Generator().manual_seed(0)
    streams = RandomStreams(shuffle=shuffle)
    state = streams.capture()
    expected = _draws(shuffle)
    streams.restore(state)
    streams.set_aside()
    _draws(shuffle)  # what validation would draw
    streams.put_back()
    assert _draws(shuffle) == expected
    loaded = torch.load(_saved(state), weights_only=True)  # plain tensors and lists: loads without code
    assert loaded["generators"]["shuffle"].equal(state["generators"]["shuffle"])


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


class TornWriteError(RuntimeError):
    pass


class TornWriter(TorchCheckpointIO):
    """Writes the first half of the bytes of the ``fail_at``-th checkpoint, then dies (raises)."""

    def __init__(self, fail_at: int = 2) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.calls += 1
        if self.calls < self.fail_at:
            return super().save_checkpoint(checkpoint, path, storage_options)
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise TornWriteError("killed while writing the checkpoint")


@pytest.mark.parametrize("atomic", [True, False])
def test_kill_while_writing_leaves_the_previous_last_checkpoint(tmp_path, atomic):
    callback = (
        "trgrpo.checkpointing.AtomicModelCheckpoint"
        if atomic
        else "lightning.pytorch.callbacks.ModelCheckpoint"
    )
    args = [
        *arithmetic_args(),
        "--trainer.max_steps=4",
        "--trainer.enable_checkpointing=true",
        f"--trainer.callbacks+={callback}",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
    ]
    with pytest.raises(TornWriteError):
        run_cli(tmp_path, *args, "--trainer.plugins=test_resume.TornWriter")
    last = tmp_path / "ckpt" / "last.ckpt"
    if not atomic:  # the control: a writer torn in half leaves plain ModelCheckpoint with a corrupt last.ckpt
        with pytest.raises(Exception):  # noqa: B017 (torch raises RuntimeError or pickle errors)
            torch.load(last, weights_only=False)
        return
    assert torch.load(last, weights_only=False)["global_step"] == 1  # the first save, intact
    assert partial_path(last).exists()  # the torn bytes went to the hidden partial file ...
    found = AtomicModelCheckpoint(dirpath=tmp_path / "ckpt")._find_last_checkpoints(None)
    assert found == {str(last)}  # ... which --ckpt_path last never picks up
    cli = run_cli(tmp_path, *args, "--ckpt_path=last")  # resumes, and the next save clears the partial file
    assert cli.trainer.global_step == 4 and not partial_path(last).exists()


def test_sigkill_inside_write_atomically_keeps_the_old_file(tmp_path):
    final = tmp_path / "last.ckpt"
    torch.save({"step": 1}, final)
    pid = os.fork()
    if pid == 0:  # child: start writing step 2, get SIGKILLed half-way

        def torn(path):
            path.write_bytes(b"\x80\x02half a pickle")
            os.kill(os.getpid(), signal.SIGKILL)

        write_atomically(final, torn)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert torch.load(final) == {"step": 1}
    write_atomically(final, lambda path: torch.save({"step": 3}, path))
    assert torch.load(final) == {"step": 3} and not partial_path(final).exists()


def test_atomic_checkpoint_folders_are_swapped_through_a_symlink(tmp_path):
    """DeepSpeed checkpoints are folders: each save lands in a new hidden folder, ``last.ckpt`` is
    re-pointed."""
    final = tmp_path / "last.ckpt"

    def folder(step):
        def write(path):
            path.mkdir()
            (path / "shard0.pt").write_text(str(step))

        return write

    write_atomically(final, folder(1))
    first = final.resolve()
    write_atomically(final, folder(2))
    assert final.is_symlink() and (final / "shard0.pt").read_text() == "2"
    assert not first.exists()  # the previous folder is removed once the link points at the new one
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("last")] == ["last.ckpt"]


def test_resume_from_a_different_model_shape_fails_before_training(tmp_path):
    args = [
        *arithmetic_args(),
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
    ]
    run_cli(tmp_path, *args, "--trainer.max_steps=1")
    with pytest.raises(
        ValueError, match=r"model.policy.tiny=.*'hidden_size': 32.*this run has .*'hidden_size': 16"
    ):
        run_cli(
            tmp_path, *args, "--trainer.max_steps=2", "--model.policy.tiny.hidden_size=16", "--ckpt_path=last"
        )
    # a checkpoint without the policy settings (written by hand, another tool...) is caught by its shapes
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    del ckpt["hyper_parameters"]["policy"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"embed_tokens.weight: checkpoint \(\d+, 32\) vs model \(\d+, 16\)"):
        run_cli(
            tmp_path,
            *args,
            "--trainer.max_steps=2",
            "--model.policy.tiny.hidden_size=16",
            f"--ckpt_path={tmp_path / 'bare.ckpt'}",
        )


if __name__ == "__main__":
    stop_at, cli_args = int(sys.argv[1]), sys.argv[2:]
    import trgrpo.module
    from trgrpo.cli import main

    if stop_at >= 0:
        update = trgrpo.module.GRPOModule.update

        def update_then_stop(self, *args, **kwargs):
            if self.global_step == stop_at:  # mid-step: rollout done, no update applied yet
                print(f"STOPPED AT {stop_at}", flush=True)
                time.sleep(600)
            return update(self, *args, **kwargs)

        trgrpo.module.GRPOModule.update = update_then_stop
    main(cli_args)
