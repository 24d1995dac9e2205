"""What a resumed run takes from its checkpoint and what from its configuration.

The rule (README, "Resuming: which settings may change"): the configuration given is the one that runs; the
checkpoint supplies the state.  Settings that cannot change are refused before training:
``check_update_layout`` (the optimiser updates per RL step; the model's shape is checked in
``trgrpo.checkpointing.check_checkpoint_fits``).  ``ConfiguredOptimizerSettings`` puts this run's optimiser
settings back over the ones an optimiser state restores.  ``flatten_settings`` lays hyper-parameters out as
dotted keys, to compare a checkpoint's with a run's.

    python -m trgrpo fit --config configs/demo.yaml --ckpt_path last --model.optim.lr=1e-5
"""

from __future__ import annotations

import dataclasses
import math

import lightning as L


def flatten_settings(tree, prefix: str = "") -> dict[str, object]:
    """Hyper-parameters as ``{"optim.lr": 0.01, ...}`` (dataclasses and dicts opened; LightningCLI's own
    bookkeeping keys left out), so that a checkpoint's and a run's can be compared key by key."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        tree = dataclasses.asdict(tree)
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if not str(key).startswith("_"):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
    return flat


# the settings (keys of GRPOModule's hyper-parameters) that fix how many optimiser updates one RL step makes
LAYOUT_KEYS = ("sampling.group_size", "optim.mini_batch_size", "optim.epochs", "batch_size")


def updates_per_step(settings: dict[str, object]) -> int | None:
    """Optimiser updates one RL step makes under flattened ``settings`` (None when they do not say)."""
    group, mini, epochs, prompts = (settings.get(k) for k in LAYOUT_KEYS)
    if not isinstance(group, int) or not isinstance(prompts, int):
        return None
    sequences = prompts * group  # per process
    return (epochs if isinstance(epochs, int) else 1) * math.ceil(sequences / (mini or sequences))


def check_update_layout(saved: dict[str, object], current: dict[str, object]) -> None:
    """Refuse to resume when the optimiser updates per RL step change: ``global_step`` counts updates, and
    ``trainer.max_steps``, checkpoint intervals and the warm-up count ``global_step``, so the run would
    continue on a different clock.  A group size changed without that (no mini-batches) is allowed."""
    before, after = updates_per_step(saved), updates_per_step(current)
    if before is None or after is None or before == after:
        return
    changed = [k for k in LAYOUT_KEYS if saved.get(k) != current.get(k)]
    names = {"batch_size": "data.batch_size"}
    detail = ", ".join(
        f"{names.get(k, 'model.' + k)}={current.get(k)} (the checkpoint has {saved.get(k)})" for k in changed
    )
    raise ValueError(
        f"--ckpt_path: this run has {detail}: that makes {after} optimiser updates per RL step where the "
        f"checkpoint made {before}, and global_step (which trainer.max_steps, checkpoint intervals and the "
        "warm-up count) would change meaning mid-run; resume with the checkpoint's values or start a new run"
    )


class ConfiguredOptimizerSettings(L.Callback):
    """After a resume, this run's optimiser settings (learning rate, betas, weight decay...) replace the
    checkpoint's; the CLI adds it to every run.

    Restoring an optimiser's state also restores the settings of its parameter groups, and a learning-rate
    schedule's base rates, so on its own a ``--model.optim.lr`` given on resume would be silently ignored.
    The settings of the freshly built optimiser are noted before the restore (``on_fit_start``) and put back
    after it (``on_train_start``); the current learning rate keeps the schedule's progress (its warm-up
    fraction), scaled to the new base rate.  Unchanged settings come back bit for bit.
    """

    def __init__(self) -> None:
        self._fresh: list[list[dict]] | None = None  # per optimiser, per parameter group: its settings

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self._fresh = [
            [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            for opt in trainer.optimizers
        ]

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._fresh is None or trainer.ckpt_path is None:
            return
        for opt, fresh in zip(trainer.optimizers, self._fresh, strict=True):
            for group, settings in zip(opt.param_groups, fresh, strict=True):
                apply_group_settings(group, settings)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            if hasattr(scheduler, "base_lrs") and all("initial_lr" in g for g in groups):
                scheduler.base_lrs = [g["initial_lr"] for g in groups]
        self._fresh = None


def apply_group_settings(group: dict, fresh: dict) -> None:
    """Put a freshly built parameter group's settings over a restored ``group``; the learning rate is scaled
    by new base rate / restored base rate (``initial_lr``, set by a schedule), so a warm-up continues."""
    restored_base, fresh_base = group.get("initial_lr"), fresh.get("initial_lr")
    for key, value in fresh.items():
        if key not in ("lr", "initial_lr"):
            group[key] = value
    if restored_base and fresh_base:
        if fresh_base != restored_base:
            group["lr"] = group["lr"] * (fresh_base / restored_base)
        group["initial_lr"] = fresh_base
    elif "lr" in fresh:
        group["lr"] = fresh["lr"]
