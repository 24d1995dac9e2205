"""Evaluation helpers: pass@k, mean@k, per-level aggregation and the sample table.

python -m pytest tests/test_evaluation.py -q
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from helpers import arithmetic_args, run_cli

from trgrpo.checkpointing import CheckpointWriteError
from trgrpo.evaluation import (
    EvalConfig,
    SampleRow,
    level_metrics,
    level_sums,
    mean_at_k,
    pass_at_k,
    sort_levels,
    write_sample_table,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 2, 1, 0.2),  # pass@1 = c / n
        (5, 0, 3, 0.0),
        (4, 2, 3, 1.0),  # n - c = 2 < k: some draw of 3 always holds a correct one
        (6, 2, 2, 0.6),  # 1 - C(4,2)/C(6,2) = 1 - 6/15
        (3, 3, 1, 1.0),
    ],
)
def test_pass_at_k_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_mean_at_k():
    assert mean_at_k([1.0, 0.0, 0.0, 1.0]) == 0.5  # 2 / 4: exact
    with pytest.raises(ValueError):
        mean_at_k([])


def test_level_aggregation_by_hand():
    levels = sort_levels([3, 4, 3])
    index = {lvl: i for i, lvl in enumerate(levels)}
    sums = level_sums(
        index, [3, 3, 4], greedy=[1.0, 0.0, 1.0], sampled=[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], k=2
    )
    # level 3: 2 prompts, 1 greedy-correct, mean@2 0.5 + 0, pass@2 1 + 0; level 4: 1 prompt, all correct
    # (float64 sums of 0, 0.5 and 1: exact)
    assert sums.tolist() == [[2.0, 1.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]]
    m = level_metrics(levels, sums, k=2)
    assert m == pytest.approx(
        {
            "val/accuracy": 2 / 3,
            "val/mean@2": 0.5,
            "val/pass@2": 2 / 3,
            "val/accuracy/level_3": 0.5,
            "val/mean@2/level_3": 0.25,
            "val/pass@2/level_3": 0.5,
            "val/accuracy/level_4": 1.0,
            "val/mean@2/level_4": 1.0,
            "val/pass@2/level_4": 1.0,
        }
    )


def test_without_levels_or_samples_only_overall_accuracy():
    sums = level_sums({None: 0}, [None, None], greedy=[1.0, 0.0], sampled=None, k=0)
    assert level_metrics([None], sums, k=0) == {"val/accuracy": 0.5}  # 1 / 2: exact


def test_sums_add_up_across_batches_and_processes():
    index = {"easy": 0, "hard": 1}
    a = level_sums(index, ["easy"], [1.0], [[1.0, 1.0, 0.0]], k=1)
    b = level_sums(index, ["hard", "easy"], [0.0, 0.0], [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], k=1)
    m = level_metrics(["easy", "hard"], a + b, k=1)
    # pass@1 from 3 samples is c / 3; easy prompts: (2/3 + 1/3) / 2
    assert m["val/pass@1/level_easy"] == pytest.approx(0.5)
    assert m["val/accuracy"] == pytest.approx(1 / 3)


def test_sort_levels_natural_order():
    assert sort_levels([7, 3, 10, 3]) == [3, 7, 10]
    assert sort_levels(["hard", "easy", None]) == [None, "easy", "hard"]


def test_eval_config_validation():
    assert EvalConfig(k=4).samples == 4 and EvalConfig(k=2, n=8).samples == 8 and EvalConfig().samples == 0
    with pytest.raises(ValueError, match=r"model\.eval\.n must be >= model\.eval\.k"):
        EvalConfig(k=4, n=2)
    with pytest.raises(ValueError, match=r"model\.eval\.k"):
        EvalConfig(k=-1)


def test_sample_table_markdown_and_jsonl(tmp_path):
    rows = [
        SampleRow(
            3,
            "Who | is\nwho?",
            "A is a knight.",
            "<think>x</think>",
            0.0,
            {"format": 1.0, "answer": None, "total": 1.0},
        ),
        SampleRow(3, "q2", "B", "y" * 1000, 1.0, {"format": -1.0, "answer": 2.0, "total": 1.0}),
    ]
    md = write_sample_table(tmp_path / "val_samples", 40, rows)
    assert md.name == "step_0000040.md"
    lines = md.read_text().splitlines()
    assert lines[2] == "| level | prompt | answer | completion | correct | format | answer | total |"
    assert lines[4].startswith(
        "| 3 | Who \\| is<br>who? | A is a knight. | <think>x</think> | 0 | 1 |  | 1 |"
    )
    assert len(lines[5]) < 700  # long completions are shortened in the table ...
    full = [json.loads(x) for x in md.with_suffix(".jsonl").read_text().splitlines()]
    assert (
        full[1]["completion"] == "y" * 1000 and full[0]["rewards"]["answer"] is None
    )  # ... not in the jsonl


def test_level_sums_dtype_survives_all_reduce_shape():
    sums = level_sums({1: 0, 2: 1}, [2], [1.0], None, k=0)
    assert sums.dtype == torch.float64 and sums.shape == (2, 4)


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fit_with_checkpoints(tmp_path: Path, steps: int) -> Path:
    """A tiny fit validating and saving ``last.ckpt`` after every step, with the reward plot on; returns
    the checkpoint folder."""
    ckpt = tmp_path / "ckpt"
    run_cli(
        tmp_path,
        *arithmetic_args(),
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=1",
        "--trainer.callbacks+=trgrpo.callbacks.RewardPlot",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
    )
    return ckpt


def test_optional_artefacts_that_cannot_be_written_only_warn(tmp_path, monkeypatch, caplog):
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # the disk is full where the sample tables go
        if self.name == "val_samples":
            _full_disk()
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _full_disk)
    with caplog.at_level(logging.WARNING):
        ckpt = _fit_with_checkpoints(tmp_path, steps=2)
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 2  # training went on
    assert "held-out sample table of step 1 not written" in caplog.text
    assert "reward plot not written" in caplog.text
    assert not list(tmp_path.rglob("val_samples"))


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous(tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):  # the first checkpoint fits on the disk, the second does not
        if isinstance(obj, dict) and "global_step" in obj:
            saves.append(obj["global_step"])
            if len(saves) > 1:
                Path(f).write_bytes(b"half a checkpoint")
                _full_disk()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint .*last\.ckpt.*No space"):
        _fit_with_checkpoints(tmp_path / "run", steps=3)
    monkeypatch.undo()
    ckpt = tmp_path / "run" / "ckpt"
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 1
    assert not list(ckpt.glob(".*.partial"))  # the half-written file does not keep the space
