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
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

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
