"""Any reasoning-gym task by name: procedural, offline, seeded, scored by reasoning-gym's own scorer.

reasoning-gym (https://github.com/open-thought/reasoning-gym) generates items of about a hundred
verifiable tasks (``knights_knaves``, ``countdown``, ``basic_arithmetic``, ``gsm_symbolic``, ...) from a
seed: item ``i`` of a dataset is drawn from ``Random(seed + i)``.  Training items therefore use
``seed`` and held-out items ``seed + VAL_SEED_OFFSET``, and every held-out item whose question also
appears in training is skipped, so the two splits never share an item::

    data:
      task:
        class_path: trgrpo.tasks.ReasoningGymTask
        init_args:
          name: countdown
          options: {min_numbers: 3, max_numbers: 4}
          train_size: 2000
          val_size: 200
    model:
      rewards:
        - fn: trgrpo.tasks.reasoning_gym.reasoning_gym_reward

The model answers inside ``<answer>...</answer>`` (reasoning-gym's convention; ``answer_tag``), and
``reasoning_gym_reward`` hands that answer to the dataset's ``score_answer``.  Some scorers ``eval`` the
answer or parse it with sympy, so scoring runs in sandbox worker processes (``trgrpo.sandbox``): never in the
trainer, each answer bounded by ``timeout`` seconds and each worker by ``memory_mb``; an answer whose scoring
times out or crashes scores 0 and is counted in ``train/reward_errors`` (``kwargs: {timeout: 5, workers: 2}``
on the reward; the task's own ``timeout`` / ``workers`` / ``memory_mb`` for held-out evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from trgrpo.rewards import SampleFailures
from trgrpo.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT, failures, get_pool, runs_in_sandbox
from trgrpo.tasks.base import Split, Task
from trgrpo.tasks.common import check_prompt_template, fill_template, normalise

VAL_SEED_OFFSET = 2**30
"""Held-out items use ``seed + VAL_SEED_OFFSET``: far from the training seeds ``seed + i``."""


def make_dataset(name: str, options: dict[str, Any], seed: int, size: int, key: str = "data.task.init_args"):
    """``reasoning_gym.create_dataset`` with errors that name the config key and the accepted values."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(
            f"{key}.name: unknown reasoning-gym task {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        )
    fields = [f.name for f in dataclasses.fields(DATASETS[name][1]) if f.name not in ("seed", "size")]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"{key}.options: reasoning-gym task {name!r} has no option(s) {unknown}; accepted: {fields}"
        )
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **options)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ValueError(f"{key}.options: reasoning-gym rejected {options} for {name!r}: {exc}") from exc


def question_key(item: dict) -> str:
    """The default identity of an item for the disjointness check: its normalised question."""
    return normalise(item["question"])


def draw_split(
    dataset, size: int, exclude: set[str], what: str, key: Callable[[dict], str] = question_key
) -> list[dict]:
    """``size`` items of ``dataset`` in index order, skipping those whose ``key`` is in ``exclude``."""
    items, i, budget = [], 0, 10 * size + 100
    while len(items) < size:
        if i >= budget:
            raise ValueError(
                f"data.task: found only {len(items)} {what} items whose question is not in the training "
                f"split after {budget} draws; lower val_size or choose options with more distinct items"
            )
        item = dataset[i]
        i += 1
        if key(item) not in exclude:
            items.append(item)
    return items


def draw_levels(
    name: str,
    level_options: dict[str | int | None, dict[str, Any]],
    train_size: int,
    val_size: int,
    seed: int,
    key: Callable[[dict], str] = question_key,
) -> tuple[dict, dict]:
    """Items per level: (train, val), dicts of level -> items.

    Training items of every level come from ``seed``; held-out items from ``seed + VAL_SEED_OFFSET``,
    skipping any whose ``key`` (the question as the model will see it) is that of a training item of
    any level.
    """
    train = {}
    for label, opts in level_options.items():
        ds = make_dataset(name, opts, seed, train_size)
        train[label] = [ds[i] for i in range(train_size)]
    seen = {key(item) for items in train.values() for item in items}
    val = {
        label: draw_split(
            make_dataset(name, opts, seed + VAL_SEED_OFFSET, 10 * val_size + 100),
            val_size,
            seen,
            f"held-out {name}" + (f" level {label}" if label is not None else ""),
            key,
        )
        for label, opts in level_options.items()
    }
    return train, val


def draw_level_rows(
    name: str, level_options: dict, train_size: int, val_size: int, seed: int, template: str
) -> dict[str, list[dict]]:
    """``draw_levels`` turned into task rows (``to_row``)."""
    train, val = draw_levels(name, level_options, train_size, val_size, seed)
    return {
        split: [
            to_row(it, name, level_options[label], template, label)
            for label, items in items_by.items()
            for it in items
        ]
        for split, items_by in (("train", train), ("val", val))
    }


def extract_tagged(completion: str, tag: str | None) -> str | None:
    """The content of the last ``<tag>...</tag>`` block (stripped), the whole completion when ``tag`` is
    empty, None when there is no such block."""
    if not tag:
        return completion.strip()
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", completion, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


@lru_cache(maxsize=64)
def _scorer(name: str, options_json: str) -> Callable[[str | None, dict], float]:
    return make_dataset(name, json.loads(options_json), seed=0, size=1).score_answer


def score_answer(name: str, options_json: str, answer: str | None, entry: dict) -> float:
    """reasoning-gym's score of one answer (runs in a sandbox worker: the scorer may ``eval`` the answer)."""
    return float(_scorer(name, options_json)(answer, entry))


def score_answers(
    completions: list[str],
    rows: list[dict],
    answer_tag: str | None,
    timeout: float,
    workers: int,
    memory_mb: int,
) -> tuple[list[float], list[int], str]:
    """(scores, indices of the answers whose scoring failed or timed out, a description of the first)."""
    jobs = [
        (
            (
                r["rg_task"],
                r["rg_options"],
                extract_tagged(c, answer_tag),
                {"question": r["question"], "answer": r["answer"], "metadata": r["metadata"]},
            ),
            {},
        )
        for c, r in zip(completions, rows, strict=True)
    ]
    results = get_pool(workers, timeout, memory_mb, ("reasoning_gym",)).map(
        "trgrpo.tasks.reasoning_gym:score_answer", jobs
    )
    scores = [float(r.value) if r.status == "ok" else 0.0 for r in results]
    failed, message = failures(results, completions, "reasoning-gym's scorer")
    return scores, failed, message


@runs_in_sandbox
def reasoning_gym_reward(
    prompts: list[str],
    completions: list[str],
    rg_task: list[str],
    rg_options: list[str],
    question: list[str],
    answer: list[str],
    metadata: list[dict],
    answer_tag: str | None = "answer",
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = 1,
    memory_mb: int = DEFAULT_MEMORY_MB,
    **_: object,
) -> list[float]:
    """reasoning-gym's own score (in [0, 1]) of the answer in the last ``<answer>`` block of each completion.

    Columns come from ``ReasoningGymTask`` rows; a completion without the tag scores 0.  Scoring runs in
    ``workers`` sandbox processes, each answer bounded by ``timeout`` seconds and each process by
    ``memory_mb`` MiB; an answer whose scoring fails or times out scores 0 and is reported as a failed sample.
    """
    rows = [
        {"rg_task": t, "rg_options": o, "question": q, "answer": a, "metadata": m}
        for t, o, q, a, m in zip(rg_task, rg_options, question, answer, metadata, strict=True)
    ]
    scores, failed, message = score_answers(completions, rows, answer_tag, timeout, workers, memory_mb)
    if failed:
        raise SampleFailures(scores, failed, message)
    return scores


def to_row(item: dict, name: str, options: dict, template: str, level: str | int | None) -> dict:
    """A task row from a reasoning-gym item: prompt, reference columns and the scorer's identity."""
    row = {
        "prompt": fill_template(template, item["question"]),
        "question": item["question"],
        "answer": item["answer"],
        "metadata": item["metadata"],
        "rg_task": name,
        "rg_options": json.dumps(options, sort_keys=True),
    }
    if level is not None:
        row["level"] = level
    return row


class ReasoningGymTask(Task):
    """Any reasoning-gym task by name, with its own options and its own scorer.

    Args:
        name: reasoning-gym dataset name, e.g. ``knights_knaves``, ``countdown``, ``basic_arithmetic``,
            ``gsm_symbolic`` (an unknown name lists the valid ones).
        options: the dataset's own options (fields of its config dataclass, e.g. ``{n_people: 3}`` for
            ``knights_knaves``); ``seed`` and ``size`` are set from ``seed`` / ``train_size`` / ``val_size``.
        levels: difficulty levels as label -> options overriding ``options``
            (e.g. ``{"easy": {min_numbers: 3}, "hard": {min_numbers: 5}}``); every level gets ``train_size``
            and ``val_size`` items and its label in the ``level`` column, so evaluation is reported per
            level.  Empty = one level.
        train_size: training items (per level).
        val_size: held-out items (per level).
        seed: seed of the training items; held-out items use ``seed + 2**30`` and skip training questions.
        prompt_template: the prompt, with ``{question}`` replaced by the item's question.
        answer_tag: the model's answer is read from the last ``<answer_tag>...</answer_tag>`` block;
            empty = the whole completion.
        timeout: seconds the scorer may spend on one answer during held-out evaluation (in a sandbox worker).
        workers: sandbox worker processes that score held-out answers.
        memory_mb: memory limit of each worker in MiB (0 = none).
    """

    def __init__(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        levels: dict[str, dict[str, Any]] | None = None,
        train_size: int = 1000,
        val_size: int = 100,
        seed: int = 0,
        prompt_template: str = "{question}",
        answer_tag: str | None = "answer",
        timeout: float = DEFAULT_TIMEOUT,
        workers: int = 1,
        memory_mb: int = DEFAULT_MEMORY_MB,
    ) -> None:
        if train_size < 1 or val_size < 1:
            raise ValueError(
                f"data.task.init_args.train_size and val_size must be >= 1, got {train_size}, {val_size}"
            )
        check_prompt_template(prompt_template)
        self.name, self.options, self.levels = name, dict(options or {}), levels
        self.train_size, self.val_size, self.seed = train_size, val_size, seed
        self.prompt_template, self.answer_tag = prompt_template, answer_tag
        self.timeout, self.workers, self.memory_mb = timeout, workers, memory_mb
        for opts in self._level_options().values():  # fail on a bad name or option now, not at set-up
            make_dataset(name, opts, seed=seed, size=1)
        self._cache: dict[str, list[dict]] = {}

    def _level_options(self) -> dict[str | None, dict[str, Any]]:
        if not self.levels:
            return {None: self.options}
        return {label: {**self.options, **(extra or {})} for label, extra in self.levels.items()}

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            self._cache = draw_level_rows(
                self.name,
                self._level_options(),
                self.train_size,
                self.val_size,
                self.seed,
                self.prompt_template,
            )
        return self._cache[split]

    def verify_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        """1.0 where reasoning-gym scores the answer 1.0 (exactly right), else 0.0;
        scored in sandbox workers."""
        scores, _, _ = score_answers(
            completions, rows, self.answer_tag, self.timeout, self.workers, self.memory_mb
        )
        return [1.0 if s >= 1.0 else 0.0 for s in scores]

    def verify(self, completion: str, row: dict) -> float:
        return self.verify_batch([completion], [row])[0]

    def demonstration(self, row: dict) -> str:
        return (
            f"<{self.answer_tag}>{row['answer']}</{self.answer_tag}>"
            if self.answer_tag
            else str(row["answer"])
        )
