"""LoRA (peft) set in YAML: only adapters train, the reference is the adapter-free base, exports work."""

from __future__ import annotations

import pytest
import torch
from helpers import arithmetic_args, run_cli
from transformers import AutoModelForCausalLM

from trgrpo.policy import LoraConfig, PolicyConfig, TinyModelConfig, load_model, load_tokenizer

TINY = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
LORA_YAML = """model:
  policy:
    lora:
      r: 4
      alpha: 8
      dropout: 0.0
      target_modules: [q_proj, v_proj, up_proj]
  loss: {beta: 0.1}
  optim: {lr: 0.01}
  rewards:
    - fn: trgrpo.rewards.regex_format
      kwargs: {pattern: ".*[0-9].*"}
"""


def test_lora_wraps_the_named_modules_and_freezes_the_base():
    cfg = PolicyConfig(tiny=TINY, lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model = load_model(cfg, load_tokenizer(cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q_proj", "v_proj"}
    # rank 4 on a 32-wide layer: A is 4 x 32, B is (out) x 4
    a = next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n)
    assert tuple(a.shape) == (4, 32)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(r=0), "lora.r must be >= 1"),
        (dict(dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
        (dict(target_modules=[]), "must name at least one module"),
    ],
)
def test_bad_lora_settings_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**bad)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    (tmp / "lora.yaml").write_text(LORA_YAML)
    base = {
        k: v.clone()
        for k, v in load_model(PolicyConfig(tiny=TINY), load_tokenizer(PolicyConfig())).state_dict().items()
    }
    cli = run_cli(
        tmp,
        *arithmetic_args(),
        "--trainer.max_steps=3",
        "--config",
        str(tmp / "lora.yaml"),
        "--trainer.callbacks+=trgrpo.callbacks.HFExport",
        f"--trainer.callbacks.dirpath={tmp / 'adapter'}",
        "--trainer.callbacks+=trgrpo.callbacks.HFExport",
        f"--trainer.callbacks.dirpath={tmp / 'merged'}",
        "--trainer.callbacks.merge_lora=true",
    )
    return tmp, cli, base


def _metric_rows(tmp):
    import csv

    (path,) = tmp.glob("**/metrics.csv")
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("train/kl")]


def test_lora_run_trains_only_adapters_and_uses_the_base_as_reference(lora_run):
    tmp, cli, base = lora_run
    module = cli.model
    assert module.ref_model is None  # no second copy of the model
    model = module.policy_model
    base_now = model.get_base_model().state_dict()
    # the frozen base is the initial model (LoRA layers hold it as base_layer): never updated, so it is
    # compared exactly
    for k, v in base.items():
        key = (
            k
            if k in base_now
            else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        torch.testing.assert_close(base_now[key], v, rtol=0, atol=0, msg=k)
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved
    kls = [float(r["train/kl"]) for r in _metric_rows(tmp)]
    # KL against the adapter-free base grows once the adapters move; at the first step lora_B is still 0, so
    # the policy's log-probs are the base's bit for bit and the KL exactly 0
    assert kls[0] == 0 and kls[-1] > 0

    # the reference log-probs are exactly those of the base model
    fresh = load_model(PolicyConfig(tiny=TINY), module.tokenizer).eval()
    ids = module.tokenizer(["3+4=12", "5+5=10"], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad(), model.disable_adapter():
        via_adapter_off = model(input_ids=ids).logits
    torch.testing.assert_close(via_adapter_off, fresh(input_ids=ids).logits, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, via_adapter_off)


def test_lora_exports_the_adapter_and_on_request_the_merged_model(lora_run):
    tmp, cli, _ = lora_run
    adapter = tmp / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert "model.safetensors" not in {p.name for p in adapter.iterdir()}
    assert "LoRA adapter weights only" in (adapter / "README.md").read_text()

    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged")  # plain transformers, no peft needed
    assert (tmp / "merged" / "adapter" / "adapter_config.json").exists()
    ids = cli.model.tokenizer(["3+4=12"], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits,
            cli.model.policy_model.eval()(input_ids=ids).logits,
            rtol=0,
            atol=1e-5,
        )

    from peft import PeftModel

    base = load_model(PolicyConfig(tiny=TINY), cli.model.tokenizer)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5
        )
