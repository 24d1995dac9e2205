"""Log-probabilities and entropies of sampled tokens without a float32 [B, T, V] tensor.

The naive ``log_softmax(logits.float(), -1).gather(-1, ids)`` keeps a float32 copy of every logit alive
until backward: for a 150k vocabulary that copy dominates the memory of the loss.  Here the log-sum-exp
is computed in row chunks (float32 only inside a chunk) and the backward recomputes the softmax chunk by
chunk, so the extra memory is one chunk, while the results match the naive version.

Pure tensor code, no Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22
"""Default chunk size in logits (16 MiB of float32): about 28 rows of a 150k vocabulary, the whole batch of a
small one, so the extra memory stays bounded whatever the vocabulary."""
DEFAULT_CHUNK_ROWS = None


def _row_chunks(n: int, chunk_rows: int | None, vocab: int):
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _logsumexp_rows(logits: Tensor, chunk_rows: int | None) -> Tensor:
    """[N, V] -> [N] float32 log-sum-exp, upcasting one chunk at a time."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for rows in _row_chunks(logits.shape[0], chunk_rows, logits.shape[-1]):
        out[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
    return out


class _SelectiveLogProb(torch.autograd.Function):
    """log softmax(logits)[ids] with a chunked, recomputing backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, chunk_rows: int | None) -> Tensor:  # [N, V], [N] -> [N]
        lse = _logsumexp_rows(logits, chunk_rows)
        picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk_rows = chunk_rows
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], ctx.chunk_rows, logits.shape[-1]):
            g = grad_out[rows].float().unsqueeze(-1)  # [n, 1]
            probs = torch.exp(logits[rows].float() - lse[rows].unsqueeze(-1))  # [n, V]
            chunk = -g * probs
            chunk.scatter_add_(-1, ids[rows].unsqueeze(-1), g)
            grad[rows] = chunk.to(grad.dtype)
        return grad, None, None


def selective_log_softmax(logits: Tensor, ids: Tensor, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> Tensor:
    """Log-probability of ``ids`` under ``softmax(logits)``.

    Args:
        logits: [..., V] any float dtype.
        ids: [...] token ids.
    Returns:
        [...] float32 log-probs.
    """
    shape = ids.shape
    flat = _SelectiveLogProb.apply(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), chunk_rows)
    return flat.view(shape)


def _detached_per_row(logits: Tensor, reduce, chunk_rows: int | None) -> Tensor:
    """``reduce`` ([n, V] float32 -> [n]) over the last dim of detached logits, one row chunk at a time.
    [..., V] -> [...] float32."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for rows in _row_chunks(flat.shape[0], chunk_rows, flat.shape[-1]):
        out[rows] = reduce(flat[rows].float())
    return out.view(logits.shape[:-1])


def token_entropy(logits: Tensor, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> Tensor:
    """Entropy of softmax(logits) per position, without gradient.  [..., V] -> [...] float32."""
    return _detached_per_row(logits, _entropy_chunk, chunk_rows)


def squared_prob_sum(logits: Tensor, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> Tensor:
    """sum_v softmax(logits)_v^2 per position, without gradient.  [..., V] -> [...] float32.

    With p the probability of the sampled token, ||onehot - softmax||^2 = 1 - 2 p + this sum: the norm of
    d log p / d logits, used by the gradient diagnostics (``trgrpo.diagnostics``).
    """
    return _detached_per_row(logits, lambda x: torch.softmax(x, dim=-1).square().sum(-1), chunk_rows)


def _entropy_chunk(x: Tensor) -> Tensor:
    logp = torch.log_softmax(x.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def differentiable_entropy(logits: Tensor, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> Tensor:
    """Entropy with gradient (for an entropy bonus); each chunk is recomputed in backward."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [
        torch.utils.checkpoint.checkpoint(_entropy_chunk, flat[rows], use_reentrant=False)
        for rows in _row_chunks(flat.shape[0], chunk_rows, flat.shape[-1])
    ]
    return torch.cat(parts).view(logits.shape[:-1])
