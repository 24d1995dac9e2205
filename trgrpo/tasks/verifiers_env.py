"""``VerifiersEnvironment``: train on an installed verifiers environment, scored by its own rewards.

A verifiers environment (``pip install -e '.[verifiers]'``, then the environment's own package) is a
taskset: a package named after its id (``tiny-addition`` -> module ``tiny_addition``; a hub id
``owner/name@version`` is installed as ``name``) whose ``Taskset`` yields tasks, each a prompt plus the
task's data, scored by the task's ``@vf.reward`` methods (weighted, async or not) that read the finished
trace (``trace.last_reply``, ``trace.messages``) and the task data::

    data:
      task:
        class_path: trgrpo.tasks.VerifiersEnvironment
        init_args:
          env_id: tiny-addition
          env_args: {num_examples: 300}     # the taskset's config fields (verifiers' --env.taskset.*)
          eval_args: {split: test}          # overrides that select its evaluation split (empty: a slice)
          val_size: 50
    model:
      rewards: []                           # empty: one reward term per environment reward

With ``model.rewards`` empty the environment's rewards are the reward terms: one per reward function,
named after it (logged as ``train/rewards/<name>``) with its weight, so the weighted total is the
environment's own trace reward.  Each completion is handed to the reward as verifiers would after a
rollout of one chat turn: a trace holding the task's system prompt and prompt and the completion as the
assistant's reply (``finish_reason`` ``length`` where the completion was cut at the token budget).  A
function returning keyed scores gives the sum of its scores (verifiers weights each by the function's
weight, so the total is the same).  A reward that raises on a sample fails that sample only
(``failure_score``, counted in ``train/reward_errors``).

Held-out accuracy (``verify``): 1 where the accuracy reward (``accuracy_reward``; default the reward of
largest weight, the first on ties) scores at least ``accuracy_threshold``, else 0.

Single-turn only: trgrpo plays the tool-less chat program (verifiers' ``null`` harness).  Environments that
need more (tool servers, a container or runtime, LLM judges, an ``Env`` class or harness of their own,
setup / finalize hooks) are refused at start-up with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import logging
import math
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trgrpo.rewards import DEFAULT_REWARD_TIMEOUT, RewardSpec, SampleFailures
from trgrpo.tasks.base import Split, Task
from trgrpo.tasks.common import normalise

log = logging.getLogger(__name__)

KEY = "data.task.init_args"
INSTALL = "pip install -e '.[verifiers]'"
TASK_COLUMN = "vf_task"
"""Row column naming the environment task a row came from (the rewards look the task up by it)."""
RESERVED = {"prompt", "raw_prompt", "completion_length", "truncated", "level", TASK_COLUMN}
"""Column names a task field may not take (the trainer's own); such fields are left out of the rows."""
READS = {"task", "trace", "runtime"}
"""What a verifiers reward may ask for by name."""


def import_verifiers():
    """``verifiers.v1``, or an error naming the install line."""
    try:
        import verifiers.v1 as vf
    except ImportError as exc:
        raise ImportError(
            f"data.task: trgrpo.tasks.VerifiersEnvironment needs the verifiers package: {INSTALL} ({exc})"
        ) from exc
    return vf


def module_name(env_id: str) -> str:
    """The module an environment id is installed as (verifiers' own rule)."""
    return env_id.rsplit("/", 1)[-1].split("@", 1)[0].replace("-", "_").lower()


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it; its parent packages are)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def taskset_class(env_id: str, env_path: str | None):
    """The environment's ``Taskset`` class; errors name ``data.task.init_args.env_id``."""
    import_verifiers()
    from verifiers.v1.utils import loaders

    if not isinstance(env_id, str) or not env_id.strip():
        raise ValueError(f"{KEY}.env_id must name an installed verifiers environment, got {env_id!r}")
    if env_path:
        folder = str(Path(env_path).resolve())
        if not Path(folder).is_dir():
            raise ValueError(f"{KEY}.env_path: {env_path!r} is not a folder")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module = module_name(env_id)
    if not any(installed(m) for m in (f"verifiers.v1.tasksets.{module}", module)):
        where = f" or in {KEY}.env_path={env_path!r}" if env_path else ""
        raise ValueError(
            f"{KEY}.env_id: verifiers environment {env_id!r} is not installed (no module {module!r}{where}); "
            f"install its package (pip install ...), or point {KEY}.env_path at the folder that holds it"
        )
    try:
        cls = loaders.taskset_class(env_id)
    except (ImportError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{KEY}.env_id: cannot load verifiers environment {env_id!r}: {exc}") from exc
    return loaders, cls


def check_single_turn(env_id: str, loaders, cls, config, task) -> None:
    """Refuse what trgrpo cannot play or score faithfully yet, naming the reason."""
    vf = import_verifiers()
    reasons = []
    env_cls = loaders.environment_class(env_id)
    if env_cls is not vf.SingleAgentEnv:
        reasons.append(f"it runs its own Env class {env_cls.__name__} (multi-agent or a custom episode)")
    if loaders.default_harness_id(env_id) != "bash":
        reasons.append("it ships its own harness (an agent program)")
    if cls.toolsets(config) or type(task).toolsets(task.config):
        reasons.append("it gives the model tool servers (a tool environment)")
    if task.NEEDS_CONTAINER:
        reasons.append("its tasks need a container")
    if task.config.judges:
        reasons.append("it scores with LLM judges (they need a judge model endpoint)")
    hooks = [
        h
        for h in ("setup", "finalize", "stage_verifier")
        if getattr(type(task), h) is not getattr(vf.Task, h)
    ]
    if hooks:
        reasons.append(f"its tasks have {'/'.join(hooks)} hooks (they prepare a runtime)")
    for fn in task.hooks("reward"):
        params = inspect.signature(fn).parameters
        runtime = params.get("runtime")
        if runtime is not None and runtime.default is inspect.Parameter.empty:
            reasons.append(f"its reward {fn.__name__!r} reads the runtime")
        unknown = [p for p in params if p not in READS and params[p].default is inspect.Parameter.empty]
        if unknown:
            reasons.append(f"its reward {fn.__name__!r} needs {unknown}, which a single turn does not give")
    if task.data.prompt is None:
        reasons.append("its tasks have no prompt (the user opens the conversation)")
    if reasons:
        raise ValueError(
            f"{KEY}.env_id: verifiers environment {env_id!r} is not supported: {'; '.join(reasons)}.  "
            "Supported: single-turn environments (one chat reply to the task's prompt, scored by the "
            "task's rewards from the trace and the task data); not yet: tool, multi-turn, multi-agent, "
            "judge and container environments"
        )


def prompt_messages(data) -> list:
    """The verifiers messages the model is prompted with: the task's system prompt, then its prompt."""
    vf = import_verifiers()
    messages = [] if data.system_prompt is None else [vf.SystemMessage(content=data.system_prompt)]
    if isinstance(data.prompt, str):
        return [*messages, vf.UserMessage(content=data.prompt)]
    return [*messages, *data.prompt]


def row_prompt(data) -> str | list[dict]:
    """The trgrpo prompt of a task: its text when it is a lone user string, else chat messages."""
    if isinstance(data.prompt, str) and data.system_prompt is None:
        return data.prompt
    from verifiers.v1.types import content_text

    return [{"role": m.role, "content": content_text(m.content)} for m in prompt_messages(data)]


def make_trace(task, completion: str, truncated: bool = False):
    """The trace verifiers would score after one chat turn: prompt messages, then ``completion`` as the
    model's sampled reply (finish reason ``length`` when cut at the token budget)."""
    vf = import_verifiers()
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.trace import AgentInfo, ModelCall, TraceTask

    nodes = [
        MessageNode(message=m, parent=i - 1 if i else None) for i, m in enumerate(prompt_messages(task.data))
    ]
    nodes.append(
        MessageNode(message=vf.AssistantMessage(content=completion), parent=len(nodes) - 1, sampled=True)
    )
    return vf.Trace(
        task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
        agent=AgentInfo(config=vf.AgentConfig()),
        nodes=nodes,
        calls=[ModelCall(node=len(nodes) - 1, finish_reason="length" if truncated else "stop")],
        is_completed=True,
        ok=True,
        stop_condition="agent_completed",
    )


def score_value(name: str, result: Any) -> float | None:
    """A reward's result as one number: a float, None, or keyed scores summed."""
    if result is None:
        return None
    if isinstance(result, Mapping):
        return float(sum(float(v) for v in result.values()))
    value = float(result)
    if not math.isfinite(value):
        raise ValueError(f"reward {name!r} returned {result!r}")
    return value


class EnvironmentReward:
    """One environment reward function as a trgrpo reward: ``fn(prompts, completions, vf_task, ...)``.

    Each completion is scored on its own trace by the same function of its own task, with the arguments
    verifiers gives it by name (``task``: the task data, ``trace``); async functions run concurrently over
    the batch.  A sample whose scoring raises is reported as failed (``SampleFailures``), the rest kept."""

    def __init__(self, environment: VerifiersEnvironment, name: str) -> None:
        self.environment, self.name = environment, name
        self.__name__ = name

    def __call__(self, prompts, completions, vf_task, truncated=None, **_) -> list[float | None]:
        flags = truncated if truncated is not None else [False] * len(completions)
        results = asyncio.run(self._score_all(completions, vf_task, flags))
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        if failed:
            first = results[failed[0]]
            scores = [None if isinstance(r, Exception) else r for r in results]
            raise SampleFailures(scores, failed, f"{type(first).__name__}: {first}")
        return results

    async def _score_all(self, completions, keys, flags) -> list:
        jobs = [self._score(c, k, bool(t)) for c, k, t in zip(completions, keys, flags, strict=True)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    async def _score(self, completion: str, key: str, truncated: bool) -> float | None:
        from verifiers.v1.utils.decorators import invoke

        task = self.environment.task(key)
        fn = {f.__name__: f for f in task.hooks("reward")}[self.name]
        result = invoke(fn, {"task": task.data, "trace": make_trace(task, completion, truncated)})
        if inspect.isawaitable(result):
            result = await result
        return score_value(self.name, result)


class VerifiersEnvironment(Task):
    """An installed verifiers environment (single-turn) as a trgrpo task, scored by its own rewards.

    Args:
        env_id: the environment's id as verifiers loads it (``tiny-addition``, ``owner/name@1.0``: the
            installed module ``tiny_addition`` / ``name``).
        env_args: the taskset's config (its ``TasksetConfig`` fields, verifiers' ``--env.taskset.*``).
        val_size: held-out rows: from the evaluation split when ``eval_args`` selects one (rows whose
            prompt appears in training are skipped), else the first ``val_size`` distinct prompts of the
            shuffled taskset, the rest training.  Never trained on.
        seed: seed of the shuffle of the taskset before the split.
        train_size: at most this many training rows (empty: all the rest; needed for an infinite taskset).
        eval_args: taskset config overrides that select the environment's evaluation split (e.g.
            ``{split: test}``), merged over ``env_args``; empty: held-out rows are a slice of the taskset.
        env_path: a folder put on ``sys.path`` to find an environment that is not installed (a local one).
        accuracy_reward: the reward whose score is held-out accuracy (empty: the one of largest weight).
        accuracy_threshold: a completion is right when that reward scores at least this.
        reward_timeout: seconds one reward call on a batch may take (``model.rewards[].timeout``).
        demonstration_column: a row column holding a correct reply (e.g. ``answer`` where the reply is the
            bare answer), for a supervised warm-start (``trgrpo.callbacks.SupervisedWarmStart``); empty: none.
    """

    def __init__(
        self,
        env_id: str,
        env_args: dict[str, Any] | None = None,
        val_size: int = 100,
        seed: int = 0,
        train_size: int | None = None,
        eval_args: dict[str, Any] | None = None,
        env_path: str | None = None,
        accuracy_reward: str | None = None,
        accuracy_threshold: float = 1.0,
        reward_timeout: float | None = DEFAULT_REWARD_TIMEOUT,
        demonstration_column: str | None = None,
    ) -> None:
        if val_size < 1:
            raise ValueError(f"{KEY}.val_size must be >= 1, got {val_size}")
        if train_size is not None and train_size < 1:
            raise ValueError(f"{KEY}.train_size must be >= 1 (empty: all rows), got {train_size}")
        self.env_id, self.env_args, self.eval_args = env_id, dict(env_args or {}), eval_args
        self.val_size, self.seed, self.train_size = val_size, seed, train_size
        self.accuracy_threshold, self.reward_timeout = accuracy_threshold, reward_timeout
        loaders, self.taskset_cls = taskset_class(env_id, env_path)
        config, train_tasks = self._load(self.env_args, "env_args", loaders)
        check_single_turn(env_id, loaders, self.taskset_cls, config, train_tasks[0])
        self.weights = {
            f.__name__: float(getattr(f, "_vf_weight", 1.0)) for f in train_tasks[0].hooks("reward")
        }
        if not self.weights:
            raise ValueError(f"{KEY}.env_id: verifiers environment {env_id!r} has no reward functions")
        if accuracy_reward is not None and accuracy_reward not in self.weights:
            raise ValueError(
                f"{KEY}.accuracy_reward: {accuracy_reward!r} is not one of its rewards {list(self.weights)}"
            )
        self.accuracy_reward = accuracy_reward or max(self.weights, key=lambda n: self.weights[n])
        self._tasks: dict[str, Any] = {}
        self._rows = self._split(train_tasks, loaders)
        if demonstration_column is not None and demonstration_column not in self._rows["train"][0]:
            columns = sorted(set(self._rows["train"][0]) - {"prompt", TASK_COLUMN})
            raise ValueError(
                f"{KEY}.demonstration_column: {demonstration_column!r} is not a column of the rows {columns}"
            )
        self.demonstration_column = demonstration_column

    # ------------------------------------------------------------------ loading and splitting

    def _load(self, args: dict, what: str, loaders) -> tuple[Any, list]:
        """(the taskset config ``args`` make, its tasks shuffled with ``seed``)."""
        config_type = loaders.taskset_config_type(self.env_id)
        try:
            config = config_type.model_validate({**args, "id": self.env_id})
        except Exception as exc:  # pydantic's ValidationError: name the key and the accepted fields
            fields = sorted(set(config_type.model_fields) - {"id"})
            errors = getattr(exc, "errors", None)
            why = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
                if callable(errors)
                else str(exc)
            )
            raise ValueError(
                f"{KEY}.{what}: rejected by {self.env_id!r}: {why}; its fields: {fields}"
            ) from exc
        taskset = self.taskset_cls(config)
        if taskset.bounded:
            tasks = list(taskset)
        elif self.train_size is None:
            raise ValueError(f"{KEY}.train_size: verifiers environment {self.env_id!r} is infinite; set it")
        else:
            tasks = list(itertools.islice(taskset, 2 * (self.train_size + self.val_size) + 100))
        if not tasks:
            raise ValueError(f"{KEY}.{what}: verifiers environment {self.env_id!r} yields no tasks")
        random.Random(self.seed).shuffle(tasks)
        return config, tasks

    def _split(self, tasks: list, loaders) -> dict[str, list[dict]]:
        """Train and held-out rows with no prompt in common."""
        if self.eval_args:
            train = tasks[: self.train_size]
            seen = {self._identity(t) for t in train}
            _, pool = self._load({**self.env_args, **self.eval_args}, "eval_args", loaders)
            val = [t for t in pool if self._identity(t) not in seen][: self.val_size]
        else:
            val, chosen = [], set()
            for t in tasks:
                if len(val) == self.val_size:
                    break
                if self._identity(t) not in chosen:
                    chosen.add(self._identity(t))
                    val.append(t)
            train = [t for t in tasks if self._identity(t) not in chosen][: self.train_size]
        if len(val) < self.val_size:
            log.warning(
                "%s.val_size=%d: only %d held-out prompts not in training", KEY, self.val_size, len(val)
            )
        if not train or not val:
            raise ValueError(
                f"{KEY}: verifiers environment {self.env_id!r} leaves {len(train)} training and {len(val)} "
                "held-out prompts; lower val_size or give more rows"
            )
        return {
            "train": [self._row("train", i, t) for i, t in enumerate(train)],
            "val": [self._row("val", i, t) for i, t in enumerate(val)],
        }

    @staticmethod
    def _identity(task) -> str:
        """What two tasks share when they are the same item: their prompt (system prompt included)."""
        data = task.data
        return normalise(f"{data.system_prompt or ''}\n{data.prompt_text}")

    def _row(self, split: str, i: int, task) -> dict:
        vf = import_verifiers()
        key = f"{split}:{i}"
        self._tasks[key] = task
        data = task.data
        own = set(type(data).model_fields) - set(vf.TaskData.model_fields)
        fields = {**{k: getattr(data, k) for k in own}, **(data.model_extra or {})}
        return {
            "prompt": row_prompt(data),
            **{k: v for k, v in fields.items() if k not in RESERVED},
            TASK_COLUMN: key,
        }

    def task(self, key: str):
        """The environment task behind a row's ``vf_task``."""
        return self._tasks[key]

    # ------------------------------------------------------------------ the Task interface

    def rows(self, split: Split) -> list[dict]:
        return self._rows[split]

    def rewards(self) -> list[RewardSpec]:
        """One term per environment reward, named after it, with its weight."""
        return [
            RewardSpec(fn=EnvironmentReward(self, name), weight=w, name=name, timeout=self.reward_timeout)
            for name, w in self.weights.items()
        ]

    def verify_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        """1.0 where the accuracy reward scores at least ``accuracy_threshold``; a failed scoring is 0."""
        reward = EnvironmentReward(self, self.accuracy_reward)
        try:
            scores = reward([r["prompt"] for r in rows], completions, [r[TASK_COLUMN] for r in rows])
        except SampleFailures as exc:
            log.warning(
                "held-out scoring by %r failed on %d samples: %s", self.accuracy_reward, len(exc.failed), exc
            )
            scores = exc.scores
        return [1.0 if s is not None and s >= self.accuracy_threshold else 0.0 for s in scores]

    def verify(self, completion: str, row: dict) -> float:
        return self.verify_batch([completion], [row])[0]

    def demonstration(self, row: dict) -> str | None:
        return None if self.demonstration_column is None else str(row[self.demonstration_column])
