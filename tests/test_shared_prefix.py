"""Scoring with each distinct prompt run once (``trgrpo.fastpath.shared_prefix``) equals the plain forward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import trgrpo.fastpath.shared_prefix as sp
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer
from trgrpo.rollout import SamplingConfig
from trgrpo.rollout.engines import generate_rollout


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PolicyConfig())


def _models(tokenizer):
    qwen = load_model(
        PolicyConfig(
            tiny=TinyModelConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            )
        ),
        tokenizer,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return {"qwen2": qwen, "llama_gqa": llama}


def _logp_and_grads(fn, model, ids, attn, p, mask):
    model.zero_grad()
    logits = fn(model, ids, attn, p)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).squeeze(-1)  # [B, T]
    (logp * mask).sum().backward()
    return logp.detach() * mask, {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.parametrize("name", ["qwen2", "llama_gqa"])
def test_shared_prompt_forward_matches_the_plain_forward(tokenizer, name):
    model = _models(tokenizer)[name]
    torch.manual_seed(0)
    prompts = ["12+34=", "7+5=", "The sum of 99 and 1 is "]
    r = generate_rollout(model, tokenizer, prompts, SamplingConfig(group_size=4, max_new_tokens=10))
    idx = torch.tensor(
        [0, 1, 2, 3, 5, 6, 9, 11]
    )  # whole and partial groups, as zero-advantage skipping leaves
    ids, attn, mask = r.input_ids[idx], r.attention_mask[idx], r.completion_mask[idx]
    calls = []
    real = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    model.forward = counting
    shared, shared_grads = _logp_and_grads(sp.completion_logits, model, ids, attn, r.prompt_len, mask)
    assert calls[0][0] == 3  # one prompt pass per distinct prompt
    full, full_grads = _logp_and_grads(sp.full_completion_logits, model, ids, attn, r.prompt_len, mask)
    # float32 through attention of different shapes (cached prompt vs whole sequence): log-probs of 0..-5
    # differ by an ulp or two, so relative tolerance (exact zeros where the mask is 0)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    for n in full_grads:
        # a gradient entry is a sum whose terms partly cancel: its rounding error scales with the tensor's
        # largest entry (up to ~8 here; measured ~5e-7 of it), not with the entry itself
        scale = full_grads[n].abs().max().item()
        torch.testing.assert_close(shared_grads[n], full_grads[n], rtol=1e-5, atol=1e-5 * scale, msg=n)


def test_falls_back_to_the_plain_forward(tokenizer, monkeypatch):
    model = _models(tokenizer)["qwen2"]
    r = generate_rollout(model, tokenizer, ["1+1=", "2+2="], SamplingConfig(group_size=2, max_new_tokens=4))
    used = []
    monkeypatch.setattr(sp, "full_completion_logits", lambda *a: used.append(True) or torch.zeros(1))
    sp.completion_logits(model, r.input_ids[[0, 2]], r.attention_mask[[0, 2]], r.prompt_len)  # no repeats
    assert used == [True]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp.completion_logits(model, r.input_ids, r.attention_mask, r.prompt_len)  # no cache under checkpointing
    assert used == [True, True]
