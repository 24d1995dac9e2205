"""Tasks: where prompts, reference data and verifiers come from.

Every task subclasses ``trgrpo.tasks.base.Task`` (rows of a split, a verifier, an optional demonstration);
helpers several tasks share are in ``trgrpo.tasks.common``.

Choose one in YAML under ``data.task`` with ``class_path`` / ``init_args``:

- ``trgrpo.tasks.ArithmeticTask``: two-operand integer arithmetic for the CPU demo.
- ``trgrpo.tasks.ReasoningGymTask``: any reasoning-gym task by name, scored by its own scorer.
- ``trgrpo.tasks.KnightsKnavesTask``: Knights and Knaves puzzles, 3 to 7 people, the published K&K reward.
- ``trgrpo.tasks.MathTask``: math word problems from a ``datasets`` source, checked with math-verify.
- ``trgrpo.tasks.SearchQATask``: Search-R1-style question answering with a search tool (local question files);
  ``trgrpo.tasks.FactQATask``: the same on a generated fact base, for CPU demos.
"""

from __future__ import annotations

from trgrpo.tasks.arithmetic import ArithmeticTask
from trgrpo.tasks.base import Split, Task
from trgrpo.tasks.knights_knaves import KnightsKnavesTask
from trgrpo.tasks.math_data import MathTask
from trgrpo.tasks.reasoning_gym import ReasoningGymTask
from trgrpo.tasks.search_qa import FactQATask, SearchQATask
from trgrpo.tasks.verifiers_env import VerifiersEnvironment

__all__ = [
    "ArithmeticTask",
    "FactQATask",
    "KnightsKnavesTask",
    "MathTask",
    "ReasoningGymTask",
    "SearchQATask",
    "Split",
    "Task",
    "VerifiersEnvironment",
]
