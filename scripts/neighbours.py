"""Busy neighbour processes for benchmarks: the kinds of load other jobs put on a shared CPU machine.

    from scripts.neighbours import start_neighbours, stop_neighbours
    procs = start_neighbours("spin", 2)
    try:
        ...  # the measurement
    finally:
        stop_neighbours(procs)

    python scripts/neighbours.py spin 2 --seconds 60     # run some by hand (Ctrl-C stops them)

Kinds (``n`` = how many independent neighbours):
    busy   a pure-Python busy loop (one thread, never sleeps)
    spin   a torch process with 2 OpenMP threads and libgomp's default spin (torch imported first, the wait
           knobs cleared) running small kernels back to back: its worker threads spin between regions
    active like ``spin`` with ``OMP_WAIT_POLICY=ACTIVE`` (the workers never sleep)
    gloo   a 2-process ``torch.distributed`` gloo job (2 torch threads each): rank 0 computes small kernels
           for a few milliseconds, rank 1 waits for it in an all-reduce, over and over
    fit    ``python -m trgrpo fit --config configs/demo.yaml`` (logger and checkpoints off, 2 torch threads,
           long enough to outlast a benchmark) in a temporary folder

Each neighbour is its own process group (``start_new_session``), so ``stop_neighbours`` ends it with all its
children (gloo ranks, dataloader workers): SIGTERM to the group, SIGKILL to what is left after ``timeout``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("busy", "spin", "active", "gloo", "fit")
WAIT_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

BUSY = "while True: pass"

# torch imported first: the OpenMP runtime reads the environment then, with no default from trgrpo
SPIN = """
import torch
torch.set_num_threads(2)
x, w = torch.randn(128, 512), torch.randn(512, 512)
while True:
    for _ in range(200):
        y = torch.relu(x @ w)
        x = torch.tanh(y * 0.5 + 0.1)
"""

GLOO = """
import os, sys, torch, torch.distributed as dist
rank = int(sys.argv[1])
torch.set_num_threads(2)
dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
x, w, t = torch.randn(128, 512), torch.randn(512, 512), torch.zeros(1024)
while True:
    if rank == 0:  # a few milliseconds of small kernels while rank 1 waits in the collective
        for _ in range(20):
            x = torch.tanh(torch.relu(x @ w) * 0.5 + 0.1)
    dist.all_reduce(t)
"""

GLOO_LAUNCH = """
import socket, subprocess, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = str(s.getsockname()[1]); s.close()
procs = [subprocess.Popen([sys.executable, "-c", sys.argv[1], str(r), port]) for r in range(2)]
for p in procs:
    p.wait()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_KNOBS}
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **extra)
    return env


def _fit_command(folder: str, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trgrpo",
        "fit",
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.max_steps={steps}",
        "--trainer.logger=false",
        "--trainer.val_check_interval=100000",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]",  # no warm-start to wait for: RL steps from the first second
        f"--trainer.default_root_dir={folder}",
    ]


def _start_one(kind: str, folder: str) -> subprocess.Popen:
    common = dict(cwd=folder, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind == "busy":
        return subprocess.Popen([sys.executable, "-c", BUSY], env=_env(), **common)
    if kind in ("spin", "active"):
        extra = {"OMP_WAIT_POLICY": "ACTIVE"} if kind == "active" else {}
        return subprocess.Popen([sys.executable, "-c", SPIN], env=_env(**extra), **common)
    if kind == "gloo":
        return subprocess.Popen([sys.executable, "-c", GLOO_LAUNCH, GLOO], env=_env(), **common)
    if kind == "fit":
        return subprocess.Popen(_fit_command(folder, 100_000), env=_env(OMP_NUM_THREADS="2"), **common)
    raise ValueError(f"neighbour kind {kind!r}: choose from {', '.join(KINDS)}")


def start_neighbours(kind: str, n: int) -> list[subprocess.Popen]:
    """Start ``n`` neighbours of ``kind`` (see the module docstring); returns their processes (each the
    leader of its own process group, with ``.folder`` its temporary working folder).  ``n = 0``: none.
    ValueError for an unknown kind or a negative n, before anything starts."""
    if kind not in KINDS:
        raise ValueError(f"neighbour kind {kind!r}: choose from {', '.join(KINDS)}")
    if n < 0:
        raise ValueError(f"neighbour count must be >= 0, got {n}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            folder = tempfile.mkdtemp(prefix=f"neighbour-{kind}-")
            proc = _start_one(kind, folder)
            proc.folder = folder  # type: ignore[attr-defined]
            procs.append(proc)
    except BaseException:
        stop_neighbours(procs)
        raise
    return procs


def stop_neighbours(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """End each neighbour's whole process group: SIGTERM, then SIGKILL after ``timeout`` seconds; removes
    their temporary folders.  Safe to call twice and on neighbours that already exited."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may outlive its leader (the gloo ranks): kill what is left either way
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        folder = getattr(p, "folder", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("n", type=int)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    procs = start_neighbours(args.kind, args.n)
    try:
        time.sleep(args.seconds)
    except KeyboardInterrupt:
        pass
    finally:
        stop_neighbours(procs)


if __name__ == "__main__":
    main()
