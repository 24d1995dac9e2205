"""Where the policy gradient comes from: its share by token-probability bucket, measured during training.

The claim behind TR-GRPO, AR and Lopti is that low-probability tokens dominate the policy gradient.  For a
token with sampled-token probability p and softmax pi at its (temperature-scaled) logits z,
d log p / d z = onehot(y) - pi, so the gradient of the weighted surrogate at that token's logits is

    g_t = -(d loss / d log p_t) * (onehot(y_t) - pi_t),   ||g_t|| = |w A r| * c_t * ||onehot(y_t) - pi_t||,

with c_t the importance and aggregation factors and g_t = 0 where the clip stops the gradient
(:func:`surrogate_grad_coef` computes |w A r| * c_t from what ``GRPOLoss`` returns), and
||onehot - pi||^2 = 1 - 2 p + sum_v pi_v^2.  Each token's logits are separate variables, so the squared norm
of the whole logit gradient is the sum of the tokens' squared norms: the share of a bucket is its part of
that sum, exact, with no extra backward.

``GradBuckets`` adds these up per bucket of the *rollout* probability (the probability the weighting
strategies see; buckets ``p < 0.1``, ``0.1 <= p < 0.5``, ``p >= 0.5`` by default) over every micro-batch of
an RL step, with the trained-token counts and mean weight per bucket, and turns them into metrics:

    train/grad_share/<bucket>   share of the squared logit-gradient norm (sums to 1 over buckets)
    train/token_share/<bucket>  share of the trained tokens
    train/weight/<bucket>       mean token weight (1 for plain GRPO)

Only the surrogate is counted (KL and entropy terms are left out).  No Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from trgrpo.losses import PolicyLossOutput
    from trgrpo.update import UpdateBatch

from trgrpo.world import is_distributed


def bucket_names(edges: Sequence[float]) -> list[str]:
    """Readable names of the buckets cut at ``edges``: ``p<0.1``, ``0.1<=p<0.5``, ``p>=0.5``."""
    if not edges:
        return ["all"]
    names = [f"p<{edges[0]:g}"]
    names += [f"{lo:g}<=p<{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return names + [f"p>={edges[-1]:g}"]


def check_edges(edges: Sequence[float], key: str = "model.grad_buckets") -> list[float]:
    """Edges strictly increasing inside (0, 1); returns them as a list."""
    out = [float(e) for e in edges]
    if any(not 0.0 < e < 1.0 for e in out) or any(b <= a for a, b in zip(out[:-1], out[1:], strict=True)):
        raise ValueError(f"{key} must be probabilities strictly increasing inside (0, 1), got {list(edges)}")
    return out


def surrogate_grad_coef(out: PolicyLossOutput, batch: UpdateBatch) -> Tensor:
    """[B, T] |d loss / d log p| of the weighted surrogate alone (KL and entropy terms left out), detached.

    |w A r| times the sampler correction and the aggregation factor, 0 where the clip, the dual clip or
    ``batch.active`` stops the gradient.  The same for both placements: d(w r)/d log p = w r, and a
    sequence ratio's token form has gradient r * grad log p as well.  CISPO and ASPO report their own
    coefficient (``out.grad``: w min(r, cap) |A|; w |A| r, w |A| / r or the soft dual clip's w c |A|),
    already 0 where their clip stops the gradient.
    """
    if out.grad is None:  # the clipped surrogate
        coef = (out.weights * out.ratio * batch.advantages.unsqueeze(1).abs()).float()  # [B, T]
        flows = ~(out.clipped_low | out.clipped_high | out.dual_clipped) & batch.active.bool()  # [B, T]
    else:
        coef, flows = out.grad.float(), batch.active.bool()  # [B, T]
    if out.correction is not None:
        coef = coef * out.correction
    return coef * flows * batch.mask * out.normaliser


def logit_grad_norm_sq(pg_coef: Tensor, logp: Tensor, prob_sq: Tensor) -> Tensor:
    """[B, T] squared norm of each token's surrogate gradient at its logits (see the module docstring).

    Args:
        pg_coef: [B, T] |d loss / d log p| of the surrogate (:func:`surrogate_grad_coef`; 0: no gradient).
        logp: [B, T] log-prob of the sampled token under the policy being differentiated.
        prob_sq: [B, T] sum of the squared probabilities at the same logits.
    """
    p = logp.detach().float().exp()
    return pg_coef.float().square() * (1.0 - 2.0 * p + prob_sq.float()).clamp(min=0.0)


class GradBuckets:
    """Sums per probability bucket over the micro-batches of one RL step (per process until ``reduced``).

    Args:
        edges: bucket boundaries on the rollout probability, increasing inside (0, 1).
    """

    def __init__(self, edges: Sequence[float] = (0.1, 0.5)) -> None:
        self.edges = check_edges(edges)
        self.names = bucket_names(self.edges)
        k = len(self.names)
        self.grad_sq = torch.zeros(k, dtype=torch.float64)  # summed squared logit-gradient norms
        self.tokens = torch.zeros(k, dtype=torch.float64)  # trained tokens
        self.weight = torch.zeros(k, dtype=torch.float64)  # summed weights of the trained tokens

    def bucket_of(self, rollout_logp: Tensor) -> Tensor:
        """[...] bucket index of each token from its rollout log-prob."""
        edges = torch.tensor(self.edges, dtype=torch.float32, device=rollout_logp.device)
        return torch.bucketize(rollout_logp.detach().float().exp(), edges, right=True)

    def add(self, grad_sq: Tensor, rollout_logp: Tensor, weights: Tensor, active: Tensor) -> None:
        """Add one micro-batch: [b, T] squared gradient norms, rollout log-probs, weights and
        trained tokens."""
        sel = active.bool()
        idx = self.bucket_of(rollout_logp)[sel].cpu()
        k = len(self.names)
        self.grad_sq += torch.bincount(idx, grad_sq[sel].double().cpu(), minlength=k)
        self.tokens += torch.bincount(idx, minlength=k).double()
        self.weight += torch.bincount(idx, weights[sel].double().cpu(), minlength=k)

    def reduced(self, device: torch.device | str = "cpu") -> GradBuckets:
        """These sums over every process (a copy; unchanged with one process or no process group)."""
        out = GradBuckets(self.edges)
        both = torch.cat([self.grad_sq, self.tokens, self.weight]).to(device)
        if is_distributed():
            dist.all_reduce(both)
        out.grad_sq, out.tokens, out.weight = both.cpu().split(len(self.names))
        return out

    def metrics(self) -> dict[str, float]:
        """The ``train/grad_share/*``, ``train/token_share/*`` and ``train/weight/*`` values of the step.

        A value without a denominator is left out rather than logged as 0 (no gradient at all: no shares; an
        empty bucket: no mean weight), so that averages over steps are not pulled towards 0."""
        grad_total, token_total = self.grad_sq.sum().item(), self.tokens.sum().item()
        out: dict[str, float] = {}
        for i, name in enumerate(self.names):
            if grad_total > 0:
                out[f"train/grad_share/{name}"] = self.grad_sq[i].item() / grad_total
            if token_total > 0:
                out[f"train/token_share/{name}"] = self.tokens[i].item() / token_total
            if self.tokens[i].item() > 0:
                out[f"train/weight/{name}"] = self.weight[i].item() / self.tokens[i].item()
        return out


__all__ = ["GradBuckets", "bucket_names", "check_edges", "logit_grad_norm_sq", "surrogate_grad_coef"]
