"""The fast sampler and the shared-prompt scorer on peft LoRA models: ``model.generate``'s tokens and the
plain forward's log-probs and gradients, with the adapters and the base left bit for bit as they were."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import DENSE_REWARD, arithmetic_args, hf_and_fast_rollouts, run_cli, train_rows

import trgrpo.fastpath.shared_prefix as sp
import trgrpo.rollout.engines as engines
from trgrpo.fastpath.sampler import fast_generation_refusal, fast_generation_supported
from trgrpo.policy import LoraConfig, PolicyConfig, TinyModelConfig, add_lora, load_model, load_tokenizer
from trgrpo.rollout import SamplingConfig
from trgrpo.rollout.engines import FastEngine, generate_rollout

PROMPTS = ["12+34=", "7+5=", "The sum of 99 and 1 is ", "3+3="]  # different lengths: left padding
TINY = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PolicyConfig())


def _lora_model(tokenizer, targets="all-linear", kv_heads=None, dropout=0.1, **peft_extra):
    """The tiny Qwen2 with LoRA adapters whose B matrices are random, so the adapters change the output."""
    base = load_model(PolicyConfig(tiny=TINY), tokenizer)
    if kv_heads is not None:  # grouped-query attention: k and v narrower than q in the fused projection
        base.config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        base = type(base)(base.config)
    if peft_extra:
        import peft

        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **peft_extra)
        return peft.get_peft_model(base, lora)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rollouts(model, tokenizer, greedy, seed=1, **sampling):
    return hf_and_fast_rollouts(model, tokenizer, PROMPTS, greedy, seed, **sampling)


def _assert_same(a, b):
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert a.completions == b.completions


def _count_fast_calls(monkeypatch) -> list[int]:
    calls = []
    real = engines.sample_completions

    def spy(model, prompt_ids, *args, **kwargs):
        calls.append(prompt_ids.shape[0])
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(engines, "sample_completions", spy)
    return calls


CASES = {
    "all_linear": dict(targets="all-linear"),
    "all_linear_gqa": dict(targets="all-linear", kv_heads=2),
    "q_v_down_head_embed": dict(targets=["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_engine_decodes_lora_models_with_generates_tokens(tokenizer, case, monkeypatch):
    model = _lora_model(tokenizer, **CASES[case])
    assert fast_generation_supported(model), fast_generation_refusal(model)
    before = _snapshot(model)
    calls = _count_fast_calls(monkeypatch)
    hf, fast = _rollouts(model, tokenizer, greedy=True)
    assert calls == [len(PROMPTS)]  # the fast sampler ran (no fallback to generate)
    _assert_same(hf, fast)
    with model.disable_adapter():  # the adapters matter: without them the greedy tokens differ
        off_hf, off_fast = _rollouts(model, tokenizer, greedy=True)
    _assert_same(off_hf, off_fast)
    assert off_fast.completions != fast.completions
    for seed, sampling in ((1, {}), (2, {"temperature": 0.7, "top_k": 20, "top_p": 0.9})):
        _assert_same(*_rollouts(model, tokenizer, greedy=False, seed=seed, **sampling))
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)  # adapters and base, bit for bit


def test_dropout_is_off_in_generation_and_the_gradients_are_unaffected(tokenizer):
    model = _lora_model(tokenizer, dropout=0.5).train()
    ids = tokenizer(PROMPTS, padding=True, return_tensors="pt")

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = grads()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    hf, fast = _rollouts(model, tokenizer, greedy=False, seed=3)  # eval mode: generate has no dropout either
    _assert_same(hf, fast)
    assert model.training
    assert all(p.grad is None for p in model.parameters())  # the rollout left no gradient behind
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    second = grads()
    assert first.keys() == second.keys() and set(first) == trainable
    assert all(torch.equal(first[n], second[n]) for n in first)


@pytest.mark.parametrize(
    "extra, reason",
    [(dict(use_dora=True), "LoRA variant"), (dict(modules_to_save=["lm_head"]), "lm_head is")],
    ids=["dora", "modules_to_save_head"],
)
def test_layers_the_loop_cannot_compute_fall_back_to_generate_with_the_reason(
    tokenizer, extra, reason, caplog
):
    model = _lora_model(tokenizer, targets=SEVEN, **extra)
    assert not fast_generation_supported(model)
    assert reason in fast_generation_refusal(model)
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        _assert_same(*_rollouts(model, tokenizer, greedy=False))
    assert any(reason in r.getMessage() and "model.generate" in r.getMessage() for r in caplog.records)


def test_the_fast_engine_is_chosen_for_a_lora_model(tokenizer, monkeypatch):
    model = _lora_model(tokenizer)
    engine = FastEngine()
    assert engine.supports(model) and engine.refused is None
    calls = _count_fast_calls(monkeypatch)
    cfg = SamplingConfig(group_size=2, max_new_tokens=4, engine="fast")
    generate_rollout(model, tokenizer, PROMPTS[:2], cfg, engine=engine)
    assert calls == [2]


def test_multi_turn_continuations_of_a_lora_model_equal_generates(tokenizer, monkeypatch):
    model = _lora_model(tokenizer).eval()
    calls = _count_fast_calls(monkeypatch)
    ctx = [tokenizer("12+34=", add_special_tokens=False).input_ids] * 2 + [
        tokenizer("7+", add_special_tokens=False).input_ids
    ]
    sampling = SamplingConfig(group_size=2, max_new_tokens=12)
    free = FastEngine().continue_contexts(model, tokenizer, ctx, sampling, [12, 12, 5], [], True)
    stop = tokenizer.decode(free[0].ids[3:5])  # a string the greedy model produces: a stop mid-way
    for stops in ([], [stop]):
        fast = FastEngine().continue_contexts(model, tokenizer, ctx, sampling, [12, 12, 5], stops, True)
        hf = engines.HFEngine().continue_contexts(model, tokenizer, ctx, sampling, [12, 12, 5], stops, True)
        assert fast == hf
    assert fast[0].finish == "stop" and len(calls) == 3


def _logp_and_grads(fn, model, ids, attn, p, mask):
    model.zero_grad(set_to_none=True)
    logits = fn(model, ids, attn, p)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)  # [B, T]
    (logp * mask).sum().backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    return logp.detach() * mask, grads


def test_shared_prompt_scoring_of_a_lora_model_matches_the_plain_forward(tokenizer, monkeypatch):
    model = _lora_model(tokenizer, dropout=0.0)
    torch.manual_seed(0)
    r = generate_rollout(model, tokenizer, PROMPTS[:3], SamplingConfig(group_size=4, max_new_tokens=10))
    idx = torch.tensor([0, 1, 2, 3, 5, 6, 9, 11])  # whole and partial groups
    ids, attn, mask = r.input_ids[idx], r.attention_mask[idx], r.completion_mask[idx]
    calls = []
    real = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    shared, shared_grads = _logp_and_grads(sp.completion_logits, model, ids, attn, r.prompt_len, mask)
    assert calls == [3, 8]  # one prompt pass per distinct prompt, then the completions on its cache
    full, full_grads = _logp_and_grads(sp.full_completion_logits, model, ids, attn, r.prompt_len, mask)
    # float32 attention of different shapes: log-probs of 0..-6 differ by an ulp or two
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(full_grads) == set(shared_grads) == adapters  # the frozen base gets none
    for n in full_grads:  # entries are sums that partly cancel: their error scales with the largest one
        scale = full_grads[n].abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(shared_grads[n], full_grads[n], rtol=1e-5, atol=1e-5 * scale, msg=n)
    # a checkpointed base under the peft wrapper returns no cache: the plain forward at once
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls.clear()
    sp.completion_logits(model, ids, attn, r.prompt_len)
    assert calls == [8]


def test_lora_rl_steps_through_the_cli_run_on_the_fast_engine(tmp_path, monkeypatch):
    calls = _count_fast_calls(monkeypatch)
    generated = []
    real_generate = engines.HFEngine.generate

    def hf_spy(self, *args, **kwargs):
        generated.append(1)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(engines.HFEngine, "generate", hf_spy)
    cli = run_cli(
        tmp_path,
        *arithmetic_args(),
        "--trainer.max_steps=3",
        "--model.policy.lora.r=4",
        "--model.optim.lr=0.01",
        "--model.sampling.engine=fast",
        DENSE_REWARD,  # rewards that differ within a group, so the adapters get a gradient
    )
    model = cli.model.policy_model
    assert hasattr(model, "get_base_model") and fast_generation_supported(model)
    assert len(calls) >= 3 and not generated  # every rollout on the fast sampler, none on generate
    assert cli.trainer.global_step == 3 and len(train_rows(tmp_path)) >= 1
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters trained
