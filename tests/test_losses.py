"""Each step of the loss on hand-computed numbers: ratios, clipped surrogate, dual clip, placements, KL
estimators, entropy bonus, normalisers and aggregation, and ``GRPOLoss`` composing them; the CISPO and ASPO
loss types against direct implementations of their formulas (value and gradient, clips that bind), their
equality with GRPO at ratio 1, their options' errors and their fragments.

    python -m pytest tests/test_losses.py -q
"""

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from trgrpo.cli import main
from trgrpo.config import LossConfig
from trgrpo.logprobs import selective_log_softmax
from trgrpo.losses import (
    GRPOLoss,
    aggregate,
    aspo_objective,
    aspo_surrogate,
    cispo_objective,
    cispo_surrogate,
    clipped_surrogate,
    entropy_clip_ranges,
    kl_penalty,
    sequence_ratio,
    token_normaliser,
    token_ratio,
    weights_in_ratio,
    weights_on_surrogate,
)
from trgrpo.scoring import TokenScores
from trgrpo.update import UpdateBatch

RATIO = torch.tensor([[0.5, 1.0, 1.5]])


def test_positive_advantage_clips_high():
    out = clipped_surrogate(RATIO, torch.tensor([[1.0]]), clip_low=0.2, clip_high=0.28)
    # min(r, clip(r, .8, 1.28)) = [0.5, 1.0, 1.28]
    assert torch.allclose(out.loss, torch.tensor([[-0.5, -1.0, -1.28]]))
    assert out.clipped_high.tolist() == [[False, False, True]]
    assert not out.clipped_low.any()


def test_negative_advantage_clips_low_and_dual_clip_bounds_loss():
    out = clipped_surrogate(RATIO, torch.tensor([[-1.0]]), clip_low=0.2, clip_high=0.28)
    # min(-r, -clip(r)) = [-0.8, -1.0, -1.5]
    assert torch.allclose(out.loss, torch.tensor([[0.8, 1.0, 1.5]]))
    assert out.clipped_low.tolist() == [[True, False, False]]
    dual = clipped_surrogate(RATIO, torch.tensor([[-1.0]]), 0.2, 0.28, dual_clip=1.4)
    # max(min(...), 1.4 * -1) caps the last token's loss at 1.4
    assert torch.allclose(dual.loss, torch.tensor([[0.8, 1.0, 1.4]]))


def test_clipped_tokens_get_no_gradient():
    ratio = torch.tensor([[0.5, 1.0, 1.5]], requires_grad=True)
    clipped_surrogate(ratio, torch.tensor([[1.0]]), 0.2, 0.28).loss.sum().backward()
    assert ratio.grad.tolist() == [[-1.0, -1.0, 0.0]]  # -A with A = 1, and the clipped branch's 0: exact


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log_ratio = ref - logp = -1
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0  # exp(0) - 0 - 1: exact
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_aggregations():
    # small integer sums, divided to representable results (3; 2, 4.5, 3.25; 1.875): exact in float32
    assert aggregate(PER_TOKEN, MASK, "token_mean", num_tokens=5, num_seqs=2, max_len=4).item() == 3.0
    # (6/3 + 9/2) / 2
    assert aggregate(PER_TOKEN, MASK, "seq_mean_token_mean", 5, 2, 4).item() == 3.25
    # 15 / (2 * 4)
    assert aggregate(PER_TOKEN, MASK, "seq_sum_const", 5, 2, 4).item() == 1.875
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(PER_TOKEN, MASK, "sum", 5, 2, 4)  # type: ignore[arg-type]


def test_global_normaliser_makes_split_batches_sum_to_the_whole():
    full = aggregate(PER_TOKEN, MASK, "seq_mean_token_mean", 5, 2, 4)
    halves = sum(
        aggregate(PER_TOKEN[i : i + 1], MASK[i : i + 1], "seq_mean_token_mean", 5, 2, 4) for i in range(2)
    )
    assert torch.allclose(full, halves)


def test_token_normaliser_by_hand():
    # token_mean: 1 / 5 tokens; seq_mean_token_mean: 1 / (length * 2 sequences) = 1/6 and 1/4; seq_sum_const:
    # 1 / (2 sequences * max_len 4) = 1/8 (padding keeps its factor: the mask zeroes it in ``aggregate``)
    norm = lambda mode: token_normaliser(MASK, mode, num_tokens=5, num_seqs=2, max_len=4)  # noqa: E731
    assert torch.equal(norm("token_mean"), torch.full((2, 3), 1 / 5))
    assert torch.equal(norm("seq_mean_token_mean"), torch.tensor([[1 / 6] * 3, [1 / 4] * 3]))
    assert torch.equal(norm("seq_sum_const"), torch.full((2, 3), 1 / 8))


def test_token_and_sequence_ratios_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, 0.4, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(token_ratio(logp, old, mask), torch.exp(torch.tensor([[0.2, 0.4, 5.0]])))
    seq = sequence_ratio(logp, old, mask)
    # mean log-ratio over the two response tokens: 0.3 (the padded 5.0 is left out); s = e^0.3 everywhere
    assert torch.allclose(seq, torch.full((1, 3), math.exp(0.3)))
    seq.sum().backward()
    assert torch.allclose(logp.grad, torch.full((1, 3), math.exp(0.3)))  # token form: d s_t / d logp_t = s


def _batch(adv, mask, active=None, old=None, ref=None) -> UpdateBatch:
    active = mask if active is None else active
    return UpdateBatch(torch.arange(len(adv)), adv, mask, active, old, ref)


def test_grpo_loss_with_kl_weights_and_ratio_one():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    batch = _batch(torch.tensor([2.0]), torch.ones(1, 2), old=logp, ref=logp - 1.0)
    w = torch.tensor([[1.0, 1.5]])
    cfg = LossConfig(beta=0.1, kl_estimator="k1")
    out = GRPOLoss(cfg, max_len=2)(batch, TokenScores(logp, None), w, num_tokens=2, num_seqs=1)
    # surrogate: -(w * A) = [-2, -3]; k1 KL = logp - ref = 1 per token -> +0.1 each; mean = (-1.9 - 2.9) / 2
    assert out.loss.item() == pytest.approx(-2.4)
    assert out.kl.item() == pytest.approx(2.0)
    assert torch.equal(out.ratio, torch.ones(1, 2)) and torch.equal(out.weights, w)  # exp(0) = 1: exact
    assert out.correction is None and out.sampler_kl is None
    # weight_kl: the KL term takes the weights too, + 0.1 * [1, 1.5]; mean = (-1.9 - 2.85) / 2
    weighted = GRPOLoss(cfg, weight_kl=True, max_len=2)(
        batch, TokenScores(logp, None), w, num_tokens=2, num_seqs=1
    )
    assert weighted.loss.item() == pytest.approx(-2.375)
    with pytest.raises(ValueError, match="reference log-probs"):
        GRPOLoss(cfg)(batch._replace(ref_logp=None), TokenScores(logp, None), w, num_tokens=2, num_seqs=1)


def test_entropy_bonus_and_tokens_outside_the_pass():
    logp = torch.zeros(1, 2)  # single pass (no old log-probs): ratio exactly 1
    batch = _batch(torch.ones(1), torch.ones(1, 2), active=torch.tensor([[1.0, 0.0]]))
    loss = GRPOLoss(LossConfig(entropy_coef=0.1))
    out = loss(
        batch, TokenScores(logp, torch.tensor([[1.0, 2.0]])), torch.ones(1, 2), num_tokens=2, num_seqs=1
    )
    # per token -A r - 0.1 H = [-1.1, -1.2]; the second is outside this pass but still counted: -1.1 / 2
    assert out.loss.item() == pytest.approx(-0.55)
    with pytest.raises(ValueError, match="entropy"):
        loss(batch, TokenScores(logp, None), torch.ones(1, 2), num_tokens=2, num_seqs=1)


def test_ratio_placement_stops_gradient_of_confident_positive_tokens():
    logp = torch.zeros(1, 1, requires_grad=True)
    w = torch.tensor([[1.4]])
    batch = _batch(torch.tensor([1.0]), torch.ones(1, 1), old=logp.detach())
    cfg = LossConfig(clip_high=0.28)
    out = GRPOLoss(cfg, placement="ratio")(batch, TokenScores(logp, None), w, num_tokens=1, num_seqs=1)
    # w * r = 1.4 > 1.28: the clipped branch wins and carries no gradient
    assert out.loss.item() == pytest.approx(-1.28) and out.clipped_high.tolist() == [[True]]
    out.loss.backward()
    assert logp.grad.item() == 0.0  # the clamp's constant branch: exactly no gradient
    logp.grad = None
    surrogate = GRPOLoss(cfg, placement="surrogate")(
        batch, TokenScores(logp, None), w, num_tokens=1, num_seqs=1
    )
    assert surrogate.clipped_high.tolist() == [[False]]  # the clip sees the plain ratio 1
    surrogate.loss.backward()
    assert logp.grad.item() == pytest.approx(-1.4)  # d/dlogp of -1.4 * exp(logp - old) at ratio 1


def test_placements_by_hand():
    ratio, adv, w = torch.tensor([[1.0, 1.2]]), torch.tensor([[1.0]]), torch.tensor([[1.5, 0.5]])
    clip = partial(clipped_surrogate, clip_low=0.2, clip_high=0.2)
    # surrogate: w * -min(r, clip(r)) = [1.5 * -1, 0.5 * -1.2]
    assert torch.allclose(weights_on_surrogate(clip, ratio, adv, w).loss, torch.tensor([[-1.5, -0.6]]))
    # ratio: -min(w r, clip(w r)) with w r = [1.5, 0.6] -> [-1.2, -0.6]; the first is clipped
    inside = weights_in_ratio(clip, ratio, adv, w)
    assert torch.allclose(inside.loss, torch.tensor([[-1.2, -0.6]]))
    assert inside.clipped_high.tolist() == [[True, False]]


# ---------------------------------------------------------------- CISPO and ASPO


def test_cispo_by_hand():
    ratio = torch.tensor([[0.5, 1.0, 6.0]])
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.75]])).requires_grad_(True)
    out = cispo_surrogate(ratio, torch.tensor([[2.0]]), logp, cap=5.0)
    # -min(r, 5) * A * log p = -[0.5, 1, 5] * 2 * log p; gradient -[1, 2, 10]: the capped token keeps one
    torch.testing.assert_close(out.loss, -torch.tensor([[1.0, 2.0, 10.0]]) * logp)
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -2.0, -10.0]]))
    assert out.clipped_high.tolist() == [[False, False, True]] and not out.clipped_low.any()
    torch.testing.assert_close(out.grad, torch.tensor([[1.0, 2.0, 10.0]]))


def test_aspo_by_hand():
    # eps = 0.2 everywhere, c = 3; A = +1 on the first row, -1 on the second; log p = 0 (p = 1)
    ratio = torch.tensor([[0.25, 0.8, 1.5], [0.5, 1.1, 4.0]], requires_grad=True)
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0], [-1.0]])
    out = aspo_surrogate(ratio, adv, logp, torch.full((2, 3), 0.2), dual_clip=3.0)
    # A > 0: r = 0.25 < 1/3 -> -A * 3 * log p = 0; r = 0.8 -> -1 / 0.8 = -1.25; r = 1.5 clipped -> -1 / 1.2
    # A < 0: r = 0.5 clipped -> 1 * 0.8; r = 1.1 -> 1.1; r = 4 > 3 -> -A * 3 * log p = 0
    torch.testing.assert_close(out.loss, torch.tensor([[0.0, -1.25, -1 / 1.2], [0.8, 1.1, 0.0]]))
    out.loss.sum().backward()
    # d/dr: A > 0 unclipped: -A / r^2 (so d/dlog r = -A / r, the flipped ratio); A < 0 unclipped: -A = 1
    torch.testing.assert_close(ratio.grad, torch.tensor([[0.0, -1 / 0.64, 0.0], [0.0, 1.0, 0.0]]))
    # the soft dual clips' gradient -A c
    torch.testing.assert_close(logp.grad, torch.tensor([[-3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    assert out.clipped_high.tolist() == [[False, False, True], [False, False, False]]
    assert out.clipped_low.tolist() == [[False, False, False], [True, False, False]]
    assert out.dual_clipped.tolist() == [[True, False, False], [False, False, True]]
    # |d loss / d log r|: [3, 1 / 0.8, 0] and [0, 1.1, 3]
    torch.testing.assert_close(out.grad, torch.tensor([[3.0, 1.25, 0.0], [0.0, 1.1, 3.0]]))


def test_entropy_clip_ranges_by_hand():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    clip = entropy_clip_ranges(entropy, mask, 0.8, narrow=0.2, wide=0.4)
    # row 1: 0.8-quantile of [1..5] = 4.2: only 5 is above (the padded 9 is not counted); row 2: none above
    torch.testing.assert_close(clip, torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.4, 0.2], [0.2] * 6]))


B, T, V = 6, 6, 11
ADV = torch.tensor([1.0, -1.0, 0.5, -0.7, 2.0, -1.5])


def _draw(seed: int = 0):
    """Logits, sampled ids, a mask with two short completions, and old log-probs off the current ones with
    planted drifts so that every clip of CISPO and ASPO binds somewhere."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2.0).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0.0
    mask[3, 2:] = 0.0
    drift = torch.randn(B, T, generator=g) * 0.3  # old = logp + drift: ratio exp(-drift)
    drift[0, 1], drift[4, 2] = 1.5, -0.5  # A > 0: ratio 0.22 (< 1/3, soft dual clip), 1.65 (clipped high)
    drift[1, 0], drift[5, 3] = -1.5, 0.7  # A < 0: ratio 4.5 (> 3, soft dual clip), 0.50 (clipped low)
    drift[2, 0] = -0.3  # A > 0, ratio 1.35: clipped only where the clip range is the narrow one
    weights = 0.5 + torch.rand(B, T, generator=g)  # token weights in [0.5, 1.5]
    return logits, ids, mask, drift, weights


def _entropy(logits):
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).detach()  # [B, T]


def _reduce(per_token, mask, aggregation):
    if aggregation == "token_mean":
        return (per_token * mask).sum() / mask.sum()
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def _cispo_reference(logp, old, w, cap, placement):
    """TRL's loss_type="cispo": -sg(min(r, eps_max)) * A * log pi_theta, per token."""
    r = torch.exp(logp - old).detach()
    if placement == "ratio":
        return -torch.clamp(w * r, max=cap) * ADV[:, None] * logp
    return -w * torch.clamp(r, max=cap) * ADV[:, None] * logp


def _aspo_clip_ranges(entropy, mask, q=0.8, narrow=0.2, wide=0.4):
    """eps per token: ``wide`` above the q-quantile of its response's entropies (numpy's, linear)."""
    eps = torch.full_like(entropy, narrow)
    for i in range(len(entropy)):
        n = int(mask[i].sum())
        threshold = np.quantile(entropy[i, :n].numpy(), q)
        eps[i, :n] = torch.where(entropy[i, :n] > float(threshold), wide, narrow)
    return eps


def _aspo_reference(logp, old, w, eps, c=3.0):
    """ASPO, case by case: A < 0 PPO's clip with a soft dual clip; A > 0 the flipped ratio (value -A / r,
    gradient -A / r * grad log p), clipped at 1 + eps, soft dual clip below 1 / c."""
    r = torch.exp(logp - old)
    rd = r.detach()
    a = ADV[:, None].expand_as(logp)
    soft = -a * c * logp
    neg = torch.where(rd > c, soft, torch.where(rd < 1 - eps, -a * (1 - eps), -a * r))
    flipped = -a / rd * torch.exp(logp - logp.detach())
    pos = torch.where(rd < 1 / c, soft, torch.where(rd > 1 + eps, -a / (1 + eps), flipped))
    return w * torch.where(a < 0, neg, pos)


def _ours(logits, ids, mask, old, w, aggregation, placement="surrogate", **loss):
    logp = selective_log_softmax(logits, ids)
    cfg = LossConfig(aggregation=aggregation, **loss)
    batch = _batch(ADV, mask, old=old)
    scores = TokenScores(logp, _entropy(logits))
    out = GRPOLoss(cfg, placement=placement, max_len=T)(
        batch, scores, w, num_tokens=mask.sum().item(), num_seqs=float(B)
    )
    return out, torch.autograd.grad(out.loss, logits)[0]


def _check(ours, grad, reference, logits):
    (g_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, g_ref, rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("placement", ["surrogate", "ratio"])
def test_cispo_matches_its_formula(aggregation, placement):
    logits, ids, mask, drift, w = _draw()
    old = selective_log_softmax(logits, ids).detach() + drift
    cap = 1.2
    out, grad = _ours(logits, ids, mask, old, w, aggregation, placement, loss_type="cispo", cispo_cap=cap)
    logp = selective_log_softmax(logits, ids)
    _check(out.loss, grad, _reduce(_cispo_reference(logp, old, w, cap, placement), mask, aggregation), logits)
    # the cap binds in this draw, on tokens of both signs of A, and no token loses its gradient
    capped = (out.ratio * (w if placement == "ratio" else 1) > cap) & mask.bool()
    assert (capped & (ADV[:, None] > 0)).any() and (capped & (ADV[:, None] < 0)).any()
    assert ((out.clipped_high & mask.bool()) == capped).all() and (grad.abs().sum(-1)[mask.bool()] > 0).all()


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_aspo_matches_its_formula(aggregation):
    logits, ids, mask, drift, w = _draw()
    old = selective_log_softmax(logits, ids).detach() + drift
    out, grad = _ours(logits, ids, mask, old, w, aggregation, loss_type="aspo")
    logp = selective_log_softmax(logits, ids)
    eps = _aspo_clip_ranges(_entropy(logits), mask)
    _check(out.loss, grad, _reduce(_aspo_reference(logp, old, w, eps), mask, aggregation), logits)
    # every branch binds in this draw: both soft dual clips, the low and high clips, the entropy's clip range
    r, a, real = out.ratio, ADV[:, None].expand(B, T), mask.bool()
    assert ((a < 0) & (r > 3) & real).any() and ((a > 0) & (r < 1 / 3) & real).any()
    assert ((a < 0) & (r < 1 - eps) & real).any() and ((a > 0) & (r > 1 + eps) & real).any()
    assert ((a > 0) & (r > 1.2) & (r < 1.4) & real).any()  # clipped at 1.2, free at 1.4
    assert (eps[real] == 0.4).any() and (eps[real] == 0.2).any()
    assert (out.dual_clipped & real).sum() >= 2 and out.clipped_low.any() and out.clipped_high.any()


def test_aspo_follows_the_entropy_of_each_response():
    """Which tokens get the wide clip range comes from the entropies: swapping them changes the loss."""
    logits, ids, mask, drift, w = _draw()
    old = selective_log_softmax(logits, ids).detach() + drift
    logp = selective_log_softmax(logits, ids)
    cfg = LossConfig(loss_type="aspo")
    batch = _batch(ADV, mask, old=old)
    entropy = _entropy(logits)
    clip = entropy_clip_ranges(entropy, mask, 0.8, 0.2, 0.4)
    torch.testing.assert_close(clip, _aspo_clip_ranges(entropy, mask))
    loss = GRPOLoss(cfg, max_len=T)
    a = loss(batch, TokenScores(logp, entropy), w, num_tokens=mask.sum().item(), num_seqs=float(B)).loss
    b = loss(batch, TokenScores(logp, -entropy), w, num_tokens=mask.sum().item(), num_seqs=float(B)).loss
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="model.loss.loss_type=aspo needs the token entropy"):
        loss(batch, TokenScores(logp, None), w, num_tokens=mask.sum().item(), num_seqs=float(B))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_at_ratio_one_aspo_is_grpo_and_cispo_has_grpo_gradient(aggregation):
    """The first update of a fresh rollout (old = current): ASPO equals GRPO in value and gradient, CISPO in
    gradient only (its value is -A log pi, not -A)."""
    logits, ids, mask, _, w = _draw()
    old = selective_log_softmax(logits, ids).detach()
    grpo, g_grpo = _ours(logits, ids, mask, old, w, aggregation)
    aspo, g_aspo = _ours(logits, ids, mask, old, w, aggregation, loss_type="aspo")
    cispo, g_cispo = _ours(logits, ids, mask, old, w, aggregation, loss_type="cispo")
    torch.testing.assert_close(aspo.loss, grpo.loss)
    torch.testing.assert_close(g_aspo, g_grpo)
    torch.testing.assert_close(g_cispo, g_grpo)
    assert not torch.allclose(cispo.loss, grpo.loss)


def test_loss_type_options_fail_naming_the_key():
    for kwargs, key in [
        ({"loss_type": "dapo"}, "model.loss.loss_type"),
        ({"cispo_cap": 0.0}, "model.loss.cispo_cap"),
        ({"aspo_entropy_quantile": 1.0}, "model.loss.aspo_entropy_quantile"),
        ({"aspo_clip_high_entropy": 1.0}, "model.loss.aspo_clip_high_entropy"),
        ({"aspo_clip_low_entropy": -0.1}, "model.loss.aspo_clip_low_entropy"),
        ({"aspo_dual_clip": 1.0}, "model.loss.aspo_dual_clip"),
    ]:
        with pytest.raises(ValueError, match=key):
            LossConfig(**kwargs)
    with pytest.raises(ValueError, match="model.loss.loss_type=aspo flips the ratio"):
        GRPOLoss(LossConfig(loss_type="aspo"), placement="ratio")


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def _parse(*fragments: str):
    configs = [a for f in (DEMO, *fragments) for a in ("--config", str(ROOT / f) if f != DEMO else str(f))]
    return main([*configs, "--trainer.logger=false"], run=False)


@pytest.mark.parametrize(
    ("fragment", "objective", "values"),
    [
        ("configs/loss/cispo.yaml", cispo_objective, {"loss_type": "cispo", "cispo_cap": 5.0}),
        (
            "configs/loss/aspo.yaml",
            aspo_objective,
            {
                "loss_type": "aspo",
                "aspo_entropy_quantile": 0.8,
                "aspo_clip_low_entropy": 0.2,
                "aspo_clip_high_entropy": 0.4,
                "aspo_dual_clip": 3.0,
            },
        ),
    ],
)
def test_the_loss_fragments_compose_with_the_demo_and_four_minibatches(fragment, objective, values):
    alone = _parse().config.model.loss.as_dict()
    for extra in ((), ("configs/optim/four_minibatches.yaml",)):
        cli = _parse(fragment, *extra)
        assert cli.config.model.loss.as_dict() == {**alone, **values}  # the rest of the demo's loss stays
        assert cli.model.loss_fn.objective is objective
        assert type(cli.model.weighting).__name__ == "UniformWeighting"
    plan = cli.model.plan
    assert plan.sequences // plan.mini == 4 and plan.needs_old_logp  # four updates, the ratio leaves 1
    assert _parse().model.loss_fn.objective.__name__ == "grpo_objective"  # the default is today's loss
