"""``python -m trgrpo compare`` grids, parallel runs and stability measures: parsing, folders, commands and
resume with stand-in runs, stability and collapse on recorded metric files, the report's numbers against a
direct computation, and one real tiny grid whose runs are checked to have trained with the grid's values.

    python -m pytest tests/test_compare_grid.py -q
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from helpers import tiny_demo_base

from trgrpo.compare import DONE, FAILED, fit_command, parse_args, plan, settings, sweep
from trgrpo.compare.grid import grid_points, grid_value
from trgrpo.compare.report import write_report
from trgrpo.compare.stats import curves_from_rows, max_drop, percentile, stability

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")

# ------------------------------------------------------------------ parsing


def test_grid_flags_make_a_product_in_flag_order():
    points = grid_points(["model.optim.lr=1e-4,4e-4", "--model.loss.clip_high=0.2,0.28,0.4"])
    assert len(points) == 6
    assert points[0] == (("model.optim.lr", "1e-4"), ("model.loss.clip_high", "0.2"))
    assert points[-1] == (("model.optim.lr", "4e-4"), ("model.loss.clip_high", "0.4"))
    assert grid_points([]) == [()]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model.optim.lr", "KEY=V1,V2"),
        ("model..lr=1", "KEY=V1,V2"),
        ("model.optim.lr=1,,2", "non-empty"),
        ("model.optim.lr=a/b", "no '/'"),
        ("model.optim.lr=1,1", "repeated values"),
    ],
)
def test_bad_grid_flags_are_refused_naming_the_flag(spec, message):
    with pytest.raises(ValueError, match=message):
        grid_points([spec])
    with pytest.raises(ValueError, match="given twice"):
        grid_points(["model.optim.lr=1", "model.optim.lr=2"])


def test_multipliers_scale_the_base_configs_value():
    lr = yaml.safe_load(Path(DEMO).read_text())["model"]["optim"]["lr"]
    assert grid_value(DEMO, "model.optim.lr", "x4") == f"{lr * 4:.6g}" == "0.0012"
    assert grid_value(DEMO, "model.optim.lr", "x0.5") == "0.00015"
    assert grid_value(DEMO, "model.optim.lr", "2e-4") == "2e-4"  # a plain value passes as given
    with pytest.raises(ValueError, match="sets no model.optim.warmup_steps"):
        grid_value(DEMO, "model.optim.warmup_steps", "x2")
    with pytest.raises(ValueError, match="not a number"):
        grid_value(DEMO, "model.weighting.class_path", "x2")


def test_parse_args_checks_the_grid_before_anything_runs(tmp_path, capsys):
    args = parse_args(
        ["--strategies", "grpo", "--out", str(tmp_path), "--grid", "model.optim.lr=x1,x4", "--jobs", "2"]
    )
    assert [p for p in args.points] == [(("model.optim.lr", "x1"),), (("model.optim.lr", "x4"),)]
    assert args.jobs == 2
    for bad in (["--grid", "model.optim.nothing=x2"], ["--jobs", "0"], ["--grid", "lr"]):
        with pytest.raises(SystemExit):
            parse_args(["--strategies", "grpo", "--out", str(tmp_path), *bad])
    assert "model.optim.nothing" in capsys.readouterr().err


# ------------------------------------------------------------------ plan, command, settings


def test_grid_runs_get_their_own_folders_labels_and_overrides(tmp_path):
    points = grid_points(["model.optim.lr=x1,x4"])
    runs = plan(tmp_path, ["configs/weighting/grpo.yaml", "configs/weighting/tr_grpo.yaml"], [0, 1], points)
    assert len(runs) == 8
    # seed by seed: every grid point and strategy of seed 0 before any of seed 1
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4
    assert runs[1].folder == tmp_path / "runs" / "model.optim.lr=x1" / "tr_grpo" / "seed0"
    assert runs[2].label == "grpo seed 0 [model.optim.lr=x4]"
    cmd = fit_command(runs[2], DEMO, 10, ["--trainer.log_every_n_steps=1"])
    assert cmd[-2:] == ["--model.optim.lr=0.0012", "--trainer.log_every_n_steps=1"]
    assert cmd.index("--model.optim.lr=0.0012") > cmd.index("configs/weighting/grpo.yaml")
    assert settings(runs[2], DEMO, 10, [])["grid"] == [["model.optim.lr", "0.0012"]]
    assert "grid" not in settings(plan(tmp_path, ["grpo.yaml"], [0])[0], DEMO, 10, [])
    # without a grid the layout is the one sweeps have always written
    assert plan(tmp_path, ["grpo.yaml"], [3])[0].folder == tmp_path / "runs" / "grpo" / "seed3"


WRITE_METRICS = """
import csv, os, pathlib, sys, time
folder = pathlib.Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
(folder / "env.txt").write_text(os.environ.get("OMP_NUM_THREADS", "") + " " + str(time.time()))
time.sleep(float(sys.argv[2]))
(folder / "end.txt").write_text(str(time.time()))
with open(folder / "metrics.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["step", "val/accuracy", "val/rl_step"]); w.writerow([0, 0.5, 0])
"""


def _stand_in(seconds: float = 0.0):
    return lambda run: [sys.executable, "-c", WRITE_METRICS, str(run.folder), str(seconds)]


def test_an_interrupted_grid_resumes_and_a_changed_value_is_redone(tmp_path):
    runs = plan(tmp_path, ["grpo.yaml", "tr_grpo.yaml"], [0], grid_points(["model.optim.lr=x1,x4"]))

    def keys(r):
        return settings(r, DEMO, 5, [])

    lines = []
    assert set(sweep(runs, _stand_in(), keys, heartbeat=0, say=lines.append).values()) == {"done"}
    (runs[3].folder / DONE).unlink()  # as if the sweep had been stopped during its last run
    lines.clear()
    status = sweep(runs, _stand_in(), keys, heartbeat=0, say=lines.append)
    assert [status[r] for r in runs] == ["skipped", "skipped", "skipped", "done"]
    assert "3 finished earlier (skipped), 1 to run" in lines[0]
    # the base's value changed: the x4 runs now mean another learning rate and are redone, x1 too
    base = tmp_path / "base.yaml"
    cfg = yaml.safe_load(Path(DEMO).read_text())
    cfg["model"]["optim"]["lr"] = 0.001
    base.write_text(yaml.safe_dump(cfg))
    status = sweep(runs, _stand_in(), lambda r: settings(r, str(base), 5, []), heartbeat=0, say=lines.append)
    assert [status[r] for r in runs] == ["done"] * 4


def test_jobs_run_at_once_with_the_cpus_split(tmp_path, monkeypatch):
    from trgrpo.compare import job_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = job_threads(2)
    assert env == {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}
    assert job_threads(1) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job_threads(2) == {}  # the user's own setting wins
    runs = plan(tmp_path, ["a.yaml", "b.yaml"], [0])
    status = sweep(runs, _stand_in(3.0), lambda r: {}, heartbeat=0, say=lambda _: None, jobs=2, env=env)
    assert set(status.values()) == {"done"}
    starts = [float((r.folder / "env.txt").read_text().split()[1]) for r in runs]
    ends = [float((r.folder / "end.txt").read_text()) for r in runs]
    assert max(starts) < min(ends), "the two runs did not overlap"
    assert all((r.folder / "env.txt").read_text().split()[0] == env["OMP_NUM_THREADS"] for r in runs)


PARALLEL_SLEEPERS = """
import signal, sys, pathlib
from trgrpo.compare import plan, sweep
out = pathlib.Path(sys.argv[1])
sleeper = (
    "import os, sys, time; p = sys.argv[1]; open(p + '.tmp', 'w').write(str(os.getpid()));"
    "os.replace(p + '.tmp', p); time.sleep(120)"
)
command = lambda r: [sys.executable, "-c", sleeper, str(out / f"{r.strategy}.pid")]
def stop(signum, frame):
    raise SystemExit(143)
signal.signal(signal.SIGTERM, stop)
sweep(plan(out, ["a.yaml", "b.yaml"], [0]), command, lambda r: {}, 0, print, jobs=2)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_parallel_sweep_stopped_with_sigterm_stops_every_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", PARALLEL_SLEEPERS, str(tmp_path)], cwd=ROOT)
    pids, deadline = [tmp_path / "a.pid", tmp_path / "b.pid"], time.monotonic() + 60
    while not all(p.exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(p.read_text()) for p in pids]
    assert all(_running(c) for c in children)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    deadline = time.monotonic() + 10
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [c for c in children if _running(c)]
    for c in left:
        os.kill(c, signal.SIGKILL)
    assert not left, "a run outlived the stopped sweep"
    assert not list(tmp_path.rglob(DONE))


# ------------------------------------------------------------------ stability on recorded metric files


def _rows(grads, entropies, accs, bad_loss=False):
    """CSVLogger-like rows: one train row per RL step, validations at evenly spaced steps."""
    rows = []
    for i, (g, e) in enumerate(zip(grads, entropies, strict=True)):
        loss = "nan" if bad_loss and i == len(grads) - 1 else "0.1"
        row = {
            "step": str(i),
            "train/rl_step": str(i + 1),
            "train/grad_norm": str(g),
            "train/entropy": str(e),
        }
        rows.append({**row, "train/loss": loss})
    every = len(grads) // (len(accs) - 1)
    for k, a in enumerate(accs):
        rows.append({"step": str(k * every), "val/accuracy": str(a), "val/rl_step": str(k * every)})
    return rows


GRADS = [1.0, 1.2, 0.9, 1.1, 8.0, 1.0, 0.95, 1.05, 1.3, 6.0, 1.0, 1.1, 0.8, 1.0, 1.2, 0.9, 1.0, 1.1, 1.0, 0.9]
HEALTHY_ENT = [0.5 - 0.01 * i for i in range(20)]


def test_stability_measures_equal_a_direct_computation():
    accs = [0.25, 0.4, 0.3, 0.45, 0.42]
    s = stability(curves_from_rows(_rows(GRADS, HEALTHY_ENT, accs)))
    median = statistics.median(GRADS)
    assert s["grad_norm_peak"] == 8.0
    ordered = sorted(GRADS)  # the 0.95 quantile by linear interpolation: position 0.95 * 19 = 18.05
    assert s["grad_norm_p95"] == pytest.approx(ordered[18] + 0.05 * (ordered[19] - ordered[18]))
    assert s["grad_spikes"] == sum(g > 5 * median for g in GRADS) == 2
    assert s["entropy_ratio"] == pytest.approx(
        statistics.fmean(HEALTHY_ENT[-2:]) / statistics.fmean(HEALTHY_ENT[:2])
    )
    assert s["accuracy_max_drop"] == pytest.approx(0.1)  # 0.4 -> 0.3 (0.45 -> 0.42 is smaller)
    assert s["collapsed"] == 0.0 and s["collapse_reason"] == ""


def test_percentile_and_max_drop_by_hand():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.25) == 1.25
    assert math.isnan(percentile([], 0.5))
    assert max_drop([0.1, 0.5, 0.2, 0.6, 0.55]) == pytest.approx(0.3) and max_drop([0.1, 0.2]) == 0.0


@pytest.mark.parametrize(
    "case, reason",
    [
        ("accuracy", "final held-out accuracy 0.200 below the start's 0.250"),
        ("entropy", "entropy fell to"),
        ("nan", "non-finite train/loss"),
    ],
)
def test_collapse_is_detected_when_it_is_there(case, reason):
    accs = [0.25, 0.3, 0.2] if case == "accuracy" else [0.25, 0.3, 0.35]
    ent = [0.5] * 10 + [0.01] * 10 if case == "entropy" else HEALTHY_ENT
    s = stability(curves_from_rows(_rows(GRADS, ent, accs, bad_loss=case == "nan")))
    assert s["collapsed"] == 1.0 and reason in s["collapse_reason"], s["collapse_reason"]


def test_an_entropy_fall_short_of_the_threshold_is_not_a_collapse():
    # a pretrained model that learns a fixed answer format: a twentieth of its start, 0.025 nats per token,
    # above the 0.02 threshold
    ent = [0.5] * 10 + [0.025] * 10
    s = stability(curves_from_rows(_rows(GRADS, ent, [0.25, 0.3])))
    assert s["collapsed"] == 0.0 and s["entropy_ratio"] == pytest.approx(0.05)
    ent = [0.5] * 10 + [0.015] * 10  # below it: collapsed
    s = stability(curves_from_rows(_rows(GRADS, ent, [0.25, 0.3])))
    assert s["collapsed"] == 1.0 and "0.0150 nats per token" in s["collapse_reason"]


# ------------------------------------------------------------------ the report of a grid


def _write_run(run, accs, ent, bad_loss=False):
    run.folder.mkdir(parents=True, exist_ok=True)
    rows = _rows(GRADS, ent, accs, bad_loss)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(run.folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        writer.writerows(rows)
    (run.folder / DONE).write_text(json.dumps({"wall_s": 5.0, "returncode": 0}))


def test_the_report_of_a_grid_counts_collapses_and_its_numbers_equal_a_direct_computation(tmp_path):
    points = grid_points(["model.optim.lr=x1,x16"])
    runs = plan(
        tmp_path, ["configs/weighting/grpo.yaml", "configs/weighting/tr_grpo.yaml"], [0, 1, 2], points
    )
    finals = {}
    for r in runs:
        high = r.point.endswith("x16")
        # at x16 GRPO collapses at seeds 0 and 1 (accuracy below the start), TR-GRPO at none
        final = 0.2 if high and r.strategy == "grpo" and r.seed < 2 else 0.3 + 0.05 * r.seed
        finals[r] = final
        if high and r.strategy == "tr_grpo" and r.seed == 2:  # a run that died on NaN probabilities
            r.folder.mkdir(parents=True)
            tail = "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0"
            (r.folder / FAILED).write_text(json.dumps({"wall_s": 1.0, "returncode": 1, "stderr_tail": tail}))
            continue
        _write_run(r, [0.25, 0.28, final], HEALTHY_ENT)
    sweep_settings = {
        "argv": [],
        "base": DEMO,
        "grid_values": {"model.optim.lr=x16": "model.optim.lr=0.0048"},
    }
    (tmp_path / "settings.json").write_text(json.dumps(sweep_settings))
    report = write_report(tmp_path, runs, Namespace(base=DEMO, baseline="grpo")).read_text()

    assert "`model.optim.lr=x16` (model.optim.lr=0.0048)" in report
    grpo_high = statistics.fmean(finals[r] for r in runs if r.point.endswith("x16") and r.strategy == "grpo")
    assert f"| `model.optim.lr=x16` | {grpo_high:.3f} ± " in report
    assert "collapsed 2 / 3 | " in report  # GRPO at x16
    assert "collapsed 1 / 1 |" not in report and "; collapsed 1 / 3 |" in report  # TR-GRPO: the NaN run
    assert "collapsed: failed on non-finite numbers" in report
    assert (
        "## Stability (model.optim.lr=x1)" in report
        and "## Paired difference to grpo (model.optim.lr=x16)" in report
    )
    for png in ["accuracy_model.optim.lr=x1.png", "accuracy_model.optim.lr=x16.png", "collapse.png"]:
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in report


# ------------------------------------------------------------------ one real grid


@pytest.mark.slow
def test_a_real_grid_trains_each_run_with_its_value(tmp_path):
    base = tiny_demo_base(tmp_path, warm_start_steps=5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trgrpo", "compare", "--base", str(base), "--strategies", "grpo"]
    cmd += [
        "--seeds",
        "0",
        "--rl_steps",
        "2",
        "--grid",
        "model.optim.lr=x1,x64",
        "--jobs",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for token, lr in (("x1", 0.0003), ("x64", 0.0192)):
        folder = out / "runs" / f"model.optim.lr={token}" / "grpo" / "seed0"
        assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["optim"]["lr"] == pytest.approx(
            lr
        )
        assert (folder / DONE).is_file()
    report = (out / "report.md").read_text()
    assert "## Across the grid" in report and "(model.optim.lr=0.0192)" in report
