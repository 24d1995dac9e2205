"""``Task``: the interface every task implements (rows of a split, a verifier, an optional demonstration).

A task produces rows (plain dicts).  Every row has a ``prompt`` (a string, or a list of chat messages
``[{"role": ..., "content": ...}]``) and any reference columns its rewards and verifier read
(``answer``, ``names``, ...).  Rows are passed to reward functions column-wise as keyword arguments.
A task with difficulty levels puts one in each row's ``level`` column (an int or a short string);
evaluation then reports its metrics per level as well.
"""

from __future__ import annotations

from typing import Literal

Split = Literal["train", "val"]


class Task:
    """Base class of the tasks."""

    def rows(self, split: Split) -> list[dict]:
        """All rows of a split.  Train and val rows never share an item."""
        raise NotImplementedError

    def verify(self, completion: str, row: dict) -> float:
        """Correctness of one completion in [0, 1] (1 = right); the basis of ``val/accuracy``."""
        raise NotImplementedError

    def verify_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        """``verify`` of many completions (row ``i`` is the reference of completion ``i``); tasks whose
        verifier has a start-up or per-call cost override it."""
        return [self.verify(c, r) for c, r in zip(completions, rows, strict=True)]

    def demonstration(self, row: dict) -> str | None:
        """A correct completion for supervised warm-starting, or None when the task has none."""
        return None

    def rewards(self) -> list | None:
        """Reward terms (``trgrpo.rewards.RewardSpec``) the task brings, used when ``model.rewards`` is empty
        (an installed environment's rubric); None: the trainer's default (exact match on ``answer``)."""
        return None
