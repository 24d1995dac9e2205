"""Statistics of one RL step, as typed values whose fields are the logged metrics.

``UpdateStats`` sums what the micro-batches of a step report (loss, clipped tokens, KL, weights, ...);
``reduced()`` sums it over processes (min / max for the weight range), so every ratio logged is the global
one.  ``StepStats`` is what is logged: each field declares its metric name (``train/clip_ratio/low``) and
``metrics()`` returns ``{name: value}`` for the fields that apply (None = not logged).  ``StepTimings``
holds the wall time of each phase of the step (``train/time/*``).  No Lightning import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from trgrpo.advantages import group_reward_spread
from trgrpo.diagnostics import GradBuckets, logit_grad_norm_sq


def _metric(name: str):
    return field(default=None, metadata={"metric": name})


class StepTimings(NamedTuple):
    """Seconds spent in each phase of one RL step."""

    generation: float
    reward: float
    old_logprobs: float  # the no-grad scoring passes: old and reference log-probs
    update: float  # forward/backward and optimiser steps


@dataclass
class UpdateStats:
    """Sums over the micro-batches and optimiser steps of one RL step (per process until ``reduced``)."""

    loss: float = 0.0
    clipped_low: float = 0.0  # active tokens clipped below (A < 0)
    clipped_high: float = 0.0  # active tokens clipped above (A > 0)
    kl: float = 0.0  # summed per-token KL over response tokens
    tokens: float = 0.0  # response tokens that went through forward/backward
    active_tokens: float = 0.0  # tokens trained in their pass
    entropy: float | None = None  # summed token entropy (None when not computed)
    sampler_kl: float | None = (
        None  # summed k3 KL(sampler || trainer) (None: the engine reports no log-probs)
    )
    weight_sum: float = 0.0
    weight_min: float = math.inf
    weight_max: float = -math.inf
    weight_at_lower: float = 0.0
    weight_at_upper: float = 0.0
    grad_norm: float = 0.0  # summed pre-clip norms (identical on every process)
    updates: float = 0.0  # optimiser steps (identical on every process)
    buckets: GradBuckets | None = None  # gradient share by probability bucket (None: diagnostics off)

    def add_micro_batch(
        self,
        loss: Tensor,
        clipped_low: Tensor,
        clipped_high: Tensor,
        kl: Tensor,
        weights: Tensor,
        mask: Tensor,
        active: Tensor,
        entropy: Tensor | None,
        bounds: tuple[float, float] | None,
        sampler_kl: Tensor | None = None,
    ) -> None:
        """Add one micro-batch: scalar loss outputs, [b, T] weights / masks / entropy."""
        self.loss += loss.item()
        self.clipped_low += clipped_low.item()
        self.clipped_high += clipped_high.item()
        self.kl += kl.item()
        self.active_tokens += active.sum().item()
        self.tokens += mask.sum().item()
        if sampler_kl is not None:
            self.sampler_kl = (self.sampler_kl or 0.0) + sampler_kl.item()
        if entropy is not None:
            self.entropy = (self.entropy or 0.0) + (entropy.detach() * mask).sum().item()
        sel = weights[active.bool()]
        if sel.numel():
            self.weight_sum += sel.sum().item()
            self.weight_min = min(self.weight_min, sel.min().item())
            self.weight_max = max(self.weight_max, sel.max().item())
            if bounds is not None:
                self.weight_at_lower += (sel <= bounds[0]).sum().item()
                self.weight_at_upper += (sel >= bounds[1]).sum().item()

    def add_grad_buckets(
        self,
        pg_coef: Tensor,
        logp: Tensor,
        prob_sq: Tensor,
        rollout_logp: Tensor,
        weights: Tensor,
        active: Tensor,
    ) -> None:
        """Add one micro-batch to the bucket diagnostics ([b, T] tensors; see ``trgrpo.diagnostics``)."""
        if self.buckets is not None:
            self.buckets.add(logit_grad_norm_sq(pg_coef, logp, prob_sq), rollout_logp, weights, active)

    def add_optimiser_step(self, grad_norm: float) -> None:
        self.grad_norm += grad_norm
        self.updates += 1

    def reduced(self, device: torch.device | str = "cpu") -> UpdateStats:
        """These sums over every process (a copy; unchanged with one process or no process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dataclasses.replace(self)  # the buckets object is shared: nothing is added after reducing
        same = {"grad_norm", "updates", "weight_min", "weight_max", "buckets"}
        keys = [f.name for f in dataclasses.fields(self) if f.name not in same]
        sums = torch.tensor(
            [float(getattr(self, k) or 0.0) for k in keys], dtype=torch.float64, device=device
        )
        low = torch.tensor([self.weight_min, -self.weight_max], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        out = dataclasses.replace(self, **dict(zip(keys, sums.tolist(), strict=True)))
        out.entropy = out.entropy if self.entropy is not None else None
        out.sampler_kl = out.sampler_kl if self.sampler_kl is not None else None
        out.weight_min, out.weight_max = low[0].item(), -low[1].item()
        out.buckets = self.buckets.reduced(device) if self.buckets is not None else None
        return out


@dataclass
class StepStats:
    """The logged metrics of one RL step; a None field is not logged."""

    reward: float | None = _metric("train/reward")
    reward_std: float | None = _metric("train/reward_std")  # mean within-group std
    frac_reward_zero_std: float | None = _metric("train/frac_reward_zero_std")
    reward_errors: float | None = _metric("train/reward_errors")
    completion_length: float | None = _metric("train/completion_length")
    truncated_ratio: float | None = _metric("train/truncated_ratio")
    loss: float | None = _metric("train/loss")
    clip_ratio_low: float | None = _metric("train/clip_ratio/low")
    clip_ratio_high: float | None = _metric("train/clip_ratio/high")
    grad_norm: float | None = _metric("train/grad_norm")
    grad_norm_delta: float | None = _metric("train/grad_norm_delta")  # |grad_norm - previous RL step's|
    rl_step: float | None = _metric("train/rl_step")  # RL steps completed, this one included
    lr: float | None = _metric("train/lr")
    weight_mean: float | None = _metric("train/weight/mean")
    weight_min: float | None = _metric("train/weight/min")
    weight_max: float | None = _metric("train/weight/max")
    weight_at_lower: float | None = _metric("train/weight/at_lower")
    weight_at_upper: float | None = _metric("train/weight/at_upper")
    kl: float | None = _metric("train/kl")
    entropy: float | None = _metric("train/entropy")
    time_generation: float | None = _metric("train/time/generation")
    time_reward: float | None = _metric("train/time/reward")
    time_old_logprobs: float | None = _metric("train/time/old_logprobs")
    time_update: float | None = _metric("train/time/update")
    tool_calls: float | None = _metric("train/tool_calls")  # multi-turn: mean tool calls per completion
    tool_errors: float | None = _metric("train/tool_errors")  # calls that returned an error text, per step
    turns: float | None = _metric("train/turns")  # mean model turns per completion
    no_tool_ratio: float | None = _metric("train/no_tool_ratio")  # share of completions without any call
    groups_drawn: float | None = _metric("train/dynamic_sampling/drawn")  # groups sampled and scored
    groups_dropped: float | None = _metric("train/dynamic_sampling/dropped")  # groups left out of the update
    groups_filled: float | None = _metric(
        "train/dynamic_sampling/filled"
    )  # kept groups without reward spread
    sampler_kl: float | None = _metric(
        "train/sampler_kl"
    )  # k3 KL(sampler || trainer) per token (vllm engine)
    reward_terms: dict[str, float] = field(default_factory=dict)  # train/rewards/<name> and <name>_std
    buckets: dict[str, float] = field(
        default_factory=dict
    )  # train/grad_share/*, token_share/*, weight/<bucket>

    def timings(self) -> StepTimings:
        return StepTimings(self.time_generation, self.time_reward, self.time_old_logprobs, self.time_update)

    def metrics(self) -> dict[str, float]:
        """``{metric name: value}`` of every field that applies."""
        out = {
            f.metadata["metric"]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if "metric" in f.metadata and getattr(self, f.name) is not None
        }
        out.update(self.reward_terms)
        out.update(self.buckets)
        return out

    @classmethod
    def collect(
        cls,
        *,
        rewards: Tensor,
        per_term: dict[str, Tensor],
        reward_errors: int,
        group_size: int,
        completion_mask: Tensor,
        truncated: Tensor,
        update: UpdateStats,
        lr: float,
        bounded_weights: bool,
        kl: bool,
        timings: StepTimings,
        episodes=None,
        groups=None,
        rl_step: int | None = None,
        previous: StepStats | None = None,
    ) -> StepStats:
        """From [N] total rewards, per-term [N] scores (NaN = not applicable), the [N, T] trained-token mask
        (tool output excluded), [N] truncation flags, the step's (already reduced) ``UpdateStats`` and, for a
        multi-turn rollout, its ``trgrpo.agent.episodes.EpisodeStats`` ([N] calls, errors, turns); with dynamic
        sampling ``rewards`` are every drawn completion's and ``groups`` the ``GroupSelection`` counts.
        ``rl_step`` is this step's number (1-based); ``previous`` the last step's stats of this run, for
        ``grad_norm_delta`` (none on a run's first step; a resumed run has it from the checkpoint)."""
        spread = group_reward_spread(rewards, group_size)
        tokens, active = max(update.tokens, 1.0), max(update.active_tokens, 1.0)
        grad_norm = update.grad_norm / max(update.updates, 1.0)  # mean pre-clip norm over the step's updates
        any_active = update.active_tokens > 0
        terms: dict[str, float] = {}
        for name, values in per_term.items():
            valid = values[~torch.isnan(values)]
            terms[f"train/rewards/{name}"] = valid.mean().item() if valid.numel() else 0.0
            terms[f"train/rewards/{name}_std"] = valid.std().item() if valid.numel() > 1 else 0.0
        return cls(
            reward=rewards.mean().item(),
            reward_std=spread.mean().item(),
            frac_reward_zero_std=(spread < 1e-8).float().mean().item(),
            reward_errors=float(reward_errors),
            completion_length=completion_mask.sum(1).float().mean().item(),
            truncated_ratio=truncated.float().mean().item(),
            loss=update.loss / max(update.updates, 1.0),
            clip_ratio_low=update.clipped_low / active,
            clip_ratio_high=update.clipped_high / active,
            grad_norm=grad_norm,
            grad_norm_delta=abs(grad_norm - previous.grad_norm)
            if previous is not None and previous.grad_norm is not None
            else None,
            rl_step=float(rl_step) if rl_step is not None else None,
            lr=lr,
            weight_mean=update.weight_sum / active,
            weight_min=update.weight_min if any_active else 0.0,
            weight_max=update.weight_max if any_active else 0.0,
            weight_at_lower=update.weight_at_lower / active if bounded_weights else None,
            weight_at_upper=update.weight_at_upper / active if bounded_weights else None,
            kl=update.kl / tokens if kl else None,
            entropy=update.entropy / tokens if update.entropy is not None else None,
            sampler_kl=update.sampler_kl / tokens if update.sampler_kl is not None else None,
            time_generation=timings.generation,
            time_reward=timings.reward,
            time_old_logprobs=timings.old_logprobs,
            time_update=timings.update,
            reward_terms=terms,
            buckets=update.buckets.metrics() if update.buckets is not None else {},
            **(tool_metrics(episodes) if episodes is not None else {}),
            **(
                {}
                if groups is None
                else {
                    "groups_drawn": float(groups.drawn),
                    "groups_dropped": float(groups.dropped),
                    "groups_filled": float(groups.filled),
                }
            ),
        )


def tool_metrics(episodes) -> dict[str, float]:
    """The tool fields of ``StepStats`` from [N] per-completion calls, errors and turns."""
    calls = episodes.tool_calls.float()
    return {
        "tool_calls": calls.mean().item(),
        "tool_errors": episodes.tool_errors.sum().item(),
        "turns": episodes.turns.float().mean().item(),
        "no_tool_ratio": (calls == 0).float().mean().item(),
    }


__all__ = ["StepStats", "StepTimings", "UpdateStats"]
