"""Held-out evaluation helpers: pass@k, mean@k, per-level aggregation and the sample table.

Pure functions and a config dataclass, no Lightning: ``GRPOModule`` runs the generation and calls these.
Per held-out prompt the module records the greedy completion's correctness and, with ``model.eval.k``,
the number ``c`` of correct completions among ``n`` samples; here those records become

- ``val/accuracy``: greedy accuracy (what the K&K papers report),
- ``val/mean@k``: mean correctness of sampled completions (the expected accuracy of one sample),
- ``val/pass@k``: probability that at least one of k samples is correct, with the unbiased estimator
  of Chen et al. (2021) ``1 - C(n - c, k) / C(n, k)``,

each overall and per difficulty level (``val/accuracy/level_3``) when the task's rows have a ``level``.
A few prompts with their completions and rewards go to ``<log_dir>/val_samples/step_<N>.md`` (and
``.jsonl``) at every validation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy always, sampled mean@k / pass@k on request."""

    k: int = 0
    """k of mean@k and pass@k (0 = greedy accuracy only)."""
    n: int | None = None
    """Completions sampled per held-out prompt to estimate them (>= k; empty = k)."""
    temperature: float | None = None
    """Temperature of the sampled completions (empty = model.sampling.temperature)."""
    table_rows: int = 4
    """Held-out prompts written with their completions and rewards to <log_dir>/val_samples (0 = none)."""

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"model.eval.k must be >= 0, got {self.k}")
        if self.n is not None and self.n < max(self.k, 1):
            raise ValueError(f"model.eval.n must be >= model.eval.k = {self.k}, got {self.n}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"model.eval.temperature must be > 0, got {self.temperature}")
        if self.table_rows < 0:
            raise ValueError(f"model.eval.table_rows must be >= 0, got {self.table_rows}")

    @property
    def samples(self) -> int:
        """Completions sampled per prompt (0 when sampling is off)."""
        return (self.n or self.k) if self.k else 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct among ``n`` samples: ``1 - C(n - c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_at_k(correct: Sequence[float]) -> float:
    """Mean correctness of a prompt's sampled completions."""
    if not correct:
        raise ValueError("mean@k of no samples")
    return sum(correct) / len(correct)


# columns of the per-level sums: prompts, greedy correct, sum of mean@k, sum of pass@k
SUM_COLUMNS = ("prompts", "greedy", "mean", "pass")


def sort_levels(levels: Iterable) -> list:
    """Distinct levels in natural order (numbers by value, then strings); None (no level) first."""
    distinct = set(levels)
    return sorted(distinct, key=lambda v: (v is not None, isinstance(v, str), v if v is not None else 0))


def level_sums(index: dict, levels: Sequence, greedy: Sequence[float],
               sampled: Sequence[Sequence[float]] | None, k: int) -> Tensor:
    """[L, 4] float64 sums (``SUM_COLUMNS``) per level of one batch of prompts; ``index`` maps level -> row.

    ``sampled[i]`` are the correctness scores of prompt i's sampled completions (None = not sampled).
    """
    sums = torch.zeros(len(index), len(SUM_COLUMNS), dtype=torch.float64)
    for i, level in enumerate(levels):
        row = sums[index[level]]
        row[0] += 1
        row[1] += float(greedy[i])
        if sampled is not None:
            scores = [float(s) for s in sampled[i]]
            row[2] += mean_at_k(scores)
            row[3] += pass_at_k(len(scores), sum(1 for s in scores if s >= 1.0), k)
    return sums


def level_name(level) -> str:
    return f"level_{level}"


def level_metrics(levels: Sequence, sums: Tensor, k: int) -> dict[str, float]:
    """Metric name -> value from the summed [L, 4] table (overall, plus per level when there are levels)."""
    out: dict[str, float] = {}
    groups = [(None, sums.sum(0))]
    if len(levels) > 1 or (levels and levels[0] is not None):
        groups += [(lvl, sums[i]) for i, lvl in enumerate(levels)]
    for lvl, row in groups:
        suffix = "" if lvl is None else "/" + level_name(lvl)
        count = row[0].item()
        if count == 0:
            continue
        out[f"val/accuracy{suffix}"] = row[1].item() / count
        if k:
            out[f"val/mean@{k}{suffix}"] = row[2].item() / count
            out[f"val/pass@{k}{suffix}"] = row[3].item() / count
    return out


class SampleRow(NamedTuple):
    """One held-out prompt in the sample table."""

    level: object  # the row's level (None without levels)
    prompt: str  # the prompt as the task wrote it (before the chat template)
    answer: str  # the reference answer (empty when the task has no ``answer`` column)
    completion: str  # the greedy completion
    correct: float  # the task's verdict on it
    rewards: dict[str, float | None]  # reward term -> score, plus "total"


def _cell(text: object, limit: int = 400) -> str:
    s = "" if text is None else str(text)
    s = s if len(s) <= limit else s[: limit // 2] + " … " + s[-limit // 2:]
    return s.replace("|", "\\|").replace("\n", "<br>")


def write_sample_table(directory: str | Path, step: int, rows: Sequence[SampleRow]) -> Path:
    """Write ``step_<step>.md`` (a Markdown table, long texts shortened) and ``step_<step>.jsonl`` (full
    texts) under ``directory``; returns the Markdown path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md, jl = directory / f"step_{step:07d}.md", directory / f"step_{step:07d}.jsonl"
    terms = list(rows[0].rewards) if rows else []
    lines = [f"# Held-out samples at step {step}", "",
             "| level | prompt | answer | completion | correct | " + " | ".join(terms) + " |",
             "|---" * (5 + len(terms)) + "|"]
    for r in rows:
        scores = ["" if r.rewards.get(t) is None else f"{r.rewards[t]:.3g}" for t in terms]
        lines.append(f"| {_cell(r.level)} | {_cell(r.prompt)} | {_cell(r.answer)} | {_cell(r.completion)} | "
                     f"{r.correct:.3g} | " + " | ".join(scores) + " |")
    md.write_text("\n".join(lines) + "\n")
    with jl.open("w") as f:
        for r in rows:
            f.write(json.dumps(r._asdict(), default=str) + "\n")
    return md
