"""Scoring a rollout: log-probs and entropies of the completion tokens under a model.

``TokenScorer`` runs a model over ``[prompt; completion]`` sequences and returns, for the completion
positions only, the log-probability of each sampled token and (on request) the token entropy:

    score(model, rollout, idx)        [b] rows -> TokenScores([b, T] logp, [b, T] entropy or None)
    score_all(model, rollout, micro)  no-grad, every row, ``micro`` rows per forward (old log-probs)
    reference(policy, ref, rollout)   no-grad log-probs under the frozen reference: a separate copy, or the
                                      LoRA policy itself with its adapters disabled

The logits are divided by the sampling temperature, so the ratio in the loss compares the distribution
that produced the samples.  Only completion positions reach the LM head, each distinct prompt runs through
the model once for all its completions (``trgrpo.fastpath.shared_prefix``), and no float32 [B, T, V] tensor
is kept (``trgrpo.logprobs``).  No Lightning import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from trgrpo.fastpath.shared_prefix import completion_logits
from trgrpo.logprobs import differentiable_entropy, selective_log_softmax, squared_prob_sum, token_entropy

if TYPE_CHECKING:
    from trgrpo.rollout import Rollout

EntropyMode = Literal["grad", "detached"] | None
"""None (no entropy), "detached" (metrics, strategies) or "grad" (the entropy bonus)."""


class TokenScores(NamedTuple):
    logp: Tensor  # [B, T] float32 log-probs of the completion tokens
    entropy: Tensor | None  # [B, T] float32 token entropy (None when not asked for)
    prob_sq: Tensor | None = None  # [B, T] float32 sum of squared probabilities (gradient diagnostics)


class TokenScorer:
    """Log-probs / entropies of completion tokens at a fixed sampling temperature.

    Args:
        temperature: the sampling temperature; the logits are divided by it before the softmax.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def score(
        self,
        model: torch.nn.Module,
        rollout: Rollout,
        idx: Tensor,
        entropy: EntropyMode = None,
        prob_sq: bool = False,
    ) -> TokenScores:
        """Scores of the completion tokens of rows ``idx`` [b]; differentiable when grad is enabled.
        ``prob_sq`` adds the detached sum of squared probabilities per token
        (for the gradient diagnostics)."""
        ids, attn = rollout.input_ids[idx], rollout.attention_mask[idx]  # [b, P + T]
        p = rollout.prompt_len
        logits = completion_logits(model, ids, attn, p)  # [b, T, V]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logp = selective_log_softmax(logits, ids[:, p:])  # [b, T]
        ent = None
        if entropy == "grad":
            ent = differentiable_entropy(logits)
        elif entropy == "detached":
            ent = token_entropy(logits)
        return TokenScores(logp, ent, squared_prob_sum(logits) if prob_sq else None)

    @torch.no_grad()
    def score_all(
        self, model: torch.nn.Module, rollout: Rollout, micro: int, entropy: bool = False
    ) -> TokenScores:
        """Detached [N, T] scores of every row, ``micro`` rows per forward."""
        rows = torch.arange(rollout.input_ids.shape[0], device=rollout.input_ids.device)
        parts = [
            self.score(model, rollout, idx, "detached" if entropy else None) for idx in rows.split(micro)
        ]
        ent = torch.cat([s.entropy for s in parts]) if entropy else None
        return TokenScores(torch.cat([s.logp for s in parts]), ent)

    @torch.no_grad()
    def reference(
        self, policy: torch.nn.Module, ref_model: torch.nn.Module | None, rollout: Rollout, micro: int
    ) -> Tensor:
        """[N, T] log-probs under the frozen reference: ``ref_model``, or with LoRA (``ref_model`` None) the
        policy with its adapters disabled (the base weights never train, so no second copy is needed)."""
        if ref_model is not None:
            return self.score_all(ref_model, rollout, micro).logp
        was_training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                return self.score_all(policy, rollout, micro).logp
        finally:
            policy.train(was_training)


__all__ = ["EntropyMode", "TokenScorer", "TokenScores"]
