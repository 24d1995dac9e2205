"""Reward functions and the code that calls them.

A reward is any callable with the signature shared by the common GRPO trainers::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the task's reference data for each completion (e.g. ``answer``), one list per column.
``None`` means "does not apply" and is left out of that reward's mean.  Rewards are chosen in YAML by
import path, so a user's own function works without touching the package::

    model:
      rewards:
        - fn: trgrpo.rewards.exact_match
          weight: 1.0
        - fn: my_project.rewards.brevity
          weight: 0.1
          kwargs: {limit: 200}

A reward that raises is retried sample by sample; samples that still fail score ``failure_score`` and
are counted in ``train/reward_errors``; the first traceback is logged once and the run goes on.
"""

from __future__ import annotations

import logging
import math
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]


@dataclass
class RewardSpec:
    """One reward term of the total reward."""

    fn: Callable
    """Import path of the reward callable, ``fn(prompts, completions, **columns) -> list[float | None]``."""
    weight: float = 1.0
    """Weight of this term in the total reward."""
    name: str | None = None
    """Name used in the metrics (``train/rewards/<name>``); defaults to the function's name."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments passed to ``fn`` on every call."""
    failure_score: float = 0.0
    """Score given to a sample whose reward raised."""

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__name__", type(self.fn).__name__)


class RewardResult(NamedTuple):
    total: Tensor  # [N] weighted sum over terms (a None term counts 0)
    per_term: dict[str, Tensor]  # name -> [N], NaN where the term returned None
    errors: int  # samples that raised, over all terms


_warned: set[str] = set()


def _call_one(spec: RewardSpec, prompts, completions, columns) -> tuple[list[float | None], int]:
    """Call a reward on the batch, falling back to sample-by-sample when it raises."""
    try:
        out = list(spec.fn(prompts, completions, **columns, **spec.kwargs))
        if len(out) != len(completions):
            raise ValueError(f"reward {spec.label!r} returned {len(out)} scores for {len(completions)} completions")
        return out, 0
    except Exception:
        pass
    scores: list[float | None] = []
    errors = 0
    for i in range(len(completions)):
        row = {k: [v[i]] for k, v in columns.items()}
        try:
            scores.append(list(spec.fn([prompts[i]], [completions[i]], **row, **spec.kwargs))[0])
        except Exception:
            errors += 1
            scores.append(spec.failure_score)
            if spec.label not in _warned:
                _warned.add(spec.label)
                log.warning("reward %r raised on sample %d; scoring it %s. First traceback:\n%s",
                            spec.label, i, spec.failure_score, traceback.format_exc())
    return scores, errors


def compute_rewards(
    specs: Sequence[RewardSpec], prompts: list[str], completions: list[str], columns: dict[str, list]
) -> RewardResult:
    """Evaluate every reward term on N completions and combine them with their weights."""
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)
    per_term: dict[str, Tensor] = {}
    errors = 0
    for spec in specs:
        scores, errs = _call_one(spec, prompts, completions, columns)
        errors += errs
        values = torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32)
        per_term[spec.label] = values
        total += spec.weight * torch.nan_to_num(values, nan=0.0)
    return RewardResult(total, per_term, errors)


# --------------------------------------------------------------------------- built-in rewards

_INT = re.compile(r"-?\d+")


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the reference ``answer``."""
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


def integer_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the first integer in the completion equals the reference ``answer``."""
    out = []
    for c, a in zip(completions, answer):
        m = _INT.search(c)
        out.append(1.0 if m is not None and m.group(0) == str(a).strip() else 0.0)
    return out


def regex_format(
    prompts: list[str], completions: list[str], pattern: str = r"^\s*-?\d+\s*$", **_: object
) -> list[float]:
    """1.0 when the whole completion matches ``pattern`` (default: a bare integer), else 0.0."""
    rx = re.compile(pattern, re.DOTALL)
    return [1.0 if rx.fullmatch(c) else 0.0 for c in completions]
