"""A progress bar that counts RL steps::

    RL step 57/200 |██▊       | [00:08<00:20,  7.10step/s, reward=0.41]

One training batch is one RL step (rollout, rewards, updates).  Lightning's own bars count batches per
epoch and label them with the epoch ("Epoch 2/-2" under ``max_epochs: -1``), which says nothing about a
run bounded by ``trainer.max_steps``.  ``RLStepProgressBar`` keeps one bar for the whole fit, across the
data's epochs, and puts the RL steps done over the RL steps the run will make in front.

``trainer.max_steps`` counts optimiser updates, which are several per RL step with ``optim.epochs`` > 1,
several mini-batches or a multi-pass weighting (Lopti); the total is ``max_steps`` until the first RL step
shows how many updates one step makes, then the RL steps that many updates allow.  Without ``max_steps``
(-1) the total is ``max_epochs`` times the batches of an epoch, or unknown (the bar then counts up).

``default_progress_bar`` is how the command line makes it the default bar; to name it yourself in YAML::

    trainer:
      callbacks:
        - class_path: trgrpo.progress.RLStepProgressBar
          init_args: {refresh_rate: 1}
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

TRAIN_BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def rl_steps_done(trainer: L.Trainer) -> int:
    """Training batches (= RL steps) processed so far, over all epochs, resumed ones included (inside a
    training step: the steps before it)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def planned_rl_steps(trainer: L.Trainer, done: int, updates_per_step: float) -> int | None:
    """RL steps the fit will have made at its end (``done`` so far), or None when nothing bounds it.

    ``updates_per_step`` is the optimiser updates one RL step makes (``global_step`` counts updates); a
    callback with an ``rl_step_limit`` attribute (``trgrpo.callbacks.RLStepLimit``) bounds it too.
    """
    bounds = [cb.rl_step_limit for cb in trainer.callbacks if getattr(cb, "rl_step_limit", None)]
    if trainer.max_steps is not None and trainer.max_steps > 0:
        left = max(trainer.max_steps - trainer.global_step, 0)
        bounds.append(done + math.ceil(left / max(updates_per_step, 1e-9)))
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
        bounds.append(int(trainer.max_epochs * batches))
    return min(bounds) if bounds else None


class RLStepProgressBar(TQDMProgressBar):
    """TQDM bar whose training bar reads ``RL step N/TOTAL`` for the whole fit instead of one bar per epoch.

    Args:
        refresh_rate: update the bars every this many batches (0 disables them).
        process_position: line offset of the bars (several trainers in one terminal).
        leave: keep the finished validation bars on screen.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._start_steps = 0  # RL steps and updates done before this fit started (a resumed run)
        self._start_updates = 0

    @property
    def train_description(self) -> str:
        return "RL step"

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.train_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            unit="step",
            bar_format=TRAIN_BAR_FORMAT,
            total=self._total(self.trainer, self._start_steps),
            initial=self._start_steps,
        )  # a resumed run starts at its step; the rate counts this run

    def _total(self, trainer: L.Trainer, done: int) -> int | None:
        steps, updates = done - self._start_steps, trainer.global_step - self._start_updates
        per_step = updates / steps if steps > 0 and updates > 0 else 1.0
        return planned_rl_steps(trainer, done, per_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_steps, self._start_updates = rl_steps_done(trainer), trainer.global_step
        self.train_progress_bar = self.init_train_tqdm()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: the same on every step, and in the log folder name
        return metrics

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole fit: an epoch of the prompt data is no unit of progress here

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        done = rl_steps_done(trainer)
        if bar.disable or not self._should_update(done, bar.total):
            return
        bar.total = self._total(trainer, done)
        bar.n = done
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def default_progress_bar(trainer_config: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer keyword overrides that add an ``RLStepProgressBar`` to the configured callbacks; ``{}`` when
    progress bars are off (``enable_progress_bar: false``) or the configured callbacks hold a progress bar.

    For ``LightningCLI.instantiate_trainer``: ``trainer_config`` is the instantiated ``trainer`` group, whose
    ``callbacks`` (a YAML list replaces any default list) are kept and extended, never replaced.
    """
    if trainer_config.get("enable_progress_bar") is False:
        return {}
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return {}
    return {"callbacks": [*callbacks, RLStepProgressBar()]}
