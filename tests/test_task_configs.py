"""The task configs: published values, and one smoke step of each through the real CLI on the tiny model.

The GPU configs keep ``Qwen/Qwen2.5-3B-Instruct`` in the file; the smoke runs swap it for the embedded
tiny model (``--model.policy.name_or_path=null``) and the embedded character tokenizer, on CPU.  The K&K
variants are the base recipe composed with a weighting fragment (tests/test_weighting_configs.py checks every
base with every fragment).  The recipes stand alone (each runs with one ``--config``, fragments compose after
it), so the settings they share are written in each; the tests here read the shared values from the files
(the K&K recipe, the TR-GRPO fragment) rather than copying them.

    python -m pytest tests/test_task_configs.py -q
"""

from __future__ import annotations

import csv
import functools
import json
import operator
from pathlib import Path

import pytest
import yaml

from trgrpo.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KK_3B = CONFIGS / "kk_qwen2.5_3b.yaml"
MATH_3B = CONFIGS / "math_gsm8k_qwen2.5_3b.yaml"
TR_GRPO = CONFIGS / "weighting" / "tr_grpo.yaml"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1"]  # parsing builds the Trainer: not on a GPU here
# the published K&K comparison: weighting fragment -> updates per RL step (Lopti trains in two passes)
KK_VARIANTS = {
    "tr_grpo": 1,
    "grpo": 1,
    "ar": 1,
    "lopti": 2,
    "ar_lopti": 2,
    "tr_grpo_ratio": 1,
    "high_entropy": 1,
}

TINY = [
    "--model.policy.name_or_path=null",
    "--model.policy.tokenizer=null",
    "--model.policy.dtype=float32",
    "--model.policy.gradient_checkpointing=false",
    "--model.policy.tiny.hidden_size=32",
    "--model.policy.tiny.num_hidden_layers=1",
    "--model.policy.tiny.num_attention_heads=2",
    "--model.policy.tiny.intermediate_size=64",
    "--model.policy.tiny.max_position_embeddings=4096",  # character tokens: a 7-person puzzle is ~1,700
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.max_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=2",
    "--data.val_batch_size=8",
    "--data.max_prompt_tokens=4096",
    "--model.sampling.group_size=2",
    "--model.sampling.max_new_tokens=4",
    "--model.optim.micro_batch_size=2",
]


def _logged(tmp_path: Path) -> list[dict]:
    files = sorted(tmp_path.rglob("metrics.csv"))
    assert files, "no metrics.csv written"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def _columns(rows: list[dict]) -> set[str]:
    return {k for r in rows for k, v in r.items() if v not in ("", None)}


def test_kk_3b_config_mirrors_the_published_setup():
    cfg = yaml.safe_load(KK_3B.read_text())
    model, data = cfg["model"], cfg["data"]
    assert model["policy"]["name_or_path"] == "Qwen/Qwen2.5-3B-Instruct"
    assert (data["batch_size"], model["sampling"]["group_size"], model["sampling"]["temperature"]) == (
        64,
        8,
        0.7,
    )
    assert model["optim"]["lr"] == 1e-6
    loss = model["loss"]
    assert (loss["clip_low"], loss["clip_high"], loss["dual_clip"], loss["beta"], loss["kl_estimator"]) == (
        0.2,
        0.24,
        10.0,
        0.001,
        "k3",
    )
    task = data["task"]
    assert task["class_path"] == "trgrpo.tasks.KnightsKnavesTask"
    assert task["init_args"]["n_people"] == [3, 4, 5, 6, 7] and task["init_args"]["train_size"] * 5 == 4500
    assert [r["fn"] for r in model["rewards"]] == [
        "trgrpo.rewards.think_answer_format",
        "trgrpo.tasks.knights_knaves.kk_answer_reward",
    ]
    # alone, the base runs TR-GRPO; the variants are fragments composed after it, so they differ from it in
    # the weighting only (tests/test_weighting_configs.py) and log to the base's folder unless renamed
    assert _weighting(KK_3B) == _weighting(KK_3B, TR_GRPO)
    assert cfg["trainer"]["logger"]["init_args"] == {"save_dir": "logs", "name": KK_3B.stem}


def _weighting(*configs: Path) -> dict:
    """``model.weighting`` as the CLI parses it (every argument, defaults included) from these configs."""
    cli = main([a for c in configs for a in ("--config", str(c))] + CPU, run=False)
    return cli.config.model.weighting.as_dict()


def test_math_config_shares_the_kk_optimisation_settings():
    kk, math = yaml.safe_load(KK_3B.read_text()), yaml.safe_load(MATH_3B.read_text())
    for key in ("policy", "optim"):
        assert math["model"][key] == kk["model"][key]
    assert {k: v for k, v in math["model"]["loss"].items() if k != "aggregation"} == {
        k: v for k, v in kk["model"]["loss"].items() if k != "aggregation"
    }
    assert math["model"]["weighting"] == kk["model"]["weighting"]
    # what its header says it takes from K&K besides: 64 prompts x 8 rollouts at temperature 0.7, in bf16
    for keys in (
        ("model", "sampling", "group_size"),
        ("model", "sampling", "temperature"),
        ("data", "batch_size"),
        ("trainer", "precision"),
    ):
        assert functools.reduce(operator.getitem, keys, math) == functools.reduce(operator.getitem, keys, kk)
    assert math["trainer"]["logger"]["init_args"] == {"save_dir": "logs", "name": MATH_3B.stem}


def _run(args: list[str], tmp_path: Path):
    logs = [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    return main(args + logs)


# The GPU recipes sample with vLLM, whose CPU attention has no kernel for the tiny model's head size (16):
# their smoke steps sample with the fast engine (the vllm engine's own tests: tests/test_vllm_engine.py)
CPU_ENGINE = ["--model.sampling.engine=fast"]


def test_the_gpu_recipes_sample_with_vllm():
    for recipe in (KK_3B, MATH_3B, CONFIGS / "search_r1_qwen2.5_3b.yaml"):
        assert yaml.safe_load(recipe.read_text())["model"]["sampling"]["engine"] == "vllm", recipe.name


@pytest.mark.parametrize("variant", list(KK_VARIANTS))
def test_kk_3b_config_smoke_step(variant, tmp_path):
    cli = _run(
        [
            "fit",
            "--config",
            str(KK_3B),
            "--config",
            str(CONFIGS / "weighting" / f"{variant}.yaml"),
            *TINY,
            *CPU_ENGINE,
            "--data.task.init_args.train_size=1",
            "--data.task.init_args.val_size=1",
        ],
        tmp_path,
    )
    assert cli.trainer.global_step == KK_VARIANTS[variant]
    assert cli.model.policy_cfg.name_or_path is None
    rows = _logged(tmp_path)
    assert {"train/rewards/format", "train/rewards/answer", "train/reward", "val/accuracy"} <= _columns(rows)


def test_math_config_smoke_step(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i}+{i}\n#### {2 * i}"})
            for i in range(6)
        )
    )
    cli = _run(
        [
            "fit",
            "--config",
            str(MATH_3B),
            *TINY,
            *CPU_ENGINE,
            f"--data.task.init_args.path={data}",
            "--data.task.init_args.name=null",
            "--data.task.init_args.val_split=null",
            "--data.task.init_args.val_size=2",
            f"--data.task.init_args.cache_dir={tmp_path / 'hf'}",
        ],
        tmp_path,
    )
    assert cli.trainer.global_step == 1
    assert len(cli.datamodule.splits["train"]) == 4 and len(cli.datamodule.splits["val"]) == 2
    assert "train/rewards/correct" in _columns(_logged(tmp_path))


def test_kk_cpu_config_fit_validate_per_level(tmp_path, monkeypatch):
    """The CPU config end to end: fit with periodic validation, then ``validate --ckpt_path``."""
    monkeypatch.chdir(tmp_path)  # the warm-start cache and logs stay in tmp_path
    cfg = yaml.safe_load((CONFIGS / "kk_tiny_cpu.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["steps"] = 2
    cfg["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
        }
    )
    config = tmp_path / "kk_tiny_cpu.yaml"
    config.write_text(yaml.safe_dump(cfg))
    small = [
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
        "--trainer.enable_checkpointing=true",
        "--trainer.enable_progress_bar=false",
        "--data.task.init_args.train_size=4",
        "--data.task.init_args.val_size=2",
        "--model.sampling.max_new_tokens=6",
    ]
    _run(["fit", "--config", str(config), *small], tmp_path / "fit")
    fit_rows = _logged(tmp_path / "fit")
    expected = {
        "val/accuracy",
        "val/accuracy/level_2",
        "val/accuracy/level_3",
        "val/mean@4",
        "val/pass@4",
        "val/mean@4/level_3",
        "val/pass@4/level_2",
    }
    assert expected <= _columns(fit_rows)
    tables = sorted((tmp_path / "fit").rglob("val_samples/step_*.md"))
    assert (
        tables
        and "| level | prompt | answer | completion | correct | format | answer | total |"
        in tables[0].read_text()
    )
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.exists()
    cli = _run(["validate", "--config", str(config), *small, "--ckpt_path", str(ckpt)], tmp_path / "validate")
    assert expected <= set(cli.trainer.logged_metrics)
    assert 0.0 <= float(cli.trainer.logged_metrics["val/pass@4"]) <= 1.0
    assert sorted((tmp_path / "validate").rglob("val_samples/step_*.jsonl"))
