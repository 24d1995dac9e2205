"""Bad input names what is wrong: the file, the line or the key, instead of a bare library exception.

Empty and non-UTF-8 data files, a YAML syntax error, a foreign or truncated checkpoint, ``compare --out`` at a
file, ``compare`` run away from the repository, and prompts longer than the policy's positions.  Also
documented facts that must stay so: the multi-node command's checkpoint callbacks, the recorded wall times.

    python -m pytest tests/test_errors.py -q
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import arithmetic_args, run_cli

from trgrpo.cli import main
from trgrpo.compare import parse_args
from trgrpo.tasks.math_data import MathTask
from trgrpo.tasks.search_qa import SearchQATask

ROOT = Path(__file__).resolve().parents[1]


def test_an_empty_data_file_is_named(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    full = tmp_path / "full.jsonl"
    full.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"data.task.init_args.path: '.*train.jsonl' is empty"):
        MathTask(str(empty), val_split=None, val_size=1).rows("train")
    with pytest.raises(ValueError, match=r"data.task.init_args.data_files.test: '.*train.jsonl' is empty"):
        MathTask("json", data_files={"train": str(full), "test": str(empty)}).rows("train")


def test_a_data_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    latin = tmp_path / "questions.jsonl"
    latin.write_bytes(b'{"question": "1+1", "answer": "2"}\n{"question": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"'.*questions.jsonl' line 2 is not UTF-8 text"):
        MathTask(str(latin), val_split=None, val_size=1).rows("train")
    with pytest.raises(
        ValueError, match=r"data.task.init_args.path: '.*questions.jsonl' line 2 is not UTF-8"
    ):
        SearchQATask(str(latin), answers_key="answer", val_size=1).rows("train")


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    with pytest.raises(ValueError, match=r"--config .*recipe.yaml: not valid YAML.*\n.*in \".*recipe.yaml\""):
        main(["fit", "--config", str(bad), "--print_config"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"state_dict": {}}, r"foreign.ckpt: not a checkpoint written by a Lightning run"),
        (None, r"foreign.ckpt: cannot read the checkpoint, truncated or corrupted\?"),
    ],
)
def test_a_foreign_or_truncated_checkpoint_is_named(tmp_path, content, message):
    path = tmp_path / "foreign.ckpt"
    torch.save(content if content is not None else {"weights": torch.zeros(256)}, path)
    if content is None:  # cut in half, as a copy that stopped early leaves it
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=message):
        run_cli(tmp_path, *arithmetic_args(), "--trainer.max_steps=1", f"--ckpt_path={path}")


def test_compare_out_at_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("a file")
    with pytest.raises(SystemExit):
        parse_args(["--strategies", "grpo", "--out", str(out)])
    assert f"--out {out}: is a file" in capsys.readouterr().err


def test_compare_finds_bare_strategy_names_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--strategies", "grpo", "tr_grpo", "--out", "results"])
    assert args.fragments == [
        str(ROOT / "configs/weighting/grpo.yaml"),
        str(ROOT / "configs/weighting/tr_grpo.yaml"),
    ]
    assert args.base == str(ROOT / "configs/demo.yaml")


def test_prompts_longer_than_the_positions_are_reported(tmp_path, caplog):
    # arithmetic prompts are about 6 characters ("12+7=") of the character tokenizer: with 4 positions and
    # 3 new tokens every one runs past the positions the policy learned
    with caplog.at_level(logging.WARNING, logger="trgrpo.data"):
        run_cli(
            tmp_path,
            *arithmetic_args(),
            "--trainer.max_steps=1",
            "--model.policy.tiny.max_position_embeddings=4",
        )
    assert "train prompts (longest" in caplog.text
    assert "model.sampling.max_new_tokens=3 exceed the policy's 4 positions" in caplog.text


def fit_commands(markdown: str, launcher: str) -> list[list[str]]:
    """The ``fit`` arguments of every bash block of ``markdown`` whose command starts with ``launcher``."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    commands = [shlex.split(b.replace("\\\n", " "), comments=True) for b in blocks]
    return [c[c.index("fit") :] for c in commands if launcher in c and "fit" in c]


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_the_multi_node_example_checkpoints_once_on_the_shared_folder(launcher, capsys):
    (args,) = [
        c
        for c in fit_commands((ROOT / "docs/scaling.md").read_text(), launcher)
        if "configs/kk_qwen2.5_3b.yaml" in c
    ]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    config = capsys.readouterr().out
    assert config.count("ModelCheckpoint") == 1 and "dirpath: /shared/runs/kk7b/ckpt" in config


def test_the_recorded_sweep_wall_times_are_those_of_its_done_files():
    walls = sorted(
        round(json.loads(f.read_text())["wall_s"])
        for f in (ROOT / "results/smollm2_addition/runs").glob("*/seed*/done.json")
    )
    text = " ".join((ROOT / "docs/real_model.md").read_text().split())
    claim = re.search(r"The ten runs of that sweep took (\d+) s to (\d+) s each", text)
    assert len(walls) == 10 and claim and (int(claim[1]), int(claim[2])) == (walls[0], walls[-1])
    assert f"eight of them {walls[0]} s to {walls[7]} s" in text and f"{walls[8]} s and {walls[9]} s" in text


def test_a_bad_weighting_says_what_is_wrong_first():
    """An optional class's own error, not jsonargparse's union report led by an unrelated NoneType line."""
    demo = str(ROOT / "configs" / "demo.yaml")
    args = ["--config", demo, "--model.weighting.init_args.lower=2", "--model.weighting.init_args.upper=1"]
    with pytest.raises(ValueError) as err:
        main(args, run=False)
    assert str(err.value) == (
        "model.weighting.init_args.lower (2.0) must not exceed model.weighting.init_args.upper (1.0)"
    )
