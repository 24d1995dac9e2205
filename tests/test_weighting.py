"""Weighting strategies: hand-computed weights, properties, and UniformWeighting == plain GRPO."""

import math

import pytest
import torch

from trgrpo.config import LossConfig
from trgrpo.logprobs import selective_log_softmax
from trgrpo.losses import GRPOLoss
from trgrpo.scoring import TokenScores
from trgrpo.update import UpdateBatch
from trgrpo.weighting import (
    AdvantageReweighting,
    HighEntropyWeighting,
    LoptiWeighting,
    TokenRegulatedWeighting,
    UniformWeighting,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_tr_grpo_weights_by_hand():
    w = TokenRegulatedWeighting()  # alpha 2, tau 1/9, mu .25, bounds [1, 1.4]
    p = torch.tensor([0.0, 0.1, 0.2, 0.5])
    expected = [
        1.0,  # 2 * (0.5 - 0.25) = 0.5 -> clipped up to 1
        1.0,  # 2 * (sigmoid(0.9) - 0.25) = 0.9219 -> 1
        2 * (_sigmoid(1.8) - 0.25),  # 1.216298, inside the bounds
        1.4,  # 2 * (sigmoid(4.5) - 0.25) = 1.4778 -> clipped down to 1.4
    ]
    assert torch.allclose(w.weight_of_prob(p), torch.tensor(expected))
    assert expected[2] == pytest.approx(1.216298, abs=1e-6)


def test_literal_tau_nine_gives_constant_weight_and_default_varies():
    p = torch.linspace(0, 1, 101)
    literal = TokenRegulatedWeighting(tau=9.0).weight_of_prob(p)
    assert torch.all(literal == 1.0)  # clamped to the lower bound 1.0: exact
    default = TokenRegulatedWeighting().weight_of_prob(p)
    assert default.min().item() == 1.0 and default.max().item() == pytest.approx(1.4)
    assert torch.all(default[1:] >= default[:-1])  # monotone in p


def test_tr_grpo_sources_masks_and_reverse():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.0001, 0.5, 0.2]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0])
    rollout = TokenRegulatedWeighting(source="rollout").weights(logp, old, adv, mask)
    current = TokenRegulatedWeighting(source="current").weights(logp, old, adv, mask)
    assert rollout.tolist()[0][0] == pytest.approx(1.0) and rollout[0, 1].item() == pytest.approx(1.4)
    assert current[0, 0].item() == pytest.approx(1.4) and current[0, 1].item() == pytest.approx(
        1.216298, abs=1e-5
    )
    assert rollout[0, 2].item() == 0.0 and current[0, 2].item() == 0.0  # padding weighs 0 (w * 0: exact)
    rev = TokenRegulatedWeighting(reverse=True).weight_of_prob(torch.tensor([0.9, 0.1]))
    assert rev[0].item() == pytest.approx(1.0) and rev[1].item() == pytest.approx(1.4)


def test_tr_grpo_rejects_inverted_bounds_naming_the_keys():
    with pytest.raises(ValueError, match="lower.*upper"):
        TokenRegulatedWeighting(lower=1.5, upper=1.0)


def test_advantage_reweighting_by_hand():
    old = torch.log(torch.tensor([[0.5, 1.0, 0.1]]))
    w = AdvantageReweighting(alpha=0.3).weights(old, old, torch.tensor([-1.0]), torch.ones(1, 3))
    # 0.3 * p + 0.7
    assert torch.allclose(w, torch.tensor([[0.85, 1.0, 0.73]]))


def test_lopti_splits_low_probability_tokens_first():
    old = torch.log(torch.tensor([[0.1, 0.6, 0.49, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    low, high = LoptiWeighting(eta=0.5).passes(old, mask, None)  # 0/1 masks, far from the threshold: exact
    assert low.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert high.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    first, second = LoptiWeighting(eta=0.5, low_first=False).passes(old, mask, None)
    assert torch.equal(first, high) and torch.equal(second, low)


def test_high_entropy_tokens_keeps_top_fraction():
    entropy = torch.arange(1, 11, dtype=torch.float32).view(1, 10)  # 1..10
    (keep,) = HighEntropyWeighting(q=0.2).passes(torch.zeros(1, 10), torch.ones(1, 10), entropy)
    assert keep.tolist() == [[0.0] * 8 + [1.0, 1.0]]


@pytest.mark.parametrize(
    "strategy",
    [
        UniformWeighting(),
        TokenRegulatedWeighting(),
        AdvantageReweighting(),
        LoptiWeighting(ar_alpha=0.1),
        HighEntropyWeighting(),
    ],
)
def test_weights_are_nonnegative_detached_and_zero_on_padding(strategy):
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 6, 9), -1)[..., 0].requires_grad_()
    mask = (torch.rand(4, 6) > 0.3).float()
    w = strategy.weights(logp, logp.detach(), torch.randn(4), mask)
    assert w.shape == (4, 6) and not w.requires_grad
    assert torch.all(w >= 0) and torch.all(w[mask == 0] == 0)  # weights times a 0 mask: exact


def _plain_grpo_loss(logits, ids, old_logp, adv, mask, clip):
    """Reference GRPO (token mean), written the naive way."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    obj = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    return -(obj * mask).sum() / mask.sum()


def test_uniform_weighting_reproduces_plain_grpo_loss_and_gradient():
    torch.manual_seed(1)
    logits = torch.randn(4, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (4, 5))
    old = torch.log_softmax(torch.randn(4, 5, 11), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    adv, mask = torch.tensor([1.0, -0.5, 0.3, -1.2]), (torch.rand(4, 5) > 0.2).float()
    ref = _plain_grpo_loss(logits, ids, old, adv, mask, 0.2)
    (g_ref,) = torch.autograd.grad(ref, logits)
    logp = selective_log_softmax(logits, ids)
    w = UniformWeighting().weights(logp.detach(), old, adv, mask)
    batch = UpdateBatch(torch.arange(4), adv, mask, mask, old, None)
    ours = GRPOLoss(LossConfig(), max_len=5)(
        batch, TokenScores(logp, None), w, num_tokens=mask.sum().item(), num_seqs=4
    )
    (g_ours,) = torch.autograd.grad(ours.loss, logits)
    assert torch.allclose(ours.loss, ref, atol=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
