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
is kept (``trgrpo.logprobs``).  When a micro-batch's logits would pass ``max_logits_mib`` the model returns
its hidden states instead and the head runs a row chunk at a time (``head_chunk_scores``), so the logits
never exist whole, in forward or backward.  No Lightning import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from trgrpo.fastpath.shared_prefix import completion_logits
from trgrpo.heads import (
    PLAIN_HEAD_MODELS,
    head_vocab,
    hidden_states_out,
    is_partitioned,
    logits_over_budget,
    output_embedding,
    output_head,
)
from trgrpo.logprobs import (
    budget_chunk_rows,
    differentiable_entropy,
    head_chunk_scores,
    selective_log_softmax,
    squared_prob_sum,
    token_entropy,
)

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
        max_logits_mib: the largest float32 logits tensor, in MiB, one forward may build; above it the head
            runs a row chunk at a time (None: never).  Not under ZeRO-3, whose hooks gather the head's
            shards once per forward.
    """

    def __init__(self, temperature: float = 1.0, max_logits_mib: float | None = None) -> None:
        self.temperature = temperature
        self.max_logits_mib = max_logits_mib

    def chunked_head(self, model: torch.nn.Module, positions: int) -> tuple[torch.nn.Module, int] | None:
        """The head and its vocabulary when ``positions`` completion positions would pass the budget."""
        if self.max_logits_mib is None:
            return None
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in PLAIN_HEAD_MODELS:
            return None
        head = output_embedding(model)
        if head is None or is_partitioned(head):
            return None
        vocab = head_vocab(head)
        if not logits_over_budget(positions, vocab, self.max_logits_mib):
            return None
        # only now the walk over the modules for the head's parent, which hidden_states_out needs
        return (head, vocab) if output_head(model) is not None else None

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
        chunked = self.chunked_head(model, ids.shape[0] * (ids.shape[1] - p))
        if chunked is not None:
            with hidden_states_out(model) as head:
                hidden = completion_logits(model, ids, attn, p)  # [b, T, H]
            rows = budget_chunk_rows(chunked[1], self.max_logits_mib)
            logp, ent, sq = head_chunk_scores(
                head, hidden, ids[:, p:], chunked[1], self.temperature, entropy, prob_sq, rows
            )
            return TokenScores(logp, ent, sq)
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
