"""Token-level GRPO losses: the clipped surrogate, KL estimators and loss aggregation.

``GRPOLoss`` is the one entry: configured once from ``LossConfig``, the weighting's placement and the
generation budget, and called with one micro-batch (``UpdateBatch``), the policy's ``TokenScores`` and the
token weights.  It composes the small pure functions below, in order:

    ratio (token or sequence) -> per-token loss of the loss type, weights in their place
        -> sampler correction -> KL -> entropy bonus -> aggregate

and returns the loss with what went into it (``PolicyLossOutput``: ratio, weights, clip masks, correction,
normaliser), from which ``trgrpo.diagnostics`` derives each token's gradient and ``trgrpo.stats`` its counts.

Conventions (shapes in trailing comments):
    B = sequences in the (micro-)batch, T = completion length (padded),
    ``mask`` is the response mask (1 on real completion tokens, 0 on padding).

The PPO clipped surrogate with clip-higher (DAPO) and dual-clip (Ye et al., 2020):

    obj_t = min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)
    obj_t = max(obj_t, dual_clip * A)          only where A < 0 and dual_clip is set
    loss_t = -obj_t

Token weights (see ``trgrpo.weighting``) enter in one of two places:
    placement="surrogate": loss_t <- w_t * loss_t            (w detached; equivalent to scaling A)
    placement="ratio":     r_t    <- w_t * r_t inside both the min and the clip

Other loss types (``LossConfig.loss_type``, table ``OBJECTIVES``) replace the clipped surrogate: CISPO
(MiniMax-M1, arXiv 2506.13585), -sg(min(r, eps_max)) A log pi_theta, and ASPO (arXiv 2510.06062): PPO's clip
for A < 0, the flipped ratio for A > 0, entropy-dependent clip ranges and a soft dual clip (formulas at
``cispo_surrogate``, ``aspo_surrogate``).  At r = 1 both have GRPO's gradient, ASPO its value too.

Sequence-level ratios (GSPO, Zheng et al., 2025, arXiv 2507.18071): with ``ratio_level="sequence"`` every
token of sequence i uses s_i = exp(mean_t(log pi_theta - log pi_old)) over its response tokens, in the
token form whose value is s_i and whose gradient is s_i * grad log pi_theta(y_t); with
``seq_mean_token_mean`` aggregation this is GSPO's objective (GSPO clips s_i with ranges near 3e-4 / 4e-4).

Truncated importance sampling (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy
RL training"): when the rollout engine's probabilities pi_sampler differ from the trainer's (vLLM kernels,
precision), each token's loss is multiplied by the detached weight min(pi_old / pi_sampler, C), pi_old the
trainer's probability of the sampled token before the update.  ``correct_for_sampler`` has the other modes
(``LossConfig.sampler_correction``), each bounding rho = pi_old / pi_sampler to [low, high]:

    token_truncate     w_t = clamp(rho_t, low, high)
    token_mask         w_t = rho_t if low <= rho_t <= high else 0
    sequence_truncate  w_t = clamp(R_i, low, high),  R_i = prod_t rho_t = exp(sum_t log rho_t) of sequence i
    sequence_mask      w_t = R_i if low <= R_i <= high else 0
    icepop             the two-sided token mask, bounds [0.5, 5] by default (IcePop, Ring-1T, 2025)

Token weights of the weighting strategies
stay computed from the trainer's probabilities.  ``sampler_kl`` measures the mismatch with the k3 estimator
of KL(pi_sampler || pi_old) on the sampled tokens.

Normalisation never uses the local micro-batch size: callers pass the token and sequence counts of the
whole optimisation batch (all micro-batches, all ranks), so splitting a batch differently gives the same
loss and gradient.  Pure tensor code, no Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from trgrpo.config import (
    Aggregation,
    KLEstimator,
    LossConfig,
    LossType,
    Placement,
    RatioLevel,
    SamplerCorrection,
)

if TYPE_CHECKING:
    from trgrpo.scoring import TokenScores
    from trgrpo.update import UpdateBatch


class SurrogateOutput(NamedTuple):
    loss: Tensor  # [B, T] per-token loss (unmasked)
    clipped_low: Tensor  # [B, T] bool: A < 0 and ratio below 1 - clip_low (no gradient)
    clipped_high: Tensor  # [B, T] bool: A > 0 and ratio above 1 + clip_high (no gradient)
    dual_clipped: Tensor  # [B, T] bool: A < 0 and ratio above dual_clip (no gradient; all False without it)
    # [B, T] |d loss_t / d log r_t| (detached) where it is not |A r| on the unclipped tokens: CISPO, ASPO
    grad: Tensor | None = None


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None = None
) -> SurrogateOutput:
    """Per-token PPO loss ``-min(r A, clip(r) A)``, with the optional dual clip for A < 0.

    Args:
        ratio: [B, T] importance ratio pi_theta / pi_old (already weighted for placement="ratio").
        advantages: [B, T] or broadcastable ([B, 1]).
    """
    advantages = advantages.expand_as(ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    clipped_low = (ratio < 1.0 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1.0 + clip_high) & (advantages > 0)
    dual = (ratio > dual_clip) & (advantages < 0) if dual_clip is not None else torch.zeros_like(clipped_low)
    return SurrogateOutput(-objective, clipped_low, clipped_high, dual)


def cispo_surrogate(ratio: Tensor, advantages: Tensor, logp: Tensor, cap: float) -> SurrogateOutput:
    """Per-token CISPO loss ``-sg(min(r, cap)) * A * log pi_theta``: the weight is capped, never the gradient.

    ``ratio`` [B, T] (weighted for placement="ratio") gives only its value; ``logp`` [B, T] carries the
    gradient; ``cap`` is eps_max.  ``clipped_high`` marks the weights the cap truncated (gradient kept).
    """
    advantages = advantages.expand_as(ratio)
    weight = ratio.detach().clamp(max=cap)  # [B, T]
    truncated = (ratio.detach() > cap) & (advantages != 0)
    none = torch.zeros_like(truncated)
    return SurrogateOutput(-weight * advantages * logp, none, truncated, none, weight * advantages.abs())


def aspo_surrogate(
    ratio: Tensor, advantages: Tensor, logp: Tensor, clip: Tensor, dual_clip: float
) -> SurrogateOutput:
    """Per-token ASPO loss: PPO's for A < 0, the flipped ratio for A > 0, a soft dual clip for both.

    With eps_t the token's clip range and c the dual clip:
        A < 0:  loss = -A * max(r, 1 - eps_t)           gradient |A| r, none below 1 - eps_t
                loss = -A * c * log pi_theta  where r > c      (weight c detached: gradient c |A|)
        A > 0:  loss = -A / min(r, 1 + eps_t)          value; gradient A / r (= A pi_old / pi_theta), none
                                                        above 1 + eps_t
                loss = -A * c * log pi_theta  where r < 1 / c  (gradient c A)
    At r = 1 value and gradient are GRPO's.  ``ratio``, ``logp`` (the soft dual clip's term) and ``clip``
    (eps_t, :func:`entropy_clip_ranges`) are [B, T], ``advantages`` broadcastable ([B, 1]), ``dual_clip`` c.
    """
    advantages = advantages.expand_as(ratio)
    r = ratio.detach()
    low = torch.maximum(ratio, 1.0 - clip)  # [B, T]
    high = torch.minimum(ratio, 1.0 + clip)  # [B, T]
    # value 1 / high, gradient 1 / r; high < 1 / c takes the dual branch, so its floor changes nothing
    denom = high.detach().clamp(min=1.0 / dual_clip)
    flipped = high / denom / denom
    soft = dual_clip * logp  # [B, T]
    neg_dual = (advantages < 0) & (r > dual_clip)
    pos_dual = (advantages >= 0) & (r < 1.0 / dual_clip)
    neg = torch.where(neg_dual, soft, low)
    pos = torch.where(pos_dual, soft, flipped)
    loss = -advantages * torch.where(advantages < 0, neg, pos)
    flows = torch.where(advantages < 0, r >= 1.0 - clip, r <= 1.0 + clip)  # [B, T] no clip binds
    grad = torch.where(advantages < 0, r, 1.0 / r) * flows  # [B, T] per unit |A|
    grad = torch.where(neg_dual | pos_dual, dual_clip, grad) * advantages.abs()
    clipped_low = (advantages < 0) & (r < 1.0 - clip)
    clipped_high = (advantages > 0) & (r > 1.0 + clip)
    return SurrogateOutput(loss, clipped_low, clipped_high, (neg_dual | pos_dual) & (advantages != 0), grad)


def entropy_clip_ranges(entropy: Tensor, mask: Tensor, quantile: float, narrow: float, wide: float) -> Tensor:
    """[B, T] ASPO's clip range per token: ``wide`` above the ``quantile`` of its response's token entropies
    (response tokens only, linear interpolation), ``narrow`` at or below it.  ``entropy`` is detached."""
    masked = torch.where(mask.bool(), entropy.detach().float(), torch.nan)  # [B, T]
    q = torch.nanquantile(masked, quantile, dim=1, keepdim=True)  # [B, 1]
    return torch.where(masked > q, wide, narrow)


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, 2020).

    With log_ratio = ref_logp - logp:  k1 = -log_ratio,  k2 = log_ratio^2 / 2,
    k3 = exp(log_ratio) - log_ratio - 1 (unbiased, always >= 0).  [B, T] -> [B, T].
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # clamp keeps exp finite when the policy drifts far from the reference
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl estimator must be one of 'k1', 'k2', 'k3', got {estimator!r}")


def token_normaliser(
    mask: Tensor, mode: Aggregation, num_tokens: float, num_seqs: float, max_len: int
) -> Tensor:
    """[B, T] factor of each token in the aggregated loss: ``aggregate(x) == (x * mask * factor).sum()``.

    ``token_mean``: 1 / num_tokens; ``seq_mean_token_mean``: 1 / (length of the token's sequence * num_seqs);
    ``seq_sum_const``: 1 / (num_seqs * max_len).  See :func:`aggregate` for the arguments.
    """
    if mode == "token_mean":
        return torch.full_like(mask, 1.0 / max(num_tokens, 1.0), dtype=torch.float32)
    if mode == "seq_mean_token_mean":
        lengths = mask.float().sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
        return (1.0 / (lengths * max(num_seqs, 1.0))).expand_as(mask)
    if mode == "seq_sum_const":
        return torch.full_like(mask, 1.0 / max(num_seqs * max_len, 1.0), dtype=torch.float32)
    raise ValueError(
        f"aggregation must be one of 'token_mean', 'seq_mean_token_mean', 'seq_sum_const', got {mode!r}"
    )


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: Aggregation,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> Tensor:
    """Reduce a per-token loss to a scalar with batch-global normalisers.

    Args:
        per_token: [B, T] loss, already zero wherever a token must not contribute.
        mask: [B, T] response mask (used for per-sequence lengths in ``seq_mean_token_mean``).
        mode: ``token_mean`` (sum / all response tokens of the batch; DAPO),
            ``seq_mean_token_mean`` (mean over sequences of each sequence's token mean; original GRPO),
            ``seq_sum_const`` (sum / (num sequences * max_len); Dr. GRPO).
        num_tokens: response tokens in the whole optimisation batch (all micro-batches and ranks).
        num_seqs: sequences in the whole optimisation batch.
        max_len: the constant length of ``seq_sum_const`` (the generation budget).
    """
    return (per_token * mask * token_normaliser(mask, mode, num_tokens, num_seqs, max_len)).sum()


def token_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """[B, T] PPO / GRPO ratio pi_theta / pi_old per token (``mask`` unused: every ratio step takes it)."""
    return torch.exp(logp - old_logp)


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """[B, T] GSPO token-form ratio: value exp(mean log-ratio of the sequence), gradient value * grad logp."""
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
    log_s = ((logp - old_logp).detach() * mask).sum(dim=1, keepdim=True) / lengths  # [B, 1]
    return torch.exp(log_s + logp - logp.detach())


def sampler_correction(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """[B, T] truncated importance weights ``min(exp(old_logp - sampler_logp), cap)`` (detached)."""
    return torch.exp((old_logp - sampler_logp).detach()).clamp(max=cap)


class SamplerCorrectionOutput(NamedTuple):
    weight: Tensor  # [B, T] detached weight of each token's loss
    corrected: Tensor  # [B, T] bool: the ratio (the token's, or its sequence's) left [low, high]


def token_sampler_log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """[B, T] log(pi_old / pi_sampler) of each token (detached; ``mask`` unused)."""
    return (old_logp - sampler_logp).detach()


def sequence_sampler_log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """[B, T] log of the sequence ratio prod_t pi_old / pi_sampler over its response tokens, on every token
    (summed in log space: the product of hundreds of ratios under- or overflows)."""
    log_ratio = ((old_logp - sampler_logp).detach() * mask).sum(dim=1, keepdim=True)  # [B, 1]
    return log_ratio.expand_as(old_logp)


def truncate_ratio(log_ratio: Tensor, low: float, high: float) -> SamplerCorrectionOutput:
    """Weight ``clamp(ratio, low, high)``: the ratio truncated to the bounds (TIS when low = 0)."""
    ratio = torch.exp(log_ratio)  # [B, T]
    return SamplerCorrectionOutput(ratio.clamp(low, high), (ratio < low) | (ratio > high))


def mask_ratio(log_ratio: Tensor, low: float, high: float) -> SamplerCorrectionOutput:
    """Weight ``ratio`` inside [low, high] and 0 outside: a token out of bounds gets no gradient."""
    ratio = torch.exp(log_ratio)  # [B, T]
    outside = (ratio < low) | (ratio > high)
    return SamplerCorrectionOutput(torch.where(outside, torch.zeros_like(ratio), ratio), outside)


# each correction mode: the ratio it bounds (token or sequence) and what it does out of bounds; IcePop is the
# two-sided token mask (it differs from token_mask only in its default bounds, ``LossConfig.sampler_bounds``)
CORRECTIONS: dict[SamplerCorrection, tuple[Callable[[Tensor, Tensor, Tensor], Tensor], Callable]] = {
    "token_truncate": (token_sampler_log_ratio, truncate_ratio),
    "token_mask": (token_sampler_log_ratio, mask_ratio),
    "sequence_truncate": (sequence_sampler_log_ratio, truncate_ratio),
    "sequence_mask": (sequence_sampler_log_ratio, mask_ratio),
    "icepop": (token_sampler_log_ratio, mask_ratio),
}


def correct_for_sampler(
    old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: SamplerCorrection, low: float, high: float
) -> SamplerCorrectionOutput:
    """[B, T] detached correction weights of ``mode`` and the tokens it truncated or masked."""
    log_ratio, bound = CORRECTIONS[mode]
    return bound(log_ratio(old_logp, sampler_logp, mask), low, high)


def sampler_kl(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """Scalar sum over ``mask`` of the k3 estimate of KL(pi_sampler || pi_trainer) on the sampler's tokens."""
    return (kl_penalty(sampler_logp, old_logp.detach(), "k3") * mask).sum()


def old_logprobs(batch: UpdateBatch, scores: TokenScores) -> Tensor:
    """[b, T] log-probs of the policy before the update: the batch's, or (a single pass, no separate forward)
    the current ones detached, so that the ratio is exactly 1."""
    return batch.old_logp if batch.old_logp is not None else scores.logp.detach()


Surrogate = Callable[[Tensor, Tensor], SurrogateOutput]
"""(ratio [B, T], advantages [B, 1]) -> per-token loss and clip masks."""


def weights_on_surrogate(
    surrogate: Surrogate, ratio: Tensor, adv: Tensor, weights: Tensor
) -> SurrogateOutput:
    """placement="surrogate": ``loss_t <- w_t * loss_t``; the clip sees the plain ratio."""
    out = surrogate(ratio, adv)  # [B, T]
    return out._replace(loss=weights * out.loss, grad=None if out.grad is None else weights * out.grad)


def weights_in_ratio(surrogate: Surrogate, ratio: Tensor, adv: Tensor, weights: Tensor) -> SurrogateOutput:
    """placement="ratio": ``r_t <- w_t * r_t`` inside both the min and the clip."""
    return surrogate(weights * ratio, adv)  # [B, T]


# the closed choices of the loss, each mapped to its step: a new choice is one function and one entry here
RATIOS: dict[RatioLevel, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_ratio,
    "sequence": sequence_ratio,
}
PLACEMENTS: dict[Placement, Callable[[Surrogate, Tensor, Tensor, Tensor], SurrogateOutput]] = {
    "surrogate": weights_on_surrogate,
    "ratio": weights_in_ratio,
}


def grpo_objective(config: LossConfig, scores: TokenScores, mask: Tensor) -> Surrogate:
    """PPO's clipped surrogate with clip-higher and the optional dual clip."""
    return partial(
        clipped_surrogate, clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip
    )


def cispo_objective(config: LossConfig, scores: TokenScores, mask: Tensor) -> Surrogate:
    """CISPO with the cap ``cispo_cap`` on this micro-batch's log-probs."""
    return partial(cispo_surrogate, logp=scores.logp, cap=config.cispo_cap)


def aspo_objective(config: LossConfig, scores: TokenScores, mask: Tensor) -> Surrogate:
    """ASPO with clip ranges from this micro-batch's token entropies (the current policy's, detached)."""
    if scores.entropy is None:
        raise ValueError("model.loss.loss_type=aspo needs the token entropy of every micro-batch")
    c = config
    clip = entropy_clip_ranges(
        scores.entropy, mask, c.aspo_entropy_quantile, c.aspo_clip_low_entropy, c.aspo_clip_high_entropy
    )
    return partial(aspo_surrogate, logp=scores.logp, clip=clip, dual_clip=config.aspo_dual_clip)


OBJECTIVES: dict[LossType, Callable[[LossConfig, TokenScores, Tensor], Surrogate]] = {
    "grpo": grpo_objective,
    "cispo": cispo_objective,
    "aspo": aspo_objective,
}


class PolicyLossOutput(NamedTuple):
    """The loss of one micro-batch and what went into it (per-token tensors detached)."""

    loss: Tensor  # scalar, normalised by the batch-global counts
    kl: Tensor  # scalar: sum of per-token KL over response tokens (0 when beta == 0)
    sampler_kl: Tensor | None  # scalar: summed k3 KL(sampler || trainer) over response tokens, or None
    ratio: Tensor  # [B, T] importance ratio pi_theta / pi_old, before any weight
    weights: Tensor  # [B, T] token weights of the weighting strategy
    clipped_low: Tensor  # [B, T] bool: A < 0 and the (weighted) ratio below 1 - clip_low
    clipped_high: Tensor  # [B, T] bool: A > 0 and the (weighted) ratio above 1 + clip_high
    dual_clipped: Tensor  # [B, T] bool: A < 0 and the (weighted) ratio above dual_clip
    correction: Tensor | None  # [B, T] correction weights against the sampler, None when off
    normaliser: Tensor  # [B, T] factor of each token in the aggregated loss (``token_normaliser``)
    # [B, T] |d surrogate_t / d log pi_t| with the weights (before correction and aggregation) for CISPO and
    # ASPO; None for the clipped surrogate, whose gradient is |w A r| wherever no clip binds
    grad: Tensor | None = None
    corrected: Tensor | None = None  # [B, T] bool: truncated or masked by the sampler correction (None: off)


class GRPOLoss:
    """The token-weighted GRPO loss, configured once and called with one micro-batch.

    Args:
        config: the clip range, dual clip, KL, entropy bonus, aggregation, ratio level and sampler correction.
        placement: where the weighting's token weights enter (``TokenWeighting.placement``).
        weight_kl: multiply the KL term by the token weights too (``TokenWeighting.weight_kl``).
        max_len: the generation budget, the constant length of ``seq_sum_const``.

    A call composes the steps in order: ratio -> the loss type's per-token loss with the weights in their
    place -> sampler correction -> KL -> entropy bonus -> aggregate.  The ratio, the loss type and the
    placement are chosen here, once, from their ``Literal`` settings.
    """

    def __init__(
        self,
        config: LossConfig,
        placement: Placement = "surrogate",
        weight_kl: bool = False,
        max_len: int = 1,
    ) -> None:
        self.config = config
        self.placement = placement
        self.weight_kl = weight_kl
        self.max_len = max_len
        self.ratio = RATIOS[config.ratio_level]
        self.correction_mode = config.correction_mode  # None: no correction
        self.sampler_bounds = config.sampler_bounds  # (low, high) of the sampler ratio
        self.place_weights = PLACEMENTS[placement]
        self.objective = OBJECTIVES[config.loss_type]
        if config.loss_type == "aspo" and placement == "ratio":
            raise ValueError(
                "model.loss.loss_type=aspo flips the ratio of positive-advantage tokens, which would invert"
                " token weights placed in the ratio: use a weighting with placement surrogate"
            )

    def __call__(
        self,
        batch: UpdateBatch,
        scores: TokenScores,
        weights: Tensor,
        sampler_logp: Tensor | None = None,
        *,
        num_tokens: float,
        num_seqs: float,
    ) -> PolicyLossOutput:
        """The loss of ``batch`` from the policy's ``scores`` (``logp`` with grad), the [b, T] token weights
        and, when the engine reports them, the [b, T] sampler log-probs.  ``num_tokens`` / ``num_seqs`` are
        the response tokens and sequences of the whole optimisation batch (all micro-batches and ranks).
        ``batch.active`` selects the trained tokens; the normalisers still count all of ``batch.mask``."""
        old_logp = old_logprobs(batch, scores)  # [b, T]
        weights = weights.detach()  # [b, T]
        ratio = self.ratio(scores.logp, old_logp, batch.mask)  # [b, T]
        adv = batch.advantages.unsqueeze(1)  # [b, 1]
        objective = self.objective(self.config, scores, batch.mask)  # the loss type's per-token step
        surrogate = self.place_weights(objective, ratio, adv, weights)  # [b, T] loss, clip masks
        correction = self.correction(old_logp, sampler_logp, batch.mask)  # [b, T] weight and bound, or None
        per_token = surrogate.loss if correction is None else correction.weight * surrogate.loss  # [b, T]
        per_token, kl = self.add_kl(per_token, scores.logp, batch, weights)  # [b, T], scalar
        per_token = self.add_entropy_bonus(per_token, scores.entropy)  # [b, T]
        per_token = per_token * batch.active  # tokens outside this pass add nothing
        norm = token_normaliser(batch.mask, self.config.aggregation, num_tokens, num_seqs, self.max_len)
        return PolicyLossOutput(
            loss=(per_token * batch.mask * norm).sum(),  # = aggregate(per_token, batch.mask, ...)
            kl=kl,
            sampler_kl=sampler_kl(old_logp, sampler_logp, batch.mask) if sampler_logp is not None else None,
            ratio=ratio.detach(),
            weights=weights,
            clipped_low=surrogate.clipped_low,
            clipped_high=surrogate.clipped_high,
            dual_clipped=surrogate.dual_clipped,
            correction=correction.weight if correction is not None else None,
            normaliser=norm,
            corrected=correction.corrected if correction is not None else None,
            grad=surrogate.grad,
        )

    def correction(
        self, old_logp: Tensor, sampler_logp: Tensor | None, mask: Tensor
    ) -> SamplerCorrectionOutput | None:
        """[b, T] correction weights against the sampler and the tokens out of bounds; None without a
        correction mode (``sampler_correction`` or ``sampler_is_cap``) or sampler log-probs."""
        if self.correction_mode is None or sampler_logp is None:
            return None
        return correct_for_sampler(old_logp, sampler_logp, mask, self.correction_mode, *self.sampler_bounds)

    def add_kl(
        self, per_token: Tensor, logp: Tensor, batch: UpdateBatch, weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``per_token + beta * KL(pi_theta || pi_ref)`` per token (times the weights with ``weight_kl``),
        and the scalar KL summed over response tokens; unchanged and 0 without a KL term (beta = 0)."""
        beta = self.config.beta
        if beta <= 0.0:
            return per_token, logp.new_zeros(())
        if batch.ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = kl_penalty(logp, batch.ref_logp, self.config.kl_estimator)  # [b, T]
        per_token = per_token + beta * (weights * kl if self.weight_kl else kl)
        return per_token, (kl.detach() * batch.mask).sum()

    def add_entropy_bonus(self, per_token: Tensor, entropy: Tensor | None) -> Tensor:
        """``per_token - entropy_coef * H_t`` with the differentiable entropy; unchanged without a bonus."""
        coef = self.config.entropy_coef
        if coef <= 0.0:
            return per_token
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the token entropy")
        return per_token - coef * entropy
