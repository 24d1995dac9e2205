"""DeepSpeed ZeRO on two CPU processes through the real CLI: LoRA, export, resume; and the engine's settings.

Two processes launched by Lightning itself (``--trainer.devices=2``) on DeepSpeed's CPU accelerator
(``trgrpo.strategies.CPUDeepSpeedStrategy``), with the helpers of ``test_multiprocess.py`` (hard timeout,
process-group kill, fixed sampled completions, the outputs a real run writes):

- ZeRO-3 with LoRA against one plain LoRA process on the same global batch: every step's loss, grad norm,
  KL and reward, the end-of-fit export (gathered module by module, no checkpoint written for it) and the
  export of the sharded checkpoint on the CPU, which must hold the same values.
- The same run resumed from its step-1 sharded checkpoint equals the uninterrupted run: step 1's metrics
  and the exported weights.
- Under bf16 the engine accumulates and reduces gradients in float32 (the start-up check refuses an engine
  that does not), and a DeepSpeed too old to know ``managed_gradient_accumulation`` is refused by name.

    python -m pytest -q tests/test_multiprocess_zero.py      (about 2 minutes on a quiet 2-core machine)
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import run_cli, train_rows
from test_multiprocess import (
    COMPARED,
    ROOT,
    assert_outputs,
    launch,
    logged,
    outputs,
)

from trgrpo.config import OptimConfig

LORA = [
    "--model.policy.lora.r=4",
    "--model.policy.lora.alpha=8",
    "--model.policy.lora.target_modules=all-linear",
]
KEYS = ("train/loss", "train/grad_norm", "train/kl", "train/reward", "train/completion_length")


class EngineDtypes(L.Callback):
    """Writes ``rank<N>.json`` under ``folder``: the dtypes DeepSpeed's engine trains, accumulates and
    reduces gradients in, as the built engine and its ZeRO optimiser report them."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        engine = trainer.strategy.deepspeed_engine
        model_dtype, accum_dtype = engine.get_data_types()
        facts = {
            "model": str(model_dtype),
            "accumulate": str(accum_dtype),
            "optimizer_accumulate": str(engine.optimizer.gradient_accumulation_dtype),
            "reduce": str(engine.communication_data_type),
        }
        path = Path(self.folder) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts))


def zero_args(run: Path, pretrained: Path, stage: int) -> list[str]:
    """A 2-process ZeRO run of ``COMPARED`` (2 prompts per process) with every output a real run writes."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "strategy" / f"deepspeed_zero{stage}.yaml"),
        *COMPARED,
        *logged(run),
        f"--model.policy.name_or_path={pretrained}",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy.class_path=trgrpo.strategies.CPUDeepSpeedStrategy",
    ]


def keep_every_checkpoint(args: list[str]) -> list[str]:
    """``outputs``' checkpoint callback keeping every step's checkpoint (the resume starts from step 1)."""
    return [a.replace("save_top_k=0", "save_top_k=-1") for a in args]


def load_export(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ----------------------------------------------------------------------- ZeRO-3 + LoRA on 2 CPU processes


@pytest.fixture(scope="module")
def plain_lora(tmp_path_factory, pretrained):
    """One process without DeepSpeed, LoRA, 4 prompts a step: (log folder, merged final weights)."""
    run = tmp_path_factory.mktemp("plain-lora")
    cli = run_cli(run, *COMPARED, *LORA, f"--model.policy.name_or_path={pretrained}", "--data.batch_size=4")
    merged = cli.model.policy_model.merge_and_unload()
    return run, {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def zero3_lora(tmp_path_factory, pretrained):
    """2 ZeRO-3 processes with LoRA, 2 RL steps, a sharded checkpoint every step, merged export at the end."""
    pytest.importorskip("deepspeed")  # an optional dependency (pip install trgrpo[deepspeed])
    run = tmp_path_factory.mktemp("zero3-lora")
    args = [
        *zero_args(run, pretrained, 3),
        *LORA,
        *keep_every_checkpoint(outputs(run)),
        "--trainer.callbacks.merge_lora=true",
    ]
    return run, args, launch(args, run)


@pytest.mark.slow
def test_zero3_lora_on_two_processes_matches_one_plain_process(zero3_lora, plain_lora):
    run, _, out = zero3_lora
    assert_outputs(run, out)
    plain, weights = plain_lora
    expected, got = train_rows(plain), train_rows(run)
    assert sorted(got) == sorted(expected) == [0, 1]
    for step in expected:
        for key in KEYS:  # float32 summed in other orders (processes, micro-batches): measured below 1e-6
            assert got[step][key] == pytest.approx(expected[step][key], rel=2e-5, abs=1e-7), (step, key)
    assert expected[1]["train/kl"] > 0 and expected[0]["train/grad_norm"] > 0
    exported = load_export(run / "hf")
    assert set(exported) <= set(weights) and len(exported) >= len(weights) - 1  # lm_head: tied, maybe dropped
    for k, v in exported.items():  # AdamW amplifies float noise on near-zero gradients: ~0.1% of a step
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-4, msg=k)


@pytest.mark.slow
def test_the_sharded_checkpoint_exports_on_the_cpu_to_the_end_of_fit_weights(zero3_lora, tmp_path):
    from trgrpo.export import export_checkpoint

    run, _, _ = zero3_lora
    last = run / "ckpt" / "last.ckpt"
    assert last.is_dir()  # a folder of shards, one per process
    again = export_checkpoint(last, tmp_path / "from-shards", merge_lora=True)
    for k, v in load_export(again).items():  # float32 master weights = the gathered float32 weights: exact
        torch.testing.assert_close(v, load_export(run / "hf")[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_a_two_process_zero3_run_resumed_from_its_sharded_checkpoint_equals_the_uninterrupted_run(
    zero3_lora, tmp_path
):
    run, args, _ = zero3_lora
    (step1,) = (run / "ckpt").glob("*step=1.ckpt")
    assert step1.is_dir()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    again = [a.replace(str(run), str(resumed)) for a in args]
    launch([*again, f"--ckpt_path={step1}"], resumed)
    expected, got = train_rows(run), train_rows(resumed)
    assert sorted(got) == [1]  # only the step after the checkpoint ran
    for key in KEYS:  # the same processes, reduction orders and restored float32 state
        assert got[1][key] == pytest.approx(expected[1][key], rel=1e-6, abs=1e-9), key
    first = load_export(run / "hf")
    for k, v in load_export(resumed / "hf").items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=1e-7, msg=k)


# ------------------------------------------------------------------ float32 gradients under bf16, versions


@pytest.mark.slow
def test_under_bf16_zero2_accumulates_and_reduces_gradients_in_float32(tmp_path, pretrained):
    """One bf16 RL step of 2 ZeRO-2 processes (2 micro-batches each): the engine the run built trains in
    bf16 and keeps its gradients, summed over micro-batches and processes, in float32."""
    pytest.importorskip("deepspeed")
    args = [
        *zero_args(tmp_path, pretrained, 2),
        "--trainer.precision=bf16-mixed",
        "--trainer.max_steps=1",
        "--trainer.callbacks+=test_multiprocess_zero.EngineDtypes",
        f"--trainer.callbacks.folder={tmp_path / 'facts'}",
    ]
    launch(args, tmp_path)
    for rank in (0, 1):
        facts = json.loads((tmp_path / "facts" / f"rank{rank}.json").read_text())
        assert facts == {
            "model": "torch.bfloat16",
            "accumulate": "torch.float32",
            "optimizer_accumulate": "torch.float32",
            "reduce": "torch.float32",
        }
    assert train_rows(tmp_path)[0]["train/grad_norm"] > 0


def _zero_backend(**config):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from trgrpo.backend import DeepSpeedBackend

    strategy = DeepSpeedStrategy(stage=2, config={"zero_optimization": {"stage": 2}, **config})
    return DeepSpeedBackend(strategy, OptimConfig(grad_clip=1.0), lambda loss: None, 0)


def test_the_zero_config_asks_for_float32_accumulation_and_reduction_and_keeps_an_explicit_choice():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _zero_backend().strategy.config
    parsed = DeepSpeedConfig({**cfg, "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}})
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
    assert parsed.managed_gradient_accumulation is False  # known to this DeepSpeed, not silently ignored
    chosen = _zero_backend(data_types={"grad_accum_dtype": "bf16"}, communication_data_type="bf16")
    assert chosen.strategy.config["data_types"] == {"grad_accum_dtype": "bf16"}
    assert chosen.strategy.config["communication_data_type"] == "bf16"


def test_a_deepspeed_without_unmanaged_accumulation_is_refused_naming_the_version(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    monkeypatch.setattr(deepspeed, "__version__", "0.19.3")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.19\.3 is installed, .* >= 0\.19\.4"):
        _zero_backend()


def test_the_start_up_check_refuses_an_engine_that_ignored_the_settings():
    from trgrpo.backend import check_engine

    def engine(managed: bool | None, accum: torch.dtype):
        e = SimpleNamespace(get_data_types=lambda: (torch.bfloat16, accum))
        if managed is not None:
            e.managed_gradient_accumulation = lambda: managed
        return e

    check_engine(engine(False, torch.float32))
    for managed in (True, None):  # None: a DeepSpeed that has no such setting at all
        with pytest.raises(RuntimeError, match="managed_gradient_accumulation is not false"):
            check_engine(engine(managed, torch.float32))
    with pytest.raises(RuntimeError, match=r"torch\.bfloat16, not float32 \(data_types\.grad_accum_dtype"):
        check_engine(engine(False, torch.bfloat16))
