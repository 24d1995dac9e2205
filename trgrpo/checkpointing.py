"""Checkpoints that survive being killed: atomic publishing and the random state of every process.

``AtomicModelCheckpoint`` is Lightning's ``ModelCheckpoint`` with one change: each checkpoint is first
written under a hidden ``.NAME.partial`` path and only then published under its real name, so a process
killed while writing (SIGKILL, pre-emption, out of memory) leaves the previous ``last.ckpt`` intact and
``--ckpt_path last`` never picks up a half-written file.  A file checkpoint is published with
``os.replace`` (atomic on POSIX); a directory checkpoint (DeepSpeed writes one folder of shards) cannot be
replaced atomically, so it is stored as ``.NAME.<n>`` and ``NAME`` is a symlink swapped atomically.

``capture_rng_states`` / ``restore_rng_states`` cover the random streams a resumed run must continue
(torch CPU and CUDA, Python, NumPy, plus named ``torch.Generator`` objects); ``GRPOModule`` stores one
entry per process (``gather_rng_states``).  ``check_policy_matches`` / ``check_state_shapes`` refuse a
checkpoint of another model before anything is loaded.  The data position is the sampler's job (``trgrpo.data.ResumableSampler``).

    trainer:
      callbacks:
        - class_path: trgrpo.checkpointing.AtomicModelCheckpoint
          init_args: {dirpath: checkpoints, every_n_train_steps: 50, save_last: true, save_top_k: 0}
    python -m trgrpo fit --config configs/kk_qwen2.5_3b.yaml --ckpt_path last
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


def partial_path(path: str | os.PathLike) -> Path:
    """Hidden sibling a checkpoint is written to before it is published (never matches ``last*.ckpt``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(partial: Path, final: Path) -> None:
    """Move a completely written checkpoint (file or folder) to ``final`` in one atomic step."""
    _fsync(partial)
    if partial.is_file():
        os.replace(partial, final)
        return
    previous = final.resolve() if final.is_symlink() else None
    n = 0
    while (store := final.with_name(f".{final.name}.{n}")).exists() or store.is_symlink():
        n += 1
    os.replace(partial, store)
    link = final.with_name(f".{final.name}.link")
    _remove(link)
    os.symlink(store.name, link)
    if final.exists() and not final.is_symlink():  # a plain folder from an earlier non-atomic save
        _remove(final)
    os.replace(link, final)
    if previous is not None and previous != store.resolve():
        _remove(previous)


def write_atomically(final: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Single-process form: ``write(partial)`` then publish; a crash inside ``write`` leaves ``final`` as it was."""
    final, partial = Path(final), partial_path(final)
    _remove(partial)
    final.parent.mkdir(parents=True, exist_ok=True)
    write(partial)
    publish(partial, final)


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files (and DeepSpeed folders) appear only once completely written.

    Takes every argument of ``lightning.pytorch.callbacks.ModelCheckpoint``.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final, partial = Path(filepath), partial_path(filepath)
        if trainer.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(partial)  # left over from a run killed while writing
        trainer.strategy.barrier("AtomicModelCheckpoint.clean")
        trainer.save_checkpoint(partial, self.save_weights_only)  # every process (DeepSpeed writes shards)
        if trainer.is_global_zero:
            publish(partial, final)
        trainer.strategy.barrier("AtomicModelCheckpoint.publish")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        path = Path(filepath)
        if path.is_symlink():
            if trainer.is_global_zero:
                target = path.resolve()
                path.unlink()
                _remove(target)
            trainer.strategy.barrier("AtomicModelCheckpoint.remove")
            return
        super()._remove_checkpoint(trainer, filepath)


# --------------------------------------------------------------------------- random state


def capture_rng_states(**generators: torch.Generator) -> dict:
    """This process's random streams as plain tensors / lists (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_states(state: dict, **generators: torch.Generator) -> None:
    """Inverse of :func:`capture_rng_states`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world: int, **generators: torch.Generator) -> list[dict]:
    """Every process's random state, in rank order (one entry without a process group)."""
    state = capture_rng_states(**generators)
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def pick_rng_state(states: list[dict], rank: int, world: int) -> dict:
    """This process's entry of :func:`gather_rng_states` (with a warning when the world size changed)."""
    if len(states) != world:
        log.warning("resuming on %d processes from a checkpoint of %d: random streams are not continued exactly",
                    world, len(states))
    return states[rank % len(states)]


# --------------------------------------------------------------------------- shape checks


def check_policy_matches(saved, current: dict, from_hub: bool) -> None:
    """Refuse to resume a checkpoint trained with another ``model.policy`` (name, tiny shape or LoRA).

    ``saved``: the checkpoint's ``hyper_parameters["policy"]`` (a dict when written through the CLI, else a
    dataclass); ``current``: this run's policy config as a dict; ``from_hub``: the policy is loaded by name,
    so the ``tiny`` settings do not apply.
    """
    if saved is None:
        return
    saved = dataclasses.asdict(saved) if dataclasses.is_dataclass(saved) else dict(saved)
    for key in ("name_or_path", "tiny", "lora"):
        if key == "tiny" and from_hub:
            continue
        old, new = saved.get(key), current.get(key)
        if old != new:
            raise ValueError(f"--ckpt_path: the checkpoint was trained with model.policy.{key}={old}, "
                             f"this run has model.policy.{key}={new}; resume with the same model")


def check_state_shapes(state: dict | None, current: dict[str, tuple]) -> None:
    """Refuse a checkpoint whose tensors do not fit the model (``current``: name -> shape), before loading.

    ``state`` None (DeepSpeed keeps the weights in its shard files) is not checked here.
    """
    if state is None:
        return
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {current[k]}"
             for k, v in state.items() if k in current and tuple(v.shape) != current[k]]
    missing = sorted(k for k in current if k not in state)
    if wrong or missing:
        raise ValueError("--ckpt_path: the checkpoint does not fit this model (different model shape?): "
                         + "; ".join(wrong[:5] + [f"missing {k}" for k in missing[:5]]))


def check_checkpoint_fits(checkpoint: dict, module) -> None:
    """Both checks above for a ``GRPOModule`` (its policy config, its parameters' shapes; ZeRO-3 shards report
    their full shape in ``ds_shape``), the frozen reference left out."""
    policy = module.policy_cfg
    check_policy_matches(checkpoint.get("hyper_parameters", {}).get("policy"), dataclasses.asdict(policy),
                         from_hub=bool(policy.name_or_path))
    current = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("ref_model.")}
    current.update({k: tuple(p.ds_shape) for k, p in module.named_parameters() if hasattr(p, "ds_shape")})
    check_state_shapes(checkpoint.get("state_dict"), current)
