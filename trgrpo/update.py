"""How one rollout batch becomes optimiser updates: the plan, and the micro-batches in order.

``UpdatePlan`` is derived once from the settings (mini/micro layout, epochs, whether old log-probs are
needed, zero-advantage skipping, shuffling).  ``UpdatePlan.steps`` walks

    passes (Lopti: low-probability tokens, then the rest)  x  epochs  x  mini-batches  x  micro-batches

and yields one ``OptimiserStep`` per mini-batch: its micro-batches as ``UpdateBatch`` tensors and the
normalisers of the loss, counted over the whole mini-batch on every process *before* any micro-batch
runs, so the update does not depend on how the mini-batch is split.

    inputs  = UpdateInputs(advantages, mask, old, ref_logp, passes)      whole rollout, [N] / [N, T]
    for step in plan.steps(inputs, generator, all_reduce_sum):
        for batch in step.micro_batches:      # forward + backward each
            ...
        optimiser.step()

Mini-batches are made of whole groups, shuffled each epoch when there are several.  No Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from trgrpo.config import LossConfig, OptimConfig, check_batch_layout
from trgrpo.scoring import TokenScores
from trgrpo.weighting import TokenWeighting


class UpdateBatch(NamedTuple):
    """The tensors of one micro-batch of b sequences (rows ``idx`` of the rollout)."""

    idx: Tensor  # [b] rows of the rollout
    advantages: Tensor  # [b] sequence advantages
    mask: Tensor  # [b, T] trained response tokens (the normalisers count these)
    active: Tensor  # [b, T] tokens trained in this pass (a subset of mask)
    old_logp: Tensor | None  # [b, T] rollout-policy log-probs; None: single pass, old = current detached
    ref_logp: Tensor | None  # [b, T] reference log-probs (KL term), None when beta = 0
    old_entropy: Tensor | None = None  # [b, T] rollout-time entropies, when the weighting reads them


class UpdateInputs(NamedTuple):
    """What the update needs about the whole rollout of N sequences."""

    advantages: Tensor  # [N]
    mask: Tensor  # [N, T] trained response tokens
    old: TokenScores | None  # [N, T] rollout-time log-probs (and entropies), None when not needed
    ref_logp: Tensor | None  # [N, T]
    passes: list[Tensor]  # [N, T] token sets trained by successive full updates (one: ``mask``)

    def micro_batch(self, idx: Tensor, active: Tensor) -> UpdateBatch:
        """The rows ``idx`` of the rollout, trained on the tokens of ``active`` [N, T]."""
        return UpdateBatch(
            idx=idx,
            advantages=self.advantages[idx],
            mask=self.mask[idx],
            active=active[idx],
            old_logp=self.old.logp[idx] if self.old is not None else None,
            ref_logp=self.ref_logp[idx] if self.ref_logp is not None else None,
            old_entropy=rows(self.old.entropy, idx) if self.old is not None else None,
        )


def rows(values: Tensor | None, idx: Tensor) -> Tensor | None:
    """The rows ``idx`` of an optional [N, ...] tensor."""
    return values[idx] if values is not None else None


class OptimiserStep(NamedTuple):
    """One mini-batch: its micro-batches and the normalisers of its loss."""

    micro_batches: list[UpdateBatch]  # empty when every sequence was skipped (zero advantage)
    num_tokens: float  # response tokens of the mini-batch, summed over processes
    num_seqs: float  # sequences of the mini-batch, summed over processes


@dataclass(frozen=True)
class UpdatePlan:
    """The layout of the updates of one rollout batch (sizes in sequences, per process).

    Build it with :meth:`build`, which validates the layout and names the config key at fault.
    """

    group_size: int  # G
    sequences: int  # N = prompts per step * G, the sequences of one RL step
    mini: int  # sequences per optimiser step
    micro: int  # sequences per forward/backward
    epochs: int  # mu
    world: int  # processes
    multi_pass: bool  # the weighting trains its own token sets (``TokenWeighting.multi_pass``)
    needs_entropy: bool  # the weighting's passes read rollout-time entropies
    skip_zero_advantage: bool  # leave zero-advantage sequences out of forward/backward

    @classmethod
    def build(
        cls,
        prompts_per_step: int,
        group_size: int,
        optim: OptimConfig,
        loss: LossConfig,
        weighting: TokenWeighting,
        world: int = 1,
    ) -> UpdatePlan:
        """From ``OptimConfig``, ``LossConfig`` and the weighting strategy."""
        mini, micro = check_batch_layout(prompts_per_step, group_size, optim)
        # a zero advantage zeroes the clipped surrogate and its gradient exactly; without KL or entropy bonus
        # such sequences add nothing, so they are left out (the normalisers still count them)
        skip = optim.skip_zero_advantage and loss.beta == 0 and loss.entropy_coef == 0 and world == 1
        return cls(
            group_size=group_size,
            sequences=prompts_per_step * group_size,
            mini=mini,
            micro=micro,
            epochs=optim.epochs,
            world=world,
            multi_pass=weighting.multi_pass,
            needs_entropy=weighting.needs_entropy,
            skip_zero_advantage=skip,
        )

    @property
    def shuffle(self) -> bool:
        """Several mini-batches per epoch: their order (whole groups) is shuffled every epoch."""
        return self.mini < self.sequences

    @property
    def needs_old_logp(self) -> bool:
        """A separate no-grad pass for the rollout-time log-probs is needed: several updates share the batch,
        or the strategy reads them before the first update.  Otherwise old = current detached, ratio 1."""
        return self.epochs > 1 or self.shuffle or self.multi_pass or self.needs_entropy

    def order(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        """[N] sequence indices for one epoch: whole groups, shuffled when there are several mini-batches."""
        g = self.group_size
        groups = self.sequences // g
        perm = torch.randperm(groups, generator=generator) if self.shuffle else torch.arange(groups)
        return (perm.unsqueeze(1) * g + torch.arange(g)).reshape(-1).to(device)

    def steps(
        self,
        inputs: UpdateInputs,
        generator: torch.Generator,
        all_reduce_sum: Callable[[Tensor], Tensor] = lambda t: t,
    ) -> Iterator[OptimiserStep]:
        """Every optimiser step of the rollout batch, in order (see the module docstring)."""
        n = inputs.advantages.shape[0]
        if n != self.sequences:
            raise ValueError(f"rollout of {n} sequences, the plan expects {self.sequences}")
        for active in inputs.passes:
            for _ in range(self.epochs):
                order = self.order(generator, inputs.advantages.device)
                for start in range(0, n, self.mini):
                    idx = order[start : start + self.mini]
                    num_tokens = all_reduce_sum(inputs.mask[idx].sum()).item()
                    trained = idx[inputs.advantages[idx] != 0] if self.skip_zero_advantage else idx
                    micro = (
                        [inputs.micro_batch(i, active) for i in trained.split(self.micro)]
                        if len(trained)
                        else []
                    )
                    yield OptimiserStep(micro, num_tokens, float(self.mini * self.world))


__all__ = ["OptimiserStep", "UpdateBatch", "UpdateInputs", "UpdatePlan"]
