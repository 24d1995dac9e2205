"""``RandomStreams``: every random stream a resumed run must continue, with one owner.

A resumed run samples exactly what the uninterrupted one would have only if each stream it draws from picks
up where it stopped: torch (CPU and CUDA), Python's ``random``, NumPy, and the module's own named
``torch.Generator`` objects (the mini-batch order).  ``GRPOModule`` owns one ``RandomStreams`` and is its
only caller for checkpoints; the SIGTERM handler asks it for a snapshot before each step and puts that back
when it abandons the step, and the module sets the streams aside around validation.

    streams = RandomStreams(shuffle=generator)
    checkpoint["trgrpo"]["rng"] = streams.gather(world)   # one entry per process, in rank order
    streams.resume_from(checkpoint["trgrpo"]["rng"], rank, world)
    streams.restore_pending()                              # right before the first step after resume
    streams.derive_for_process(seed, rank)                 # once, when training starts: one stream a process

Every process runs ``seed_everything`` with the same seed, so without ``derive_for_process`` the sampling
noise (the ``fast`` / ``hf`` engines' draws, vLLM's per-request seeds) would repeat on every process and
the global batch would hold copies of one process's samples.  Rank 0 keeps the run seed's stream (a
one-process run draws what it always drew); rank ``r`` re-seeds torch, NumPy and Python from
``process_seed(seed, r)``.  The named generators (the mini-batch order) are left alone.

A state is plain tensors and lists, so a checkpoint holding it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
import torch.distributed as dist

from trgrpo.world import is_distributed

log = logging.getLogger(__name__)


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s streams: ``seed`` itself for rank 0, else a 63-bit mix of both (NumPy's
    ``SeedSequence``): unlike ``seed + rank``, process 1 of seed 0 does not replay process 0 of seed 1."""
    if rank == 0:
        return seed
    words = np.random.SeedSequence([seed % 2**63, rank]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


class RandomStreams:
    """The global random streams and named generators (``shuffle=generator``), captured and restored together.

    Args:
        generators: the owner's own ``torch.Generator`` objects, stored under these names.
    """

    def __init__(self, **generators: torch.Generator) -> None:
        self.generators = generators
        self._pending: dict | None = None  # queued by resume_from, restored by restore_pending
        self._aside: dict | None = None  # kept by set_aside, restored by put_back

    def capture(self) -> dict:
        """This process's streams now, as plain tensors and lists."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "generators": {name: g.get_state() for name, g in self.generators.items()},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def restore(self, state: dict) -> None:
        """Put back a state of :meth:`capture` (a generator it does not name is left as it is)."""
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for name, g in self.generators.items():
            if name in state["generators"]:
                g.set_state(state["generators"][name])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def derive_for_process(self, seed: int, rank: int) -> None:
        """Re-seed torch (CPU and CUDA), NumPy and Python from ``process_seed(seed, rank)``: one stream per
        process; rank 0's stream is left as the run seed made it.  A resumed run then restores each
        process's own saved state over it (``restore_pending``)."""
        if rank == 0:
            return
        derived = process_seed(seed, rank)
        torch.manual_seed(derived)  # all CUDA devices too
        np.random.seed(derived % 2**32)
        random.seed(derived)

    def gather(self, world: int) -> list[dict]:
        """Every process's state, in rank order (one entry without a process group); all processes call it."""
        state = self.capture()
        if world == 1 or not is_distributed():
            return [state]
        states: list = [None] * world
        dist.all_gather_object(states, state)
        return states

    def resume_from(self, states: list[dict], rank: int, world: int) -> None:
        """Queue this process's entry of :meth:`gather` for :meth:`restore_pending` (a warning when the world
        size changed: the streams then do not continue exactly)."""
        if len(states) != world:
            log.warning(
                "resuming on %d processes from a checkpoint of %d: random streams are not continued exactly",
                world,
                len(states),
            )
        self._pending = states[rank % len(states)]

    def restore_pending(self) -> None:
        """Restore the state queued by :meth:`resume_from`, once (nothing when none is queued)."""
        pending = self._pending
        self._pending = None
        if pending is not None:
            self.restore(pending)

    def set_aside(self) -> None:
        """Keep the current state until :meth:`put_back`, so what runs in between leaves the streams alone."""
        self._aside = self.capture()

    def put_back(self) -> None:
        """Restore the state kept by :meth:`set_aside`, once (nothing when none is kept)."""
        aside = self._aside
        self._aside = None
        if aside is not None:
            self.restore(aside)


__all__ = ["RandomStreams", "process_seed"]
