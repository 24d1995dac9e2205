"""Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476): train on groups with reward spread.

A group whose G rewards are all equal has zero advantage everywhere and carries no policy gradient.  With
``data.dynamic_sampling`` the data module draws ``ceil(oversample * batch_size)`` prompts per step, the
module samples and scores all of them, and ``keep_groups`` keeps ``batch_size`` groups: those with reward
spread first, in drawn order, then (only when too few have spread) zero-spread groups to fill the batch, so
every step trains on exactly ``batch_size`` groups (a fixed update layout, equal on every process).  The
data module hands the module what it keeps once, as a ``GroupFilter`` (``PromptDataModule.group_filter``,
passed on by ``GRPOModule.connect``), so the RL step never reads the data module.

Why a factor and not DAPO's "generate again until the batch is full": every step then reads exactly one
loader batch, so the data position Lightning checkpoints (batches trained) stays exact on resume, and all
processes run the same number of generation calls.  ``train/dynamic_sampling/*`` reports how many groups
were drawn, dropped and filled without spread; raise ``oversample`` when ``filled`` stays above 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from trgrpo.advantages import group_has_spread
from trgrpo.rewards import RewardResult
from trgrpo.rollout import Rollout


@dataclass
class DynamicSampling:
    """Over-sample prompts and keep the groups whose rewards differ."""

    oversample: float = 2.0
    """Prompts drawn per step, as a multiple of ``data.batch_size`` (rounded up; > 1)."""
    min_spread: float = 1e-6
    """A group has spread when max - min of its rewards exceeds this."""

    def __post_init__(self) -> None:
        if self.oversample <= 1:
            raise ValueError(f"data.dynamic_sampling.oversample must be > 1, got {self.oversample}")
        if self.min_spread < 0:
            raise ValueError(f"data.dynamic_sampling.min_spread must be >= 0, got {self.min_spread}")

    def draw_size(self, batch_size: int) -> int:
        """Prompts drawn per step for ``batch_size`` trained ones."""
        return math.ceil(self.oversample * batch_size - 1e-9)

    def group_filter(self, batch_size: int) -> GroupFilter:
        """What the RL step needs to keep ``batch_size`` groups of each drawn batch."""
        return GroupFilter(keep=batch_size, min_spread=self.min_spread)


class GroupFilter(NamedTuple):
    """The groups one RL step trains on: ``keep`` of those drawn, with spread first (``select_groups``)."""

    keep: int  # groups trained per step (data.batch_size)
    min_spread: float  # a group has spread when max - min of its rewards exceeds this


class GroupSelection(NamedTuple):
    """What ``keep_groups`` did to one step's groups (counts of this process)."""

    drawn: int  # groups sampled and scored
    dropped: int  # groups left out of the update
    filled: int  # kept groups without reward spread (too few had spread)


def select_groups(rewards: torch.Tensor, group_size: int, keep: int, min_spread: float) -> torch.Tensor:
    """[N] rewards -> [keep] indices of the kept groups: spread first (in order), then zero-spread fillers."""
    spread = group_has_spread(rewards, group_size, min_spread)  # [U]
    order = torch.cat([torch.nonzero(spread).flatten(), torch.nonzero(~spread).flatten()])
    return order[:keep].sort().values


def keep_groups(
    rollout: Rollout, rewards: RewardResult, group_size: int, keep: int, min_spread: float
) -> tuple[Rollout, RewardResult, GroupSelection]:
    """The rollout and rewards of ``keep`` groups (``select_groups``), and the counts for the log."""
    drawn = len(rewards.total) // group_size
    if keep >= drawn:
        return rollout, rewards, GroupSelection(drawn, 0, 0)
    groups = select_groups(rewards.total, group_size, keep, min_spread)  # [keep]
    rows = (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()  # [keep * G]
    filled = int((~group_has_spread(rewards.total[rows], group_size, min_spread)).sum())
    kept = RewardResult(
        rewards.total[rows], {k: v[rows] for k, v in rewards.per_term.items()}, rewards.errors
    )
    return rollout.select(rows), kept, GroupSelection(drawn, drawn - keep, filled)


def apply_dynamic_sampling(
    group_filter: GroupFilter | None, rollout: Rollout, rewards: RewardResult, group_size: int
) -> tuple[Rollout, RewardResult, GroupSelection | None]:
    """The groups to train on: those ``group_filter`` keeps, or all without dynamic sampling (None)."""
    if group_filter is None:
        return rollout, rewards, None
    return keep_groups(rollout, rewards, group_size, group_filter.keep, group_filter.min_spread)


__all__ = [
    "DynamicSampling",
    "GroupFilter",
    "GroupSelection",
    "apply_dynamic_sampling",
    "keep_groups",
    "select_groups",
]
