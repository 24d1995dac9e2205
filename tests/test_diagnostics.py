"""Gradient diagnostics by probability bucket, the GSPO sequence ratio, and counting RL steps.

The per-token logit-gradient norms the diagnostics compute without a backward are checked against autograd
over every loss setting that changes the gradient (placements, clips, aggregations, importance weights,
sequence ratios, the CISPO and ASPO loss types).
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import DENSE_REWARD, arithmetic_args, run_cli

from trgrpo.config import LossConfig
from trgrpo.diagnostics import (
    GradBuckets,
    bucket_names,
    check_edges,
    logit_grad_norm_sq,
    surrogate_grad_coef,
)
from trgrpo.logprobs import selective_log_softmax, squared_prob_sum, token_entropy
from trgrpo.losses import GRPOLoss, sequence_ratio
from trgrpo.scoring import TokenScores
from trgrpo.update import UpdateBatch
from trgrpo.weighting import TokenRegulatedWeighting

B, T, V = 6, 5, 11


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2.0).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0.0  # a short completion
    mask[4, 1:] = 0.0
    active = mask.clone()
    active[2, 1] = 0.0  # a token left out of this pass (Lopti-like)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7, 0.0, 2.0])
    # old log-probs a little off the current ones, so some ratios fall outside the clip range
    drift = torch.randn(B, T, generator=g) * 0.4
    return logits, ids, mask, active, adv, drift


SETTINGS = [
    {},
    {"placement": "ratio"},
    {"dual_clip": 1.3},
    {"aggregation": "seq_mean_token_mean"},
    {"aggregation": "seq_sum_const"},
    {"ratio_level": "sequence", "aggregation": "seq_mean_token_mean", "clip_low": 0.05, "clip_high": 0.05},
    {"sampler": True, "sampler_is_cap": 1.5},
    {"loss_type": "cispo", "cispo_cap": 1.2},
    {"loss_type": "cispo", "cispo_cap": 1.2, "placement": "ratio", "aggregation": "seq_mean_token_mean"},
    {"loss_type": "aspo"},
    {"loss_type": "aspo", "aspo_dual_clip": 1.3, "aggregation": "seq_mean_token_mean"},
    {"loss_type": "aspo", "aspo_dual_clip": 1.3, "sampler": True, "sampler_is_cap": 1.5},
]


@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default"
)
def test_logit_gradient_norms_match_autograd(setting):
    setting = dict(setting)
    logits, ids, mask, active, adv, drift = _inputs(0)
    logp = selective_log_softmax(logits, ids)
    old = logp.detach() + drift
    weights = TokenRegulatedWeighting().weights(logp.detach(), old, adv, mask)
    placement = setting.pop("placement", "surrogate")
    sampler = (
        old + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(1))
        if setting.pop("sampler", False)
        else None
    )
    batch = UpdateBatch(torch.arange(B), adv, mask, active, old, None)
    loss = GRPOLoss(LossConfig(**setting), placement=placement, max_len=T)
    scores = TokenScores(logp, token_entropy(logits))  # ASPO's clip ranges read the entropy
    out = loss(batch, scores, weights, sampler, num_tokens=mask.sum().item(), num_seqs=float(B))
    out.loss.backward()
    expected = logits.grad.square().sum(-1)  # [B, T] squared norm of each token's logit gradient
    pg_coef = surrogate_grad_coef(out, batch)  # [B, T]
    got = logit_grad_norm_sq(pg_coef, logp, squared_prob_sum(logits))
    scale = expected.max().item()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * scale)
    # the clip must have stopped some gradients in this draw, or the test would not exercise it (CISPO's cap
    # stops none: it must have truncated some weights instead; ASPO's soft dual clip must bind with c = 1.3)
    flows = (pg_coef > 0).sum().item()
    trained = active.bool() & (adv != 0).unsqueeze(1)
    if setting.get("loss_type") == "cispo":
        assert (out.clipped_high & trained).any() and flows == trained.sum().item()
    else:
        assert flows < trained.sum().item() or setting.get("ratio_level")
    if setting.get("aspo_dual_clip"):
        assert (out.dual_clipped & trained).any()


def test_sequence_ratio_is_gspo():
    """Token form with seq_mean_token_mean aggregation = GSPO's sequence objective, value and gradient."""
    logits, ids, mask, active, adv, drift = _inputs(2)
    old = selective_log_softmax(logits, ids).detach() + 0.05 * drift
    eps = 0.02

    logp = selective_log_softmax(logits, ids)
    ratio = sequence_ratio(logp, old, mask)
    lengths = mask.sum(1)
    expected_s = torch.exp(((logp - old) * mask).sum(1) / lengths).detach()
    torch.testing.assert_close(ratio.detach()[:, 0], expected_s)
    cfg = LossConfig(clip_low=eps, clip_high=eps, aggregation="seq_mean_token_mean", ratio_level="sequence")
    batch = UpdateBatch(torch.arange(B), adv, mask, mask, old, None)
    ours = GRPOLoss(cfg, max_len=T)(
        batch, TokenScores(logp, None), mask, num_tokens=mask.sum().item(), num_seqs=float(B)
    ).loss
    (g_ours,) = torch.autograd.grad(ours, logits)

    logp = selective_log_softmax(logits, ids)
    s = torch.exp(((logp - old) * mask).sum(1) / lengths)  # [B] differentiable sequence ratio
    gspo = -torch.minimum(s * adv, s.clamp(1 - eps, 1 + eps) * adv).mean()
    (g_ref,) = torch.autograd.grad(gspo, logits)
    torch.testing.assert_close(ours, gspo, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())


def test_surrogate_grad_coef_by_hand():
    # A = -2, ratios e^0 = 1 and e^-0.5 = 0.61 (below 1 - 0.2: clipped, no gradient), a third token outside
    # the pass; weights 1.5; sampler correction 0.5 everywhere; token_mean over 4 tokens
    logp = torch.tensor([[0.0, -0.5, 0.0, 0.0]])
    sampler = torch.full((1, 4), math.log(2.0))  # pi_old / pi_sampler = 1 / 2 with the old log-probs 0
    batch = UpdateBatch(
        torch.arange(1),
        torch.tensor([-2.0]),
        torch.ones(1, 4),
        torch.tensor([[1.0, 1, 0, 1]]),
        torch.zeros(1, 4),
        None,
    )
    loss = GRPOLoss(LossConfig(sampler_is_cap=3.0), max_len=4)
    out = loss(batch, TokenScores(logp, None), torch.full((1, 4), 1.5), sampler, num_tokens=4, num_seqs=1)
    # |w A r| * correction / 4 = 1.5 * 2 * 1 * 0.5 / 4 = 0.375 where the gradient flows
    torch.testing.assert_close(surrogate_grad_coef(out, batch), torch.tensor([[0.375, 0.0, 0.0, 0.375]]))


def test_buckets_by_hand():
    buckets = GradBuckets([0.1, 0.5])
    assert buckets.names == ["p<0.1", "0.1<=p<0.5", "p>=0.5"]
    probs = torch.tensor([[0.05, 0.2, 0.6, 0.9]])
    grad_sq = torch.tensor([[4.0, 1.0, 2.0, 1.0]])
    weights = torch.tensor([[1.0, 1.2, 1.4, 1.4]])
    active = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    buckets.add(grad_sq, probs.log(), weights, active)
    buckets.add(
        torch.tensor([[1.0, 100.0]]),
        torch.tensor([[0.3, 0.05]]).log(),
        torch.ones(1, 2),
        torch.tensor([[1.0, 0.0]]),
    )  # the second token is not trained: not counted
    m = buckets.reduced().metrics()
    total = 4 + 1 + 2 + 1 + 1
    assert m["train/grad_share/p<0.1"] == pytest.approx(4 / total)
    assert m["train/grad_share/0.1<=p<0.5"] == pytest.approx(2 / total)
    assert m["train/grad_share/p>=0.5"] == pytest.approx(3 / total)
    assert m["train/token_share/p<0.1"] == pytest.approx(1 / 5)
    assert m["train/token_share/0.1<=p<0.5"] == pytest.approx(2 / 5)
    assert m["train/weight/0.1<=p<0.5"] == pytest.approx((1.2 + 1.0) / 2)
    assert m["train/weight/p>=0.5"] == pytest.approx(1.4)


def test_empty_buckets_and_steps_without_gradient_log_nothing_rather_than_zero():
    buckets = GradBuckets([0.5])
    buckets.add(torch.zeros(1, 2), torch.tensor([[0.2, 0.3]]).log(), torch.ones(1, 2), torch.ones(1, 2))
    m = buckets.metrics()
    assert m == {"train/token_share/p<0.5": 1.0, "train/token_share/p>=0.5": 0.0, "train/weight/p<0.5": 1.0}
    assert GradBuckets().metrics() == {}


def test_bucket_edges_are_checked():
    assert bucket_names([0.5]) == ["p<0.5", "p>=0.5"]
    with pytest.raises(ValueError, match="model.grad_buckets"):
        check_edges([0.5, 0.1])
    with pytest.raises(ValueError, match="model.grad_buckets"):
        check_edges([0.0, 0.5])


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _metrics(tmp_path):
    return _rows(next(tmp_path.rglob("metrics.csv")))


@pytest.mark.slow
def test_training_logs_diagnostics_and_rl_steps_with_lopti(tmp_path):
    """Lopti makes two updates per RL step: RLStepLimit still stops after 3 RL steps, ``train/rl_step`` and
    ``val/rl_step`` count RL steps, and the bucket shares of every step sum to one."""
    run_cli(
        tmp_path,
        *arithmetic_args(),
        DENSE_REWARD,
        "--model.weighting=trgrpo.weighting.Lopti",
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=100",
        "--trainer.val_check_interval=2",
        "--trainer.callbacks+=trgrpo.callbacks.RLStepLimit",
        "--trainer.callbacks.steps=3",
    )
    rows = _metrics(tmp_path)
    train = [r for r in rows if r.get("train/rl_step")]
    assert [float(r["train/rl_step"]) for r in train] == [1.0, 2.0, 3.0]
    val = sorted({float(r["val/rl_step"]) for r in rows if r.get("val/rl_step")})
    assert val == [0.0, 2.0, 3.0]  # before RL, the periodic check, after RL
    names = ["p<0.1", "0.1<=p<0.5", "p>=0.5"]
    for r in train:
        shares = [float(r[f"train/grad_share/{n}"]) for n in names]
        tokens = [float(r[f"train/token_share/{n}"]) for n in names]
        assert sum(tokens) == pytest.approx(1.0)
        assert sum(shares) == pytest.approx(1.0)
    deltas = [r.get("train/grad_norm_delta") for r in train]
    assert not deltas[0] and all(d not in (None, "") and math.isfinite(float(d)) for d in deltas[1:])
