"""OpenEnv environments driving multi-turn episodes (``trgrpo.agent.openenv``) on the tiny example of
``examples/openenv_tiny`` served by the adapter: episode rewards equal the environment's own, a server that
dies, hangs or answers garbage costs one episode (zero reward, one counted error) while the others score,
the start-up errors, and RL steps through the CLI.  Every test runs under a hard time limit (SIGALRM) and
every server started here is stopped by its fixture.

    python -m pytest tests/test_openenv.py -q
"""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("openenv")

from helpers import run_cli, train_rows  # noqa: E402

import trgrpo.agent.openenv as oe  # noqa: E402
from trgrpo.agent.episodes import run_episodes  # noqa: E402
from trgrpo.agent.tools import AgentConfig  # noqa: E402
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer  # noqa: E402
from trgrpo.rollout.base import SamplingConfig, StopStrings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from examples.openenv_tiny.server import SumAction, SumEnvironment  # noqa: E402

APP = "examples.openenv_tiny.server:app"
FAULTY = "examples.openenv_tiny.server:faulty_app"
CONFIG = str(ROOT / "configs" / "openenv_tiny_cpu.yaml")
LIMIT_S = 420  # hard limit of one test


@pytest.fixture(autouse=True)
def hard_limit():
    def expire(signum, frame):
        raise TimeoutError(f"test exceeded its hard limit of {LIMIT_S}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _serve(app: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the server imports examples.* from the working directory
        env = oe.OpenEnvEnvironment(app=app, observation_field="text", startup_timeout=180)
        env.check()
    return env


@pytest.fixture(scope="module")
def tiny_env():
    env = _serve(APP)
    yield env
    env.close()


@pytest.fixture(scope="module")
def faulty_env():
    env = _serve(FAULTY)
    yield env
    env.close()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PolicyConfig())


@pytest.fixture(scope="module")
def model(tokenizer):
    tiny = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return load_model(PolicyConfig(tiny=tiny), tokenizer).eval()


def observations(text: str) -> list[str]:
    return re.findall(r"<information>(.*?)</information>", text, flags=re.DOTALL)


def policy(seen: list[str], fault: str | None = None) -> str:
    """A scripted reply from the observations so far: the right sum when it is divisible by 3, first a wrong
    number and then the right one when it leaves 1, never a number when it leaves 2; ``fault`` (at the turn
    whose number it carries: ``die@2``) replaces that turn's reply."""
    turn = len(seen)
    if fault is not None:
        word, at = fault.split("@")
        if turn == int(at):
            return f"<answer>{word}</answer>"
    a, b = map(int, seen[0].rstrip("=").split("+"))
    total = a + b
    if total % 3 == 0 or (total % 3 == 1 and turn > 1):
        return f"<answer>{total}</answer>"
    return f"<answer>{total + 1}</answer>" if total % 3 == 1 else "<answer>no idea</answer>"


class PolicyEngine:
    """``continue_contexts`` answering with ``policy`` on each context's observations; a context whose prompt
    starts with ``FAULT <word>@<turn>`` gets that fault."""

    def continue_contexts(self, model, tokenizer, contexts, sampling, max_new_tokens, stop, greedy):
        checker, out = StopStrings(tokenizer, stop), []
        for ctx, budget in zip(contexts, max_new_tokens, strict=True):
            text = tokenizer.decode(ctx, skip_special_tokens=True)
            fault = re.match(r"FAULT (\S+)", text)
            reply = policy(observations(text), fault.group(1) if fault else None)
            ids = tokenizer(reply, add_special_tokens=False).input_ids
            out.append(checker.cut(ids, tokenizer.eos_token_id, budget))
        return out


def direct_reward(tokenizer, seed: int, max_turns: int, final: bool = False) -> float:
    """The same episode driven through the environment itself, in this process."""
    env = SumEnvironment()
    seen, rewards = [env.reset(seed=seed).text], []
    for _ in range(max_turns):
        reply = policy(seen)
        action = tokenizer.decode(
            tokenizer(reply, add_special_tokens=False).input_ids, skip_special_tokens=True
        )
        obs = env.step(SumAction(message=action.strip()))
        rewards.append(float(obs.reward or 0.0))
        if obs.done:
            break
        seen.append(obs.text)
    return rewards[-1] if final else sum(rewards)


def rollout(env, model, tokenizer, rows, g=2, max_turns=3, timeout=20.0):
    agent = AgentConfig(environment=env, max_turns=max_turns, max_tool_tokens=200, tool_timeout=timeout)
    sampling = SamplingConfig(group_size=max(g, 2), max_new_tokens=200, agent=agent)
    prompts = [r["prompt"] for r in rows]
    r = run_episodes(PolicyEngine(), model, tokenizer, prompts, sampling, g, False, rows)
    rewards = oe.episode_reward([p for p in prompts for _ in range(g)], r.completions)
    return r, rewards


def seeds_of_each_kind(k: int = 2) -> list[int]:
    """Seeds whose sum leaves 0, 1 and 2 modulo 3, ``k`` of each (all three reply patterns)."""
    found: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for seed in range(1000):
        o = SumEnvironment().reset(seed=seed).text
        kind = sum(map(int, o.rstrip("=").split("+"))) % 3
        if len(found[kind]) < k:
            found[kind].append(seed)
    return [s for kind in (0, 1, 2) for s in found[kind]]


def test_episode_rewards_equal_the_environments_own(tiny_env, model, tokenizer):
    seeds = seeds_of_each_kind()
    rows = [{"prompt": f"Add {i}: ", "env_seed": s} for i, s in enumerate(seeds)]
    r, rewards = rollout(tiny_env, model, tokenizer, rows, g=2)
    expected = [direct_reward(tokenizer, s, 3) for s in seeds for _ in range(2)]
    assert rewards == pytest.approx(expected)
    assert sorted(set(expected)) == pytest.approx([0.0, 1.0, 1.1])  # 3 no-number steps; right; wrong, right
    assert r.episodes.tool_errors.tolist() == [0] * len(expected)
    assert r.episodes.tool_calls.tolist() == [{0.0: 3, 1.0: 1}.get(round(x, 1), 2) for x in expected]
    # observations are context, never trained: no trained token lies inside an <information> block
    for row in range(len(expected)):
        ids = r.input_ids[row, r.prompt_len :]
        trained = tokenizer.decode(ids[r.trainable_mask[row] == 1])
        assert "<information>" not in trained and "+" not in trained
        assert observations(r.completions[row])[0] == SumEnvironment().reset(seed=seeds[row // 2]).text
    # reward: final reads the last step's reward; a turn limit of 1 stops every episode after one step
    final = copy.copy(tiny_env)
    final.reward = "final"
    _, last = rollout(final, model, tokenizer, rows, g=1, max_turns=1)
    assert last == pytest.approx([direct_reward(tokenizer, s, 1, final=True) for s in seeds])
    assert oe.OpenEnvTask("x").verify_batch(r.completions[:2], rows[:1] * 2) == pytest.approx(rewards[:2])


@pytest.mark.parametrize("fault", ["hang@1", "garbage@1", "die@2"])
def test_a_failing_server_costs_one_episode(faulty_env, model, tokenizer, caplog, fault):
    k0a, k0b, k1 = seeds_of_each_kind(2)[:3]
    seeds = [k1, k0a, k0b]  # the faulty row answers wrong first ("die" comes at turn 2); the others end at 1
    rows = [
        {"prompt": f"FAULT {fault} " if i == 0 else f"Add {i}: ", "env_seed": s} for i, s in enumerate(seeds)
    ]
    oe._said.clear()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trgrpo.agent.openenv"):
        r, rewards = rollout(faulty_env, model, tokenizer, rows, g=1, timeout=3.0)
    assert time.monotonic() - t0 < 40  # a hanging call is abandoned after its time limit
    expected = [0.0] + [direct_reward(tokenizer, s, 3) for s in seeds[1:]]
    assert rewards == pytest.approx(expected)
    assert r.episodes.tool_errors.tolist() == [1, 0, 0]
    kind = {"hang": "timeout", "garbage": "malformed", "die": "connection"}[fault.split("@")[0]]
    said = [m for m in caplog.messages if "OpenEnv episode failed" in m]
    assert len(said) == 1 and kind in said[0]
    if fault.startswith("die"):  # the server started here is started again: the next rollout scores
        with caplog.at_level(logging.WARNING, logger="trgrpo.agent.openenv"):
            _, again = rollout(faulty_env, model, tokenizer, rows[1:], g=1)
        assert again == pytest.approx(expected[1:])
        assert any("exited" in m and "starting it again" in m for m in caplog.messages)


def test_start_up_errors_name_the_key(tmp_path, monkeypatch):
    port = oe.free_port()
    with pytest.raises(ValueError, match=r"init_args\.url: no OpenEnv server answers"):
        oe.OpenEnvEnvironment(url=f"http://127.0.0.1:{port}", startup_timeout=2).check()
    with pytest.raises(ValueError, match=r"init_args\.app: cannot import 'no_such_pkg\.server'"):
        oe.OpenEnvEnvironment(app="no_such_pkg.server:app").check()
    with pytest.raises(ValueError, match="exactly one of url"):
        oe.OpenEnvEnvironment()
    with pytest.raises(ValueError, match="exactly one of url"):
        oe.OpenEnvEnvironment(url="http://x", app=APP)
    real = oe.importlib.util.find_spec
    monkeypatch.setattr(oe.importlib.util, "find_spec", lambda n, *a: None if n == "openenv" else real(n, *a))
    with pytest.raises(ValueError, match=re.escape("pip install -e '.[openenv]'")):
        oe.OpenEnvEnvironment(app=APP).check()  # at start-up: a recipe parses without the extra
    monkeypatch.undo()

    # through the CLI: the unreachable url stops fit before the model loads
    import trgrpo.module

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the start-up check")

    monkeypatch.setattr(trgrpo.module, "load_model", no_model)
    with pytest.raises(ValueError, match=r"model\.sampling\.agent\.environment\.init_args\.url"):
        run_cli(
            tmp_path,
            "--model.sampling.agent.environment.init_args.app=null",
            f"--model.sampling.agent.environment.init_args.url=http://127.0.0.1:{port}",
            "--model.sampling.agent.environment.init_args.startup_timeout=2",
            config=CONFIG,
        )


def test_rl_steps_through_the_cli_on_the_tiny_example(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = set(oe._runtimes)
    try:
        run_cli(
            tmp_path,
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--data.batch_size=2",
            "--data.val_batch_size=4",
            "--data.task.init_args.val_size=4",
            "--model.sampling.group_size=2",
            config=CONFIG,
        )
    finally:  # the CLI's server: stopped here (at the process's exit in a real run)
        for token in set(oe._runtimes) - before:
            oe._runtimes.pop(token).close()
    rows = train_rows(tmp_path)
    assert sorted(rows) and len(rows) == 2
    for metrics in rows.values():
        assert 0.0 <= metrics["train/rewards/env"] <= 1.1 * 3
        assert metrics["train/tool_errors"] == 0 and metrics["train/tool_calls"] >= 1


def test_the_server_started_here_dies_with_the_trainer(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from trgrpo.agent.openenv import OpenEnvEnvironment, _runtimes\n"
        f"env = OpenEnvEnvironment(app={APP!r}, startup_timeout=180)\n"
        "env.check()\n"
        "rt = _runtimes[env._token]\n"
        "print(rt.proc.pid, rt.log_path, flush=True)\n"
        "time.sleep(600)\n"
    )
    trainer = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid, log_path = None, None
    try:
        pid, log_path = trainer.stdout.readline().split()
        pid = int(pid)
        assert alive(pid)
        trainer.kill()  # SIGKILL: no atexit, no cleanup of its own
        trainer.wait(30)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pid)
    finally:
        trainer.kill()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
        if log_path is not None and os.path.exists(log_path):
            os.remove(log_path)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_actions_and_observations_are_read_strictly():
    from openenv.core.client_types import StepResult

    env = oe.OpenEnvEnvironment(url="http://127.0.0.1:1", action_json=True)  # nothing is reached until check
    assert env.action('I move {"dx": 1, "say": "hi"} now') == {"dx": 1, "say": "hi"}
    with pytest.raises(ValueError, match="no JSON action"):
        env.action("left")
    assert oe.OpenEnvEnvironment(url="http://x", action_field="cmd").action("go") == {"cmd": "go"}
    assert env.read(StepResult({"text": "hi", "n": 3}, None, False)) == ("hi", 0.0, False)
    assert env.read(StepResult({"a": "x", "b": "y"}, 2, True)) == ('{"a": "x", "b": "y"}', 2.0, True)
    for bad in (
        StepResult({"text": "hi"}, "lots", False),
        StepResult({"text": "hi"}, float("nan"), False),
        StepResult({"text": "hi"}, 1.0, "yes"),
        StepResult(["not", "an", "object"], 1.0, False),
    ):
        with pytest.raises(oe.MalformedResponse):
            env.read(bad)
    env.observation_field = "missing"
    with pytest.raises(oe.MalformedResponse, match="no text field 'missing'"):
        env.read(StepResult({"text": "hi"}, 1.0, False))
