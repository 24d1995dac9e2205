"""Token weighting strategies: plain GRPO, TR-GRPO, Advantage Reweighting, Lopti, top-entropy tokens,
entropy-shaped advantages.

A strategy turns token probabilities into detached per-token weights ``w`` of shape [B, T] (0 on
padding) that scale each token's share of the clipped surrogate (see ``trgrpo.losses.GRPOLoss``).
It may also split the response tokens into sequential update passes (Lopti) or select a subset of
them (top-entropy training) through :meth:`TokenWeighting.passes`, which sees the whole rollout batch.

Choose one in YAML::

    model:
      weighting:
        class_path: trgrpo.weighting.TokenRegulatedWeighting
        init_args: {alpha: 2.0, tau: 0.1111111111, mu: 0.25, lower: 1.0, upper: 1.4}

Papers: TR-GRPO (arXiv 2511.00066); Advantage Reweighting and Lopti (arXiv 2505.12929);
top-entropy "80/20" token training (arXiv 2506.01939); entropy-shaped advantages (GTPO, arXiv 2508.04349).
No Lightning import.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from trgrpo.config import Placement

WeightSource = Literal["rollout", "current"]
"""Which probabilities a weight is computed from: the rollout's, or the current policy's."""


class TokenWeighting:
    """Base class of the weighting strategies.

    Subclasses implement :meth:`weights`; the class attributes tell the trainer what else they need.
    """

    #: where the weight enters the loss: "surrogate" (multiplies the per-token loss) or "ratio"
    placement: Placement = "surrogate"
    #: multiply the KL term by the same weight
    weight_kl: bool = False
    #: the strategy reads rollout-time token entropies in :meth:`passes`
    needs_entropy: bool = False
    #: the strategy overrides :meth:`passes`: the update trains the token sets it returns, in turn (Lopti's
    #: two sequential passes, the top-entropy subset), and the trainer computes the rollout-time log-probs
    #: they are chosen by before the first update
    multi_pass: bool = False
    #: clip bounds of the weight, for the share-at-bound statistics (None when unbounded)
    bounds: tuple[float, float] | None = None

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """Detached token weights.

        Args:
            logp: [B, T] current-policy log-probs of the sampled tokens (detached).
            old_logp: [B, T] rollout-time log-probs.
            advantages: [B] sequence advantages.
            mask: [B, T] response mask.
        Returns:
            [B, T] weights, 0 where ``mask`` is 0.
        """
        raise NotImplementedError

    def token_weights(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, entropy: Tensor | None
    ) -> Tensor:
        """What the trainer calls: :meth:`weights`, offered also the [B, T] rollout-time entropies (None
        unless ``needs_entropy``); a strategy that reads them overrides this."""
        return self.weights(logp, old_logp, advantages, mask)

    def passes(self, old_logp: Tensor, mask: Tensor, entropy: Tensor | None) -> list[Tensor]:
        """Token sets trained by successive full updates over the rollout batch, in order.

        Args are for the whole rollout batch ([N, T]); returns a list of [N, T] float masks, each a subset
        of ``mask``.  The default is one pass over every response token.
        """
        return [mask]


class UniformWeighting(TokenWeighting):
    """w = 1 on every response token: plain GRPO."""

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        return mask.to(torch.float32)


class TokenRegulatedWeighting(TokenWeighting):
    """TR-GRPO: ``w = clip(alpha * (sigmoid(p / tau) - mu), lower, upper)``, p the token probability.

    With the defaults (tau = 1/9) the weight is 1 for p below about 0.12 and rises to 1.4 for p above
    about 0.35: confident tokens gain up to 40% more weight than unlikely ones.  (The transcription
    tau = 9 gives sigmoid(p / 9) in [0.5, 0.53] and so a constant w = 1.)

    Args:
        alpha: scale of the shaped probability.
        tau: temperature of the sigmoid; smaller is steeper.
        mu: offset subtracted from the sigmoid.
        lower: lower clip bound of the weight.
        upper: upper clip bound of the weight.
        placement: "surrogate" multiplies the per-token clipped surrogate by the detached weight
            (what the paper's gradient analysis describes); "ratio" multiplies the ratio inside both the
            min and the clip (the reviewers' reading; with w > 1 + clip_high it stops the gradient of
            confident positive-advantage tokens).
        source: which probability feeds the weight: "rollout" (the policy that sampled the batch) or
            "current" (the policy being optimised; equal to rollout on the first update of a batch).
        weight_kl: also multiply the KL term by the weight.
        reverse: use 1 - p (weights that fall with probability; an ablation).
    """

    def __init__(
        self,
        alpha: float = 2.0,
        tau: float = 1.0 / 9.0,
        mu: float = 0.25,
        lower: float = 1.0,
        upper: float = 1.4,
        placement: Placement = "surrogate",
        source: WeightSource = "rollout",
        weight_kl: bool = False,
        reverse: bool = False,
    ) -> None:
        if tau <= 0:
            raise ValueError(f"model.weighting.init_args.tau must be > 0, got {tau}")
        if lower > upper:
            raise ValueError(
                f"model.weighting.init_args.lower ({lower}) must not exceed "
                f"model.weighting.init_args.upper ({upper})"
            )
        if lower < 0:
            raise ValueError(
                f"model.weighting.init_args.lower must be >= 0 (weights are non-negative), got {lower}"
            )
        for key, value, choices in (("placement", placement, Placement), ("source", source, WeightSource)):
            if value not in get_args(choices):
                names = " or ".join(map(repr, get_args(choices)))
                raise ValueError(f"model.weighting.init_args.{key} must be {names}, got {value!r}")
        self.alpha, self.tau, self.mu = alpha, tau, mu
        self.lower, self.upper = lower, upper
        self.bounds = (lower, upper)
        self.placement, self.source = placement, source
        self.weight_kl, self.reverse = weight_kl, reverse

    def weight_of_prob(self, p: Tensor) -> Tensor:
        """The shaping function alone: [...] probabilities -> [...] weights."""
        if self.reverse:
            p = 1.0 - p
        return (self.alpha * (torch.sigmoid(p / self.tau) - self.mu)).clamp(self.lower, self.upper)

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        src = old_logp if self.source == "rollout" else logp
        return self.weight_of_prob(src.detach().float().exp()) * mask


class AdvantageReweighting(TokenWeighting):
    """Advantage Reweighting: ``A_t <- (alpha * p_t + 1 - alpha) * A_t``, p_t the rollout probability.

    The weight is positive, so multiplying the surrogate by it scales A without changing which tokens
    are clipped.  Args: alpha: 0.3 for logic puzzles, 0.1 for math in the paper.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"model.weighting.init_args.alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.bounds = (1.0 - alpha, 1.0)

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        p = old_logp.detach().float().exp()
        return (self.alpha * p + 1.0 - self.alpha) * mask


class LoptiWeighting(TokenWeighting):
    """Lopti: two sequential updates per batch, tokens with rollout probability below ``eta`` first.

    Each pass is a full update (all epochs and mini-batches) restricted to its tokens, normalised by
    all response tokens; the second pass runs on the model the first one updated, with the same old
    log-probs.  Roughly doubles update time.

    Args:
        eta: probability threshold separating low- from high-probability tokens.
        low_first: train the low-probability tokens first (the paper's order; reversing it collapsed
            training there, kept as an ablation).
        ar_alpha: when > 0, also apply Advantage Reweighting with this alpha (the paper's "both").
    """

    multi_pass = True

    def __init__(self, eta: float = 0.5, low_first: bool = True, ar_alpha: float = 0.0) -> None:
        if not 0.0 < eta < 1.0:
            raise ValueError(f"model.weighting.init_args.eta must be in (0, 1), got {eta}")
        if not 0.0 <= ar_alpha <= 1.0:
            raise ValueError(f"model.weighting.init_args.ar_alpha must be in [0, 1], got {ar_alpha}")
        self.eta, self.low_first, self.ar_alpha = eta, low_first, ar_alpha

    def passes(self, old_logp: Tensor, mask: Tensor, entropy: Tensor | None) -> list[Tensor]:
        low = (old_logp.exp() < self.eta).to(mask.dtype) * mask
        high = mask - low
        return [low, high] if self.low_first else [high, low]

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        p = old_logp.detach().float().exp()
        return (self.ar_alpha * p + 1.0 - self.ar_alpha) * mask


class HighEntropyWeighting(TokenWeighting):
    """Train only on the top-``q`` fraction of response tokens by rollout-time entropy.

    The threshold is the (1 - q) quantile of the entropies of all response tokens in the rollout
    batch (per rank under data parallelism); the loss keeps its usual normaliser (all response tokens).

    Args:
        q: fraction of tokens kept, in (0, 1].
    """

    needs_entropy = True
    multi_pass = True

    def __init__(self, q: float = 0.2) -> None:
        if not 0.0 < q <= 1.0:
            raise ValueError(f"model.weighting.init_args.q must be in (0, 1], got {q}")
        self.q = q

    def passes(self, old_logp: Tensor, mask: Tensor, entropy: Tensor | None) -> list[Tensor]:
        if entropy is None:
            raise ValueError("HighEntropyWeighting needs rollout entropies")
        values = entropy[mask.bool()].float()
        if values.numel() == 0:
            return [mask]
        threshold = torch.quantile(values, 1.0 - self.q)
        return [((entropy >= threshold).to(mask.dtype)) * mask]

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        return mask.to(torch.float32)


class EntropyShapedWeighting(TokenWeighting):
    """Entropy-shaped advantages: ``A_t <- A * (1 + beta * (H_t / mean H - 1))``, H_t the token's rollout
    entropy (detached), mean H over the rollout batch's trained tokens (per rank under data parallelism).

    The GTPO / entropy-weighted family (arXiv 2508.04349): uncertain tokens (forks) get more of the sequence's
    advantage, confident ones less, and the mean weight over the batch stays 1.  The weight multiplies the
    per-token surrogate, which equals scaling A as long as it is >= 0; it is clamped at 0 where
    ``1 + beta * (H_t / mean H - 1)`` would turn negative (only possible for beta > 1 or beta < 0).
    The mean is taken once per rollout batch, in :meth:`passes`, before any update.

    Args:
        beta: strength of the shaping; 0 is plain GRPO, 1 makes the weight H_t / mean H, < 0 favours confident
            tokens instead.  The default 0.5 is our middle choice, not a published value.
        negative_only: shape the advantages of negative-advantage sequences only (weight 1 elsewhere).
    """

    needs_entropy = True
    multi_pass = True  # overrides ``passes`` to take the batch's mean entropy; trains one pass, all tokens

    def __init__(self, beta: float = 0.5, negative_only: bool = False) -> None:
        self.beta, self.negative_only = beta, negative_only
        self.mean_entropy: float | None = None  # of the current rollout batch, set by ``passes``

    def passes(self, old_logp: Tensor, mask: Tensor, entropy: Tensor | None) -> list[Tensor]:
        if entropy is None:
            raise ValueError("EntropyShapedWeighting needs rollout entropies")
        self.mean_entropy = mean_entropy(entropy, mask)
        return [mask]

    def shape(self, entropy: Tensor, advantages: Tensor, mask: Tensor, mean: float) -> Tensor:
        """[B, T] weights from the [B, T] entropies, the [B] advantages and the batch's mean entropy."""
        entropy = entropy.detach().float()  # [B, T]
        relative = entropy / mean if mean > 0 else torch.ones_like(entropy)
        w = (1.0 + self.beta * (relative - 1.0)).clamp(min=0.0)  # [B, T]
        if self.negative_only:
            w = torch.where((advantages < 0).unsqueeze(1), w, torch.ones_like(w))
        return w * mask

    def token_weights(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, entropy: Tensor | None
    ) -> Tensor:
        if entropy is None or self.mean_entropy is None:
            raise ValueError("EntropyShapedWeighting needs the rollout entropies and their mean (passes)")
        return self.shape(entropy, advantages, mask, self.mean_entropy)

    def weights(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        raise ValueError("EntropyShapedWeighting weighs by the rollout entropy: call token_weights")


def mean_entropy(entropy: Tensor, mask: Tensor) -> float:
    """Mean of the [N, T] entropies over the [N, T] trained tokens (0.0 when there are none)."""
    count = mask.sum().item()
    return (entropy.float() * mask).sum().item() / count if count > 0 else 0.0


# The names the two strategies had before they took the ``...Weighting`` suffix of their siblings, kept so
# that configs naming them (``class_path: trgrpo.weighting.Lopti``, ``--model.weighting=Lopti``) still load.
# Subclasses rather than plain aliases: the command line resolves a short name by the class's own name.


class Lopti(LoptiWeighting):
    """The former name of ``LoptiWeighting`` (same arguments, same behaviour)."""


class HighEntropyTokens(HighEntropyWeighting):
    """The former name of ``HighEntropyWeighting`` (same arguments, same behaviour)."""


__all__ = [
    "AdvantageReweighting",
    "EntropyShapedWeighting",
    "HighEntropyTokens",
    "HighEntropyWeighting",
    "Lopti",
    "LoptiWeighting",
    "TokenRegulatedWeighting",
    "TokenWeighting",
    "UniformWeighting",
]
