"""Each step of the loss on hand-computed numbers: ratios, clipped surrogate, dual clip, placements, KL
estimators, entropy bonus, normalisers and aggregation, and ``GRPOLoss`` composing them.

    python -m pytest tests/test_losses.py -q
"""

import math
from functools import partial

import pytest
import torch

from trgrpo.config import LossConfig
from trgrpo.losses import (
    GRPOLoss,
    aggregate,
    clipped_surrogate,
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
