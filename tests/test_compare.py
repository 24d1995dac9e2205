"""``python -m trgrpo compare``: the statistics on hand-computed numbers, the report from fabricated runs, the
resume and failure handling with a stand-in command, and one real (tiny) sweep of two strategies x two seeds.

    python -m pytest tests/test_compare.py -q
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from helpers import tiny_demo_base

from trgrpo.compare import DONE, FAILED, Run, fit_command, parse_args, plan, settings, sweep
from trgrpo.compare import main as compare_main
from trgrpo.compare.report import write_report
from trgrpo.compare.stats import (
    curves_from_rows,
    mean_ci,
    noise_note,
    normalised_auc,
    paired_differences,
    smooth,
    summarise,
    t_quantile_975,
    variation,
)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ statistics


def test_t_quantiles_match_published_values():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile_975(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile_975(9) == pytest.approx(2.2622, abs=1e-4)
    assert t_quantile_975(30) == pytest.approx(2.0423, abs=1e-4)
    assert t_quantile_975(35) == pytest.approx(2.0301, abs=2e-4)  # interpolated in 1/df
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-4)
    assert t_quantile_975(10**6) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)
    stats = pytest.importorskip("scipy.stats")
    for df in [1, 3, 7, 12, 29, 31, 45, 90, 500]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)


def test_mean_and_t_interval_by_hand():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3) = 1.290994, s/sqrt(4) = 0.645497, t(0.975, 3) = 3.182446
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert (ci.mean, ci.n) == (2.5, 4)
    assert ci.half == pytest.approx(2.054260, abs=1e-5)
    assert (ci.low, ci.high) == pytest.approx((0.445740, 4.554260), abs=1e-5)
    assert ci.fmt(2) == "2.50 ± 2.05"
    one = mean_ci([0.5, float("nan")])  # nan values are left out
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.half) and one.contains_zero() is None
    assert mean_ci([]).fmt() == "n/a"


def test_paired_differences_and_the_noise_note():
    ours = {0: 0.5, 1: 0.6, 2: 0.7}
    base = {0: 0.4, 1: 0.6, 2: 0.5, 3: 0.9}  # seed 3 has no pair
    diff = paired_differences(ours, base)
    assert diff == pytest.approx({0: 0.1, 1: 0.0, 2: 0.2})
    # mean 0.1, s = 0.1, s/sqrt(3) = 0.057735, t(0.975, 2) = 4.302653 -> half-width 0.248414
    ci = mean_ci(diff.values())
    assert ci.mean == pytest.approx(0.1) and ci.half == pytest.approx(0.248414, abs=1e-5)
    assert ci.contains_zero() and noise_note(ci).startswith("inside the noise")
    # [0.10, 0.12, 0.11]: mean 0.11, s = 0.01 -> half-width 4.302653 * 0.01 / sqrt(3) = 0.024841
    tight = mean_ci([0.10, 0.12, 0.11])
    assert tight.half == pytest.approx(0.024841, abs=1e-5)
    assert not tight.contains_zero() and noise_note(tight) == "higher than baseline"
    assert noise_note(mean_ci([-0.10, -0.12, -0.11])) == "lower than baseline"
    assert noise_note(mean_ci([0.1])).startswith("no interval")


def test_area_under_the_accuracy_curve_is_a_mean_accuracy():
    # trapezoids: 50 * 0.3 + 50 * 0.4 + 100 * 0.6 = 95 over a range of 200
    points = [(100, 0.4), (0, 0.2), (200, 0.8), (50, 0.4)]
    assert normalised_auc(points) == pytest.approx(0.475)
    assert normalised_auc([(0, 0.3), (10, 0.3)]) == pytest.approx(0.3)
    assert normalised_auc([(5, 0.7)]) == 0.7
    assert math.isnan(normalised_auc([]))


def test_grad_norm_variation():
    # [1, 3, 2, 2]: mean 2, std sqrt(2/3); changes [2, 1, 0]: mean 1, std 1
    v = variation([1.0, 3.0, 2.0, 2.0])
    assert v["mean"] == 2.0 and v["std"] == pytest.approx(math.sqrt(2 / 3))
    assert v["change_mean"] == 1.0 and v["change_std"] == pytest.approx(1.0)
    assert math.isnan(variation([5.0])["change_mean"])
    assert smooth([0, 3, 0, 3, 0], 3) == pytest.approx([1.5, 1, 2, 1, 1.5])
    assert smooth([1, 2], 1) == [1, 2]


def _row(**kw):
    return {k: "" if v is None else str(v) for k, v in kw.items()}


def test_curves_use_rl_steps_from_the_row_or_its_step():
    rows = [
        _row(step=0, **{"val/accuracy": 0.2, "val/rl_step": 0}),
        _row(step=0, **{"train/grad_norm": 1.0, "train/rl_step": 1, "train/grad_share/p<0.1": 0.3}),
        _row(step=1, **{"train/grad_norm": 2.0, "train/rl_step": 2, "train/grad_share/p<0.1": 0.5}),
        _row(step=3, **{"train/grad_norm": 4.0, "train/rl_step": 3}),  # Lopti: two updates per RL step
        _row(step=3, **{"val/accuracy": 0.5}),
        _row(step=3, **{"val/rl_step": 3}),  # logged in another row of the same step
        _row(
            step=4, **{"val/accuracy": 0.6, "val/rl_step": 3}
        ),  # after training: the same RL step, last wins
    ]
    c = curves_from_rows(rows)
    assert c.rl_steps_axis
    assert c.accuracy == [(0.0, 0.2), (3.0, 0.6)]
    assert c.grad_norm == [(1.0, 1.0), (2.0, 2.0), (3.0, 4.0)]
    assert c.extras == {"train/grad_share/p<0.1": pytest.approx(0.4)}
    s = summarise(c)
    assert s["final_accuracy"] == 0.6 and s["best_accuracy"] == 0.6 and s["rl_steps"] == 3
    assert s["accuracy_auc"] == pytest.approx(0.4)
    assert s["grad_change_mean"] == pytest.approx(1.5)
    assert s["grad_change_relative"] == pytest.approx(1.5 / (7.0 / 3.0))  # |1-2|, |2-4| over the mean 7/3
    old = curves_from_rows([_row(step=0, **{"val/accuracy": 0.1}), _row(step=9, **{"val/accuracy": 0.3})])
    assert not old.rl_steps_axis and old.accuracy == [(0.0, 0.1), (9.0, 0.3)]  # fallback: Lightning's step


# ------------------------------------------------------------------ report from fabricated runs

FINAL = {
    ("grpo", 0): 0.40,
    ("grpo", 1): 0.50,
    ("grpo", 2): 0.60,
    ("tr_grpo", 0): 0.45,
    ("tr_grpo", 1): 0.60,
    ("tr_grpo", 2): 0.65,
}


def _fake_metrics(path: Path, final: float, grad: float, share: float | None = None) -> None:
    cols = ["epoch", "step", "train/grad_norm", "train/rl_step", "val/accuracy", "val/rl_step"]
    cols += ["train/grad_share/low"] if share is not None else []
    rows = [{"step": 0, "val/accuracy": 0.2, "val/rl_step": 0}]
    for i in range(10):
        row = {"epoch": 0, "step": i, "train/grad_norm": grad + (i % 2) * 0.5, "train/rl_step": i + 1}
        if share is not None:
            row["train/grad_share/low"] = share
        rows.append(row)
    rows += [
        {"epoch": 0, "step": 4, "val/accuracy": (0.2 + final) / 2, "val/rl_step": 5},
        {"step": 10, "val/accuracy": final, "val/rl_step": 10},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        writer.writerows(rows)


def _args(**kw):
    return Namespace(**{"base": "configs/demo.yaml", "baseline": "grpo", **kw})


def test_report_from_fabricated_runs(tmp_path):
    frags = ["configs/weighting/grpo.yaml", "configs/weighting/tr_grpo.yaml"]
    runs = plan(tmp_path, frags, [0, 1, 2, 3])
    for run in runs:
        if (run.strategy, run.seed) in FINAL:
            _fake_metrics(
                run.folder / "metrics.csv", FINAL[run.strategy, run.seed], 1.0 + run.seed, share=0.25
            )
            (run.folder / DONE).write_text(json.dumps({"wall_s": 10.0, "returncode": 0}))
    failed = next(r for r in runs if (r.strategy, r.seed) == ("tr_grpo", 3))
    failed.folder.mkdir(parents=True)
    (failed.folder / FAILED).write_text(
        json.dumps({"wall_s": 2.0, "returncode": 1, "error": "exit status 1"})
    )
    report = write_report(tmp_path, runs, _args(), session_s=3.0).read_text()

    assert "Student t" in report and "| tr_grpo | 3 | **FAILED** |" in report
    assert "| grpo | 3 | not run |" in report
    # final accuracy: grpo 0.5 ± t(2)*0.1/sqrt(3) = 0.248; tr_grpo mean 0.5667
    assert "| grpo | 3 | 0.500 ± 0.248 |" in report
    assert "| tr_grpo | 3 | 0.567 ± " in report
    # paired final accuracy differences 0.05, 0.10, 0.05: mean 0.0667, s 0.02887 -> half 0.0717, contains 0
    assert "| tr_grpo | 3 | +0.067 ± 0.072 | [-0.005, +0.138] | inside the noise" in report
    # the grad-norm differences are 0 for every seed: mean 0, s 0
    assert "| tr_grpo | 3 | +0.000 ± 0.000 | [+0.000, +0.000] | inside the noise" in report
    assert "`train/grad_share/low`" in report and "0.250 ± 0.000" in report
    assert "x axis: RL step" in report and "total wall time: 0:01:02" in report
    for png in ["accuracy.png", "grad_norm.png"]:
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in report


# ------------------------------------------------------------------ the runner

WRITE_METRICS = """
import csv, pathlib, sys
folder = pathlib.Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
print("training", folder)
if folder.parent.name == "broken":
    sys.exit("this strategy breaks")
with open(folder / "metrics.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["step", "val/accuracy", "val/rl_step"]); w.writerow([0, 0.5, 0])
"""


def _stand_in(run: Run) -> list[str]:
    return [sys.executable, "-c", WRITE_METRICS, str(run.folder)]


def test_sweep_resumes_redoes_unfinished_runs_and_survives_failures(tmp_path):
    runs = plan(tmp_path, ["grpo.yaml", "broken.yaml"], [0, 1])
    lines = []
    status = sweep(runs, _stand_in, lambda r: {"seed": r.seed}, heartbeat=0, say=lines.append)
    assert [status[r] for r in runs] == ["done", "failed", "done", "failed"]
    broken = runs[1]
    record = json.loads((broken.folder / FAILED).read_text())
    assert record["returncode"] == 1 and "this strategy breaks" in record["stderr_tail"]
    assert "this strategy breaks" in (broken.folder / "stderr.log").read_text()
    assert "training" in (runs[0].folder / "stdout.log").read_text()
    assert any("FAILED" in line for line in lines) and any(
        line.startswith("[2/4] broken seed 0") for line in lines
    )

    # rerun: finished runs are skipped; the unfinished one (no marker) and the failed ones start again
    (runs[2].folder / DONE).unlink()
    (runs[2].folder / "leftover").write_text("x")
    lines.clear()
    status = sweep(runs, _stand_in, lambda r: {"seed": r.seed}, heartbeat=0, say=lines.append)
    assert [status[r] for r in runs] == ["skipped", "failed", "done", "failed"]
    assert not (runs[2].folder / "leftover").exists()
    assert "1 finished earlier (skipped), 3 to run" in lines[0] and "ETA" in lines[1]
    # changed settings: the finished run is redone
    status = sweep(
        runs[:1], _stand_in, lambda r: {"seed": r.seed, "rl_steps": 7}, heartbeat=0, say=lines.append
    )
    assert status[runs[0]] == "done"


SWEEP_OF_SLEEPERS = """
import sys, pathlib
from trgrpo.compare import plan, sweep
out = pathlib.Path(sys.argv[1])
sleeper = (
    "import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()));"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(120)"
)
command = lambda r: [sys.executable, "-c", sleeper, str(out / "child.pid")]
sweep(plan(out, ["grpo.yaml"], [0]), command, lambda r: {}, 0, print)
"""


def _running(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
def test_a_sweep_killed_with_sigkill_takes_its_run_along(tmp_path):
    sweep_proc = subprocess.Popen([sys.executable, "-c", SWEEP_OF_SLEEPERS, str(tmp_path)], cwd=ROOT)
    pid_file, deadline = tmp_path / "child.pid", time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _running(child)
    sweep_proc.kill()  # SIGKILL: no handler, no finally block runs in the sweep
    sweep_proc.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = _running(child)
    if still:
        os.kill(child, signal.SIGKILL)
    assert not still, "the run outlived the sweep that started it"


def test_fit_command_pairs_seeds_and_counts_rl_steps(tmp_path):
    args = parse_args(
        [
            "--strategies",
            "grpo",
            "configs/weighting/lopti.yaml",
            "--seeds",
            "3",
            "--rl_steps",
            "50",
            "--out",
            str(tmp_path),
            "--",
            "--trainer.val_check_interval=10",
        ]
    )
    assert args.fragments == ["configs/weighting/grpo.yaml", "configs/weighting/lopti.yaml"]
    assert args.extra == ["--trainer.val_check_interval=10"]
    run = plan(tmp_path, args.fragments, args.seeds)[1]
    assert run.folder == tmp_path / "runs" / "lopti" / "seed3"
    cmd = fit_command(run, args.base, args.rl_steps, args.extra)
    assert cmd[1:9] == [
        "-m",
        "trgrpo",
        "fit",
        "--config",
        "configs/demo.yaml",
        "--config",
        "configs/weighting/lopti.yaml",
        "--seed_everything",
    ]
    assert cmd[9:12] == ["3", "--data.seed", "3"] and cmd[-1] == "--trainer.val_check_interval=10"
    logger = json.loads(cmd[cmd.index("--trainer.logger") + 1])
    assert logger["init_args"] == {"save_dir": str(run.folder.parent), "name": "", "version": "seed3"}
    limit = next(a for a in cmd if a.startswith("--trainer.callbacks+="))
    assert json.loads(limit.split("=", 1)[1]) == {
        "class_path": "trgrpo.callbacks.RLStepLimit",
        "init_args": {"steps": 50},
    }
    assert settings(run, args.base, 50, args.extra)["rl_steps"] == 50
    with pytest.raises(SystemExit):
        parse_args(["--strategies", "grpo", "grpo", "--out", str(tmp_path)])


def test_the_cli_dispatches_compare(capsys):
    from trgrpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])  # what python -m trgrpo compare --help runs
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--rl_steps" in out and "--report_only" in out


# ------------------------------------------------------------------ one real sweep


@pytest.mark.slow
def test_real_sweep_of_two_strategies_and_two_seeds(tmp_path, capsys):
    base = tiny_demo_base(tmp_path, warm_start_steps=10)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "trgrpo",
        "compare",
        "--base",
        str(base),
        "--strategies",
        "grpo",
        "tr_grpo",
        "--seeds",
        "0",
        "1",
        "--rl_steps",
        "4",
        "--out",
        str(out),
        "--",
        "--trainer.log_every_n_steps=1",
    ]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[4/4] tr_grpo seed 1: done" in done.stdout, done.stdout
    first = time.monotonic() - start

    report = (out / "report.md").read_text()
    assert "**FAILED**" not in report and "| grpo | 2 | " in report
    for run in plan(out, ["grpo", "tr_grpo"], [0, 1]):
        summary = summarise(curves_from_rows(list(csv.DictReader(open(run.folder / "metrics.csv")))))
        assert summary["rl_steps"] == 4 and 0 <= summary["final_accuracy"] <= 1
        assert json.loads((run.folder / DONE).read_text())["returncode"] == 0
    # paired seeds: one warm-start, cached once and loaded by every other run
    assert len(list((tmp_path / "warm").glob("*.pt"))) == 1
    for png in ["accuracy.png", "grad_norm.png"]:
        assert (out / png).stat().st_size > 1000

    capsys.readouterr()
    assert compare_main(cmd[4:]) == 0  # rerun in-process: every run finished, nothing starts
    assert "4 finished earlier (skipped), 0 to run" in capsys.readouterr().out
    print(f"sweep {first:.0f}s, rerun {time.monotonic() - start - first:.0f}s")


def test_bucket_columns_are_ordered_by_probability_and_grouped_by_family():
    from trgrpo.compare.stats import bucket_order

    cols = [
        "train/token_share/p>=0.5",
        "train/grad_share/p>=0.5",
        "train/grad_share/0.1<=p<0.5",
        "train/weight/p<0.1",
        "train/grad_share/p<0.1",
        "train/token_share/p<0.1",
    ]
    assert sorted(cols, key=bucket_order) == [
        "train/grad_share/p<0.1",
        "train/grad_share/0.1<=p<0.5",
        "train/grad_share/p>=0.5",
        "train/token_share/p<0.1",
        "train/token_share/p>=0.5",
        "train/weight/p<0.1",
    ]
