"""Math word problems from a ``datasets`` source, checked with math-verify in killable worker processes.

The source is a hub id (e.g. ``openai/gsm8k`` with ``name: main``), a builder name with local files
(``path: json`` + ``data_files: {train: train.jsonl, test: test.jsonl}``; also ``parquet`` and ``csv``),
or a local file or folder.  Column names and splits are configurable::

    data:
      task:
        class_path: trgrpo.tasks.MathTask
        init_args: {path: openai/gsm8k, name: main, val_split: test,
                    question_key: question, answer_key: answer}
    model:
      rewards:
        - {fn: trgrpo.tasks.math_data.math_verify_reward, kwargs: {timeout: 5.0}}

Reference answers are read from GSM8K's ``#### 42`` or from the last ``\\boxed{}`` of a solution; the
model's answer from the last ``\\boxed{}`` of its completion (or the last match of ``answer_pattern``).
Equivalence is math-verify's (``1/2`` = ``0.5`` = ``\\frac{1}{2}``).  math-verify's own timeout uses
SIGALRM, which only works in the main thread and cannot interrupt a C call such as a huge integer power
(``\\boxed{10^{10^{10}}}``), and parsing hands model output to sympy, so extraction, parsing and comparison
run side by side in ``workers`` (default 4) sandbox worker processes (``trgrpo.sandbox``): a sample that takes
longer than ``timeout`` seconds has its worker killed and replaced, scores 0 and is counted in
``train/reward_errors``, and the other answers keep their own ``timeout`` each (the reward's call limit is
raised to fit); ``memory_mb`` bounds each worker's memory.
"""

from __future__ import annotations

import logging
import os
import random
import re

from trgrpo.rewards import SampleFailures
from trgrpo.sandbox import (
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    DEFAULT_WORKERS,
    failures,
    get_pool,
    runs_in_sandbox,
)
from trgrpo.tasks.base import Split, Task
from trgrpo.tasks.common import check_data_file, check_prompt_template, fill_template, normalise

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# --------------------------------------------------------------------------- answers


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or brace-less ``\\boxed 5``); None when there
    is none or its braces never close."""
    matches = list(re.finditer(r"\\(?:boxed|fbox)(\s*\{)?", text))
    if not matches:
        return None
    m = matches[-1]
    if m.group(1) is None:
        bare = re.match(r"\\boxed\s+([^\s$]+)", text[m.start() :])
        return bare.group(1) if bare else None
    depth = 1
    for i in range(m.end(), len(text)):
        depth += 1 if text[i] == "{" else -1 if text[i] == "}" else 0
        if depth == 0:
            return text[m.end() : i]
    return None


def extract_reference(solution: str) -> str:
    """The reference answer of a solution: after GSM8K's last ``####``, else the last ``\\boxed{}``, else the
    whole text (stripped); thousands separators of a plain number are removed."""
    if "####" in solution:
        ref = solution.rsplit("####", 1)[1].strip()
    else:
        ref = last_boxed(solution) or solution.strip()
    return ref.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", ref) else ref


def extract_model_answer(completion: str, pattern: str | None = None) -> str | None:
    """The model's answer: the last ``\\boxed{}``, or with ``pattern`` its last match
    (group 1 if it has one)."""
    if pattern is None:
        return last_boxed(completion)
    matches = list(re.finditer(pattern, completion, flags=re.DOTALL))
    if not matches:
        return None
    m = matches[-1]
    return m.group(1) if m.re.groups else m.group(0)


def check_answer(gold: str, completion: str, pattern: str | None = None) -> bool:
    """math-verify equivalence of the model's answer and ``gold`` (no timeout: run it in a worker)."""
    from math_verify import parse, verify

    pred = extract_model_answer(completion, pattern)
    if pred is None or not pred.strip():
        return False
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))


# --------------------------------------------------------------------------- checks in sandbox workers

MATH_PRELOAD = ("trgrpo.tasks.math_data:warm_up",)


def warm_up() -> None:
    """Import sympy and the parsers in a worker before it takes jobs (and keep math-verify's logs quiet)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check_answer("1", "\\boxed{1}")


def verify_answers(
    golds: list[str],
    completions: list[str],
    pattern: str | None,
    timeout: float,
    workers: int,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> tuple[list[float], list[int], str]:
    """(scores 1.0 / 0.0, indices of the checks that failed or timed out, a description of the first), each
    check run by ``check_answer`` in a ``trgrpo.sandbox`` worker."""
    pool = get_pool(workers, timeout, memory_mb, MATH_PRELOAD)
    results = pool.map(
        "trgrpo.tasks.math_data:check_answer",
        [((str(g), c, pattern), {}) for g, c in zip(golds, completions, strict=True)],
    )
    scores = [1.0 if r.status == "ok" and r.value is True else 0.0 for r in results]
    failed, message = failures(results, completions, "math-verify")
    return scores, failed, message


@runs_in_sandbox
def math_verify_reward(
    prompts: list[str],
    completions: list[str],
    answer: list[str],
    answer_pattern: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    **_: object,
) -> list[float]:
    """1.0 when the last ``\\boxed{}`` of the completion (or the last match of ``answer_pattern``) equals the
    reference ``answer`` under math-verify, else 0.0.  The checks run side by side in ``workers`` sandbox
    worker processes (``trgrpo.sandbox``); one that takes longer than ``timeout`` seconds is abandoned (its
    worker killed) and reported as a failed sample, and costs no other answer its check: the reward's call
    limit (``model.rewards[].timeout``) is raised to what the batch needs at worst
    (``trgrpo.rewards.sandbox_call_limit``).  ``memory_mb`` bounds each worker's memory."""
    scores, failed, message = verify_answers(answer, completions, answer_pattern, timeout, workers, memory_mb)
    if failed:
        raise SampleFailures(scores, failed, message)
    return scores


# --------------------------------------------------------------------------- the task


class MathTask(Task):
    """Math problems from a ``datasets`` source with math-verify checking.

    Rows carry ``question``, ``answer`` (the extracted reference), ``solution`` (the raw answer column)
    and, with ``level_key``, ``level``.

    Args:
        path: a hub id (``openai/gsm8k``), a builder (``json``, ``parquet``, ``csv``) used with
            ``data_files``, or a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file (read as the
            training split) or folder.
        name: the dataset's configuration name (``main`` for GSM8K).
        data_files: local files per split, e.g. ``{train: data/train.jsonl, test: data/test.jsonl}``.
        train_split: split to train on.
        val_split: held-out split; empty = hold out ``val_size`` random rows of the training split.
        question_key: column holding the question.
        answer_key: column holding the reference answer or solution (``#### 42`` or ``\\boxed{}``).
        level_key: optional column holding a difficulty level (e.g. ``level`` in MATH).
        train_size: keep this many training rows, drawn at random (empty = all).
        val_size: keep the first this many held-out rows (empty = all; required when ``val_split`` is empty).
        prompt_template: the prompt, with ``{question}`` replaced by the question.
        answer_pattern: regex whose last match (group 1 if any) is the model's answer;
            empty = last ``\\boxed{}``.
        timeout: seconds math-verify may spend on one answer during evaluation.
        workers: verifier processes used during evaluation (the reward's default: they share one pool).
        memory_mb: memory limit of each verifier process in MiB (0 = none).
        cache_dir: ``datasets`` cache folder (empty = its default).
        seed: seed of the training subsample and of the held-out carve-out.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        question_key: str = "question",
        answer_key: str = "answer",
        level_key: str | None = None,
        train_size: int | None = None,
        val_size: int | None = None,
        prompt_template: str = (
            "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
        ),
        answer_pattern: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        workers: int = DEFAULT_WORKERS,
        memory_mb: int = DEFAULT_MEMORY_MB,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        if val_split is None and not val_size:
            raise ValueError(
                "data.task.init_args.val_size is required when val_split is empty "
                "(that many training rows are held out)"
            )
        check_prompt_template(prompt_template)
        if answer_pattern is not None:
            try:
                re.compile(answer_pattern)
            except re.error as exc:
                raise ValueError(f"data.task.init_args.answer_pattern is not a valid regex: {exc}") from exc
        for key, value in (("train_size", train_size), ("val_size", val_size)):
            if value is not None and value < 1:
                raise ValueError(f"data.task.init_args.{key} must be >= 1 (or empty), got {value}")
        self.path, self.name, self.data_files = path, name, data_files
        self.train_split, self.val_split = train_split, val_split
        self.question_key, self.answer_key, self.level_key = question_key, answer_key, level_key
        self.train_size, self.val_size, self.prompt_template = train_size, val_size, prompt_template
        self.answer_pattern, self.timeout, self.workers = answer_pattern, timeout, workers
        self.memory_mb = memory_mb
        self.cache_dir, self.seed = cache_dir, seed
        self._cache: dict[str, list[dict]] = {}

    def _load(self, split: str):
        import datasets

        path, data_files = self.path, self.data_files
        builder = BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is not None and os.path.isfile(path):
            path, data_files = builder, {self.train_split: self.path}
        key = "train_split" if split == self.train_split else "val_split"
        self._check_files(split)
        try:
            ds = datasets.load_dataset(
                path, name=self.name, data_files=data_files, split=split, cache_dir=self.cache_dir
            )
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise ValueError(f"data.task.init_args.{key}={split!r}: {exc}") from exc
            raise
        for k in (self.question_key, self.answer_key, self.level_key):
            if k is not None and k not in ds.column_names:
                which = {self.question_key: "question_key", self.answer_key: "answer_key"}.get(k, "level_key")
                raise ValueError(
                    f"data.task.init_args.{which}: column {k!r} is not in the {split!r} split of "
                    f"{self.path!r}; columns present: {ds.column_names}"
                )
        return ds

    def _check_files(self, split: str) -> None:
        """Empty or non-UTF-8 local files of ``split`` fail here, naming the key and the file."""
        if self.data_files is None:
            check_data_file(self.path, "data.task.init_args.path")
            return
        files = self.data_files.get(split, [])
        for file in [files] if isinstance(files, str) else files:
            check_data_file(file, f"data.task.init_args.data_files.{split}")

    def _to_rows(self, ds, split: str) -> list[dict]:
        rows = []
        levels = ds[self.level_key] if self.level_key is not None else [None] * len(ds)
        for i, (q, a, level) in enumerate(
            zip(ds[self.question_key], ds[self.answer_key], levels, strict=True)
        ):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(
                    f"data.task: {split!r} row {i} has an empty or non-string question "
                    f"({self.question_key}={q!r})"
                )
            ref = extract_reference(str(a)) if a is not None else ""
            if not ref:
                raise ValueError(
                    f"data.task: {split!r} row {i} has an empty reference answer ({self.answer_key}={a!r})"
                )
            row = {
                "prompt": fill_template(self.prompt_template, q),
                "question": q,
                "answer": ref,
                "solution": str(a),
            }
            if self.level_key is not None:
                row["level"] = level if isinstance(level, (int, str)) else str(level)
            rows.append(row)
        return rows

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            train = self._to_rows(self._load(self.train_split), self.train_split)
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            if self.val_split is None:
                val = [train[i] for i in order[: self.val_size]]
                train = [train[i] for i in order[self.val_size :]]
            else:
                val = self._to_rows(self._load(self.val_split), self.val_split)[: self.val_size]
                train = [train[i] for i in order]
            train = train[: self.train_size] if self.train_size else train
            self._cache = {"train": train, "val": self._drop_seen(val, train)}
        return self._cache[split]

    @staticmethod
    def _drop_seen(val: list[dict], train: list[dict]) -> list[dict]:
        """Held-out rows whose question is not a training question (the splits never share an item)."""
        seen = {normalise(r["question"]) for r in train}
        kept = [r for r in val if normalise(r["question"]) not in seen]
        if len(kept) < len(val):
            log.warning(
                "data.task: dropped %d held-out rows whose question is also a training question",
                len(val) - len(kept),
            )
        if not kept:
            raise ValueError("data.task: every held-out row is also a training row")
        return kept

    def verify_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        scores, _, _ = verify_answers(
            [r["answer"] for r in rows],
            completions,
            self.answer_pattern,
            self.timeout,
            self.workers,
            self.memory_mb,
        )
        return scores

    def verify(self, completion: str, row: dict) -> float:
        return self.verify_batch([completion], [row])[0]

    def demonstration(self, row: dict) -> str:
        return f"The answer is $\\boxed{{{row['answer']}}}$."
