"""VerifiersEnvironment: an installed verifiers environment as a task, scored by its own rewards.

The reward terms are checked against the environment's own scoring entry point (``Task.score`` on a trace
built here with verifiers' types), the splits for disjointness, the error messages for the config key they
name, and a few RL steps through the real CLI on the tiny example environment (examples/verifiers_tiny)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

vf = pytest.importorskip("verifiers.v1")

from helpers import run_cli, train_rows  # noqa: E402

from trgrpo.rewards import collate_rows, compute_rewards, reward_columns  # noqa: E402
from trgrpo.tasks import VerifiersEnvironment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "verifiers_tiny"
CONFIG = ROOT / "configs" / "verifiers_tiny_cpu.yaml"


def tiny(**kwargs) -> VerifiersEnvironment:
    args = {"env_args": {"num_examples": 120}, "val_size": 20, "env_path": str(EXAMPLE), **kwargs}
    return VerifiersEnvironment("tiny-addition", **args)


@pytest.fixture(scope="module")
def env() -> VerifiersEnvironment:
    return tiny(eval_args={"split": "test", "num_examples": 60})


def own_score(task, completion: str, truncated: bool = False):
    """The environment's own scoring of ``completion``: ``Task.score`` on the trace of one chat turn, built
    here from verifiers' types (prompt, then the reply as a sampled assistant message)."""
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.trace import AgentInfo, ModelCall, TraceTask

    data = task.data
    prompt = [vf.UserMessage(content=data.prompt)] if isinstance(data.prompt, str) else list(data.prompt)
    if data.system_prompt is not None:  # sent as a system message, as the tool-less chat program does
        prompt = [vf.SystemMessage(content=data.system_prompt), *prompt]
    nodes = [MessageNode(message=m, parent=i - 1 if i else None) for i, m in enumerate(prompt)]
    nodes.append(
        MessageNode(message=vf.AssistantMessage(content=completion), parent=len(nodes) - 1, sampled=True)
    )
    trace = vf.Trace(
        task=TraceTask(type=type(task).__name__, data=data),
        agent=AgentInfo(config=vf.AgentConfig()),
        nodes=nodes,
        calls=[ModelCall(node=len(nodes) - 1, finish_reason="length" if truncated else "stop")],
    )
    asyncio.run(task.score(trace))
    return trace


def completions_for(answer: str) -> list[str]:
    wrong = str(int(answer) + 1)
    return [answer, f" {answer}\n", f"so it is {answer}", wrong, f"{answer} or {wrong}", "", "no idea"]


def score_batch(env, rows, completions, truncated=None):
    """The trainer's reward call: every spec of ``env.rewards()`` through ``compute_rewards``."""
    import torch

    columns = reward_columns(
        collate_rows(rows),
        torch.ones(len(rows), 3),
        torch.tensor(truncated if truncated is not None else [False] * len(rows)),
    )
    return compute_rewards(env.rewards(), [r["prompt"] for r in rows], completions, columns)


def test_rows_and_splits_are_disjoint(env):
    train, val = env.rows("train"), env.rows("val")
    assert len(train) == 120 and len(val) == 20
    assert set(train[0]) == {"prompt", "answer", "vf_task"}
    assert all(isinstance(r["prompt"], str) and r["prompt"].endswith("=") for r in train + val)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    # held-out rows come from the environment's test split, training rows from its train split
    import tiny_addition  # the example, on sys.path from env_path

    config = tiny_addition.TinyAdditionConfig(id="tiny-addition", split="test", num_examples=60)
    test_split = {t.data.prompt for t in tiny_addition.TinyAddition(config)}
    assert {r["prompt"] for r in val} <= test_split
    for row in train + val:
        a, b = row["prompt"][:-1].split("+")
        assert row["answer"] == str(int(a) + int(b))


def test_without_an_eval_split_a_disjoint_slice_is_held_out():
    env = tiny(train_size=50, seed=3)
    train, val = env.rows("train"), env.rows("val")
    assert len(train) == 50 and len(val) == 20
    assert len({r["prompt"] for r in val}) == 20
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    again, other = tiny(train_size=50, seed=3), tiny(train_size=50, seed=4)
    assert [r["prompt"] for r in again.rows("val")] == [r["prompt"] for r in val]
    assert [r["prompt"] for r in other.rows("val")] != [r["prompt"] for r in val]


def test_reward_terms_are_the_environments_own_scores(env):
    specs = env.rewards()
    assert [(s.name, s.weight) for s in specs] == [("correct", 1.0), ("format", 0.2)]
    rows, completions, truncated = [], [], []
    for row in env.rows("train")[:3] + env.rows("val")[:2]:
        for i, c in enumerate(completions_for(row["answer"])):
            rows.append(row)
            completions.append(c)
            truncated.append(i == 4)
    result = score_batch(env, rows, completions, truncated)
    assert result.errors == 0
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        trace = own_score(env.task(row["vf_task"]), completion, truncated[i])
        for name, term in result.per_term.items():
            assert term[i].item() == trace.rewards[name].score, (name, completion)
        assert result.total[i].item() == pytest.approx(trace.reward, abs=1e-6)
    # the fixed completions give both rewards both values: the comparison is not between constants
    for name in ("correct", "format"):
        assert set(result.per_term[name].tolist()) == {0.0, 1.0}
    assert result.per_term["correct"][:3].tolist() == [1.0, 1.0, 1.0]
    assert result.per_term["format"][:3].tolist() == [1.0, 1.0, 0.0]


def test_weights_plugged_in_the_taskset_config_are_kept():
    env = tiny(env_args={"num_examples": 40, "task": {"rewards": {"format": {"weight": 0.5}}}})
    assert {s.name: s.weight for s in env.rewards()} == {"correct": 1.0, "format": 0.5}
    row = env.rows("train")[0]
    result = score_batch(env, [row], [row["answer"]])
    assert result.total[0].item() == pytest.approx(own_score(env.task(row["vf_task"]), row["answer"]).reward)
    assert result.total[0].item() == pytest.approx(1.5)


def test_verify_reads_the_accuracy_reward(env):
    row = env.rows("val")[0]
    right, wrong = row["answer"], str(int(row["answer"]) + 1)
    assert env.accuracy_reward == "correct"
    assert env.verify_batch([right, f"it is {right}", wrong, ""], [row] * 4) == [1.0, 1.0, 0.0, 0.0]
    by_format = tiny(accuracy_reward="format")
    other = by_format.rows("val")[0]
    assert by_format.verify_batch([other["answer"], f"it is {other['answer']}", "7"], [other] * 3) == [
        1.0,
        0.0,
        1.0,
    ]


def test_failed_samples_keyed_scores_and_chat_traces(tmp_path):
    write_env(
        tmp_path,
        "flaky_env",
        """
        class FlakyTask(vf.Task[Data, vf.State, vf.TaskConfig]):
            @vf.reward(weight=2.0)
            async def fragile(self, trace) -> float:
                if "boom" in trace.last_reply:
                    raise RuntimeError("cannot score this")
                return 1.0

            @vf.reward(weight=0.5)
            async def parts(self, trace) -> dict:
                return {"long": float(len(trace.last_reply) > 3), "short": 1.0}

            @vf.reward(weight=0.25)
            async def seen(self, trace) -> float:
                return 10.0 * trace.is_truncated + len(trace.messages)
        """,
        "FlakyTask",
    )
    system = tmp_path / "system.txt"
    system.write_text("Answer briefly.")
    env = VerifiersEnvironment(
        "flaky-env", env_args={"system_prompt": str(system)}, val_size=2, env_path=str(tmp_path)
    )
    rows = env.rows("train")[:3]
    # a task with a system prompt is a chat prompt
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Answer briefly."}
    assert rows[0]["prompt"][1]["role"] == "user"
    completions, truncated = ["fine", "boom", "ok"], [False, False, True]
    result = score_batch(env, rows, completions, truncated)
    assert result.errors == 1
    assert result.per_term["fragile"].tolist() == [1.0, 0.0, 1.0]
    # keyed scores are summed: the total is verifiers' own (each key weighted by the function's weight)
    assert result.per_term["parts"].tolist() == [2.0, 2.0, 1.0]
    # the trace holds system prompt, prompt and reply, and the cut reply reads as truncated
    assert result.per_term["seen"].tolist() == [3.0, 3.0, 13.0]
    for i in (0, 2):
        trace = own_score(env.task(rows[i]["vf_task"]), completions[i], truncated[i])
        assert result.total[i].item() == pytest.approx(trace.reward)


def write_env(folder: Path, module: str, task_body: str, task_class: str) -> None:
    """A one-file verifiers environment ``module`` with six tasks and the given task class."""
    header = """
        import verifiers.v1 as vf

        class Data(vf.TaskData):
            answer: str
        """
    footer = f"""
        class Set(vf.Taskset[{task_class}, vf.TasksetConfig]):
            def load(self):
                for i in range(6):
                    yield {task_class}(Data(prompt=f"q{{i}}", answer=str(i)), self.config.task)

        __all__ = ["Set"]
        """
    source = textwrap.dedent(header) + textwrap.dedent(task_body) + textwrap.dedent(footer)
    (folder / f"{module}.py").write_text(source)


def test_errors_name_the_config_key(tmp_path, monkeypatch):
    with pytest.raises(
        ValueError,
        match=r"data.task.init_args.env_id: verifiers environment 'no-such-env' "
        r"is not installed",
    ):
        VerifiersEnvironment("no-such-env")
    with pytest.raises(ValueError, match=r"data.task.init_args.env_args: rejected by 'tiny-addition'.*nope"):
        tiny(env_args={"nope": 1})
    with pytest.raises(
        ValueError, match=r"data.task.init_args.accuracy_reward: 'exact'.*\['correct', 'format'\]"
    ):
        tiny(accuracy_reward="exact")
    write_env(
        tmp_path,
        "tool_env",
        """
        class ToolTask(vf.Task[Data, vf.State, vf.TaskConfig]):
            @classmethod
            def toolsets(cls, config):
                return [object()]

            @vf.reward
            async def correct(self, task, trace, runtime) -> float:
                return 1.0
        """,
        "ToolTask",
    )
    with pytest.raises(
        ValueError,
        match=r"'tool-env' is not supported: .*tool servers.*reads the runtime.*"
        r"Supported: single-turn",
    ):
        VerifiersEnvironment("tool-env", val_size=2, env_path=str(tmp_path))
    for name in ("verifiers", "verifiers.v1"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[verifiers\]'"):
        tiny()


def test_rl_steps_through_the_cli_log_every_environment_reward(tmp_path):
    cli = run_cli(
        tmp_path,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks=[]",
        f"--data.task.init_args.env_path={EXAMPLE}",
        "--data.task.init_args.env_args={num_examples: 40}",
        "--data.task.init_args.eval_args={split: test, num_examples: 20}",
        "--data.task.init_args.val_size=4",
        "--data.batch_size=2",
        "--data.val_batch_size=4",
        "--model.sampling.group_size=4",
        config=str(CONFIG),
    )
    assert cli.trainer.global_step == 2
    assert [s.name for s in cli.model.rewards] == ["correct", "format"]
    rows = train_rows(Path(cli.trainer.log_dir))
    assert len(rows) == 2
    for metrics in rows.values():
        assert metrics["train/reward_errors"] == 0
        # the logged reward is the environment's weighted total of its logged terms
        total = metrics["train/rewards/correct"] + 0.2 * metrics["train/rewards/format"]
        assert metrics["train/reward"] == pytest.approx(total, abs=1e-5)
    header = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/accuracy" in header
