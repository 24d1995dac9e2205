"""Checkpoints that survive being killed: atomic publishing, resume checks, and stopping on SIGTERM.

``AtomicModelCheckpoint`` is Lightning's ``ModelCheckpoint`` with one change: each checkpoint is first
written under a hidden ``.NAME.partial`` path and only then published under its real name, so a process
killed while writing (SIGKILL, pre-emption, out of memory) leaves the previous ``last.ckpt`` intact and
``--ckpt_path last`` never picks up a half-written file.  A file checkpoint is published with
``os.replace`` (atomic on POSIX); a directory checkpoint (DeepSpeed writes one folder of shards) cannot be
replaced atomically, so it is stored as ``.NAME.<n>`` and ``NAME`` is a symlink swapped atomically.

Checkpoint files are staged next to their target, never in the system temp folder (``StagedCheckpointIO``
replaces Lightning's default writer, which stages in ``/tmp`` and leaves whole checkpoints there when
killed); stale partial files are removed by the next save.  ``SigtermHandler`` stops a run on SIGTERM with a
resumable checkpoint (the CLI adds it to every run and exits with status ``EXIT_SIGTERM`` = 143).

The random streams a resumed run must continue have their own home (``trgrpo.random_streams``, owned by
``GRPOModule``).  ``check_policy_matches`` / ``check_state_shapes`` refuse a checkpoint of another model
before anything is loaded, and when fitting ``trgrpo.resume.check_update_layout`` refuses other optimiser
updates per RL step; every other changed setting is named in a warning and taken from the run's config.  The
data position is the sampler's job (``trgrpo.data.ResumableSampler``).

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
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trgrpo.random_streams import RandomStreams
from trgrpo.resume import check_update_layout, flatten_settings

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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the previous file under its name is intact."""


@contextmanager
def stop_on_failed_write(final: Path, partial: Path) -> Iterator[None]:
    """Turn a failed checkpoint write into one clear error naming the file, after removing the half-written
    partial (it holds the space a full disk lacks); training cannot go on without its checkpoints."""
    try:
        yield
    except Exception as err:
        _remove(partial)
        raise CheckpointWriteError(
            f"could not write the checkpoint {final} ({type(err).__name__}: {err}); the run stops here "
            f"and the previous {final.name}, if any, is kept intact"
        ) from err


def write_atomically(final: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Single-process form: ``write(partial)`` then publish;
    a crash inside ``write`` leaves ``final`` as it was."""
    final, partial = Path(final), partial_path(final)
    _remove(partial)
    final.parent.mkdir(parents=True, exist_ok=True)
    with stop_on_failed_write(final, partial):
        write(partial)
        publish(partial, final)


def remove_stale_partials(folder: str | os.PathLike) -> None:
    """Remove the hidden ``.NAME.partial`` files and folders a killed save left in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob(".*.partial"):
            _remove(path)


class StagedCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but a local file is staged next to its target, not in ``/tmp``.

    Lightning writes each checkpoint to a temp file of the system temp folder (fsspec's transaction) and
    then moves it into place: a process killed while writing leaves the whole checkpoint there, and a temp
    folder on another filesystem makes the move a copy.  Here a local file is written to ``.NAME.partial``
    beside it and published with ``os.replace`` (``write_atomically``; a partial file a killed save left is
    replaced); a path that is already a partial path is written as it is (its caller publishes it); remote
    paths (``s3://...``) are written as Lightning writes them.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        if path.name.startswith(".") and path.name.endswith(".partial"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with stop_on_failed_write(path.with_name(path.name[1 : -len(".partial")]), path):
                torch.save(checkpoint, path)
            return None
        write_atomically(path, lambda partial: torch.save(checkpoint, partial))
        return None

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        """Lightning's load, with a truncated or foreign file refused by name (torch's message omits the
        file; a dict without Lightning's version key fails later as a bare ``KeyError``)."""
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError) as err:  # not UnpicklingError: weights_only's refusal says enough
            raise ValueError(
                f"--ckpt_path {path}: cannot read the checkpoint, truncated or corrupted? "
                f"({type(err).__name__}: {err})"
            ) from err
        if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
            keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(
                f"--ckpt_path {path}: not a checkpoint written by a Lightning run (no "
                f"'pytorch-lightning_version'; it holds {keys}); resume from a .ckpt that fit saved, or load "
                "plain weights as model.policy.name_or_path"
            )
        return checkpoint


def use_staged_checkpoint_io(strategy) -> None:
    """Give ``strategy`` a ``StagedCheckpointIO`` if it has Lightning's default writer
    (a custom one is kept)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = StagedCheckpointIO()


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files (and DeepSpeed folders) appear only once completely written.

    Takes every argument of ``lightning.pytorch.callbacks.ModelCheckpoint``.  At set-up it removes the partial
    files a killed run left in ``dirpath``.
    """

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_staged_checkpoint_io(trainer.strategy)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            remove_stale_partials(self.dirpath)

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
            raise ValueError(
                f"--ckpt_path: the checkpoint was trained with model.policy.{key}={old}, "
                f"this run has model.policy.{key}={new}; resume with the same model"
            )


def check_state_shapes(state: dict | None, current: dict[str, tuple]) -> None:
    """Refuse a checkpoint whose tensors do not fit the model (``current``: name -> shape), before loading.

    ``state`` None (DeepSpeed keeps the weights in its shard files) is not checked here.
    """
    if state is None:
        return
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {current[k]}"
        for k, v in state.items()
        if k in current and tuple(v.shape) != current[k]
    ]
    missing = sorted(k for k in current if k not in state)
    if wrong or missing:
        raise ValueError(
            "--ckpt_path: the checkpoint does not fit this model (different model shape?): "
            + "; ".join(wrong[:5] + [f"missing {k}" for k in missing[:5]])
        )


def check_checkpoint_fits(checkpoint: dict, module) -> None:
    """Both checks above for a ``GRPOModule`` (its policy config, its parameters' shapes; ZeRO-3 shards report
    their full shape in ``ds_shape``), the frozen reference left out; when fitting, the update layout too
    (``check_update_layout``).  Every other setting that differs from the checkpoint's is named in a warning:
    this run's value is the one used."""
    policy = module.policy_cfg
    saved = checkpoint.get("hyper_parameters") or {}
    check_policy_matches(saved.get("policy"), dataclasses.asdict(policy), from_hub=bool(policy.name_or_path))
    current = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("ref_model.")}
    current.update({k: tuple(p.ds_shape) for k, p in module.named_parameters() if hasattr(p, "ds_shape")})
    check_state_shapes(checkpoint.get("state_dict"), current)
    old, new = flatten_settings(saved), flatten_settings(dict(module.hparams))
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
        check_update_layout(old, new)
    same = old.keys() & new.keys()
    changed = [f"model.{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(same) if old[k] != new[k]]
    if changed:
        log.warning(
            "--ckpt_path: this run's settings differ from the checkpoint's, and this run's are used: %s",
            "; ".join(changed),
        )


# --------------------------------------------------------------------------- SIGTERM

EXIT_SIGTERM = 128 + signal.SIGTERM
"""Exit status of a run stopped by SIGTERM (143: the shell's status for a process ended by that signal)."""


class Preempted(SIGTERMException):
    """SIGTERM stopped the run before the current step applied anything."""


def save_for_resume(callback: ModelCheckpoint, trainer: L.Trainer) -> str:
    """Save through ``callback`` now: its ``last`` checkpoint when it keeps one, else one under its own file
    name (nothing when it saved this step already).  Returns the path to resume from."""
    if callback._last_global_step_saved == trainer.global_step and callback._last_checkpoint_saved:
        return callback.last_model_path or callback._last_checkpoint_saved
    candidates = callback._monitor_candidates(trainer)
    if callback.save_last is True:
        callback._save_last_checkpoint(trainer, candidates)
        return callback.last_model_path
    path = callback.format_checkpoint_name(candidates)
    callback._save_checkpoint(trainer, path)
    if callback.save_last == "link":
        callback._save_last_checkpoint(trainer, candidates)
    return path


class SigtermHandler(L.Callback):
    """Stop a run promptly on SIGTERM, with a resumable checkpoint; the CLI adds it to every run.

    On its own Lightning only notes SIGTERM and stops after the current training step, however long a reward
    or a verifier holds that step, and the process then exits with status 0.
    With this callback (one process):

    - SIGTERM before the step's first backward pass (set-up, rollout, rewards, verifiers, evaluation) abandons
      the step at once, nothing of it applied; during the update the step is finished first (a second SIGTERM
      abandons it anyway, and then no checkpoint is written).
    - Every ``ModelCheckpoint`` (``AtomicModelCheckpoint`` included) then saves: ``last`` when it keeps one
      (resume with ``--ckpt_path last``), else a checkpoint under its own file name; nothing when nothing was
      trained since the run started.  An abandoned step's random state is put back first, so a resumed run
      samples what the uninterrupted one would have.
    - The run ends with Lightning's ``SIGTERMException``; ``trgrpo.cli.main`` exits with ``EXIT_SIGTERM``.

    With several processes a SIGTERM only notes itself: at the start of the next step every process asks
    whether any of them got one (a single all-reduce, at the same point on all), and if so all abandon that
    step together and save as above.  Lightning's own handler is replaced (before the sanity check and at the
    start of training) because it broadcasts from inside the signal handler: a collective at a different
    point on every process, which pairs with whatever collective the others run next (a 2-process run hangs
    there).  A SIGTERM during the last step lets the run end as usual.
    Without the CLI, add the callback and wrap ``trainer.fit`` in ``handler.installed()``.
    """

    def __init__(self) -> None:
        self._reset(world=1)

    def _reset(self, world: int) -> None:
        """The state at the start of a run: no signal seen, nothing trained yet."""
        self.abandonable = True  # a SIGTERM now abandons the step: nothing of it is applied yet
        self.updating = False  # inside the update: a SIGTERM lets the step finish
        self.saving = False
        self.signals = 0
        self._rng: dict | None = None  # the random streams when the step (or validation) under way began
        self._start_step: int | None = None
        self._world = world

    @contextmanager
    def installed(self) -> Iterator[None]:
        """This handler for SIGTERM inside the block (Lightning adds its own to it while it runs)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self.on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def on_sigterm(self, signum, frame) -> None:
        self.signals += 1
        if self.saving or self._world > 1:
            return  # already stopping; or every process stops before the next step (on_train_batch_start)
        if self.abandonable or self.signals > 1:
            log.warning(
                "SIGTERM: stopping now (%s)",
                "nothing of the current step was applied"
                if self.abandonable
                else "a second SIGTERM during an update: no checkpoint will be written",
            )
            raise Preempted()
        log.warning("SIGTERM: finishing the current update, then saving a checkpoint and stopping")

    @staticmethod
    def _streams(pl_module) -> RandomStreams:
        """The module's random streams (the global ones alone for a module that keeps none)."""
        streams = getattr(pl_module, "random_streams", None)
        return streams if isinstance(streams, RandomStreams) else RandomStreams()

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._reset(trainer.world_size)

    def _take_over_sigterm(self) -> None:
        """With several processes, this handler alone for SIGTERM (in place of Lightning's, registered
        before the sanity check and restored by Lightning at teardown)."""
        if self._world > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module) -> None:
        self._take_over_sigterm()

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start_step = trainer.global_step
        self._take_over_sigterm()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._rng = self._streams(pl_module).capture()
        self.abandonable, self.updating = True, False
        if self._world > 1 and trainer.strategy.reduce_boolean_decision(self.signals > 0, all=False):
            log.warning("SIGTERM (on process %d or another): stopping before this step", trainer.global_rank)
            raise Preempted()

    def _enter_update(self) -> None:
        self.abandonable, self.updating = False, True

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss) -> None:
        self._enter_update()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        self._enter_update()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._rng, self.abandonable, self.updating = None, False, False

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._rng = self._streams(pl_module).capture()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.abandonable = not self.updating

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.abandonable = False

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._rng = None

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        self.abandonable, self.saving = False, True
        if self.updating:
            return
        if self._start_step is None or trainer.global_step == self._start_step:
            log.warning("SIGTERM: nothing was trained since the run started; no checkpoint written")
            return
        if self._rng is not None:  # the abandoned step's sampling is undone: resume draws it again
            self._streams(pl_module).restore(self._rng)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                path = save_for_resume(callback, trainer)
                log.warning(
                    "SIGTERM: process %d saved its part of the checkpoint of step %d to %s "
                    "(resume with --ckpt_path %s)",
                    trainer.global_rank,
                    trainer.global_step,
                    path,
                    "last" if callback.save_last else path,
                )
