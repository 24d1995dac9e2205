"""Token-level GRPO losses: the clipped surrogate, KL estimators and loss aggregation.

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

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_sum_const"]
KLEstimator = Literal["k1", "k2", "k3"]
Placement = Literal["surrogate", "ratio"]
RatioLevel = Literal["token", "sequence"]


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


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """[B, T] GSPO token-form ratio: value exp(mean log-ratio of the sequence), gradient value * grad logp."""
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
    log_s = ((logp - old_logp).detach() * mask).sum(dim=1, keepdim=True) / lengths  # [B, 1]
    return torch.exp(log_s + logp - logp.detach())


class PolicyLossOutput(NamedTuple):
    loss: Tensor  # scalar, normalised by the batch-global counts
    clipped_low: Tensor  # scalar: number of active tokens clipped below
    clipped_high: Tensor  # scalar: number of active tokens clipped above
    kl: Tensor  # scalar: sum of per-token KL over response tokens (0 when beta == 0)
    sampler_kl: Tensor | None = None  # scalar: summed k3 KL(sampler || trainer) over response tokens, or None
    pg_coef: Tensor | None = (
        None  # [B, T] |d loss / d logp| of the surrogate alone (detached; 0 where no gradient)
    )


def sampler_correction(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """[B, T] truncated importance weights ``min(exp(old_logp - sampler_logp), cap)`` (detached)."""
    return torch.exp((old_logp - sampler_logp).detach()).clamp(max=cap)


def sampler_kl(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """Scalar sum over ``mask`` of the k3 estimate of KL(pi_sampler || pi_trainer) from the sampler's tokens."""
    return (kl_penalty(sampler_logp, old_logp.detach(), "k3") * mask).sum()


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    weights: Tensor,
    mask: Tensor,
    active: Tensor,
    *,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    placement: Placement = "surrogate",
    aggregation: Aggregation = "token_mean",
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weight_kl: bool = False,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    sampler_logp: Tensor | None = None,
    sampler_is_cap: float | None = None,
    ratio_level: RatioLevel = "token",
) -> PolicyLossOutput:
    """The full token-weighted GRPO loss of one micro-batch.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logp: [B, T] log-probs under the rollout policy (detached).
        advantages: [B] sequence advantages.
        weights: [B, T] detached token weights from a weighting strategy (0 on padding).
        mask: [B, T] response mask.
        active: [B, T] tokens trained in this pass (a subset of ``mask``; Lopti and top-entropy
            training use it; otherwise equal to ``mask``).  Normalisers still count all of ``mask``.
        ref_logp: [B, T] reference-model log-probs, required when beta > 0.
        entropy: [B, T] differentiable token entropy, required when entropy_coef > 0.
        sampler_logp: [B, T] log-probs under the engine that sampled (for ``sampler_kl`` and, with
            ``sampler_is_cap``, the truncated importance weight of every token's surrogate loss).
        ratio_level: "token" (PPO / GRPO) or "sequence" (GSPO's length-normalised sequence ratio).

    ``pg_coef`` is |d loss / d logp_t| of the weighted surrogate alone (KL and entropy terms left out):
    |w A r| times the importance and aggregation factors, 0 where the clip, the dual clip or ``active``
    stops the gradient.  Times ||onehot(y_t) - pi_t|| it is the norm of the token's gradient at the logits.
    """
    weights = weights.detach()
    ratio = sequence_ratio(logp, old_logp, mask) if ratio_level == "sequence" else torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)  # [B, 1]
    if placement == "ratio":
        out = clipped_surrogate(weights * ratio, adv, clip_low, clip_high, dual_clip)
        per_token = out.loss
    else:
        out = clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip)
        per_token = weights * out.loss
    coef = (weights * ratio.detach() * adv.abs()).float()
    if sampler_is_cap is not None and sampler_logp is not None:
        correction = sampler_correction(old_logp, sampler_logp, sampler_is_cap)
        per_token = correction * per_token
        coef = coef * correction
    norm = token_normaliser(
        mask, aggregation, num_tokens, num_seqs, max_len
    )  # [B, T], once for loss and coef
    flows = ~(out.clipped_low | out.clipped_high | out.dual_clipped) & active.bool()
    coef = coef * flows * mask * norm
    kl_sum = logp.new_zeros(())
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * (weights * kl if weight_kl else kl)
        kl_sum = (kl.detach() * mask).sum()
    if entropy_coef > 0.0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the token entropy")
        per_token = per_token - entropy_coef * entropy
    per_token = per_token * active
    loss = (per_token * mask * norm).sum()  # = aggregate(per_token, mask, aggregation, ...)
    act = active.bool()
    return PolicyLossOutput(
        loss=loss,
        clipped_low=(out.clipped_low & act).sum(),
        clipped_high=(out.clipped_high & act).sum(),
        kl=kl_sum,
        sampler_kl=sampler_kl(old_logp, sampler_logp, mask) if sampler_logp is not None else None,
        pg_coef=coef,
    )


class GRPOLoss:
    """The token-weighted GRPO loss, configured once and called with tensors only.

    Settings come from ``LossConfig`` (clip range, dual clip, KL, entropy bonus, aggregation), the weighting
    strategy (``placement``, ``weight_kl``) and the generation budget (``max_len`` of ``seq_sum_const``);
    a call computes :func:`policy_loss` for one micro-batch.
    """

    def __init__(
        self,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        aggregation: Aggregation = "token_mean",
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
        entropy_coef: float = 0.0,
        placement: Placement = "surrogate",
        weight_kl: bool = False,
        max_len: int = 1,
        sampler_is_cap: float | None = None,
        ratio_level: RatioLevel = "token",
    ) -> None:
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.aggregation, self.max_len = aggregation, max_len
        self.beta, self.kl_estimator, self.entropy_coef = beta, kl_estimator, entropy_coef
        self.placement, self.weight_kl = placement, weight_kl
        self.sampler_is_cap, self.ratio_level = sampler_is_cap, ratio_level

    @classmethod
    def from_config(cls, loss, weighting, max_len: int) -> GRPOLoss:
        """From a ``LossConfig``, a ``TokenWeighting`` and ``sampling.max_new_tokens``."""
        return cls(
            clip_low=loss.clip_low,
            clip_high=loss.clip_high,
            dual_clip=loss.dual_clip,
            aggregation=loss.aggregation,
            beta=loss.beta,
            kl_estimator=loss.kl_estimator,
            entropy_coef=loss.entropy_coef,
            placement=weighting.placement,
            weight_kl=weighting.weight_kl,
            max_len=max_len,
            sampler_is_cap=loss.sampler_is_cap,
            ratio_level=loss.ratio_level,
        )

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        weights: Tensor,
        mask: Tensor,
        active: Tensor,
        *,
        num_tokens: float,
        num_seqs: float,
        ref_logp: Tensor | None = None,
        entropy: Tensor | None = None,
        sampler_logp: Tensor | None = None,
    ) -> PolicyLossOutput:
        """Shapes as in :func:`policy_loss`: [B, T] token tensors, [B] advantages.  ``entropy`` is used only
        with an entropy bonus (a detached one passed for metrics is ignored otherwise)."""
        return policy_loss(
            logp,
            old_logp,
            advantages,
            weights,
            mask,
            active,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            max_len=self.max_len,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            placement=self.placement,
            aggregation=self.aggregation,
            ref_logp=ref_logp,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            weight_kl=self.weight_kl,
            entropy=entropy if self.entropy_coef > 0 else None,
            entropy_coef=self.entropy_coef,
            sampler_logp=sampler_logp,
            sampler_is_cap=self.sampler_is_cap,
            ratio_level=self.ratio_level,
        )
