"""OpenMP defaults that degrade gracefully when other processes share the CPU cores.

torch's CPU kernels run on OpenMP threads.  By default libgomp (the OpenMP runtime of the Linux pip wheels)
lets an idle thread spin for a few milliseconds before it sleeps; the demo's many small kernels keep it
spinning, and when another process is busy on the same cores the spinning threads fight that process for
them while every parallel region waits for a descheduled thread: on 2 shared cores the demo took 15
minutes instead of 2.5.  ``OMP_WAIT_POLICY=PASSIVE`` (standard OpenMP, every runtime) makes idle threads
sleep at once.  ``python scripts/bench_threads.py`` on 2 cores, demo-sized workload: next to a busy
process PASSIVE took 0.03-0.09x the default's time; on an idle machine it costs about 1.2-1.5x (the
threads wake up for every kernel).  A short libgomp spin (``GOMP_SPINCOUNT=1000``) kept the idle
machine's speed but was 1.6x slower than PASSIVE when busy, and does nothing under other runtimes.

The runtime reads the variable once, when torch is imported, so ``trgrpo/__init__.py`` applies it before
anything imports torch, and only then: a program that imported torch before trgrpo keeps its environment
untouched.  A value you set wins, and so does ``GOMP_SPINCOUNT`` (then nothing is set)::

    OMP_WAIT_POLICY=ACTIVE python -m trgrpo fit ...   # always spin: fastest on cores nothing else uses
    GOMP_SPINCOUNT=300000 python -m trgrpo fit ...    # libgomp's own default (spin about 3 ms, then sleep)
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

THREAD_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment set when the user has not set it (nor ``GOMP_SPINCOUNT``, which overrides the policy)."""


def apply_thread_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of ``THREAD_DEFAULTS`` the user has not set, unless torch is imported already (too late to
    matter, and then the host program owns its threads).  Returns the variables it set."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in environ:
        return {}
    added = {k: v for k, v in THREAD_DEFAULTS.items() if k not in environ}
    environ.update(added)
    return added
