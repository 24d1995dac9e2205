"""The LM head a chunk of rows at a time (``model.optim.max_logits_mib``): the same log-probs, entropies and
gradients as whole logits, no logits tensor beyond one chunk in forward or backward, and the model is left
as it was."""

from __future__ import annotations

import copy

import pytest
import torch

import trgrpo.logprobs as logprobs
from trgrpo.config import OptimConfig
from trgrpo.heads import hidden_states_out
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer
from trgrpo.rollout import SamplingConfig
from trgrpo.rollout.engines import generate_rollout
from trgrpo.scoring import TokenScorer


def naive(logits, ids, temperature):
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    sq = logp_all.exp().square().sum(-1)
    return logp, ent, sq


def test_chunked_head_equals_whole_logits_with_gradients(monkeypatch):
    torch.manual_seed(0)
    vocab, hidden_size = 50, 8
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", vocab * 4)  # 4 rows per chunk: 15 rows make 4 chunks
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(3, 5, hidden_size, requires_grad=True)
    ids = torch.randint(0, vocab, (3, 5))
    w_logp, w_ent = torch.randn(3, 5), torch.randn(3, 5)
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))

    logp, ent, sq = logprobs.head_chunk_scores(head, hidden, ids, vocab, 0.7, "grad", prob_sq=True)
    assert calls == [4, 4, 4, 3]  # forward: one call per chunk, never all 15 rows
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    assert sorted(calls[4:]) == [3, 4, 4, 4]  # backward recomputes each chunk (last first), one at a time
    got = (logp.detach(), ent.detach(), sq, hidden.grad.clone(), head.weight.grad.clone())

    hidden.grad, head.weight.grad = None, None
    n_logp, n_ent, n_sq = naive(head(hidden), ids, 0.7)
    ((n_logp * w_logp).sum() + (n_ent * w_ent).sum()).backward()
    want = (n_logp.detach(), n_ent.detach(), n_sq.detach(), hidden.grad, head.weight.grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_gradient_only_the_values_are_computed():
    torch.manual_seed(1)
    head = torch.nn.Linear(6, 30)
    hidden, ids = torch.randn(2, 4, 6), torch.randint(0, 30, (2, 4))
    with torch.no_grad():
        logp, ent, sq = logprobs.head_chunk_scores(head, hidden, ids, 30, entropy="detached")
        n_logp, n_ent, _ = naive(head(hidden), ids, 1.0)
    assert sq is None
    torch.testing.assert_close(logp, n_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, n_ent, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    cfg = PolicyConfig(tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tok)
    sampling = SamplingConfig(group_size=3, max_new_tokens=6, ignore_eos=True)
    torch.manual_seed(1)
    rollout = generate_rollout(model, tok, ["12+3=", "7+40="], sampling)
    return model, rollout


def close_to_scale(got, want, name):
    """Equal up to float32 rounding of sums taken in another order: relative 1e-4, and an absolute slack of
    1e-6 of the tensor's largest entry (a tiny entry of a gradient whose largest is ~5 moves by ~1e-6)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * max(1.0, float(want.abs().max())), msg=name)


def scores_and_grads(model, rollout, scorer, entropy):
    model.zero_grad()
    rows = torch.arange(rollout.input_ids.shape[0])
    out = scorer.score(model, rollout, rows, entropy, prob_sq=True)
    (out.logp.sum() + (out.entropy.sum() if entropy == "grad" else 0)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("entropy", ["grad", "detached"])
def test_scorer_over_budget_matches_whole_logits(tiny, monkeypatch, entropy):
    model, rollout = tiny
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", model.config.vocab_size * 5)  # 5 rows per chunk
    whole = TokenScorer(temperature=0.8, max_logits_mib=None)
    chunked = TokenScorer(temperature=0.8, max_logits_mib=1e-6)
    head = model.get_output_embeddings()
    positions = rollout.input_ids.shape[0] * (rollout.input_ids.shape[1] - rollout.prompt_len)
    assert whole.chunked_head(model, positions) is None
    assert chunked.chunked_head(model, positions) == (head, model.config.vocab_size)
    shapes = []
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        a, grads_a = scores_and_grads(model, rollout, chunked, entropy)
    finally:
        handle.remove()
    assert shapes and all(s[0] <= 5 and len(s) == 2 for s in shapes)  # chunks of rows, never [b, T, V]
    assert model.get_output_embeddings() is head  # put back
    b, grads_b = scores_and_grads(model, rollout, whole, entropy)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 3
    for k in grads_a:
        close_to_scale(grads_a[k], grads_b[k], k)


def test_chunks_are_a_quarter_of_the_budget(tiny, monkeypatch):
    model, rollout = tiny
    vocab = model.config.vocab_size
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", vocab * 2)  # the default chunk: 2 rows
    budget = 4 * vocab * 4 * 4 / 2**20  # a quarter of it is 4 rows of float32 logits
    assert logprobs.budget_chunk_rows(vocab, budget) == 4
    assert logprobs.budget_chunk_rows(vocab, 1e-6) == 2  # never below the default chunk
    positions = rollout.input_ids.shape[0] * (rollout.input_ids.shape[1] - rollout.prompt_len)
    assert positions > 16  # over the budget: the head runs in chunks
    head, shapes = model.get_output_embeddings(), []
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        a, _ = scores_and_grads(model, rollout, TokenScorer(max_logits_mib=budget), "detached")
    finally:
        handle.remove()
    assert max(s[0] for s in shapes) == 4 and all(len(s) == 2 for s in shapes)
    b, _ = scores_and_grads(model, rollout, TokenScorer(max_logits_mib=None), "detached")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_the_head_is_restored_when_the_forward_fails(tiny):
    model, rollout = tiny
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="boom"), hidden_states_out(model) as inside:
        assert inside is head and model.get_output_embeddings() is not head
        raise RuntimeError("boom")
    assert model.get_output_embeddings() is head
    logits = model(input_ids=rollout.input_ids[:1]).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_budget_and_model_type_decide(tiny, monkeypatch):
    model, _ = tiny
    vocab = model.config.vocab_size
    scorer = TokenScorer(max_logits_mib=1.0)  # 1 MiB: 2**18 float32 logits
    limit = 2**18 // vocab
    assert scorer.chunked_head(model, limit) is None
    assert scorer.chunked_head(model, limit + 1) is not None
    monkeypatch.setattr(model.config, "model_type", "gemma2")  # logits soft-capped after the head
    assert scorer.chunked_head(model, 10 * limit) is None
    monkeypatch.setattr(model.config, "model_type", "qwen2")
    weight = model.get_output_embeddings().weight
    monkeypatch.setattr(weight, "ds_id", 0, raising=False)  # a ZeRO-3 shard: its hooks gather per forward
    assert scorer.chunked_head(model, 10 * limit) is None


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="model.optim.max_logits_mib must be > 0"):
        OptimConfig(max_logits_mib=0)


def test_lora_policy_chunked_matches_whole(tiny, monkeypatch):
    peft = pytest.importorskip("peft")
    base, rollout = tiny
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", base.config.vocab_size * 7)
    chunked = TokenScorer(max_logits_mib=1e-6)
    positions = rollout.input_ids.shape[0] * (rollout.input_ids.shape[1] - rollout.prompt_len)
    assert chunked.chunked_head(model, positions) is not None
    a, grads_a = scores_and_grads(model, rollout, chunked, "detached")
    b, grads_b = scores_and_grads(model, rollout, TokenScorer(max_logits_mib=None), "detached")
    torch.testing.assert_close(a.logp, b.logp, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all("lora_" in k for k in grads_a)
    for k in grads_a:
        close_to_scale(grads_a[k], grads_b[k], k)
