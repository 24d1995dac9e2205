"""Group advantages on hand-computed numbers."""

import math

import pytest
import torch

from trgrpo.advantages import compute_advantages, zero_spread_fraction


def test_group_scale_matches_hand_computation():
    # group [1, 0, 0, 1]: mean 0.5, centred [.5, -.5, -.5, .5], unbiased std sqrt(1/3) = 0.57735
    adv = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, scale="group", eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)  # 0.866025
    assert torch.allclose(adv, torch.tensor([expected, -expected, -expected, expected]))


def test_groups_are_independent_and_none_scale_is_centring_only():
    rewards = torch.tensor([2.0, 0.0, 10.0, 10.0])  # groups of 2: [2, 0] and [10, 10]
    # small integers: the means and differences are exact in float32
    assert torch.equal(compute_advantages(rewards, 2, scale="none"), torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_batch_scale_divides_by_batch_std():
    rewards = torch.tensor([0.0, 0.0, 0.0, 4.0])  # groups [0, 0] and [0, 4]
    # batch mean 1, deviations [-1, -1, -1, 3], unbiased variance 12 / 3 = 4, std 2
    adv = compute_advantages(rewards, 2, scale="batch", eps=0.0)
    assert torch.allclose(adv, torch.tensor([0.0, 0.0, -1.0, 1.0]))


def test_equal_reward_group_gives_zero_not_nan():
    adv = compute_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5]), group_size=3)
    assert torch.equal(
        adv[:3], torch.zeros(3)
    )  # r - mean(r) of equal r is exactly 0, and so is 0 / (0 + eps)
    assert not torch.isnan(adv).any()
    assert (
        zero_spread_fraction(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5]), 3) == 0.5
    )  # 1 of 2 groups: exact


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match="groups of 4"):
        compute_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale must be one of"):
        compute_advantages(torch.zeros(4), 2, scale="rank")  # type: ignore[arg-type]
