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
without ``**kwargs`` receives only the columns it names.  ``check_rewards`` checks every reward against the
columns of one task row before any model is loaded (the CLI runs it): a function that cannot be called with
them, that requires a column the task does not give, or whose ``kwargs`` name no parameter of it stops the
run at start-up with an error naming it.

A reward whose batch call raises is logged once with the reason and retried sample by sample; samples that
still fail score ``failure_score`` and are counted in ``train/reward_errors``; the first traceback is logged
once and the run goes on.  A reward can also report failures of single samples by raising ``SampleFailures``.
One that returns a number of scores other than one per completion breaks its contract, which no retry mends:
every sample of that call scores ``failure_score`` and is counted, with a warning; a reward that does so on
``BREACHES_TO_STOP`` (3) calls in a row stops the run with an error naming it.

Every call is bounded by ``timeout`` seconds (default ``DEFAULT_REWARD_TIMEOUT`` = 60; 0 or empty turns it
off); a call that outlives it fails all the samples it was given, with a warning naming the reward each time.
An ordinary reward runs in a worker thread for this; a thread cannot be killed, so it is abandoned, and a C
call that holds the GIL (``9**9**9**9``) is not interrupted: a reward that evaluates model output must not run
in the trainer.  The built-in verifiers that do (``math_verify_reward``, ``reasoning_gym_reward``) score in
killable sandbox processes (``trgrpo.sandbox``), each answer bounded by their own ``kwargs.timeout``; the
call's ``timeout`` is raised to what gives every answer that time however slow its neighbours
(``sandbox_call_limit``).  ``sandbox: true`` runs a reward of your own in a sandbox worker (its module must be
importable by name; the columns are sent to the worker process, and ``memory_mb`` bounds its memory)::

    model:
      rewards:
        - {fn: my_project.rewards.runs_model_code, sandbox: true, timeout: 20, memory_mb: 1024}

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

from trgrpo.sandbox import DEFAULT_MEMORY_MB, call_seconds, function_path, get_pool, time_limit

if TYPE_CHECKING:  # torch is imported where rewards are combined, so verifier worker processes start light
    from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_REWARD_TIMEOUT = 60.0
"""Seconds one reward call may take unless ``model.rewards[].timeout`` says otherwise (0 = no limit)."""
TRAINER_COLUMNS = ("completion_length", "truncated")
"""Columns the trainer adds to the task's for every completion."""
BREACHES_TO_STOP = 3
"""Calls in a row on which a reward returns the wrong number of scores before the run stops."""


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
    timeout: float | None = DEFAULT_REWARD_TIMEOUT
    """Seconds one call may take (the batch call, then each single-sample retry; for a verifier that scores in
    sandbox workers, raised to what each answer's own ``kwargs.timeout`` needs); a slower call fails every
    sample it was given, with a warning naming the reward.  0 or empty = no limit, and ``fn`` runs in the
    calling thread (needed by code that uses signals)."""
    sandbox: bool = False
    """Run ``fn`` in a killable sandbox worker process (``trgrpo.sandbox``) instead of the trainer: for a
    reward that runs or evaluates model output.  ``fn`` must be importable by name."""
    memory_mb: int = DEFAULT_MEMORY_MB
    """With ``sandbox``: memory limit of the worker process in MiB (0 = none)."""

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout < 0:
            raise ValueError(
                f"model.rewards[].timeout must be >= 0 seconds (0 or empty = no limit), got {self.timeout}"
            )
        if not math.isfinite(self.weight):
            raise ValueError(f"model.rewards[].weight must be a finite number, got {self.weight}")
        if self.memory_mb < 0:
            raise ValueError(f"model.rewards[].memory_mb must be >= 0 (0 = no limit), got {self.memory_mb}")
        if self.sandbox:
            try:
                function_path(self.fn)
            except ValueError as exc:
                raise ValueError(f"model.rewards[].sandbox: {exc}") from exc

    @property
    def label(self) -> str:
        return self.name or getattr(self.fn, "__name__", type(self.fn).__name__)


class RewardResult(NamedTuple):
    total: Tensor  # [N] weighted sum over terms (a None term counts 0)
    per_term: dict[str, Tensor]  # name -> [N], NaN where the term returned None
    errors: int  # samples that raised or timed out, over all terms


class RewardTimeout(Exception):
    """A reward call took longer than its ``RewardSpec.timeout``."""


class RewardContractError(ValueError):
    """A reward returned other than one score per completion: a bug of the function that no retry mends."""


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
_breaches: dict[str, int] = {}  # reward label -> calls in a row that returned the wrong number of scores


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _run(spec: RewardSpec, n: int, args: tuple, kwargs: dict) -> Sequence:
    """``spec.fn(*args, **kwargs)`` on ``n`` completions bounded by ``spec.timeout``: in a sandbox worker
    (``spec.sandbox``), in this thread under a pool time limit (a reward that scores in sandbox workers
    itself), in a daemon worker thread (any other reward), or plainly in this thread (no timeout)."""
    if spec.sandbox:
        return _run_in_sandbox(spec, args, kwargs)
    if getattr(spec.fn, "runs_in_sandbox", False):
        with time_limit(sandbox_call_limit(spec, n)):
            return spec.fn(*args, **kwargs)
    if not spec.timeout:
        return spec.fn(*args, **kwargs)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = spec.fn(*args, **kwargs)
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


def sandbox_call_limit(spec: RewardSpec, n: int) -> float | None:
    """Seconds a call on ``n`` completions of a reward that scores in sandbox workers may take: ``timeout``
    raised to what gives every answer its own per-answer time (``trgrpo.sandbox.call_seconds`` of the
    function's ``timeout`` and ``workers``, from ``kwargs`` or its defaults); None when ``timeout`` is off."""
    if not spec.timeout:
        return None
    settings = {**{k: p.default for k, p in inspect.signature(spec.fn).parameters.items()}, **spec.kwargs}
    per_answer, workers = settings.get("timeout"), settings.get("workers", 1)
    if not isinstance(per_answer, (int, float)) or not per_answer:
        return spec.timeout  # answers are not bounded one by one: the call's limit is all there is
    return max(spec.timeout, call_seconds(n, int(workers or 1), float(per_answer)))


def _run_in_sandbox(spec: RewardSpec, args: tuple, kwargs: dict) -> Sequence:
    (result,) = get_pool(1, spec.timeout or 0, spec.memory_mb).map(function_path(spec.fn), [(args, kwargs)])
    if result.status == "timeout":
        why = f"took longer than its timeout of {spec.timeout}s (its sandbox worker was killed)"
        raise RewardTimeout(f"reward {spec.label!r} {why}")
    if result.status != "ok":
        raise RuntimeError(f"reward {spec.label!r} failed in its sandbox worker: {result.value}")
    return result.value


def _checked(spec: RewardSpec, out, n: int) -> list[float | None]:
    """The reward's output as ``n`` finite floats or None; raises on anything else."""
    scores = list(out)
    if len(scores) != n:
        raise RewardContractError(f"reward {spec.label!r} returned {len(scores)} scores for {n} completions")
    clean: list[float | None] = []
    for s in scores:
        value = None if s is None else float(s)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"reward {spec.label!r} returned a non-finite score {s!r}")
        clean.append(value)
    return clean


def _call_arguments(
    fn: Callable, prompts, completions, columns: dict[str, list], kwargs: dict
) -> tuple[tuple, dict]:
    """The arguments ``fn`` is called with, by keyword as in TRL (``prompts=..., completions=...``).

    A function with ``**kwargs`` gets every column; otherwise only the names it declares.  A function whose
    first parameters are positional-only gets prompts and completions by position.
    """
    given = {"prompts": prompts, "completions": completions, **columns, **kwargs}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return (), given
    if any(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in params):
        return (prompts, completions), {k: v for k, v in given.items() if k not in ("prompts", "completions")}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        given = {k: v for k, v in given.items() if k in names}
    return (), given


def check_reward_columns(spec: RewardSpec, signature: inspect.Signature, columns: Sequence[str]) -> None:
    """Raise when ``spec.fn`` requires a keyword that neither the task's columns nor ``spec.kwargs`` give."""
    available = {"prompts", "completions", *columns, *spec.kwargs}
    for p in signature.parameters.values():
        required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and p.name not in available:
            raise ValueError(
                f"reward {spec.label!r} (model.rewards[].fn) needs the column {p.name!r}, "
                f"which the task does not provide; columns present: {sorted(columns)}"
            )


def check_rewards(specs: Sequence[RewardSpec], task_columns: Sequence[str]) -> None:
    """Check every reward against the columns of a task row (plus ``TRAINER_COLUMNS``) without calling it:
    the columns it requires exist, its ``kwargs`` are parameters of it, and it can be called with what it will
    be given.  Raises ValueError naming the reward."""
    columns = sorted({*task_columns, *TRAINER_COLUMNS})
    for spec in specs:
        try:
            signature = inspect.signature(spec.fn)
        except (TypeError, ValueError):  # some builtins have no signature: nothing to check
            continue
        check_reward_columns(spec, signature, columns)
        params = signature.parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(spec.kwargs) - set(params))
            if unknown:
                raise ValueError(
                    f"reward {spec.label!r}: model.rewards[].kwargs {unknown} are not parameters of "
                    f"the function; its parameters: {list(params)}"
                )
        args, kwargs = _call_arguments(spec.fn, [""], [""], {c: [None] for c in columns}, spec.kwargs)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValueError(
                f"reward {spec.label!r} (model.rewards[].fn) cannot be called as "
                f"fn(prompts, completions, **columns) with the columns {columns}: {exc}"
            ) from exc


def _call_batch(spec: RewardSpec, prompts, completions, columns) -> tuple[list[float | None], int]:
    """(scores, failed samples) of one call on the whole batch; ``SampleFailures`` scores its failed samples
    ``failure_score``.  Raises what the call raised, and ``RewardContractError`` on a wrong score count."""
    n, call = len(completions), _call_arguments(spec.fn, prompts, completions, columns, spec.kwargs)
    try:
        return _checked(spec, _run(spec, n, *call), n), 0
    except SampleFailures as exc:
        scores = _checked(spec, exc.scores, n)
        for i in exc.failed:
            scores[i] = spec.failure_score
        what = f"reward {spec.label!r} failed on {len(exc.failed)} of {n} samples"
        _warn_once(f"{spec.label}:samples", "%s, scoring them %s: %s", what, spec.failure_score, exc.message)
        return scores, len(exc.failed)


def _contract_broken(spec: RewardSpec, exc: RewardContractError, n: int) -> None:
    """Count a call that broke the one-score-per-completion contract; stop the run when the reward broke it
    on each of its last ``BREACHES_TO_STOP`` calls (a bug of the function, not bad luck of a batch)."""
    _breaches[spec.label] = _breaches.get(spec.label, 0) + 1
    if _breaches[spec.label] >= BREACHES_TO_STOP:
        raise RewardContractError(
            f"{exc} on each of its last {BREACHES_TO_STOP} calls: a reward must return one score (or None) "
            "per completion, in order; fix the function named by model.rewards[].fn"
        ) from exc
    log.warning("%s; scoring all %d of them %s (counted as errors)", exc, n, spec.failure_score)


def _call_one(spec: RewardSpec, prompts, completions, columns) -> tuple[list[float | None], int]:
    """(scores, errors) of one reward on the batch: a timeout or a wrong number of scores fails every
    sample; any other error falls back to calling it sample by sample."""
    n = len(completions)
    try:
        scores, errors = _call_batch(spec, prompts, completions, columns)
    except RewardTimeout as exc:
        hint = "(model.rewards[].timeout; 0 turns it off)"
        log.warning("%s on a batch of %d completions; scoring them %s %s", exc, n, spec.failure_score, hint)
        return [spec.failure_score] * n, n
    except RewardContractError as exc:
        _contract_broken(spec, exc, n)
        return [spec.failure_score] * n, n
    except Exception as exc:  # noqa: BLE001 - logged, then every sample is tried on its own
        what = f"reward {spec.label!r} failed on the batch of {n} completions ({type(exc).__name__}: {exc})"
        _warn_once(f"{spec.label}:batch", "%s; retrying sample by sample", what)
        return _call_each(spec, prompts, completions, columns)
    _breaches.pop(spec.label, None)
    return scores, errors


def _call_each(spec: RewardSpec, prompts, completions, columns) -> tuple[list[float | None], int]:
    """(scores, errors) of the reward called on one sample at a time; a sample that fails scores
    ``failure_score`` (the first traceback is logged once)."""
    scores: list[float | None] = []
    errors = 0
    for i in range(len(completions)):
        row = {k: [v[i]] for k, v in columns.items()}
        try:
            out = _run(spec, 1, *_call_arguments(spec.fn, [prompts[i]], [completions[i]], row, spec.kwargs))
            scores.append(_checked(spec, out, 1)[0])
        except Exception as exc:  # noqa: BLE001 - scored as failed and counted
            errors += 1
            scores.append(spec.failure_score)
            if isinstance(exc, RewardTimeout):
                log.warning("%s on sample %d; scoring it %s", exc, i, spec.failure_score)
                continue
            what = f"reward {spec.label!r} failed on sample {i}; scoring it {spec.failure_score}"
            _warn_once(spec.label, "%s. First traceback:\n%s", what, traceback.format_exc())
    return scores, errors


def collate_rows(rows: list[dict]) -> dict[str, list]:
    """One dict per row -> column lists, the layout of a batch and of what rewards receive (keys of the first
    row; a key another row lacks reads None).  The data loaders' ``collate_fn``."""
    return {key: [r.get(key) for r in rows] for key in rows[0]}


def batch_rows(batch: dict[str, list]) -> list[dict]:
    """Column lists -> one dict per row: the inverse of ``collate_rows``."""
    return [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]


def reward_columns(
    batch: dict[str, list], completion_mask, truncated, group_size: int = 1
) -> dict[str, list]:
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
    """Evaluate every reward term on N completions and combine them with their weights.

    The rewards are not checked against ``columns`` here: ``check_rewards`` did that once, at start-up."""
    import torch

    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)
    per_term: dict[str, Tensor] = {}
    errors = 0
    for spec in specs:
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


def last_number(text: str) -> str | None:
    """The last integer written in ``text`` (None when there is none)."""
    found = _INT.findall(text)
    return found[-1] if found else None


def last_number_match(
    prompts: list[str], completions: list[str], answer: list[str], **_: object
) -> list[float]:
    """1.0 when the last integer in the completion equals the reference ``answer`` ("37 + 58 = 95" counts)."""
    return [
        1.0 if last_number(c) == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)
    ]


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
    return [
        right if has_think_answer_format(with_prefilled_think(p, c)) else wrong
        for p, c in zip(prompts, completions, strict=True)
    ]


def soft_overlong_punishment(
    prompts: list[str],
    completions: list[str],
    completion_length: list[int],
    max_length: int,
    cache_length: int,
    **_: object,
) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to ``max_length - cache_length`` tokens, then falling linearly
    to -1 at ``max_length``, and -1 beyond.

    ``max_length`` is normally ``model.sampling.max_new_tokens``; ``completion_length`` (tokens) is
    passed by the trainer.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"soft_overlong_punishment needs 0 < cache_length <= max_length, got {cache_length}, {max_length}"
        )
    free = max_length - cache_length
    out = []
    for n in completion_length:
        out.append(0.0 if n <= free else (free - n) / cache_length if n <= max_length else -1.0)
    return out
