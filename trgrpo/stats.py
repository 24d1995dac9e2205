"""Statistics of one RL step, as typed values whose fields are the logged metrics.

``UpdateStats`` sums what the micro-batches of a step report (loss, clipped tokens, KL, weights, ...), each
added from the loss's ``PolicyLossOutput``, its ``UpdateBatch`` and the policy's ``TokenScores``;
``reduced()`` sums it over processes (min / max for the weight range), so every ratio logged is the global
one.  ``StepStats`` is what is logged: each field declares its metric name (``train/clip_ratio/low``) and
``metrics()`` returns ``{name: value}`` for the fields that apply (None = not logged); ``collect`` builds
it from the step's ``RewardResult``, ``Rollout``, reduced ``UpdateStats`` and ``StepTimings`` (the wall
time of each phase of the step, ``train/time/*``).  With several processes ``collect`` pools each reward
term's mean and std over all of them (``ProcessReduce``) and adds the slowest process's phase times
(``train/time_max/*``): a straggler that the averaged ``train/time/*`` hides.  No Lightning import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from trgrpo.advantages import group_reward_spread, zero_spread_fraction
from trgrpo.diagnostics import GradBuckets, logit_grad_norm_sq, surrogate_grad_coef
from trgrpo.losses import old_logprobs
from trgrpo.world import is_distributed

if TYPE_CHECKING:
    from trgrpo.dynamic_sampling import GroupSelection
    from trgrpo.losses import PolicyLossOutput
    from trgrpo.rewards import RewardResult
    from trgrpo.rollout import Rollout
    from trgrpo.rollout.base import EpisodeStats
    from trgrpo.scoring import TokenScores
    from trgrpo.update import UpdateBatch


def _metric(name: str):
    return field(default=None, metadata={"metric": name})


class StepTimings(NamedTuple):
    """Seconds spent in each phase of one RL step."""

    generation: float
    reward: float
    old_logprobs: float  # the no-grad scoring passes: old and reference log-probs
    update: float  # forward/backward and optimiser steps


def _all_reduce(op: dist.ReduceOp) -> Callable[[Tensor], Tensor]:
    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=op)
        return t

    return reduce


class ProcessReduce(NamedTuple):
    """Reductions of a tensor over every process (a copy), and how many processes there are."""

    sum: Callable[[Tensor], Tensor]
    max: Callable[[Tensor], Tensor]
    world: int
    device: torch.device | str = "cpu"  # where the reduced tensors must live (CUDA for NCCL)

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> ProcessReduce:
        """torch.distributed's all-reduce when a process group holds several processes, else identities."""
        if not is_distributed():
            return cls(lambda t: t, lambda t: t, 1, device)
        return cls(
            _all_reduce(dist.ReduceOp.SUM), _all_reduce(dist.ReduceOp.MAX), dist.get_world_size(), device
        )


def slowest_timings(timings: StepTimings, processes: ProcessReduce) -> StepTimings | None:
    """Each phase's longest time over the processes (a straggler the mean hides); None with one process."""
    if processes.world == 1:
        return None
    longest = processes.max(torch.tensor(timings, dtype=torch.float64, device=processes.device))
    return StepTimings(*longest.tolist())


CORRECTION_SUMS = ("corrected_tokens", "corrected_seqs", "correction_seqs", "correction_weight_sum")


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
    # summed k3 KL(sampler || trainer) (None: the engine reports no log-probs)
    sampler_kl: float | None = None
    # the sampler correction (None when off): trained tokens and sequences seen, how many were truncated or
    # masked (a sequence when any of its trained tokens was), and the summed correction weight of the tokens
    corrected_tokens: float | None = None
    corrected_seqs: float | None = None
    correction_seqs: float | None = None
    correction_weight_sum: float | None = None
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
        out: PolicyLossOutput,
        batch: UpdateBatch,
        scores: TokenScores,
        bounds: tuple[float, float] | None,
    ) -> None:
        """Add one micro-batch: the loss's output, its batch, the policy's scores and the weighting's bounds
        (``TokenWeighting.bounds``; None: no at-bound counts)."""
        active = batch.active.bool()  # [b, T]
        self.loss += out.loss.item()
        self.clipped_low += (out.clipped_low & active).sum().item()
        self.clipped_high += (out.clipped_high & active).sum().item()
        self.kl += out.kl.item()
        self.active_tokens += batch.active.sum().item()
        self.tokens += batch.mask.sum().item()
        if out.sampler_kl is not None:
            self.sampler_kl = (self.sampler_kl or 0.0) + out.sampler_kl.item()
        if scores.entropy is not None:
            self.entropy = (self.entropy or 0.0) + (scores.entropy.detach() * batch.mask).sum().item()
        if out.correction is not None and out.corrected is not None:
            self.add_correction(out.correction, out.corrected, active)
        self.add_weights(out.weights[active], bounds)

    def add_correction(self, weight: Tensor, corrected: Tensor, active: Tensor) -> None:
        """Add the [b, T] correction weights and out-of-bounds flags of the [b, T] trained tokens."""
        hit = corrected & active  # [b, T]
        self.corrected_tokens = (self.corrected_tokens or 0.0) + hit.sum().item()
        self.corrected_seqs = (self.corrected_seqs or 0.0) + hit.any(dim=1).sum().item()
        self.correction_seqs = (self.correction_seqs or 0.0) + active.any(dim=1).sum().item()
        self.correction_weight_sum = (self.correction_weight_sum or 0.0) + weight[active].sum().item()

    def add_weights(self, trained: Tensor, bounds: tuple[float, float] | None) -> None:
        """Add the [n] weights of the trained tokens to the sum, the range and the at-bound counts."""
        if not trained.numel():
            return
        self.weight_sum += trained.sum().item()
        self.weight_min = min(self.weight_min, trained.min().item())
        self.weight_max = max(self.weight_max, trained.max().item())
        if bounds is not None:
            self.weight_at_lower += (trained <= bounds[0]).sum().item()
            self.weight_at_upper += (trained >= bounds[1]).sum().item()

    def add_grad_buckets(self, out: PolicyLossOutput, batch: UpdateBatch, scores: TokenScores) -> None:
        """Add one micro-batch to the bucket diagnostics (``trgrpo.diagnostics``): each token's surrogate
        gradient at its logits, by the probability it had under the policy before the update."""
        if self.buckets is None:
            return
        grad_sq = logit_grad_norm_sq(surrogate_grad_coef(out, batch), scores.logp, scores.prob_sq)  # [b, T]
        self.buckets.add(grad_sq, old_logprobs(batch, scores), out.weights, batch.active)

    def add_optimiser_step(self, grad_norm: float) -> None:
        self.grad_norm += grad_norm
        self.updates += 1

    def reduced(self, device: torch.device | str = "cpu") -> UpdateStats:
        """These sums over every process (a copy; unchanged with one process or no process group)."""
        if not is_distributed():
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
        for key in ("sampler_kl", *CORRECTION_SUMS):
            setattr(out, key, getattr(out, key) if getattr(self, key) is not None else None)
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
    # the slowest process's time of each phase (several processes only; train/time/* is their mean)
    time_max_generation: float | None = _metric("train/time_max/generation")
    time_max_reward: float | None = _metric("train/time_max/reward")
    time_max_old_logprobs: float | None = _metric("train/time_max/old_logprobs")
    time_max_update: float | None = _metric("train/time_max/update")
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
    # the sampler correction: shares of trained tokens and of sequences truncated or masked, mean weight
    sampler_corrected_tokens: float | None = _metric("train/sampler_correction/token_frac")
    sampler_corrected_seqs: float | None = _metric("train/sampler_correction/seq_frac")
    sampler_weight_mean: float | None = _metric("train/sampler_correction/weight_mean")
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
        rewards: RewardResult,
        rollout: Rollout,
        update: UpdateStats,
        timings: StepTimings,
        *,
        group_size: int,
        lr: float,
        bounded_weights: bool,
        kl: bool,
        groups: GroupSelection | None = None,
        rl_step: int | None = None,
        previous: StepStats | None = None,
        processes: ProcessReduce | None = None,
    ) -> StepStats:
        """The step's metrics from its rewards (with dynamic sampling: every drawn completion's, and
        ``groups`` the ``GroupSelection`` counts), the rollout trained on (its trained-token mask leaves tool
        output out; a multi-turn rollout's ``episodes`` give the tool metrics), the (already reduced)
        ``UpdateStats`` and the phase timings.  ``bounded_weights`` / ``kl``: whether the weighting has bounds
        and the loss a KL term.  ``rl_step`` is this step's number (1-based); ``previous`` the last step's
        stats of this run, for ``grad_norm_delta`` (none on a run's first step; a resumed run has it from the
        checkpoint).  ``processes``: how the reward terms and the slowest phase times are reduced (default:
        over torch.distributed's processes, on the CPU)."""
        processes = processes or ProcessReduce.current()
        slowest = slowest_timings(timings, processes)
        stats = cls(
            **reward_fields(rewards, group_size, processes),
            **(timing_fields(slowest, "time_max_") if slowest is not None else {}),
            **rollout_fields(rollout),
            **update_fields(update, bounded_weights, kl),
            **(group_fields(groups) if groups is not None else {}),
            rl_step=float(rl_step) if rl_step is not None else None,
            lr=lr,
            time_generation=timings.generation,
            time_reward=timings.reward,
            time_old_logprobs=timings.old_logprobs,
            time_update=timings.update,
        )
        if previous is not None and previous.grad_norm is not None:
            stats.grad_norm_delta = abs(stats.grad_norm - previous.grad_norm)
        return stats


def term_moments(per_term: dict[str, Tensor]) -> Tensor:
    """[terms, 3] float64 (count, sum, sum of squares) of each term's [N] values, NaN (not applicable) left
    out: sums that add up over processes, unlike a mean or a std."""
    rows = []
    for values in per_term.values():
        valid = values[~torch.isnan(values)].double()
        rows.append(torch.stack([valid.new_tensor(float(valid.numel())), valid.sum(), valid.square().sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def pooled_mean_std(n: float, total: float, squares: float) -> tuple[float, float]:
    """Mean and sample std (n - 1, as ``Tensor.std``) of n values from their sum and sum of squares; NaN for
    no value, std 0.0 for one."""
    if n == 0:
        return math.nan, math.nan
    mean = total / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(max(squares - n * mean * mean, 0.0) / (n - 1))


def reward_fields(rewards: RewardResult, group_size: int, processes: ProcessReduce | None = None) -> dict:
    """The reward fields of ``StepStats``: [N] totals, within-group spread, errors, and each term's mean and
    std over the samples it applies to on every process (NaN = not applicable anywhere).  The terms are
    pooled over ``processes`` (a mean of per-process stds is not the std, and processes differ in how many
    samples a term applies to); the group statistics are per-process means, exact as they are averaged over
    processes because every process has as many groups."""
    processes = processes or ProcessReduce.current()
    total = rewards.total  # [N]
    terms: dict[str, float] = {}
    pooled = processes.sum(term_moments(rewards.per_term).to(processes.device)).cpu()  # [terms, 3]
    for name, moments in zip(rewards.per_term, pooled.tolist(), strict=True):
        # a term that applied to no sample is NaN, not 0.0 (which would read as a real score); logged all the
        # same, so that every process logs the same metric names
        mean, std = pooled_mean_std(*moments)
        terms[f"train/rewards/{name}"] = mean
        terms[f"train/rewards/{name}_std"] = std
    return {
        "reward": total.mean().item(),
        "reward_std": group_reward_spread(total, group_size).mean().item(),
        "frac_reward_zero_std": zero_spread_fraction(total, group_size),
        "reward_errors": float(rewards.errors),
        "reward_terms": terms,
    }


def rollout_fields(rollout: Rollout) -> dict:
    """Completion length over the [N, T] trained tokens, the truncated share, and the tool metrics."""
    out = {
        "completion_length": rollout.trainable_mask.sum(1).float().mean().item(),
        "truncated_ratio": rollout.truncated.float().mean().item(),
    }
    return {**out, **tool_metrics(rollout.episodes)} if rollout.episodes is not None else out


def update_fields(update: UpdateStats, bounded_weights: bool, kl: bool) -> dict:
    """Loss, clipping, gradient norm, weights, KL and entropy, per trained or response token of the step."""
    tokens, active = max(update.tokens, 1.0), max(update.active_tokens, 1.0)
    updates = max(update.updates, 1.0)
    any_active = update.active_tokens > 0
    return {
        "loss": update.loss / updates,
        "clip_ratio_low": update.clipped_low / active,
        "clip_ratio_high": update.clipped_high / active,
        "grad_norm": update.grad_norm / updates,  # mean pre-clip norm over the step's updates
        "weight_mean": update.weight_sum / active,
        "weight_min": update.weight_min if any_active else 0.0,
        "weight_max": update.weight_max if any_active else 0.0,
        "weight_at_lower": update.weight_at_lower / active if bounded_weights else None,
        "weight_at_upper": update.weight_at_upper / active if bounded_weights else None,
        "kl": update.kl / tokens if kl else None,
        "entropy": update.entropy / tokens if update.entropy is not None else None,
        "sampler_kl": update.sampler_kl / tokens if update.sampler_kl is not None else None,
        "buckets": update.buckets.metrics() if update.buckets is not None else {},
        **correction_fields(update, active),
    }


def correction_fields(update: UpdateStats, active: float) -> dict:
    """The sampler correction's shares of trained tokens and sequences truncated or masked, and its mean
    weight per trained token; empty without a correction."""
    if update.corrected_tokens is None:
        return {}
    return {
        "sampler_corrected_tokens": update.corrected_tokens / active,
        "sampler_corrected_seqs": update.corrected_seqs / max(update.correction_seqs, 1.0),
        "sampler_weight_mean": update.correction_weight_sum / active,
    }


def timing_fields(timings: StepTimings, prefix: str) -> dict[str, float]:
    """``{prefix + phase: seconds}`` of each phase."""
    return {prefix + phase: seconds for phase, seconds in timings._asdict().items()}


def group_fields(groups: GroupSelection) -> dict[str, float]:
    """The dynamic-sampling fields of ``StepStats``: groups drawn, dropped and filled."""
    return {
        "groups_drawn": float(groups.drawn),
        "groups_dropped": float(groups.dropped),
        "groups_filled": float(groups.filled),
    }


def tool_metrics(episodes: EpisodeStats) -> dict[str, float]:
    """The tool fields of ``StepStats`` from [N] per-completion calls, errors and turns."""
    calls = episodes.tool_calls.float()
    return {
        "tool_calls": calls.mean().item(),
        "tool_errors": episodes.tool_errors.sum().item(),
        "turns": episodes.turns.float().mean().item(),
        "no_tool_ratio": (calls == 0).float().mean().item(),
    }


__all__ = ["ProcessReduce", "StepStats", "StepTimings", "UpdateStats"]
