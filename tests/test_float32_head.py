"""``model.policy.float32_lm_head``: the LM head computed in float32 under bf16 weights or bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import arithmetic_args, run_cli

from trgrpo.fastpath.sampler import fast_generation_supported
from trgrpo.heads import Float32Head, use_float32_head
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer
from trgrpo.rollout import SamplingConfig
from trgrpo.rollout.engines import generate_rollout

SHAPE = TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PolicyConfig())


def _model(tokenizer, dtype="float32", fp32_head=False):
    return load_model(PolicyConfig(tiny=SHAPE, dtype=dtype, float32_lm_head=fp32_head), tokenizer)


def _ids(tokenizer):
    return tokenizer(["12+34=", "7+80="], return_tensors="pt", padding=True)


def _reference_logits(model, batch):
    """The head's formula by hand: the final hidden state and the head weight, both cast to float32."""
    out = model(**batch, output_hidden_states=True)
    return F.linear(out.hidden_states[-1].float(), model.get_output_embeddings().weight.float())


def test_bf16_weights_give_float32_logits_equal_to_the_float32_formula(tokenizer):
    plain, fp32 = _model(tokenizer, "bfloat16"), _model(tokenizer, "bfloat16", fp32_head=True)
    assert type(fp32.get_output_embeddings()) is Float32Head
    batch = _ids(tokenizer)
    with torch.no_grad():
        want = _reference_logits(fp32, batch)
        got = fp32(**batch).logits
        rounded = plain(**batch).logits
    assert got.dtype == torch.float32
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    # the plain bf16 head rounds every logit to 8 mantissa bits: its error is orders of magnitude larger
    assert (rounded.float() - want).abs().max() > 1e-3 * scale


def test_bf16_autocast_is_switched_off_inside_the_head(tokenizer):
    plain, fp32 = _model(tokenizer), _model(tokenizer, fp32_head=True)
    batch = _ids(tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, rounded = fp32(**batch).logits, plain(**batch).logits
        hidden = fp32(**batch, output_hidden_states=True).hidden_states[-1]
    want = F.linear(hidden.float(), fp32.get_output_embeddings().weight)
    assert rounded.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_gradient_reaches_the_bf16_weight_as_the_formula_gives_it(tokenizer):
    model = _model(tokenizer, "bfloat16", fp32_head=True)
    head = model.get_output_embeddings()
    x = torch.randn(5, SHAPE.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(5, head.weight.shape[0])
    (head(x) * g).sum().backward()
    assert head.weight.grad.dtype == torch.bfloat16
    want_w = g.T @ x.detach().float()  # d/dW of sum(g * x W^T)
    want_x = g @ head.weight.detach().float()
    assert torch.allclose(head.weight.grad.float(), want_w, rtol=2e-2, atol=2e-2 * want_w.abs().max())
    assert torch.allclose(x.grad.float(), want_x, rtol=2e-2, atol=2e-2 * want_x.abs().max())


def test_parameters_names_and_tying_are_unchanged(tokenizer):
    plain, fp32 = _model(tokenizer), _model(tokenizer, fp32_head=True)
    assert list(plain.state_dict()) == list(fp32.state_dict())
    assert fp32.get_output_embeddings().weight is fp32.get_input_embeddings().weight
    for a, b in zip(plain.state_dict().values(), fp32.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("greedy", [True, False])
def test_the_fast_sampler_keeps_working_and_matches_generate(tokenizer, greedy):
    model = _model(tokenizer, fp32_head=True)
    assert fast_generation_supported(model)
    out = {}
    for engine in ("hf", "fast"):
        torch.manual_seed(3)
        cfg = SamplingConfig(group_size=3, max_new_tokens=8, engine=engine)
        out[engine] = generate_rollout(model, tokenizer, ["12+34=", "7+80="], cfg, greedy=greedy)
    assert torch.equal(out["hf"].input_ids, out["fast"].input_ids)


def test_the_fast_sampler_decodes_bf16_weights_through_the_float32_head(tokenizer):
    model = _model(tokenizer, "bfloat16", fp32_head=True)
    assert fast_generation_supported(model)
    torch.manual_seed(0)
    cfg = SamplingConfig(group_size=2, max_new_tokens=6, engine="fast")
    rollout = generate_rollout(model, tokenizer, ["12+34="], cfg, greedy=False)
    assert rollout.input_ids.shape[0] == 2 and rollout.completion_mask.sum() > 0


def test_a_head_that_is_not_a_plain_linear_is_refused_naming_the_key():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 8)

    class Model(torch.nn.Module):
        def get_output_embeddings(self):
            return Wrapped()

    with pytest.raises(ValueError, match=r"model\.policy\.float32_lm_head.*Wrapped"):
        use_float32_head(Model())


def test_the_option_trains_through_the_cli(tmp_path):
    cli = run_cli(
        tmp_path,
        *arithmetic_args(),
        "--model.policy.float32_lm_head=true",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
    )
    head = cli.model.policy_model.get_output_embeddings()
    assert type(head) is Float32Head
    assert cli.trainer.global_step == 2


def test_the_fast_sampler_keeps_the_head_in_float32_under_autocast(tokenizer, monkeypatch):
    import trgrpo.fastpath.sampler as sampler

    seen = []
    real = sampler.add_adapters

    def spy(logits, h, adapters):
        seen.append(logits.dtype)
        return real(logits, h, adapters)

    monkeypatch.setattr(sampler, "add_adapters", spy)
    for fp32_head, want in ((True, torch.float32), (False, torch.bfloat16)):
        seen.clear()
        model = _model(tokenizer, fp32_head=fp32_head)
        cfg = SamplingConfig(group_size=2, max_new_tokens=4, engine="fast", ignore_eos=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            generate_rollout(model, tokenizer, ["12+34="], cfg, greedy=False)
        assert seen and set(seen) == {want}
