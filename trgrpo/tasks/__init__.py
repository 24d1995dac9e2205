"""Tasks: where prompts, reference data and verifiers come from.

A task produces rows (plain dicts).  Every row has a ``prompt`` (a string, or a list of chat messages
``[{"role": ..., "content": ...}]``) and any reference columns its rewards and verifier read
(``answer``, ``level``, ...).  Rows are passed to reward functions column-wise as keyword arguments.

Choose one in YAML under ``data.task`` with ``class_path`` / ``init_args``.
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

    def demonstration(self, row: dict) -> str | None:
        """A correct completion for supervised warm-starting, or None when the task has none."""
        return None


from trgrpo.tasks.arithmetic import ArithmeticTask  # noqa: E402

__all__ = ["ArithmeticTask", "Split", "Task"]
