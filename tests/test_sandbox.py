"""Model output never runs in the trainer: verifiers score in killable sandbox workers that die with it.

The code-execution checks use a harmless marker file (a completion that would create it); the hang checks
run in subprocesses with bounded timeouts, so a regression fails instead of hanging the test run.

    python -m pytest tests/test_sandbox.py -q
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sandbox_jobs

from trgrpo.rewards import RewardSpec, compute_rewards
from trgrpo.sandbox import SandboxPool, failures, time_limit

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# --------------------------------------------------------------------------- reasoning-gym scorers

SCORE_IN_A_TRAINER = """
import json, sys
from trgrpo.rewards import RewardSpec, compute_rewards
from trgrpo.tasks import ReasoningGymTask
from trgrpo.tasks.reasoning_gym import reasoning_gym_reward

marker = sys.argv[1]
insertion, integration = (ReasoningGymTask(name=n, train_size=1, val_size=1).rows("val")[0]
                          for n in ("string_insertion", "simple_integration"))
system = "__import__('os').system('touch " + marker + "-{}')"
completions = [
    "<answer>" + system.format("eval") + "</answer>",         # string_insertion eval()s the answer
    "<answer>" + system.format("sympy") + "</answer>",        # simple_integration parses it with sympy
    "<answer>open('" + marker + "-open', 'w').write('x')</answer>",
    "<answer>9**9**9**9</answer>",                            # hours of one C call, holding the GIL
    "<answer>" + insertion["answer"] + "</answer>",           # right
]
rows = [insertion, integration, insertion, insertion, insertion]
columns = {k: [r[k] for r in rows] for k in ("rg_task", "rg_options", "question", "answer", "metadata")}
result = compute_rewards([RewardSpec(fn=reasoning_gym_reward, kwargs={"timeout": 1.0})],
                         ["q"] * 5, completions, columns)
task = ReasoningGymTask(name="string_insertion", train_size=1, val_size=1)
verified = task.verify_batch(completions[:1] + completions[-1:], [insertion, insertion])
print(json.dumps({"total": result.total.tolist(), "errors": result.errors, "verified": verified}))
"""


def test_reasoning_gym_scorers_never_run_model_output_in_the_trainer(tmp_path):
    marker = tmp_path / "ran"
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", SCORE_IN_A_TRAINER, str(marker)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not list(tmp_path.glob("ran*"))  # no completion ran code: the marker files were never created
    assert result["total"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert result["errors"] == 1  # 9**9**9**9: timed out after 1 s, its worker killed, the step went on
    assert result["verified"] == [0.0, 1.0]  # held-out verification runs in the sandbox too
    assert time.perf_counter() - start < 60
    assert "refused os.system" in out.stderr  # said once in the log


# --------------------------------------------------------------------------- workers die with the trainer

HANG_A_WORKER = """
import os
from trgrpo.tasks.math_data import verify_answers
print(os.getpid(), flush=True)
verify_answers(["1"], ["\\\\boxed{10^{10^{10}}}"], None, 600, 1)  # a check that takes hours, in a worker
"""


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_verifier_workers_die_with_a_killed_trainer():
    trainer = subprocess.Popen(
        [sys.executable, "-c", HANG_A_WORKER], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        pid = int(trainer.stdout.readline())
        deadline = time.monotonic() + 30
        while not workers and time.monotonic() < deadline:
            workers = _children(pid)
            time.sleep(0.1)
        assert workers, "the verifier worker never started"
        time.sleep(3)  # it imports sympy, then sits in the check
        assert all(_running(w) for w in workers)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        deadline = time.monotonic() + 5
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(w) for w in workers), "a verifier worker outlived the trainer"
    finally:
        trainer.kill()
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)


# --------------------------------------------------------------------------- the pool itself


def test_pool_limits_memory_kills_on_timeout_and_starts_again():
    pool = SandboxPool(workers=1, timeout=1.0, memory_mb=512)
    try:
        (big,) = pool.map("sandbox_jobs:allocate", [((1,), {})])
        assert big.status == "error" and big.value.startswith("MemoryError")
        start = time.perf_counter()
        (spun,) = pool.map("sandbox_jobs:spin", [((), {})])
        assert spun.status == "timeout" and time.perf_counter() - start < 5
        assert pool.map("sandbox_jobs:add", [((1, 2), {}), ((3, 4), {})]) == [("ok", 3, ()), ("ok", 7, ())]
    finally:
        pool.close()


def test_jobs_the_call_limit_stops_are_not_blamed_on_their_own_limit():
    pool = SandboxPool(workers=1, timeout=5.0)
    try:
        start = time.perf_counter()
        with time_limit(1.0):  # the whole call's limit, shorter than one job's 5 s
            results = pool.map("sandbox_jobs:spin", [((), {})] * 3)
        assert time.perf_counter() - start < 4
        assert [r.status for r in results] == ["skipped"] * 3  # cut short, then never started
        failed, message = failures(results, ["a", "b", "c"], "spin")
        assert failed == [0, 1, 2] and "3 answers were not (fully) checked" in message
        assert "5.0s" not in message  # no answer is said to have used its own 5 s
    finally:
        pool.close()


def test_workers_refuse_writes_and_see_no_secrets(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    pool = SandboxPool(workers=1, timeout=10.0)
    try:
        with caplog.at_level(logging.WARNING, logger="trgrpo.sandbox"):
            (write,) = pool.map("sandbox_jobs:write_file", [((str(tmp_path / "ran"),), {})])
        assert write.status == "error" and "PermissionError" in write.value and write.refused == ("open",)
        assert not (tmp_path / "ran").exists()
        assert "refused open while running sandbox_jobs:write_file" in caplog.text
        (env,) = pool.map("sandbox_jobs:environment_names", [((), {})])
        assert "HF_TOKEN" not in env.value and "PATH" in env.value
    finally:
        pool.close()


def test_a_reward_marked_untrusted_runs_in_a_sandbox(tmp_path):
    marker = tmp_path / "ran"
    spec = RewardSpec(fn=sandbox_jobs.eval_reward, sandbox=True, timeout=10)
    res = compute_rewards([spec], ["p"] * 2, [f"__import__('os').system('touch {marker}')", "1 + 1"], {})
    assert res.total.tolist() == [0.0, 1.0] and res.errors == 0 and not marker.exists()
    start = time.perf_counter()
    res = compute_rewards(
        [RewardSpec(fn=sandbox_jobs.eval_reward, sandbox=True, timeout=1, failure_score=-1.0)],
        ["p"],
        ["any(iter(int, 1))"],
        {},
    )  # loops forever inside one C call
    assert res.total.tolist() == [-1.0] and res.errors == 1 and time.perf_counter() - start < 10
    with pytest.raises(ValueError, match="model.rewards.*sandbox.*cannot be imported by name"):
        RewardSpec(fn=lambda prompts, completions: [0.0], sandbox=True)
