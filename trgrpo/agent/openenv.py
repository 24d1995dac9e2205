"""OpenEnv environments behind ``reset()`` / ``step()`` as multi-turn episodes (the ``openenv`` extra).

``OpenEnvEnvironment`` is an ``agent.environment`` that drives the episodes itself: ``reset`` gives the first
observation (after the row's prompt), every model turn is the action of one ``step`` (a turn ends at EOS, the
format's stop string or its token budget; its text, stripped, becomes ``{action_field: text}``, or with
``action_json`` the JSON object it holds), and each observation is appended exactly like tool output
(``fmt.wrap``, cut to ``agent.max_tool_tokens``: context, never trained), until ``done`` or
``agent.max_turns`` turns.  The server is reached at ``url`` or started here from ``app`` (an ASGI app,
``module:attribute``) with uvicorn on a free local port when fit / validate starts, before the model loads;
it is stopped when the process exits and killed with it if the trainer dies (Linux).  Each episode is one
WebSocket session (OpenEnv's ``GenericEnvClient``): the server must accept ``data.batch_size * group_size``.

The episode reward is the sum of the step rewards (``reward: final``: the last one; none counts 0, the
reset's is not counted); ``episode_reward`` (a ``model.rewards`` term) reads it back by (prompt, completion)
from what this process's rollouts recorded.  A server that dies, a call that outlives ``agent.tool_timeout``
or a response that is not an observation fails that episode only: reward 0, one error in
``train/tool_errors``, the reason logged once per kind; a server started here that exited is started again
at the next rollout.  A reply with no JSON action (``action_json``) gets an error text, counted the same.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import OrderedDict
from typing import Literal

import torch

from trgrpo.agent.episodes import Episode, assemble_episodes, fit_result, turn_budgets
from trgrpo.agent.formats import make_format
from trgrpo.agent.tools import ToolEnvironment
from trgrpo.rewards import RewardSpec
from trgrpo.rollout.base import Rollout, encode_prompts
from trgrpo.tasks.base import Split, Task

log = logging.getLogger(__name__)

OPENENV_MISSING = "OpenEnv environments need openenv-core: pip install -e '.[openenv]'"
KEY = "model.sampling.agent.environment.init_args"
LEDGER_SIZE = 100_000
"""(prompt, completion) -> episode rewards kept for ``episode_reward``, oldest dropped first."""

_ledger: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
_ledger_lock = threading.Lock()
_runtimes: dict[int, _Runtime] = {}  # one server and event loop per configured environment, per process
_tokens = itertools.count()
_said: set[str] = set()


class MalformedResponse(ValueError):
    """A response of the server that is not an observation with a numeric reward and a boolean done."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGKILL it when the trainer dies (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def healthy(url: str, timeout: float) -> str | None:
    """None when ``url``/health answers, else why not."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except Exception as exc:  # noqa: BLE001 - every failure means "not reachable"
        return f"{type(exc).__name__}: {exc}"


class _Runtime:
    """The server (reached by url or started here) and the event loop the WebSocket sessions run on."""

    def __init__(self, env: OpenEnvEnvironment) -> None:
        self.env, self.proc, self.url, self.log_path = env, None, env.url, None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="trgrpo-openenv", daemon=True)
        self.thread.start()
        try:
            if env.app is not None:
                self.start_server()
            elif (problem := healthy(self.url, env.startup_timeout)) is not None:
                raise ValueError(f"{KEY}.url: no OpenEnv server answers at {self.url}/health ({problem})")
        except BaseException:
            self.close()  # the server and the loop thread
            raise
        atexit.register(self.close)

    def start_server(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if self.log_path is not None and os.path.exists(self.log_path):  # started again: a fresh log
            os.remove(self.log_path)
        fd, self.log_path = tempfile.mkstemp(prefix="trgrpo-openenv-", suffix=".log")
        cmd = [sys.executable, "-m", "uvicorn", self.env.app, "--port", str(port), "--log-level", "warning"]
        path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        linux = sys.platform.startswith("linux")  # the app is imported from the working directory too
        pipes = {"stdout": fd, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
        env, pre = {**os.environ, "PYTHONPATH": path}, _die_with_parent if linux else None
        self.proc = subprocess.Popen(cmd, env=env, preexec_fn=pre, **pipes)
        os.close(fd)
        deadline = time.monotonic() + self.env.startup_timeout
        while (problem := healthy(self.url, 2.0)) is not None:
            if (code := self.proc.poll()) is not None or time.monotonic() > deadline:
                self.stop_server()
                with open(self.log_path, errors="replace") as f:
                    tail = f.read()[-2000:]
                what = (
                    f"did not answer in {self.env.startup_timeout}s" if code is None else f"exited ({code})"
                )
                raise ValueError(f"{KEY}.app: the server of {self.env.app!r} {what}: {problem}\n{tail}")
            time.sleep(0.2)

    def ensure_running(self) -> None:
        """Start a server started here again when it exited (its episodes in flight were lost)."""
        if self.proc is not None and self.proc.poll() is not None:
            log.warning(
                "the OpenEnv server of %r exited (%s); starting it again", self.env.app, self.proc.poll()
            )
            try:
                self.start_server()
            except ValueError as exc:  # this rollout's episodes fail (counted); the next one tries again
                log.warning("%s", exc)

    def stop_server(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def close(self) -> None:
        self.stop_server()
        if self.log_path is not None and os.path.exists(self.log_path):
            os.remove(self.log_path)
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)

    def run(self, coros: list, timeout: float) -> list:
        """Run the coroutines at once, each bounded by ``timeout``; an exception is returned, not raised."""

        async def bounded(c):
            return await asyncio.wait_for(c, timeout)

        async def gather():
            return await asyncio.gather(*(bounded(c) for c in coros), return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(gather(), self.loop).result(timeout + 30)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (MalformedResponse, json.JSONDecodeError, AttributeError, TypeError, KeyError)):
        return "malformed"
    if isinstance(exc, RuntimeError) and str(exc).startswith("Server error"):
        return "server error"
    return "connection"


def _failed(exc: BaseException, timeout: float) -> None:
    kind = _kind(exc)
    if kind not in _said:
        _said.add(kind)
        why = f"no answer within model.sampling.agent.tool_timeout={timeout}s" if kind == "timeout" else exc
        what = "it scores 0 and counts in train/tool_errors; the run goes on (said once per kind)"
        log.warning("an OpenEnv episode failed (%s: %s): %s", kind, why, what)


async def _drop(client) -> None:
    """Close a failed session's connection without the close handshake (its server may not answer)."""
    ws, client._ws = client._ws, None
    if (transport := getattr(ws, "transport", None)) is not None:
        transport.abort()


class OpenEnvEnvironment(ToolEnvironment):
    """An OpenEnv environment driving the episodes: every model turn is the action of one ``step``.

    Args:
        url: a running server (``http://host:port``); exactly one of ``url`` and ``app``.
        app: an ASGI app to serve here (``package.server.app:app``), started with uvicorn on a free port.
        action_field: the action's text field: a turn becomes ``{action_field: text}``.
        action_json: the turn's text holds the whole action as a JSON object instead.
        observation_field: the observation's text field; empty: its only string field, or else its JSON.
        reward: "sum" (of the step rewards) or "final" (the last step's).
        reset_kwargs: extra keyword arguments of every ``reset`` (the seed is always given).
        startup_timeout: seconds the server may take to start (or answer, for ``url``).
    """

    drives_turns = True

    def __init__(
        self,
        url: str | None = None,
        app: str | None = None,
        action_field: str = "message",
        action_json: bool = False,
        observation_field: str | None = None,
        reward: Literal["sum", "final"] = "sum",
        reset_kwargs: dict | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        url, app = (None if v in ("", "None", "null") else v for v in (url, app))  # a CLI's null -> "None"
        if (url is None) == (app is None):
            raise ValueError(f"{KEY}: give exactly one of url (a running server) or app (module:attribute)")
        if app is not None and ":" not in app:
            raise ValueError(f"{KEY}.app must be 'module:attribute' (an ASGI app), got {app!r}")
        if reward not in ("sum", "final"):
            raise ValueError(f"{KEY}.reward must be 'sum' or 'final', got {reward!r}")
        if startup_timeout <= 0:
            raise ValueError(f"{KEY}.startup_timeout must be > 0, got {startup_timeout}")
        self.url, self.app = url.rstrip("/") if url else None, app
        self.action_field, self.action_json = action_field, action_json
        self.observation_field, self.reward = observation_field, reward
        self.reset_kwargs, self.startup_timeout = dict(reset_kwargs or {}), startup_timeout
        self._token = next(_tokens)  # copies share the runtime; another process starts its own

    def tools(self) -> list[dict]:
        return []

    def step(self, call):
        raise NotImplementedError("OpenEnvEnvironment drives the turns itself (drives_turns)")

    def check(self) -> None:
        """Start the server (``app``) or reach it (``url``) now, before the model loads."""
        if importlib.util.find_spec("openenv") is None:  # parsing a recipe works without it
            raise ValueError(OPENENV_MISSING)
        if self.app is not None:
            module = self.app.split(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ValueError(f"{KEY}.app: cannot import {module!r} (from {self.app!r})")
        self.runtime()

    def runtime(self) -> _Runtime:
        if self._token not in _runtimes:
            _runtimes[self._token] = _Runtime(self)
        return _runtimes[self._token]

    def close(self) -> None:
        """Stop the server started here and the session loop (also done when the process exits)."""
        rt = _runtimes.pop(self._token, None)
        if rt is not None:
            rt.close()

    # ------------------------------------------------------------------ responses and actions

    def read(self, result) -> tuple[str, float, bool]:
        """(observation text, reward, done) of a ``StepResult``, or ``MalformedResponse``."""
        obs, reward, done = result.observation, result.reward, result.done
        if not isinstance(obs, dict):
            raise MalformedResponse(f"observation is {type(obs).__name__}, not an object")
        reward = 0.0 if reward is None else reward
        if not isinstance(reward, (bool, int, float)) or not math.isfinite(reward):
            raise MalformedResponse(f"reward {reward!r} is not a finite number")
        if not isinstance(done, bool):
            raise MalformedResponse(f"done {done!r} is not a boolean")
        if self.observation_field is not None:
            text = obs.get(self.observation_field)
            if not isinstance(text, str):
                raise MalformedResponse(
                    f"observation has no text field {self.observation_field!r}: {obs!r:.200}"
                )
        else:
            strings = [v for v in obs.values() if isinstance(v, str)]
            text = strings[0] if len(strings) == 1 else json.dumps(obs, sort_keys=True, default=str)
        return text, float(reward), done

    def action(self, text: str) -> dict:
        """The action of a turn's text; ``ValueError`` (the model's fault, not the server's) when
        ``action_json`` finds no JSON object in it."""
        if not self.action_json:
            return {self.action_field: text}
        start, end = text.find("{"), text.rfind("}")
        try:
            action = json.loads(text[start : end + 1]) if 0 <= start < end else None
        except (ValueError, RecursionError):
            action = None
        if not isinstance(action, dict):
            raise ValueError(f"the reply holds no JSON action object: {text[:200]!r}")
        return action

    # ------------------------------------------------------------------ the episode loop

    @torch.no_grad()
    def run_episodes(
        self, engine, model, tokenizer, prompts, sampling, group_size, greedy, rows=None
    ) -> Rollout:
        """``group_size`` episodes per prompt as one ``Rollout`` (see the module docstring)."""
        from openenv.core import GenericEnvClient

        agent, g = sampling.agent, group_size
        rt = self.runtime()
        rt.ensure_running()
        fmt = make_format(agent, [])
        before, after = fmt.wrap(tokenizer)
        enc = encode_prompts(model, tokenizer, [fmt.render_prompt(tokenizer, p) for p in prompts])
        prompt_ids = [
            ids[m.bool()].tolist() for ids, m in zip(enc.input_ids, enc.attention_mask, strict=True)
        ]
        rows = rows if rows is not None else [{"prompt": p} for p in prompts]
        drawn = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # one per prompt: its G share it
        seeds = [
            s if r.get("env_seed") is None else int(r["env_seed"]) for r, s in zip(rows, drawn, strict=True)
        ]
        n, limit = len(prompts) * g, max(agent.max_turns, 1)
        episodes = [Episode(box=None) for _ in range(n)]
        rewards: list[list[float]] = [[] for _ in range(n)]
        failed = [False] * n
        clients = [
            GenericEnvClient(
                base_url=rt.url, connect_timeout_s=agent.tool_timeout, message_timeout_s=agent.tool_timeout
            )
            for _ in range(n)
        ]

        def fail(i: int, exc: BaseException) -> None:
            _failed(exc, agent.tool_timeout)
            failed[i] = True
            episodes[i].errors += 1
            episodes[i].end(truncated=False)

        def observe(i: int, text: str) -> None:
            e = episodes[i]
            ids = fit_result(
                tokenizer, before, text, after, agent.truncation_marker, agent.max_tool_tokens - e.tool_tokens
            )
            if ids is None:
                e.end(truncated=True)
                return
            e.pieces.append((ids, False))
            e.tool_tokens += len(ids)

        async def reset(client, seed):
            await client.connect()
            return await client.reset(seed=seed, **self.reset_kwargs)

        def take(i: int, result) -> tuple[str, float, bool] | None:
            """(text, reward, done) of a call's result; None: the episode failed."""
            try:
                if isinstance(result, BaseException):
                    raise result
                return self.read(result)
            except Exception as exc:  # noqa: BLE001 - this episode fails, the others go on
                fail(i, exc)
                return None

        results = rt.run([reset(c, seeds[i // g]) for i, c in enumerate(clients)], agent.tool_timeout)
        for i, result in enumerate(results):
            if (got := take(i, result)) is not None:
                episodes[i].end(truncated=False) if got[2] else observe(i, got[0])
        while active := [i for i, e in enumerate(episodes) if not e.done]:
            budgets = turn_budgets(episodes, active, sampling)
            contexts = [prompt_ids[i // g] + episodes[i].ids() for i in active]
            outs = engine.continue_contexts(model, tokenizer, contexts, sampling, budgets, fmt.stop, greedy)
            stepping, replies = [], []
            for i, out in zip(active, outs, strict=True):
                e = episodes[i]
                e.pieces.append((out.ids, True))
                e.model_tokens += len(out.ids)
                e.turns += 1
                try:
                    action = self.action(tokenizer.decode(out.ids, skip_special_tokens=True).strip())
                except ValueError as exc:  # an unusable reply: an error text for the model, counted
                    e.errors += 1
                    replies.append((i, f"Error: {exc}"))
                    continue
                stepping.append((i, action))
            results = rt.run([clients[i].step(a) for i, a in stepping], agent.tool_timeout)
            for (i, _), result in zip(stepping, results, strict=True):
                episodes[i].calls += 1
                if (got := take(i, result)) is not None:
                    rewards[i].append(got[1])
                    episodes[i].end(truncated=False) if got[2] else replies.append((i, got[0]))
            for i, text in sorted(replies):
                e = episodes[i]
                if e.model_tokens >= sampling.max_new_tokens:
                    e.end(truncated=True)  # the model's budget is spent
                elif e.turns >= limit:
                    e.end(truncated=False)  # the turn limit: the environment's episode is cut, not the model
                else:
                    observe(i, text)
        rt.run(
            [c.disconnect() if not bad else _drop(c) for c, bad in zip(clients, failed, strict=True)],
            agent.tool_timeout,
        )
        rollout = assemble_episodes(tokenizer, enc.input_ids, enc.attention_mask, episodes, g)
        totals = [
            0.0 if bad or not r else (r[-1] if self.reward == "final" else sum(r))
            for r, bad in zip(rewards, failed, strict=True)
        ]
        record([prompts[i // g] for i in range(n)], rollout.completions, totals)
        return rollout


def _key(prompt, completion: str) -> tuple[str, str]:
    return (prompt if isinstance(prompt, str) else str(prompt), completion)


def record(prompts: list, completions: list[str], rewards: list[float]) -> None:
    """Keep the episode rewards of one rollout for ``episode_reward`` (a later rollout's replace them)."""
    fresh: dict[tuple[str, str], list[float]] = {}
    for p, c, r in zip(prompts, completions, rewards, strict=True):
        fresh.setdefault(_key(p, c), []).append(r)
    with _ledger_lock:
        for key, values in fresh.items():
            _ledger[key] = values
            _ledger.move_to_end(key)
        while len(_ledger) > LEDGER_SIZE:
            _ledger.popitem(last=False)


def lookup(prompts: list, completions: list[str]) -> list[float]:
    """The recorded episode reward of each (prompt, completion); identical pairs take the recorded rewards
    of that pair in order.  ``KeyError`` for a completion no rollout of this process recorded."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    with _ledger_lock:
        for p, c in zip(prompts, completions, strict=True):
            key = _key(p, c)
            if key not in _ledger:
                raise KeyError(f"no OpenEnv episode recorded for the completion {c[:80]!r}")
            k = seen.get(key, 0)
            seen[key] = k + 1
            values = _ledger[key]
            out.append(values[k % len(values)])
    return out


def episode_reward(prompts: list, completions: list[str], **_) -> list[float]:
    """The environment's reward of each episode (a ``model.rewards`` term): what its rollout recorded."""
    return lookup(prompts, completions)


class OpenEnvTask(Task):
    """Rows for an environment that brings its own tasks: the same instruction ``prompt`` in every row (the
    first observation follows it) and an ``env_seed`` (the seed of ``reset``: train and val seeds differ).
    ``val/accuracy`` is the mean episode reward of the greedy held-out episodes.

    Args:
        prompt: the text before the first observation.
        train_size: training rows (environment instances).
        val_size: held-out rows.
        seed: offset of the rows' seeds.
    """

    def __init__(self, prompt: str, train_size: int = 1000, val_size: int = 32, seed: int = 0) -> None:
        if not prompt or train_size < 1 or val_size < 0:
            what = f"prompt={prompt!r}, train_size={train_size}, val_size={val_size}"
            raise ValueError(
                f"data.task.init_args: need a prompt, train_size >= 1, val_size >= 0; got {what}"
            )
        self.prompt, self.train_size, self.val_size, self.seed = prompt, train_size, val_size, seed

    def rows(self, split: Split) -> list[dict]:
        start = self.seed * 10**7 + (0 if split == "train" else self.train_size)
        size = self.train_size if split == "train" else self.val_size
        return [{"prompt": self.prompt, "env_seed": start + i} for i in range(size)]

    def verify_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        return lookup([r["prompt"] for r in rows], completions)

    def rewards(self) -> list:
        return [RewardSpec(fn=episode_reward, name="env")]


__all__ = ["OPENENV_MISSING", "MalformedResponse", "OpenEnvEnvironment", "OpenEnvTask", "episode_reward"]
