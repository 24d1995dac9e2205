"""OpenMP defaults that degrade gracefully when other processes share the CPU cores.

torch's CPU kernels run on OpenMP threads.  By default libgomp (the OpenMP runtime of the Linux pip wheels)
lets an idle thread spin for about 300,000 iterations before it sleeps; the demo's many small kernels keep
it spinning, and when another process is busy on the same cores the spinning threads and that process fight
for them, every parallel region waiting for a descheduled thread: on 2 shared cores the demo took 613 s
instead of 75 s.  ``GOMP_SPINCOUNT=10000`` lets an idle thread spin briefly and then sleep: on a quiet
machine the demo is as fast as with the default (68 s vs 75 s), and with two busy processes on the same two
cores it took 245 s.  ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) did better under load (130 s) but made the
quiet run 1.5x slower (110 s), so it is the knob for a machine known to be shared.  The measurements:
``scripts/bench_threads.py`` and the README section "CPU threads on a shared machine".

The runtime reads the variables once, when torch is imported, so ``trgrpo/__init__.py`` applies the default
before anything imports torch, and only then: a program that imported torch before trgrpo keeps its
environment untouched.  A value you set wins (either variable)::

    OMP_WAIT_POLICY=PASSIVE python -m trgrpo fit --config configs/demo.yaml  # a machine shared with busy jobs
    OMP_WAIT_POLICY=ACTIVE python -m trgrpo fit ...                          # always spin (dedicated cores)
    GOMP_SPINCOUNT=300000 python -m trgrpo fit ...                           # libgomp's own default spin

Other OpenMP runtimes (macOS's libomp) ignore ``GOMP_SPINCOUNT``.

The fast sampler's decode loop runs on one thread when a decode step is small (:func:`decode_threads`): its
kernels are too small to gain from a second thread, and each is a parallel region whose barrier waits for
the other thread.  Next to busy processes the scheduler often stacks both threads of the process on one
core; a spinning thread then holds that core until preempted, and every one of the loop's thousands of
small regions costs a time slice (seen with libgomp's default spin, which applies whenever torch was
imported first): demo-sized rollouts took 3.0 s instead of 0.2 s.  ``TRGRPO_DECODE_THREADS`` overrides the
choice: ``auto`` (the default), ``0`` (torch's own thread count, never changed) or a thread count.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

THREAD_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}
"""Environment set when the user has set neither ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY``."""

USER_KNOBS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def apply_thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``THREAD_DEFAULTS`` unless the user set a wait knob or torch is imported already (too late to
    matter, and then the host program owns its threads).  Returns the variables it set."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or any(k in environ for k in USER_KNOBS):
        return {}
    added = {k: v for k, v in THREAD_DEFAULTS.items() if k not in environ}
    environ.update(added)
    return added


DECODE_THREADS_ENV = "TRGRPO_DECODE_THREADS"
DECODE_ONE_THREAD_FLOPS = 1e9
"""A decode step of fewer floating-point operations than this runs on one thread (``auto``): the demo's is
0.14 GFLOP (128 rows of a 0.5M-parameter model), the 30M-parameter benchmark model's 3.8 GFLOP (64 rows)."""


def decode_threads(flops_per_step: float, threads: int, environ: Mapping[str, str] | None = None) -> int:
    """Threads for a decode loop whose steps take ``flops_per_step`` each, in a process with ``threads``
    intra-op threads: ``TRGRPO_DECODE_THREADS`` when set to a count (0 = ``threads``), else (unset or
    ``auto``) 1 below :data:`DECODE_ONE_THREAD_FLOPS`, ``threads`` above.  ValueError naming the variable
    for any other value."""
    environ = os.environ if environ is None else environ
    value = environ.get(DECODE_THREADS_ENV, "").strip().lower()
    if value in ("", "auto"):
        return 1 if flops_per_step < DECODE_ONE_THREAD_FLOPS else threads
    if not value.isdigit():
        raise ValueError(f"{DECODE_THREADS_ENV}={value!r}: expected 'auto', 0 (torch's count) or a count")
    return int(value) or threads


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads; the count before it is restored after (also on an
    error).  Nothing is changed when ``n`` is already the count."""
    import torch

    before = torch.get_num_threads()
    if n == before:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
