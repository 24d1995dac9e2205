"""Clipped surrogate, dual clip, KL estimators and aggregation on hand-computed numbers."""

import math

import pytest
import torch

from trgrpo.losses import aggregate, clipped_surrogate, kl_penalty, policy_loss

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


def test_policy_loss_with_kl_weights_and_ratio_one():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ones = torch.ones(1, 2)
    out = policy_loss(
        logp,
        logp,
        torch.tensor([2.0]),
        torch.tensor([[1.0, 1.5]]),
        ones,
        ones,
        num_tokens=2,
        num_seqs=1,
        max_len=2,
        beta=0.1,
        ref_logp=logp - 1.0,
        kl_estimator="k1",
    )
    # surrogate: -(w * A) = [-2, -3]; k1 KL = logp - ref = 1 per token -> +0.1 each; mean = (-1.9 - 2.9) / 2
    assert out.loss.item() == pytest.approx(-2.4)
    assert out.kl.item() == pytest.approx(2.0)


def test_ratio_placement_stops_gradient_of_confident_positive_tokens():
    logp = torch.zeros(1, 1, requires_grad=True)
    w = torch.tensor([[1.4]])
    one = torch.ones(1, 1)
    out = policy_loss(
        logp,
        logp.detach(),
        torch.tensor([1.0]),
        w,
        one,
        one,
        num_tokens=1,
        num_seqs=1,
        max_len=1,
        clip_high=0.28,
        placement="ratio",
    )
    # w * r = 1.4 > 1.28: the clipped branch wins and carries no gradient
    assert out.loss.item() == pytest.approx(-1.28)
    out.loss.backward()
    assert logp.grad.item() == 0.0  # the clamp's constant branch: exactly no gradient
    logp.grad = None
    surrogate = policy_loss(
        logp,
        logp.detach(),
        torch.tensor([1.0]),
        w,
        one,
        one,
        num_tokens=1,
        num_seqs=1,
        max_len=1,
        clip_high=0.28,
        placement="surrogate",
    )
    surrogate.loss.backward()
    assert logp.grad.item() == pytest.approx(-1.4)  # d/dlogp of -1.4 * exp(logp - old) at ratio 1
