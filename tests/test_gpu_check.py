"""``scripts/gpu_check.py`` without a GPU: its arguments, its plan, the wheel budget, the checks it asserts.

The runs themselves need CUDA; what is tested here is everything that decides what they will be.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)


def test_the_plan_fits_eight_minutes_and_every_row_has_its_own_timeout(tmp_path):
    rows = gpu_check.plan_rows(tmp_path, steps=3)
    assert [r.name for r in rows][:3] == ["plain", "zero2", "zero3"]
    assert sum(r.timeout_s for r in rows) <= gpu_check.TOTAL_BUDGET_S and all(r.timeout_s > 0 for r in rows)
    vllm = [r for r in rows if "--model.sampling.engine=vllm" in r.args]
    assert [r.needs for r in vllm] == ["vllm"]  # the only row that needs vLLM, and says so


def test_the_compared_rows_differ_only_in_strategy(tmp_path):
    rows = {r.name: r.args for r in gpu_check.plan_rows(tmp_path, steps=3)}
    for stage in (2, 3):
        strategy = gpu_check.zero(stage)
        assert rows[f"zero{stage}"] == [*strategy, *rows["plain"][1:]]  # plain's first argument: its strategy


def test_arguments_fail_early_naming_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["run", "--rows", "zero9"])
    assert "--rows: unknown ['zero9']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["run", "--steps", "1"])
    assert "--steps: at least 2" in capsys.readouterr().err


def test_a_subset_brings_the_rows_it_depends_on(tmp_path):
    rows = gpu_check.plan_rows(tmp_path, steps=3)
    assert [r.name for r in gpu_check.selected(rows, ["zero3"])] == ["plain", "zero3"]
    assert [r.name for r in gpu_check.selected(rows, ["zero3-resumed"])] == ["zero3-resume", "zero3-resumed"]


def test_a_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(["run", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "plan: 8 rows" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_a_row_whose_module_is_missing_is_not_installed_and_runs_nothing(tmp_path):
    row = gpu_check.Row("x", ["--nothing"], 1, needs="surely_not_a_module_here")
    assert gpu_check.run_row(row, [], tmp_path)["status"] == "not installed"
    assert gpu_check.missing_modules({"surely_not_a_module_here": "dist", "json": "json"}) == ["dist"]


def test_the_wheel_folder_is_refused_over_its_budget(tmp_path):
    small = tmp_path / "a.whl"
    small.write_bytes(b"0" * 2**20)
    assert gpu_check.check_wheel_budget([small]) == pytest.approx(1.0)
    big = tmp_path / "b.whl"
    big.write_bytes(b"0" * (gpu_check.WHEEL_BUDGET_MB * 2**20))
    with pytest.raises(ValueError, match="over the 60 MB budget"):
        gpu_check.check_wheel_budget([small, big])


def test_the_checks_pass_and_fail_on_metrics(tmp_path):
    plain = {0: {"train/grad_norm": 2.0, "train/loss": 0.001}}
    ok = {0: {"train/grad_norm": 2.01, "train/loss": 0.002}}
    far = {0: {"train/grad_norm": 2.2, "train/loss": 0.001}}
    results = {"plain": {"rows": plain}, "zero2": {"rows": ok}, "zero3": {"rows": far}}
    assert gpu_check.check("zero2", results, tmp_path) == "pass"
    assert gpu_check.check("zero3", results, tmp_path).startswith("FAIL: grad_norm 2.2")
    results["zero3-ref"] = {"rows": {0: {"train/kl": 0.0}, 1: {"train/kl": 1e-4}}}
    assert gpu_check.check("zero3-ref", results, tmp_path) == "pass"
    results["zero2-vllm"] = {"rows": {1: {"train/sampler_kl": 0.5}}}
    assert gpu_check.check("zero2-vllm", results, tmp_path).startswith("FAIL: sampler_kl")


def test_the_padded_model_has_qwens_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setattr(
        gpu_check,
        "SHAPE",
        {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
    )
    import json

    folder = gpu_check.write_padded_model(tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 151_936
    assert (folder / "tokenizer.json").is_file()
