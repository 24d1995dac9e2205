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
LossType = Literal["grpo", "cispo", "aspo"]
"""The per-token policy loss: PPO's clipped surrogate, CISPO or ASPO (``trgrpo.losses.OBJECTIVES``)."""
SamplerCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop"]
"""How the loss corrects for a sampler that is not the trainer (``trgrpo.losses.correct_for_sampler``)."""


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

    sampler_correction: SamplerCorrection | None = None
    """Correction against the sampler's log-probs (``vllm`` engine only), from the ratio pi_old / pi_sampler
    per token or, for sequence_*, its product over the completion: token_truncate / sequence_truncate weight
    the loss by the ratio clamped to [sampler_ratio_low, sampler_ratio_high]; token_mask / sequence_mask
    weight it by the ratio inside the bounds and by 0 outside (no gradient); icepop is the two-sided token
    mask with IcePop's bounds [0.5, 5] by default.  Empty = off (token_truncate with sampler_is_cap)."""
    sampler_ratio_low: float | None = None
    """Lower bound of the sampler ratio (empty = 0, or 0.5 for icepop)."""
    sampler_ratio_high: float | None = None
    """Upper bound of the sampler ratio (empty = 3.0, or 5.0 for icepop)."""

    ratio_level: RatioLevel = "token"
    """Importance ratio per token (PPO / GRPO) or per sequence (GSPO: exp of the mean token log-ratio, the
    same for every token of a completion; use with seq_mean_token_mean and clip ranges near 3e-4 / 4e-4)."""

    loss_type: LossType = "grpo"
    """grpo: PPO's clipped surrogate (clip_low, clip_high, dual_clip).  cispo (MiniMax-M1, arXiv 2506.13585):
    -sg(min(r, cispo_cap)) * A * log pi_theta, every token's gradient kept.  aspo (arXiv 2510.06062): flipped
    ratio for A > 0, entropy-dependent clip ranges and a soft dual clip (the aspo_* keys).  cispo and aspo
    ignore clip_low, clip_high and dual_clip; both equal grpo in gradient at ratio 1 (the first update of a
    rollout), so they differ only with several updates per rollout (configs/optim/four_minibatches.yaml)."""
    cispo_cap: float = 5.0
    """CISPO's eps_max: the importance weight is min(r, cispo_cap), detached.  5.0 is the value TRL recommends
    for its loss_type="cispo" (its epsilon_high, ScaleRL's eps_max, arXiv 2510.13786); TRL is not a
    dependency, so its fallback (epsilon_high = epsilon = 0.2, which would scale every gradient by <= 0.2) is
    not copied."""
    aspo_entropy_quantile: float = 0.8
    """ASPO: a token whose entropy is above this quantile of its response's token entropies gets the wide clip
    range (aspo_clip_high_entropy), the others the narrow one (aspo_clip_low_entropy)."""
    aspo_clip_low_entropy: float = 0.2
    """ASPO clip range eps of tokens at or below the entropy quantile: ratio kept within 1 - eps (A < 0) and
    1 + eps (A > 0)."""
    aspo_clip_high_entropy: float = 0.4
    """ASPO clip range eps of tokens above the entropy quantile."""
    aspo_dual_clip: float = 3.0
    """ASPO's soft dual clip c > 1: where r > c (A < 0) or r < 1 / c (A > 0) the loss is -A * c * log pi_theta
    (weight c detached): a gradient capped at c * |A| instead of none."""

    def __post_init__(self) -> None:
        if self.ratio_level not in get_args(RatioLevel):
            levels = " or ".join(map(repr, get_args(RatioLevel)))
            raise ValueError(f"model.loss.ratio_level must be {levels}, got {self.ratio_level!r}")
        self.check_loss_type()
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
        self.check_sampler_correction()
        for key, choices in (
            ("aggregation", Aggregation),
            ("kl_estimator", KLEstimator),
            ("advantage_scale", AdvantageScale),
        ):
            value = getattr(self, key)
            if value not in get_args(choices):
                names = ", ".join(get_args(choices))
                raise ValueError(f"model.loss.{key} must be one of {names}; got {value!r}")

    @property
    def correction_mode(self) -> SamplerCorrection | None:
        """The correction in force: ``sampler_correction``, or token_truncate from ``sampler_is_cap``."""
        if self.sampler_correction is None and self.sampler_is_cap is not None:
            return "token_truncate"
        return self.sampler_correction

    @property
    def sampler_bounds(self) -> tuple[float, float]:
        """(low, high) of the sampler ratio, the empty bounds filled with the mode's defaults."""
        if self.sampler_correction is None and self.sampler_is_cap is not None:
            return 0.0, self.sampler_is_cap
        low, high = (0.5, 5.0) if self.sampler_correction == "icepop" else (0.0, 3.0)
        return (
            low if self.sampler_ratio_low is None else self.sampler_ratio_low,
            high if self.sampler_ratio_high is None else self.sampler_ratio_high,
        )

    def check_sampler_correction(self) -> None:
        """The correction mode is known, its bounds are in order, and it is set one way only."""
        mode = self.sampler_correction
        if mode is not None and mode not in get_args(SamplerCorrection):
            names = ", ".join(get_args(SamplerCorrection))
            raise ValueError(f"model.loss.sampler_correction must be one of {names} (or empty); got {mode!r}")
        if mode is not None and self.sampler_is_cap is not None:
            raise ValueError(
                "model.loss.sampler_is_cap and model.loss.sampler_correction are two ways to set one"
                " correction: give sampler_correction: token_truncate and sampler_ratio_high, not the cap"
            )
        given = [k for k in ("sampler_ratio_low", "sampler_ratio_high") if getattr(self, k) is not None]
        if mode is None and given:
            raise ValueError(f"model.loss.{given[0]} bounds a correction: set model.loss.sampler_correction")
        low, high = self.sampler_bounds
        if low < 0:
            raise ValueError(f"model.loss.sampler_ratio_low must be >= 0, got {low}")
        if not low < high:
            raise ValueError(
                f"model.loss.sampler_ratio_low ({low}) must be below model.loss.sampler_ratio_high ({high})"
            )

    def check_loss_type(self) -> None:
        """The loss type is known and its constants are in range (naming the key)."""
        if self.loss_type not in get_args(LossType):
            names = ", ".join(get_args(LossType))
            raise ValueError(f"model.loss.loss_type must be one of {names}; got {self.loss_type!r}")
        if self.cispo_cap <= 0:
            raise ValueError(f"model.loss.cispo_cap must be > 0, got {self.cispo_cap}")
        if not 0 < self.aspo_entropy_quantile < 1:
            raise ValueError(
                f"model.loss.aspo_entropy_quantile must be in (0, 1), got {self.aspo_entropy_quantile}"
            )
        for key in ("aspo_clip_low_entropy", "aspo_clip_high_entropy"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"model.loss.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.aspo_dual_clip <= 1:
            raise ValueError(f"model.loss.aspo_dual_clip must be > 1, got {self.aspo_dual_clip}")


def check_sampler_engine(loss: LossConfig, engine: str) -> None:
    """A sampler correction needs an engine that reports its log-probs (``vllm``); ``fast`` and ``hf``
    sample from the trainer itself and report none.  ``sampler_is_cap`` alone stays a no-op there."""
    if loss.sampler_correction is not None and engine != "vllm":
        raise ValueError(
            f"model.loss.sampler_correction={loss.sampler_correction} needs the sampler's log-probs, which "
            f"model.sampling.engine={engine} does not report (only vllm does): set the engine to vllm or "
            "leave model.loss.sampler_correction empty"
        )


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
    max_logits_mib: float | None = 256.0
    """The largest float32 logits tensor (MiB) one scoring forward may build.  Above it (a large vocabulary
    times many completion tokens) the model hands back hidden states and the LM head runs a chunk of rows at
    a time (a chunk's logits a quarter of the budget), recomputed in backward: the logits never exist whole,
    for about one more head matmul per token.
    Plain-head model types only (Llama, Qwen2/3, Mistral, ...), not under ZeRO-3; empty: always whole."""

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
        if self.max_logits_mib is not None and not self.max_logits_mib > 0:
            raise ValueError(f"model.optim.max_logits_mib must be > 0 (or empty), got {self.max_logits_mib}")


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
