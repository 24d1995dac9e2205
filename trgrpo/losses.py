"""Token-level GRPO losses: the clipped surrogate, KL estimators and loss aggregation.

``GRPOLoss`` is the one entry: configured once from ``LossConfig``, the weighting's placement and the
generation budget, and called with one micro-batch (``UpdateBatch``), the policy's ``TokenScores`` and the
token weights.  It composes the small pure functions below, in order:

    ratio (token or sequence) -> clipped surrogate, weights in their place -> sampler correction
        -> KL -> entropy bonus -> aggregate

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

Sequence-level ratios (GSPO, Zheng et al., 2025, arXiv 2507.18071): with ``ratio_level="sequence"`` every
token of sequence i uses s_i = exp(mean_t(log pi_theta - log pi_old)) over its response tokens, in the
token form whose value is s_i and whose gradient is s_i * grad log pi_theta(y_t); with
``seq_mean_token_mean`` aggregation this is GSPO's objective (GSPO clips s_i with ranges near 3e-4 / 4e-4).

Truncated importance sampling (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy
RL training"): when the rollout engine's probabilities pi_sampler differ from the trainer's (vLLM kernels,
precision), each token's loss is multiplied by the detached weight min(pi_old / pi_sampler, C), pi_old the
trainer's probability of the sampled token before the update.  Token weights of the weighting strategies
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

from trgrpo.config import Aggregation, KLEstimator, LossConfig, Placement, RatioLevel

if TYPE_CHECKING:
    from trgrpo.scoring import TokenScores
    from trgrpo.update import UpdateBatch


class SurrogateOutput(NamedTuple):
    loss: Tensor  # [B, T] per-token loss (unmasked)
    clipped_low: Tensor  # [B, T] bool: A < 0 and ratio below 1 - clip_low (no gradient)
    clipped_high: Tensor  # [B, T] bool: A > 0 and ratio above 1 + clip_high (no gradient)
    dual_clipped: Tensor  # [B, T] bool: A < 0 and ratio above dual_clip (no gradient; all False without it)


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
    return out._replace(loss=weights * out.loss)


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
    correction: Tensor | None  # [B, T] truncated importance weights against the sampler, None when off
    normaliser: Tensor  # [B, T] factor of each token in the aggregated loss (``token_normaliser``)


class GRPOLoss:
    """The token-weighted GRPO loss, configured once and called with one micro-batch.

    Args:
        config: the clip range, dual clip, KL, entropy bonus, aggregation, ratio level and sampler correction.
        placement: where the weighting's token weights enter (``TokenWeighting.placement``).
        weight_kl: multiply the KL term by the token weights too (``TokenWeighting.weight_kl``).
        max_len: the generation budget, the constant length of ``seq_sum_const``.

    A call composes the steps in order: ratio -> clipped surrogate with the weights in their place ->
    sampler correction -> KL -> entropy bonus -> aggregate.  The ratio and the placement are chosen here,
    once, from their ``Literal`` settings.
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
        self.place_weights = PLACEMENTS[placement]
        self.surrogate: Surrogate = partial(
            clipped_surrogate,
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            dual_clip=config.dual_clip,
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
        surrogate = self.place_weights(self.surrogate, ratio, adv, weights)  # [b, T] loss, clip masks
        correction = self.correction(old_logp, sampler_logp)  # [b, T] or None
        per_token = surrogate.loss if correction is None else correction * surrogate.loss  # [b, T]
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
            correction=correction,
            normaliser=norm,
        )

    def correction(self, old_logp: Tensor, sampler_logp: Tensor | None) -> Tensor | None:
        """[b, T] truncated importance weights against the sampler; None without a cap or sampler logp."""
        if self.config.sampler_is_cap is None or sampler_logp is None:
            return None
        return sampler_correction(old_logp, sampler_logp, self.config.sampler_is_cap)

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
