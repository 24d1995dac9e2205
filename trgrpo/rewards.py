"""Reward functions and the code that calls them.

A reward is any callable with the signature shared by the common GRPO trainers::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the task's reference data for each completion (e.g. ``answer``), one list per column,
plus what the trainer knows about each completion: ``completion_length`` (tokens) and ``truncated``.
``None`` means "does not apply" and is left out of that reward's mean (it counts 0 in the total).
Rewards are chosen in YAML by import path, so a user's own function works without touching the
package; a path that cannot be imported stops the CLI while it parses the config, before any model
is loaded::

    model:
      rewards:
        - fn: trgrpo.rewards.exact_match
          weight: 1.0
        - fn: my_project.rewards.brevity
          weight: 0.1
          kwargs: {limit: 200}
          timeout: 30

Rewards are called by keyword (``prompts=..., completions=..., answer=...``, as TRL does); a function
without ``**kwargs`` receives only the columns it names, and one that requires a column the task does not
give stops the first step with an error naming it.  A reward that raises is retried
sample by sample; samples that still fail score ``failure_score`` and are counted in
``train/reward_errors``; the first traceback is logged once and the run goes on.  With ``timeout`` set,
each call runs in a worker thread and a call that outlives it fails all the samples it was given (a
thread cannot be killed: it is abandoned, and a C call that holds the GIL is not interrupted, which is
why the math verifier runs math-verify in a subprocess instead).  A reward can also report failures of
single samples without losing the others by raising ``SampleFailures``.

Built-in rewards here are task-independent; task rewards live with their tasks
(``trgrpo.tasks.knights_knaves.kk_answer_reward``, ``trgrpo.tasks.math_data.math_verify_reward``,
``trgrpo.tasks.reasoning_gym.reasoning_gym_reward``).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch is imported where rewards are combined, so verifier worker processes start light
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
    """Score given to a sample whose reward raised or timed out."""
    timeout: float | None = None
    """Seconds one call may take (the batch call, then each single-sample retry); a call that takes
    longer fails every sample it was given.  Empty = no limit, and ``fn`` runs in the calling thread
    (needed by code that uses signals, such as math-verify's own timeouts)."""

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"model.rewards[].timeout must be > 0 seconds (or empty), got {self.timeout}")
        if not math.isfinite(self.weight):
            raise ValueError(f"model.rewards[].weight must be a finite number, got {self.weight}")

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__name__", type(self.fn).__name__)


class RewardResult(NamedTuple):
    total: Tensor  # [N] weighted sum over terms (a None term counts 0)
    per_term: dict[str, Tensor]  # name -> [N], NaN where the term returned None
    errors: int  # samples that raised or timed out, over all terms


class RewardTimeout(Exception):
    """A reward call took longer than its ``RewardSpec.timeout``."""


class SampleFailures(Exception):
    """Raised by a reward to report that some samples failed while the others were scored.

    Args:
        scores: one score per completion (the failed ones are replaced by ``failure_score``).
        failed: indices of the samples that failed.
        message: what went wrong (logged once per reward).
    """

    def __init__(self, scores: Sequence[float | None], failed: Sequence[int], message: str) -> None:
        super().__init__(message)
        self.scores, self.failed, self.message = list(scores), list(failed), message


_warned: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _run(spec: RewardSpec, call: Callable[[], Sequence]) -> Sequence:
    """``call()`` in this thread, or in a daemon worker thread bounded by ``spec.timeout``."""
    if spec.timeout is None:
        return call()
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"trgrpo-reward-{spec.label}", daemon=True)
    worker.start()
    worker.join(spec.timeout)
    if worker.is_alive():
        raise RewardTimeout(f"reward {spec.label!r} took longer than its timeout of {spec.timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _checked(spec: RewardSpec, out, n: int) -> list[float | None]:
    """The reward's output as ``n`` finite floats or None; raises on anything else."""
    scores = list(out)
    if len(scores) != n:
        raise ValueError(f"reward {spec.label!r} returned {len(scores)} scores for {n} completions")
    clean: list[float | None] = []
    for s in scores:
        value = None if s is None else float(s)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"reward {spec.label!r} returned a non-finite score {s!r}")
        clean.append(value)
    return clean


def _keyword_call(fn: Callable, prompts, completions, columns: dict[str, list], kwargs: dict) -> Callable[[], Sequence]:
    """A zero-argument call of ``fn`` by keyword, as TRL calls rewards (``prompts=..., completions=...``).

    A function with ``**kwargs`` gets every column; otherwise only the names it declares.  A function whose
    first parameters are positional-only gets prompts and completions by position.
    """
    given = {"prompts": prompts, "completions": completions, **columns, **kwargs}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return lambda: fn(**given)
    positional_only = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    if positional_only:
        rest = {k: v for k, v in given.items() if k not in ("prompts", "completions")}
        return lambda: fn(prompts, completions, **rest)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        given = {k: v for k, v in given.items() if k in names}
    return lambda: fn(**given)


def check_reward_columns(spec: RewardSpec, columns: Sequence[str]) -> None:
    """Raise when ``spec.fn`` requires a keyword that neither the task's columns nor ``spec.kwargs`` give."""
    try:
        params = list(inspect.signature(spec.fn).parameters.values())
    except (TypeError, ValueError):
        return
    available = {"prompts", "completions", *columns, *spec.kwargs}
    for p in params:
        required = p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and p.name not in available:
            raise ValueError(
                f"reward {spec.label!r} (model.rewards[].fn) needs the column {p.name!r}, which the task does "
                f"not provide; columns present: {sorted(columns)}"
            )


def _call_one(spec: RewardSpec, prompts, completions, columns) -> tuple[list[float | None], int]:
    """Call a reward on the batch, falling back to sample-by-sample when it raises."""
    n = len(completions)
    try:
        out = _run(spec, _keyword_call(spec.fn, prompts, completions, columns, spec.kwargs))
        return _checked(spec, out, n), 0
    except RewardTimeout as exc:
        _warn_once(f"{spec.label}:timeout", "%s on a batch of %d; scoring those samples %s", exc, n, spec.failure_score)
        return [spec.failure_score] * n, n
    except SampleFailures as exc:
        scores = _checked(spec, exc.scores, n)
        for i in exc.failed:
            scores[i] = spec.failure_score
        _warn_once(f"{spec.label}:samples", "reward %r failed on %d of %d samples, scoring them %s: %s",
                   spec.label, len(exc.failed), n, spec.failure_score, exc.message)
        return scores, len(exc.failed)
    except Exception:
        pass
    scores: list[float | None] = []
    errors = 0
    for i in range(n):
        row = {k: [v[i]] for k, v in columns.items()}
        try:
            out = _run(spec, _keyword_call(spec.fn, [prompts[i]], [completions[i]], row, spec.kwargs))
            scores.append(_checked(spec, out, 1)[0])
        except Exception:
            errors += 1
            scores.append(spec.failure_score)
            _warn_once(spec.label, "reward %r failed on sample %d; scoring it %s. First traceback:\n%s",
                       spec.label, i, spec.failure_score, traceback.format_exc())
    return scores, errors


def reward_columns(batch: dict[str, list], completion_mask, truncated, group_size: int = 1) -> dict[str, list]:
    """The columns rewards receive: the task's (each repeated for the G completions of its prompt, the
    prompt itself left out), plus ``completion_length`` (trained tokens, from the [N, T] mask) and
    ``truncated`` ([N] bool)."""
    columns = {k: [v for v in vals for _ in range(group_size)] for k, vals in batch.items() if k != "prompt"}
    columns["completion_length"] = completion_mask.sum(1).long().tolist()
    columns["truncated"] = truncated.tolist()
    return columns


def compute_rewards(
    specs: Sequence[RewardSpec], prompts: list[str], completions: list[str], columns: dict[str, list]
) -> RewardResult:
    """Evaluate every reward term on N completions and combine them with their weights."""
    import torch

    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)
    per_term: dict[str, Tensor] = {}
    errors = 0
    for spec in specs:
        check_reward_columns(spec, list(columns))
        scores, errs = _call_one(spec, prompts, completions, columns)
        errors += errs
        values = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)
        per_term[spec.label] = values
        total += spec.weight * torch.nan_to_num(values, nan=0.0)
    return RewardResult(total, per_term, errors)


# --------------------------------------------------------------------------- built-in rewards

_INT = re.compile(r"-?\d+")


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the reference ``answer``."""
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)]


def integer_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 when the first integer in the completion equals the reference ``answer``."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        m = _INT.search(c)
        out.append(1.0 if m is not None and m.group(0) == str(a).strip() else 0.0)
    return out


def regex_format(
    prompts: list[str], completions: list[str], pattern: str = r"^\s*-?\d+\s*$", **_: object
) -> list[float]:
    """1.0 when the whole completion matches ``pattern`` (default: a bare integer), else 0.0."""
    rx = re.compile(pattern, re.DOTALL)
    return [1.0 if rx.fullmatch(c) else 0.0 for c in completions]


THINK_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def with_prefilled_think(prompt: str, completion: str) -> str:
    """The completion as the format check sees it: a prompt that ends by opening ``<think>`` (a prefilled
    assistant turn) counts as the completion's first tag."""
    return "<think>" + completion if prompt.rstrip().endswith("<think>") else completion


def has_think_answer_format(text: str) -> bool:
    """Each of ``<think> </think> <answer> </answer>`` exactly once and in that order (the Logic-RL check)."""
    if any(text.count(tag) != 1 for tag in THINK_TAGS):
        return False
    positions = [text.find(tag) for tag in THINK_TAGS]
    return positions == sorted(positions)


def think_answer_format(
    prompts: list[str], completions: list[str], right: float = 1.0, wrong: float = -1.0, **_: object
) -> list[float]:
    """``right`` for ``<think>...</think><answer>...</answer>`` (each tag once, in order), else ``wrong``.

    The format reward of the published Knights-and-Knaves setups (+1 / -1).
    """
    return [right if has_think_answer_format(with_prefilled_think(p, c)) else wrong
            for p, c in zip(prompts, completions, strict=True)]


def soft_overlong_punishment(
    prompts: list[str], completions: list[str], completion_length: list[int], max_length: int,
    cache_length: int, **_: object,
) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to ``max_length - cache_length`` tokens, then falling linearly
    to -1 at ``max_length``, and -1 beyond.

    ``max_length`` is normally ``model.sampling.max_new_tokens``; ``completion_length`` (tokens) is
    passed by the trainer.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"soft_overlong_punishment needs 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    free = max_length - cache_length
    out = []
    for n in completion_length:
        out.append(0.0 if n <= free else (free - n) / cache_length if n <= max_length else -1.0)
    return out
