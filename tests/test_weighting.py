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
    EntropyShapedWeighting,
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


def _random_batch():
    """4 sequences x 5 tokens over 11 logits (differentiable), sampled ids, old log-probs, advantages, a mask;
    from torch's current random state."""
    logits = torch.randn(4, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (4, 5))
    old = torch.log_softmax(torch.randn(4, 5, 11), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    adv, mask = torch.tensor([1.0, -0.5, 0.3, -1.2]), (torch.rand(4, 5) > 0.2).float()
    return logits, ids, old, adv, mask


def test_uniform_weighting_reproduces_plain_grpo_loss_and_gradient():
    torch.manual_seed(1)
    logits, ids, old, adv, mask = _random_batch()
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


# two sequences; trained entropies 0.5, 1.5, 1.0 | 2.0, 0.0 (the 9.0s are padding): mean H = 5 / 5 = 1.0
_ENTROPY = torch.tensor([[0.5, 1.5, 1.0, 9.0], [2.0, 0.0, 9.0, 9.0]])
_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def _entropy_shaped(weighting: EntropyShapedWeighting, adv: torch.Tensor) -> torch.Tensor:
    assert weighting.passes(torch.zeros(2, 4), _MASK, _ENTROPY) == [_MASK]  # one pass; records mean H
    return weighting.token_weights(torch.zeros(2, 4), torch.zeros(2, 4), adv, _MASK, _ENTROPY)


def test_entropy_shaped_advantages_by_hand():
    adv = torch.tensor([1.0, -1.0])
    # beta 0.5: 1 + 0.5 * (H / 1.0 - 1) = 0.75, 1.25, 1.0 | 1.5, 0.5; padding 0
    half = _entropy_shaped(EntropyShapedWeighting(beta=0.5), adv)
    assert torch.allclose(half, torch.tensor([[0.75, 1.25, 1.0, 0.0], [1.5, 0.5, 0.0, 0.0]]))
    # beta 2: 1 + 2 * (H - 1) = 0, 2, 1 | 3, -1 -> clamped at 0 (the weight scales A only while >= 0)
    two = _entropy_shaped(EntropyShapedWeighting(beta=2.0), adv)
    assert torch.allclose(two, torch.tensor([[0.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    # negative advantages only: the first sequence (A = +1) keeps weight 1
    neg = _entropy_shaped(EntropyShapedWeighting(beta=0.5, negative_only=True), adv)
    assert torch.allclose(neg, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.5, 0.5, 0.0, 0.0]]))
    # beta 0 is plain GRPO; the mean weight over the trained tokens is 1 (while nothing is clamped)
    assert torch.equal(_entropy_shaped(EntropyShapedWeighting(beta=0.0), adv), _MASK)
    assert half.sum().item() == pytest.approx(_MASK.sum().item())


def test_entropy_shaped_mean_is_the_batchs_not_the_micro_batchs():
    # trained entropies 0.5, 1.5, 1.0 | 3.0, 1.0: the batch's mean H = 7 / 5 = 1.4, the second row's alone 2.0
    entropy = torch.tensor([[0.5, 1.5, 1.0, 9.0], [3.0, 1.0, 9.0, 9.0]])
    zeros, adv = torch.zeros(1, 4), torch.tensor([-1.0])
    shaped = EntropyShapedWeighting(beta=0.5)
    shaped.passes(torch.zeros(2, 4), _MASK, entropy)  # the whole rollout batch
    second = shaped.token_weights(zeros, zeros, adv, _MASK[1:], entropy[1:])  # one micro-batch of it
    # 1 + 0.5 * (3 / 1.4 - 1) = 1.5714, 1 + 0.5 * (1 / 1.4 - 1) = 0.8571 (the row alone: 1.25, 0.75)
    expected = [[1.0 + 0.5 * (3 / 1.4 - 1), 1.0 + 0.5 * (1 / 1.4 - 1), 0.0, 0.0]]
    assert torch.allclose(second, torch.tensor(expected))


def test_entropy_shaped_loss_is_grpo_with_per_token_advantages():
    """Against a direct implementation: GRPO with A_t = A * (1 + beta * (H_t / mean H - 1)), value, grad."""
    torch.manual_seed(3)
    logits, ids, old, adv, mask = _random_batch()
    entropy = torch.rand(4, 5) * 2.0
    logp = selective_log_softmax(logits, ids)
    ratio = torch.exp(logp - old).detach()
    assert ((ratio > 1.2) & (adv.unsqueeze(1) > 0) & (mask > 0)).any()  # the clip binds in this draw
    assert ((ratio < 0.8) & (adv.unsqueeze(1) < 0) & (mask > 0)).any()
    beta = 0.7
    mean_h = (entropy * mask).sum() / mask.sum()
    adv_t = adv.unsqueeze(1) * (1 + beta * (entropy / mean_h - 1))  # [4, 5]
    r = torch.exp(logp - old)
    obj = torch.minimum(r * adv_t, torch.clamp(r, 0.8, 1.2) * adv_t)
    ref = -(obj * mask).sum() / mask.sum()
    (g_ref,) = torch.autograd.grad(ref, logits, retain_graph=True)
    shaped = EntropyShapedWeighting(beta=beta)
    shaped.passes(old, mask, entropy)
    w = shaped.token_weights(logp.detach(), old, adv, mask, entropy)
    assert torch.all(w >= 0)  # beta < 1: nothing clamped, the weight scales A exactly
    batch = UpdateBatch(torch.arange(4), adv, mask, mask, old, None)
    ours = GRPOLoss(LossConfig(), max_len=5)(
        batch, TokenScores(logp, None), w, num_tokens=mask.sum().item(), num_seqs=4
    )
    (g_ours,) = torch.autograd.grad(ours.loss, logits)
    assert torch.allclose(ours.loss, ref, atol=1e-6)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_entropy_shaped_needs_the_rollout_entropy():
    shaped = EntropyShapedWeighting()
    assert shaped.needs_entropy  # the plan scores the rollout entropies before the update
    with pytest.raises(ValueError, match="needs rollout entropies"):
        shaped.passes(torch.zeros(1, 2), torch.ones(1, 2), None)


def _first_grads(tmp_path, *extra):
    from helpers import DENSE_REWARD, GradRecorder, arithmetic_args, run_cli

    cli = run_cli(
        tmp_path,
        "--seed_everything=3",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--model.sampling.temperature=1.5",
        *arithmetic_args(4, 4, 4),
        DENSE_REWARD,
        "--trainer.callbacks+=helpers.GradRecorder",
        *extra,
    )
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, GradRecorder)]
    return recorder.grads, cli.model.last_stats


def test_entropy_shaped_training_step_is_the_same_however_the_batch_is_split(tmp_path):
    """End to end: the rollout entropies reach the weights, and their mean is the batch's, not the
    micro-batch's (a per-micro-batch mean would change the gradient when the batch is split)."""
    shaped = ("--model.weighting=EntropyShapedWeighting", "--model.weighting.init_args.beta=0.9")
    whole, stats = _first_grads(tmp_path / "a", *shaped)
    split, _ = _first_grads(tmp_path / "b", *shaped, "--model.optim.micro_batch_size=4")
    uniform, _ = _first_grads(tmp_path / "c")
    assert stats.weight_min < 1.0 < stats.weight_max  # the weights vary with the entropy
    for k in whole:
        scale = whole[k].abs().max().item()
        torch.testing.assert_close(split[k], whole[k], rtol=1e-5, atol=1e-5 * scale, msg=k)
    assert any(not torch.allclose(whole[k], uniform[k]) for k in whole)
