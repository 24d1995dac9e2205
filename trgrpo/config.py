"""Option groups of the RL step (plain dataclasses; every field documented, shown by ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from trgrpo.advantages import AdvantageScale

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_sum_const"]
"""How per-token losses become one number (``trgrpo.losses.token_normaliser``)."""
KLEstimator = Literal["k1", "k2", "k3"]
"""Schulman's estimators of KL(pi_theta || pi_ref) (``trgrpo.losses.kl_penalty``)."""
Placement = Literal["surrogate", "ratio"]
"""Where a token weight enters the loss (``trgrpo.losses``, ``trgrpo.weighting``)."""
RatioLevel = Literal["token", "sequence"]
"""Token ratios (PPO / GRPO) or GSPO's sequence ratio."""


@dataclass
class LossConfig:
    """The clipped surrogate, its regularisers and its aggregation."""

    clip_low: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip range: the ratio is clipped at 1 + clip_high (clip-higher when > clip_low)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens at c * |A| (empty = off)."""
    beta: float = 0.0
    """KL coefficient against a frozen reference model; 0 loads no reference model at all."""
    kl_estimator: KLEstimator = "k3"
    """KL estimator: k1, k2 or k3."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 = off)."""
    aggregation: Aggregation = "token_mean"
    """token_mean (DAPO), seq_mean_token_mean (original GRPO) or seq_sum_const (Dr. GRPO)."""
    advantage_scale: AdvantageScale = "group"
    """Divide centred rewards by the group std (group), the batch std (batch) or nothing (none = Dr. GRPO)."""
    advantage_eps: float = 1e-4
    """Added to the std so equal-reward groups get exactly zero advantage."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens out of the loss."""
    sampler_is_cap: float | None = None
    """Truncated importance sampling against the sampler (engines that report their log-probs, ``vllm``):
    each token's loss is weighted by min(pi_old / pi_sampler, cap), pi_old the trainer's probability before
    the update; empty = off (``fast`` and ``hf`` sample from the trainer's own distribution)."""

    ratio_level: RatioLevel = "token"
    """Importance ratio per token (PPO / GRPO) or per sequence (GSPO: exp of the mean token log-ratio, the
    same for every token of a completion; use with seq_mean_token_mean and clip ranges near 3e-4 / 4e-4)."""

    def __post_init__(self) -> None:
        if self.ratio_level not in get_args(RatioLevel):
            levels = " or ".join(map(repr, get_args(RatioLevel)))
            raise ValueError(f"model.loss.ratio_level must be {levels}, got {self.ratio_level!r}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(
                f"model.loss.clip_low / clip_high must be >= 0, got {self.clip_low} / {self.clip_high}"
            )
        if self.clip_low >= 1:
            raise ValueError(f"model.loss.clip_low must be < 1, got {self.clip_low}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"model.loss.dual_clip must be > 1 (or empty), got {self.dual_clip}")
        if self.beta < 0:
            raise ValueError(f"model.loss.beta must be >= 0, got {self.beta}")
        if self.sampler_is_cap is not None and self.sampler_is_cap <= 0:
            raise ValueError(f"model.loss.sampler_is_cap must be > 0 (or empty), got {self.sampler_is_cap}")
        for key, choices in (
            ("aggregation", Aggregation),
            ("kl_estimator", KLEstimator),
            ("advantage_scale", AdvantageScale),
        ):
            value = getattr(self, key)
            if value not in get_args(choices):
                names = ", ".join(get_args(choices))
                raise ValueError(f"model.loss.{key} must be one of {names}; got {value!r}")


@dataclass
class OptimConfig:
    """Optimiser, schedule and how the rollout batch is cut into updates."""

    lr: float = 1e-6
    """AdamW learning rate after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Optimiser steps of linear learning-rate warm-up, then constant."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (empty = no clipping; the norm is still logged)."""
    epochs: int = 1
    """mu: optimisation epochs over each rollout batch."""
    mini_batch_size: int | None = None
    """Sequences per optimiser step, per process (empty = the whole rollout batch: one step per epoch)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward, per process (empty = the mini-batch); only changes memory use."""
    skip_zero_advantage: bool = True
    """Skip the forward/backward of sequences whose advantage is exactly 0 (groups with equal rewards)
    when nothing else needs them (loss.beta = 0, loss.entropy_coef = 0, one process): their gradient is
    exactly zero and the normalisers still count them, so the update is the same, only faster. Per-token
    metrics (entropy, weights, clip ratios) then cover the trained sequences."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"model.optim.lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"model.optim.epochs must be >= 1, got {self.epochs}")
        if self.warmup_steps < 0:
            raise ValueError(f"model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        for key in ("mini_batch_size", "micro_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.optim.{key} must be >= 1 (or empty), got {value}")


def check_batch_layout(prompts_per_step: int, group_size: int, optim: OptimConfig) -> tuple[int, int]:
    """Validate that the rollout batch splits into whole groups; returns (mini, micro) in sequences."""
    n = prompts_per_step * group_size
    mini = optim.mini_batch_size or n
    micro = optim.micro_batch_size or mini
    if mini % group_size or n % mini:
        raise ValueError(
            f"model.optim.mini_batch_size={mini} must be a multiple of "
            f"model.sampling.group_size={group_size} and divide the rollout batch "
            f"data.batch_size * group_size = {n} into whole groups"
        )
    if micro % group_size or mini % micro:
        raise ValueError(
            f"model.optim.micro_batch_size={micro} must be a multiple of "
            f"model.sampling.group_size={group_size} and divide the mini-batch of {mini} sequences"
        )
    return mini, micro
