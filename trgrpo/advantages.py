"""Group-relative advantages for GRPO (DeepSeekMath, 2024) and its Dr. GRPO variant.

Every completion i of a group of G shares the prompt; its advantage is its reward minus the group mean,
optionally divided by a spread estimate:

    A_i = (R_i - mean_g R) / (std_g R + eps)     scale="group"   (GRPO)
    A_i = (R_i - mean_g R) / (std_B R + eps)     scale="batch"   (std over the whole rollout batch)
    A_i =  R_i - mean_g R                        scale="none"    (Dr. GRPO)

A group whose rewards are all equal gets A = 0 (never NaN): its centred rewards are exactly zero and the
denominator is at least eps.  Pure tensor code, no Lightning import.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]


def compute_advantages(
    rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4
) -> Tensor:
    """Advantages for rewards laid out group by group.

    Args:
        rewards: [N] float, N = num_groups * group_size, completions of one prompt contiguous.
        group_size: G, completions per prompt (>= 2).
        scale: how centred rewards are divided; see the module docstring.
        eps: added to the spread so equal-reward groups give exactly 0.

    Returns:
        [N] advantages, same dtype as ``rewards``.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        # unbiased std over G samples, as the GRPO reference implementations use
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps) if rewards.numel() > 1 else centred
    elif scale != "none":
        names = ", ".join(map(repr, get_args(AdvantageScale)))
        raise ValueError(f"scale must be one of {names}, got {scale!r}")
    return centred.reshape(-1)


def group_reward_spread(rewards: Tensor, group_size: int) -> Tensor:
    """[num_groups] std of the rewards inside each group (0 where the group carries no signal)."""
    return rewards.view(-1, group_size).std(dim=1)


def group_has_spread(rewards: Tensor, group_size: int, tol: float = 1e-8) -> Tensor:
    """[num_groups] bool: max - min of the group's rewards exceeds ``tol`` (the group carries a signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > tol


def zero_spread_fraction(rewards: Tensor, group_size: int, tol: float = 1e-8) -> float:
    """Share of groups whose reward std is under ``tol``: they contribute no policy gradient.

    This is ``train/frac_reward_zero_std``.  It reads the same std as ``group_reward_spread`` (and so
    ``train/reward_std``), not the max - min test of ``group_has_spread`` that dynamic sampling filters with.
    """
    return (group_reward_spread(rewards, group_size) < tol).float().mean().item()


__all__ = [
    "AdvantageScale",
    "compute_advantages",
    "group_has_spread",
    "group_reward_spread",
    "zero_spread_fraction",
]
