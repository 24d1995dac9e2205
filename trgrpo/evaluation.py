"""Held-out evaluation helpers: pass@k, mean@k, per-level aggregation and the sample table.

Pure functions, a config dataclass and ``HeldoutEvaluator`` (no Lightning), which generates on held-out
prompts and calls the helpers; ``GRPOModule`` and the ``HeldoutAccuracy`` callback drive it.
Per held-out prompt the evaluator records the greedy completion's correctness and, with ``model.eval.k``,
the number ``c`` of correct completions among ``n`` samples; here those records become

- ``val/accuracy``: greedy accuracy (what the K&K papers report),
- ``val/mean@k``: mean correctness of sampled completions (the expected accuracy of one sample),
- ``val/pass@k``: probability that at least one of k samples is correct, with the unbiased estimator
  of Chen et al. (2021) ``1 - C(n - c, k) / C(n, k)``,

each overall and per difficulty level (``val/accuracy/level_3``) when the task's rows have a ``level``;
with multi-turn rollouts also ``val/tool_calls`` (mean tool calls per greedy completion), and any per-prompt
scores a task gives through an optional ``eval_scores(completions, rows) -> {name: [score]}`` (the QA tasks:
``val/em``, ``val/f1``), the same way.
A few prompts with their completions and rewards go to ``<log_dir>/val_samples/step_<N>.md`` (and
``.jsonl``) at every validation; like every optional artefact of a run, a table that cannot be written (a
full disk, a read-only folder) is a warning and training goes on (``save_sample_table``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from trgrpo.rewards import batch_rows, collate_rows, compute_rewards, reward_columns
from trgrpo.rollout.engines import generate_rollout

log = logging.getLogger(__name__)


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


def level_sums(
    index: dict, levels: Sequence, greedy: Sequence[float], sampled: Sequence[Sequence[float]] | None, k: int
) -> Tensor:
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
    s = s if len(s) <= limit else s[: limit // 2] + " … " + s[-limit // 2 :]
    return s.replace("|", "\\|").replace("\n", "<br>")


def write_sample_table(directory: str | Path, step: int, rows: Sequence[SampleRow]) -> Path:
    """Write ``step_<step>.md`` (a Markdown table, long texts shortened) and ``step_<step>.jsonl`` (full
    texts) under ``directory``; returns the Markdown path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md, jl = directory / f"step_{step:07d}.md", directory / f"step_{step:07d}.jsonl"
    terms = list(rows[0].rewards) if rows else []
    lines = [
        f"# Held-out samples at step {step}",
        "",
        "| level | prompt | answer | completion | correct | " + " | ".join(terms) + " |",
        "|---" * (5 + len(terms)) + "|",
    ]
    for r in rows:
        scores = ["" if r.rewards.get(t) is None else f"{r.rewards[t]:.3g}" for t in terms]
        lines.append(
            f"| {_cell(r.level)} | {_cell(r.prompt)} | {_cell(r.answer)} | {_cell(r.completion)} | "
            f"{r.correct:.3g} | " + " | ".join(scores) + " |"
        )
    md.write_text("\n".join(lines) + "\n")
    with jl.open("w") as f:
        for r in rows:
            f.write(json.dumps(r._asdict(), default=str) + "\n")
    return md


def save_sample_table(directory: str | Path, step: int, rows: Sequence[SampleRow]) -> Path | None:
    """``write_sample_table`` during a run: the table is an optional artefact, so a failed write (a full
    disk, a read-only folder) is logged as a warning and returns None instead of ending training."""
    try:
        md = write_sample_table(directory, step, rows)
    except OSError as err:
        log.warning(
            "held-out sample table of step %d not written to %s (%s); training goes on", step, directory, err
        )
        return None
    log.info("held-out samples written to %s", md)
    return md


class HeldoutEvaluator:
    """Greedy accuracy (and sampled mean@k / pass@k) of a policy on held-out prompts, per level.

    Handed the task's verifier once (``connect``); generation uses the training sampling settings, with
    ``eval.temperature`` for the sampled completions.  A validation epoch is ``start`` ->
    ``add_batch`` per batch -> ``finish`` (metrics over every process, with ``gather`` merging the
    processes' per-level sums); ``accuracy`` is the whole-split greedy accuracy of the before / after line.

    Args:
        cfg: ``model.eval``.
        sampling: ``model.sampling`` (budget, temperature, engine).
        rewards: the reward terms, scored on the sample-table rows.
    """

    def __init__(self, cfg: EvalConfig, sampling, rewards: Sequence) -> None:
        self.cfg, self.sampling, self.rewards = cfg, sampling, list(rewards)
        self.task = None
        self.engine = None  # the run's rollout engine (``use_engine``); empty: a new one per rollout
        self.tool_calls: float | None = None  # mean tool calls per completion of the last ``accuracy`` call
        self.start()

    def connect(self, task) -> None:
        """The task whose ``verify_batch`` scores completions."""
        self.task = task

    def use_engine(self, engine) -> None:
        """The run's rollout engine (the training rollouts' own): every held-out rollout goes through it."""
        self.engine = engine

    def _verify(self, completions: list[str], rows: list[dict]) -> list[float]:
        if self.task is None:
            raise RuntimeError("HeldoutEvaluator: no task connected (connect(task) before evaluating)")
        return self.task.verify_batch(completions, rows)

    @torch.no_grad()
    def greedy(self, model, tokenizer, batch: dict[str, list]):
        """(greedy rollout, the batch's rows, [B] correctness) of a batch of held-out prompts."""
        rows = batch_rows(batch)
        rollout = generate_rollout(
            model, tokenizer, batch["prompt"], self.sampling, greedy=True, rows=rows, engine=self.engine
        )
        return rollout, rows, torch.tensor(self._verify(rollout.completions, rows), dtype=torch.float32)

    @torch.no_grad()
    def sampled(self, model, tokenizer, batch: dict[str, list], rows: list[dict]) -> list[list[float]]:
        """[B][n] correctness of ``eval.samples`` sampled completions per held-out prompt."""
        n = self.cfg.samples
        sampling = dataclasses.replace(
            self.sampling, temperature=self.cfg.temperature or self.sampling.temperature
        )
        rollout = generate_rollout(
            model, tokenizer, batch["prompt"], sampling, group_size=n, rows=rows, engine=self.engine
        )
        flat = self._verify(rollout.completions, [r for r in rows for _ in range(n)])
        return [flat[i * n : (i + 1) * n] for i in range(len(rows))]

    def table_rows(self, rollout, rows: list[dict], correct: Tensor, count: int) -> list[SampleRow]:
        """The first ``count`` prompts of a batch for the sample table, scored by every reward term."""
        rows, texts = rows[:count], rollout.completions[:count]
        columns = reward_columns(
            collate_rows(rows),
            rollout.trainable_mask[:count],
            rollout.truncated[:count],
        )
        result = compute_rewards(self.rewards, [r["prompt"] for r in rows], texts, columns)
        out = []
        for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
            scores = {name: (None if v[i].isnan() else v[i].item()) for name, v in result.per_term.items()}
            scores["total"] = result.total[i].item()
            out.append(
                SampleRow(
                    row.get("level"),
                    str(row.get("raw_prompt", row["prompt"])),
                    str(row.get("answer", "")),
                    text,
                    correct[i].item(),
                    scores,
                )
            )
        return out

    # ------------------------------------------------------------------ one validation epoch

    def start(self) -> None:
        self._sums: dict = {}  # level -> [4] float64 sums (SUM_COLUMNS)
        self._extra: dict = {}  # level -> {name: sum}: tool calls and the task's eval_scores
        self.table: list[SampleRow] = []

    def extra_scores(self, rollout, rows: list[dict]) -> dict[str, list[float]]:
        """Per-prompt scores beyond correctness: ``tool_calls`` of a multi-turn rollout,
        the task's ``eval_scores``."""
        out = {}
        if rollout.episodes is not None:
            out["tool_calls"] = rollout.episodes.tool_calls.float().tolist()
        scorer = getattr(self.task, "eval_scores", None)
        if scorer is not None:
            out.update(
                {name: [float(v) for v in vals] for name, vals in scorer(rollout.completions, rows).items()}
            )
        return out

    def add_batch(self, model, tokenizer, batch: dict[str, list], keep_table: bool) -> None:
        rollout, rows, correct = self.greedy(model, tokenizer, batch)
        sampled = self.sampled(model, tokenizer, batch, rows) if self.cfg.k else None
        levels = [r.get("level") for r in rows]
        index = {level: i for i, level in enumerate(sort_levels(levels))}
        sums = level_sums(index, levels, correct.tolist(), sampled, self.cfg.k)
        for level, i in index.items():
            self._sums[level] = (
                self._sums.get(level, torch.zeros(len(SUM_COLUMNS), dtype=torch.float64)) + sums[i]
            )
        for name, values in self.extra_scores(rollout, rows).items():
            for level, v in zip(levels, values, strict=True):
                per = self._extra.setdefault(level, {})
                per[name] = per.get(name, 0.0) + v
        missing = self.cfg.table_rows - len(self.table)
        if keep_table and missing > 0:
            self.table += self.table_rows(rollout, rows, correct, missing)

    def finish(self, gather=lambda sums: [sums]) -> dict[str, float]:
        """Metrics of the epoch; ``gather(obj)`` returns every process's ``obj`` (per-level sums; default:
        this process's)."""
        merged: dict = {}
        extra: dict = {}
        for part, part_extra in gather((self._sums, self._extra)):
            for level, row in part.items():
                merged[level] = merged.get(level, torch.zeros(len(SUM_COLUMNS), dtype=torch.float64)) + row
            for level, named in part_extra.items():
                for name, v in named.items():
                    extra.setdefault(level, {})[name] = extra.get(level, {}).get(name, 0.0) + v
        levels = sort_levels(merged)
        sums = (
            torch.stack([merged[level] for level in levels]) if levels else torch.zeros(0, len(SUM_COLUMNS))
        )
        out = level_metrics(levels, sums, self.cfg.k)
        by_level = len(levels) > 1 or (levels and levels[0] is not None)
        names = sorted({n for named in extra.values() for n in named})
        for name in names:
            total = sum(named.get(name, 0.0) for named in extra.values())
            if sums.shape[0] and sums[:, 0].sum() > 0:
                out[f"val/{name}"] = total / sums[:, 0].sum().item()
            for i, level in enumerate(levels if by_level else []):
                if sums[i, 0] > 0:
                    out[f"val/{name}/{level_name(level)}"] = (
                        extra.get(level, {}).get(name, 0.0) / sums[i, 0].item()
                    )
        return out

    def accuracy(
        self, model, tokenizer, batches: Iterable[dict[str, list]], reduce_sum=lambda t: t
    ) -> tuple[float, int]:
        """(greedy accuracy, prompts) over ``batches`` (this process's share); ``reduce_sum`` adds up the
        [3] float64 counts of every process.  With multi-turn rollouts ``tool_calls`` is then the mean tool
        calls per greedy completion (None otherwise)."""
        counts = torch.zeros(3, dtype=torch.float64)
        for batch in batches:
            rollout, _, scores = self.greedy(model, tokenizer, batch)
            calls = rollout.episodes.tool_calls.sum().item() if rollout.episodes is not None else 0.0
            counts += torch.tensor([scores.sum().item(), scores.numel(), calls], dtype=torch.float64)
        counts = reduce_sum(counts)
        prompts = counts[1].clamp(min=1)
        self.tool_calls = (counts[2] / prompts).item() if getattr(self.sampling, "agent", None) else None
        return (counts[0] / prompts).item(), int(counts[1].item())
