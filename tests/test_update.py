"""The update plan and the step statistics, without a trainer.

python -m pytest tests/test_update.py -q
"""

from __future__ import annotations

import pytest
import torch

import trgrpo.weighting
from trgrpo.config import LossConfig, OptimConfig
from trgrpo.losses import PolicyLossOutput
from trgrpo.rewards import RewardResult
from trgrpo.rollout import Rollout
from trgrpo.scoring import TokenScores
from trgrpo.stats import StepStats, StepTimings, UpdateStats
from trgrpo.update import UpdateBatch, UpdateInputs, UpdatePlan
from trgrpo.weighting import (
    HighEntropyWeighting,
    LoptiWeighting,
    TokenRegulatedWeighting,
    TokenWeighting,
    UniformWeighting,
)

G = 2


def _plan(prompts=4, weighting=None, **optim) -> UpdatePlan:
    return UpdatePlan.build(prompts, G, OptimConfig(**optim), LossConfig(), weighting or UniformWeighting())


def _inputs(n=8, t=3, adv=None) -> UpdateInputs:
    mask = torch.ones(n, t)
    mask[0, 2] = 0  # one padded position: 23 response tokens
    adv = adv if adv is not None else torch.arange(1.0, n + 1)
    return UpdateInputs(adv, mask, TokenScores(torch.zeros(n, t), None), None, [mask])


def test_one_mini_batch_needs_no_old_logprobs_and_is_not_shuffled():
    plan = _plan()
    assert (plan.mini, plan.micro, plan.sequences) == (8, 8, 8)
    assert not plan.shuffle and not plan.needs_old_logp
    steps = list(plan.steps(_inputs(), torch.Generator().manual_seed(0)))
    assert len(steps) == 1 and len(steps[0].micro_batches) == 1  # one optimiser update per RL step
    assert steps[0].micro_batches[0].idx.tolist() == list(range(8))
    assert (steps[0].num_tokens, steps[0].num_seqs) == (23.0, 8.0)


@pytest.mark.parametrize(
    ("optim", "why"), [({"epochs": 2}, "epochs"), ({"mini_batch_size": 4}, "mini-batches")]
)
def test_several_updates_per_batch_need_old_logprobs(optim, why):
    assert _plan(**optim).needs_old_logp, why


def test_lopti_needs_old_logprobs_and_top_entropy_needs_entropies():
    assert _plan(weighting=LoptiWeighting()).multi_pass and _plan(weighting=LoptiWeighting()).needs_old_logp
    assert _plan(weighting=HighEntropyWeighting()).needs_entropy
    assert not _plan(weighting=TokenRegulatedWeighting()).needs_old_logp


STRATEGIES = [
    c for c in vars(trgrpo.weighting).values() if isinstance(c, type) and issubclass(c, TokenWeighting)
]


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_a_weighting_declares_multi_pass_exactly_when_it_chooses_its_own_passes(cls):
    """The plan reads ``multi_pass`` from the weighting: every strategy that overrides ``passes`` says so."""
    assert cls.multi_pass == (cls.passes is not TokenWeighting.passes), cls.__name__


def test_lopti_updates_twice_per_mini_batch_on_the_same_old_logprobs():
    """Two passes x one epoch x one mini-batch: two optimiser updates per RL step, low tokens first."""
    inputs = _inputs()
    low = inputs.mask * (torch.arange(3) == 0)  # [N, T] the first token of each sequence
    passes = UpdateInputs(inputs.advantages, inputs.mask, inputs.old, None, [low, inputs.mask - low])
    steps = list(_plan(weighting=LoptiWeighting()).steps(passes, torch.Generator()))
    assert len(steps) == 2
    assert all(torch.equal(s.micro_batches[0].active, a) for s, a in zip(steps, passes.passes, strict=True))
    assert all(s.num_tokens == 23.0 for s in steps)  # each pass normalised by every response token


def test_mini_batches_are_whole_shuffled_groups_and_normalisers_count_the_mini_batch():
    plan = _plan(mini_batch_size=4, micro_batch_size=2, epochs=2)
    assert plan.shuffle
    inputs = _inputs()
    steps = list(plan.steps(inputs, torch.Generator().manual_seed(1)))
    assert len(steps) == 4  # 2 epochs x 2 mini-batches: four optimiser updates per RL step
    epochs = [torch.cat([b.idx for s in steps[i : i + 2] for b in s.micro_batches]) for i in (0, 2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(8))  # every sequence once per epoch
        assert all(order[i].item() // G == order[i + 1].item() // G for i in range(0, 8, G))  # whole groups
    assert any(not torch.equal(e, torch.arange(8)) for e in epochs)  # shuffled
    for step in steps:
        assert [len(b.idx) for b in step.micro_batches] == [2, 2]
        idx = torch.cat([b.idx for b in step.micro_batches])
        assert step.num_tokens == inputs.mask[idx].sum().item() and step.num_seqs == 4.0
        for b in step.micro_batches:  # tensors sliced to the micro-batch's rows
            assert torch.equal(b.advantages, inputs.advantages[b.idx]) and b.old_logp.shape == (2, 3)


def test_module_without_a_data_module_shuffles_its_mini_batches():
    """The plan is derived from the first batch when no data.batch_size is linked, and it shuffles."""
    from trgrpo.module import GRPOModule
    from trgrpo.rollout import SamplingConfig

    module = GRPOModule(sampling=SamplingConfig(group_size=G), optim=OptimConfig(mini_batch_size=4))
    assert module.plan is None
    module.plan = module._plan(4)
    assert module.plan.shuffle


def test_zero_advantage_sequences_are_skipped_but_counted():
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    plan = _plan()
    (step,) = plan.steps(_inputs(adv=adv), torch.Generator())
    assert [b.idx.tolist() for b in step.micro_batches] == [[2, 3]]
    assert step.num_tokens == 23.0 and step.num_seqs == 8.0
    (dead,) = plan.steps(_inputs(adv=torch.zeros(8)), torch.Generator())
    assert dead.micro_batches == []
    kept = UpdatePlan.build(4, G, OptimConfig(), LossConfig(beta=0.1), UniformWeighting())
    assert not kept.skip_zero_advantage  # the KL term needs every sequence


def test_bad_layout_names_the_key():
    with pytest.raises(ValueError, match="mini_batch_size=6 must be a multiple of model.sampling.group_size"):
        UpdatePlan.build(4, 4, OptimConfig(mini_batch_size=6), LossConfig(), UniformWeighting())


def test_step_stats_use_the_documented_metric_names():
    upd = UpdateStats()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    w = torch.tensor([[1.0, 1.4, 0.0], [1.2, 0.0, 0.0]])
    none = torch.zeros(2, 3, dtype=torch.bool)
    out = PolicyLossOutput(
        loss=torch.tensor(0.5),
        kl=torch.tensor(0.3),
        sampler_kl=None,
        ratio=torch.ones(2, 3),
        weights=w,
        clipped_low=torch.tensor([[True, False, True], [False, False, False]]),  # padding: not counted
        clipped_high=none,
        dual_clipped=none,
        correction=None,
        normaliser=torch.ones(2, 3),
    )
    batch = UpdateBatch(torch.arange(2), torch.ones(2), mask, mask, None, None)
    upd.add_micro_batch(out, batch, TokenScores(torch.zeros(2, 3), None), (1.0, 1.4))
    upd.add_optimiser_step(2.0)
    rewards = RewardResult(
        torch.tensor([1.0, 0.0, 1.0, 1.0]), {"answer": torch.tensor([1.0, 0.0, float("nan"), 1.0])}, 0
    )
    ids = torch.zeros(4, 3, dtype=torch.long)
    rollout = Rollout(ids, torch.ones(4, 3), torch.ones(4, 2), torch.tensor([0, 0, 1, 0]).bool(), 1, [""] * 4)
    stats = StepStats.collect(
        rewards,
        rollout,
        upd,
        StepTimings(1.0, 2.0, 3.0, 4.0),
        group_size=2,
        lr=1e-3,
        bounded_weights=True,
        kl=True,
    )
    m = stats.metrics()
    assert m["train/reward"] == 0.75 and m["train/frac_reward_zero_std"] == 0.5
    assert m["train/clip_ratio/low"] == pytest.approx(1 / 3) and m["train/clip_ratio/high"] == 0.0
    assert m["train/weight/mean"] == pytest.approx(3.6 / 3) and m["train/weight/at_upper"] == pytest.approx(
        1 / 3
    )
    assert (m["train/weight/min"], m["train/weight/max"]) == pytest.approx((1.0, 1.4))  # float32 1.4
    assert (
        m["train/kl"] == pytest.approx(0.1)
        and m["train/grad_norm"] == 2.0
        and m["train/truncated_ratio"] == 0.25
    )
    assert m["train/rewards/answer"] == pytest.approx(2 / 3) and "train/entropy" not in m  # not computed
    assert m["train/time/update"] == 4.0 and stats.timings().generation == 1.0
