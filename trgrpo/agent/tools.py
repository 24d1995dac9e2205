"""Tools a policy may call in a multi-turn rollout, and the settings of that loop (``model.sampling.agent``).

Two kinds of tool, both given in YAML:

- plain Python callables by import path, with type hints and a Google-style docstring; their JSON schema
  (what the chat template shows the model) comes from ``transformers.utils.get_json_schema``::

      model:
        sampling:
          agent:
            tools: [my_project.tools.calculator]

- an environment (``ToolEnvironment`` subclass, ``class_path`` / ``init_args``) for stateful tasks: each
  completion gets its own episode (``episode()``, a shallow copy), ``reset(row, seed)`` with the prompt's
  task row and a seed shared by the G completions of that prompt (so they see the same task instance),
  then ``step(call)`` per tool call.  ``trgrpo.agent.retrieval.SearchEnvironment`` is one.

``ToolBox`` puts both behind one dispatch, and ``run_calls(calls, timeout)`` runs a turn's calls (one per
completion, each with its own ``ToolBox``) at once, each in a worker thread bounded by ``timeout``;
a tool that raises, times out, is unknown or gets malformed arguments returns an error text to the model
and is counted (a timed-out thread cannot be killed: it is abandoned, as timed-out rewards are); the first
call that cannot be parsed is also logged, once per process.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

log = logging.getLogger(__name__)
_said: set[str] = set()  # warnings already given in this process


class ToolCall(NamedTuple):
    """One call parsed from the model's text; ``error`` says why it could not be parsed (then not run)."""

    name: str
    arguments: dict
    error: str | None = None


class ToolResult(NamedTuple):
    text: str  # what the model reads (the tool's output or an error text)
    error: bool  # the call failed: unparsable, unknown tool, bad arguments, raised or timed out


class ToolEnvironment:
    """A stateful tool provider.  Subclasses implement ``tools`` and ``step``; ``reset`` is optional.

    ``reset`` must assign fresh state (episodes are shallow copies of the configured instance, so mutating a
    shared attribute would leak between completions); large read-only state (an index) may be shared.
    An environment with ``drives_turns`` runs the episodes itself (``run_episodes``, the signature of
    ``trgrpo.agent.episodes.run_episodes``): every model turn is its action (``trgrpo.agent.openenv``).
    """

    drives_turns: bool = False

    def tools(self) -> list[dict]:
        """JSON schemas of the tools (``{"type": "function", "function": {...}}``), for the chat template."""
        raise NotImplementedError

    def check(self) -> None:
        """Start-up checks of what the constructor names but does not read (a file): run when fit / validate
        starts, before the model loads; raise ``ValueError`` naming the key.
        Parsing a recipe does not run it."""

    def episode(self) -> ToolEnvironment:
        """A fresh copy for one completion (shallow: read-only state is shared)."""
        return copy.copy(self)

    def reset(self, row: dict, seed: int) -> None:
        """Start an episode on one task row; ``seed`` is the same for the G completions of a prompt."""

    def step(self, call: ToolCall) -> str:
        """Run one call (name, arguments) and return its output text; raising counts as a tool error."""
        raise NotImplementedError


def tool_schema(fn: Callable, key: str = "model.sampling.agent.tools") -> dict:
    """The JSON schema of a plain callable, or a ``ValueError`` naming ``key`` when it has none."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds; all mean "not usable"
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(
            f"{key}: tool {name!r} needs type hints and a docstring with an Args section "
            f"to describe it to the model ({exc})"
        ) from exc


class FunctionTools(ToolEnvironment):
    """Plain callables as tools: ``step`` calls ``fn(**arguments)`` and returns ``str`` of the result."""

    def __init__(self, functions: list[Callable]) -> None:
        self.functions = {}
        self.schemas = []
        for i, fn in enumerate(functions):
            schema = tool_schema(fn, f"model.sampling.agent.tools[{i}]")
            self.functions[schema["function"]["name"]] = fn
            self.schemas.append(schema)

    def tools(self) -> list[dict]:
        return self.schemas

    def step(self, call: ToolCall) -> str:
        return str(self.functions[call.name](**call.arguments))


CallFormat = Literal["tags", "chat"]
"""How tool calls are written: Search-R1 tags or the chat template's tool-call block."""


@dataclass
class AgentConfig:
    """Multi-turn rollouts with tool calls (empty ``model.sampling.agent`` = single-turn).

    Budgets: ``model.sampling.max_new_tokens`` counts the model's own tokens over all turns; tool output
    counts against ``max_tool_tokens`` separately.  A completion ends at EOS or a final answer, or, marked
    truncated, when a budget runs out or the model calls a tool more than ``max_turns`` times.
    """

    format: CallFormat = "tags"
    """Call format: "tags" (Search-R1: ``<search>query</search>`` -> ``<information>...</information>``, final
    ``<answer>...</answer>``) or "chat" (the chat template's tool-call block and ``tool`` messages)."""
    tools: list[Callable] = field(default_factory=list)
    """Plain callables by import path (type hints and docstrings required: their schema is derived)."""
    environment: ToolEnvironment | None = None
    """A stateful tool environment (class_path / init_args),
    e.g. ``trgrpo.agent.retrieval.SearchEnvironment``."""
    max_turns: int = 2
    """Tool calls per completion at most; one more ends the completion, marked truncated."""
    max_tool_tokens: int = 512
    """Tool-output tokens per completion; a result that would overflow is cut and ends with
    ``truncation_marker``."""
    max_turn_tokens: int | None = None
    """Model tokens per turn (empty = whatever is left of ``model.sampling.max_new_tokens``)."""
    tool_timeout: float = 10.0
    """Seconds one tool call may take; a slower call returns an error text to the model."""
    truncation_marker: str = " [truncated]"
    """Appended to a tool result cut to fit ``max_tool_tokens``."""
    system_prompt: str | None = None
    """"chat" format: system message rendered before the user prompt with the tool schemas."""
    answer_tag: str = "answer"
    """"tags" format: ``</answer_tag>`` ends the completion (its final answer)."""

    def __post_init__(self) -> None:
        if self.max_turns < 0:
            raise ValueError(f"model.sampling.agent.max_turns must be >= 0, got {self.max_turns}")
        if self.max_tool_tokens < 1:
            raise ValueError(f"model.sampling.agent.max_tool_tokens must be >= 1, got {self.max_tool_tokens}")
        if self.max_turn_tokens is not None and self.max_turn_tokens < 1:
            raise ValueError(
                f"model.sampling.agent.max_turn_tokens must be >= 1 (or empty), got {self.max_turn_tokens}"
            )
        if self.tool_timeout <= 0:
            raise ValueError(f"model.sampling.agent.tool_timeout must be > 0, got {self.tool_timeout}")
        if self.format not in get_args(CallFormat):
            formats = " or ".join(map(repr, get_args(CallFormat)))
            raise ValueError(f"model.sampling.agent.format must be {formats}, got {self.format!r}")
        if not self.tools and self.environment is None:
            raise ValueError("model.sampling.agent needs tools (import paths) or an environment (class_path)")
        ToolBox(self)  # schemas now: a tool without type hints or docstring fails at start-up

    def check(self) -> None:
        """The environment's start-up checks (its files), before the model loads (``GRPOModule.setup``)."""
        if self.environment is not None:
            self.environment.check()


class ToolBox:
    """The tools of one completion: plain callables and an environment episode behind one dispatch."""

    def __init__(self, agent: AgentConfig) -> None:
        self.timeout = agent.tool_timeout
        self.providers: list[ToolEnvironment] = [FunctionTools(agent.tools)] if agent.tools else []
        if agent.environment is not None:
            self.providers.append(agent.environment)

    def schemas(self) -> list[dict]:
        return [s for p in self.providers for s in p.tools()]

    def names(self) -> list[str]:
        return [s["function"]["name"] for s in self.schemas()]

    def episode(self, row: dict, seed: int) -> ToolBox:
        """Fresh environment episodes for one completion, reset on ``row`` with ``seed``."""
        box = copy.copy(self)
        box.providers = [p.episode() for p in self.providers]
        for p in box.providers:
            p.reset(row, seed)
        return box

    def _owner(self, name: str) -> ToolEnvironment | None:
        for p in self.providers:
            if name in (s["function"]["name"] for s in p.tools()):
                return p
        return None

    def check(self, call: ToolCall) -> str | None:
        """Why ``call`` cannot run (unparsable, unknown tool, missing or unexpected arguments), or None."""
        if call.error is not None:
            return call.error
        owner = self._owner(call.name)
        if owner is None:
            return f"unknown tool {call.name!r}; available: {', '.join(self.names())}"
        params = next(s for s in owner.tools() if s["function"]["name"] == call.name)["function"][
            "parameters"
        ]
        missing = [k for k in params.get("required", []) if k not in call.arguments]
        unexpected = [k for k in call.arguments if k not in params.get("properties", {})]
        if missing or unexpected:
            return f"bad arguments for {call.name}: missing {missing}, unexpected {unexpected}"
        return None


def _warn_unparsed(call: ToolCall) -> None:
    """Log the first call of the process that could not be parsed; later ones are only counted."""
    if call.error is not None and "unparsed" not in _said:
        _said.add("unparsed")
        what = "it returns an error text to the model and counts in train/tool_errors (said once)"
        log.warning("a tool call could not be parsed (%s): %s", call.error, what)


def run_calls(calls: list[tuple[ToolBox, ToolCall]], timeout: float) -> list[ToolResult]:
    """Run each (toolbox, call) in its own daemon thread; all run at once, each bounded by ``timeout``."""
    boxes: list[dict] = [{} for _ in calls]
    threads = []
    for (box, call), out in zip(calls, boxes, strict=True):
        problem = box.check(call)
        _warn_unparsed(call)
        if problem is not None:
            out["error"] = problem
            threads.append(None)
            continue

        def target(box=box, call=call, out=out) -> None:
            try:
                out["value"] = box._owner(call.name).step(call)
            except BaseException as exc:  # noqa: BLE001 - reported to the model as an error text
                out["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=target, name=f"trgrpo-tool-{call.name}", daemon=True)
        thread.start()
        threads.append(thread)
    results, deadline = [], time.monotonic() + timeout  # all started together: one deadline is per call
    for (_, call), out, thread in zip(calls, boxes, threads, strict=True):
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                out = {"error": f"tool {call.name!r} timed out after {timeout}s"}
        if "error" in out:
            results.append(ToolResult(f"Error: {out['error']}", True))
        else:
            results.append(ToolResult(str(out["value"]), False))
    return results


def dump_call(name: str, arguments: dict) -> str:
    """The JSON text of a call in the chat format (for demonstrations)."""
    return json.dumps({"name": name, "arguments": arguments})


__all__ = [
    "AgentConfig",
    "FunctionTools",
    "ToolBox",
    "ToolCall",
    "ToolEnvironment",
    "ToolResult",
    "dump_call",
    "run_calls",
    "tool_schema",
]
