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


def budget_chunk_rows(vocab: int, max_logits_mib: float) -> int:
    """Rows per chunk of the head in row chunks under a logits budget of ``max_logits_mib``: a chunk's float32
    logits take a quarter of it (backward holds about four such tensors at once: the logits, their
    probabilities, their gradient and the head's output), and never fewer rows than the default chunk.

    Larger chunks make fewer, fuller matmuls: the head's weight gradient is summed over the chunks, one
    [V, H] accumulation per chunk."""
    return max(int(max_logits_mib * 2**20 / 4 // (4 * max(vocab, 1))), default_chunk_rows(vocab))


def default_chunk_rows(vocab: int) -> int:
    """Rows of ``vocab`` logits in a default chunk (``CHUNK_ELEMENTS``), at least one."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _row_chunks(n: int, chunk_rows: int | None, vocab: int):
    rows = chunk_rows or default_chunk_rows(vocab)
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


class _HeadInChunks(torch.autograd.Function):
    """Log-probs (and entropies) from hidden states with the LM head applied a row chunk at a time.

    Forward keeps no logits: only the hidden states and each row's log-sum-exp.  Backward recomputes one
    chunk's logits, forms their gradient in closed form (d log p_y / dz = onehot_y - p, d H / dz = -p (log p +
    H)) and back-propagates it through the head chunk by chunk; the gradients of the hidden states and of the
    head's trainable parameters (inputs here, summed over the chunks) are returned to autograd, so a
    parameter used elsewhere too (an embedding tied to the head) is accumulated once, as DDP's and ZeRO's
    gradient hooks expect."""

    @staticmethod
    def forward(ctx, hidden, ids, head, vocab, temperature, entropy, prob_sq, chunk_rows, *trainable):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if entropy else None
        sq = torch.empty_like(logp) if prob_sq else None
        for rows in _row_chunks(n, chunk_rows, vocab):
            z = head(hidden[rows]).float()
            if temperature != 1.0:
                z = z / temperature
            lse[rows] = torch.logsumexp(z, dim=-1)
            logp[rows] = z.gather(-1, ids[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
            if entropy or prob_sq:
                probs = torch.exp(z - lse[rows].unsqueeze(-1))
                if entropy:
                    ent[rows] = lse[rows] - (probs * z).sum(-1)  # H = lse - sum p z
                if prob_sq:
                    sq[rows] = probs.square().sum(-1)
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        ctx.head, ctx.vocab, ctx.temperature, ctx.chunk_rows = head, vocab, temperature, chunk_rows
        ctx.params = trainable
        ctx.entropy_grad = entropy == "grad"
        ctx.save_for_backward(hidden, ids, lse)
        if not ctx.entropy_grad and ent is not None:
            ctx.mark_non_differentiable(ent)
        if sq is not None:
            ctx.mark_non_differentiable(sq)
        return logp, ent, sq

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_sq):
        hidden, ids, lse = ctx.saved_tensors
        want_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[8:]) if need]
        grad_params: list[Tensor | None] = [None] * len(ctx.params)
        enabled, dtype, device = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            for rows in _row_chunks(hidden.shape[0], ctx.chunk_rows, ctx.vocab):
                h = hidden[rows].detach().requires_grad_(want_hidden)
                logits = ctx.head(h)
                with torch.no_grad():
                    z = logits.float()
                    if ctx.temperature != 1.0:
                        z = z / ctx.temperature
                    logq = z - lse[rows].unsqueeze(-1)
                    probs = logq.exp()
                    g = g_logp[rows].float().unsqueeze(-1)
                    grad_z = -g * probs
                    grad_z.scatter_add_(-1, ids[rows].unsqueeze(-1), g)
                    if ctx.entropy_grad and g_ent is not None:
                        ent = -(probs * logq).sum(-1, keepdim=True)
                        grad_z -= g_ent[rows].float().unsqueeze(-1) * probs * (logq + ent)
                    if ctx.temperature != 1.0:
                        grad_z /= ctx.temperature
                inputs = ([h] if want_hidden else []) + [ctx.params[i] for i in wanted]
                if not inputs or not logits.requires_grad:
                    continue
                grads = torch.autograd.grad(logits, inputs, grad_z.to(logits.dtype), allow_unused=True)
                if want_hidden:
                    if grads[0] is not None:
                        grad_hidden[rows] = grads[0]
                    grads = grads[1:]
                for i, g in zip(wanted, grads, strict=True):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        return (grad_hidden, None, None, None, None, None, None, None, *grad_params)


def head_chunk_scores(
    head,
    hidden: Tensor,
    ids: Tensor,
    vocab: int,
    temperature: float = 1.0,
    entropy: str | None = None,
    prob_sq: bool = False,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probs of ``ids`` (and entropy / squared-probability sums) from hidden states, the LM head applied a
    row chunk at a time: no [..., V] tensor beyond one chunk's exists in forward or backward.

    Backward recomputes each chunk's logits (one more head matmul per token, in exchange for the memory) and
    back-propagates through ``head`` chunk by chunk, so its parameters (or adapters) get their gradient.

    Args:
        head: the LM head module ([n, H] -> [n, V]).
        hidden: [..., H] last hidden states at the positions that predict ``ids``.
        ids: [...] token ids.
        vocab: V, the head's output size (sets the rows per chunk).
        temperature: logits are divided by it before the softmax.
        entropy: None, "detached" or "grad" (as ``token_entropy`` / ``differentiable_entropy``).
        prob_sq: also return the detached sum of squared probabilities.
    Returns:
        ([...] float32 log-probs, [...] entropy or None, [...] squared-probability sum or None).
    """
    shape = ids.shape
    flat, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    # the head's trainable parameters are inputs: their gradient is returned through autograd, once
    trainable = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    logp, ent, sq = _HeadInChunks.apply(
        flat, flat_ids, head, vocab, temperature, entropy, prob_sq, chunk_rows, *trainable
    )
    return logp.view(shape), None if ent is None else ent.view(shape), None if sq is None else sq.view(shape)
