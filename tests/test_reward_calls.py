"""How rewards are called: a default timeout that says which reward it stopped, and no silent fallback.

python -m pytest tests/test_reward_calls.py -q
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from trgrpo.rewards import DEFAULT_REWARD_TIMEOUT, RewardSpec, compute_rewards

_release = threading.Event()


def never_returns(prompts, completions, **_):
    _release.wait()  # until the test ends
    return [1.0] * len(completions)


def one_score(prompts, completions, **_):
    """A broken reward: one score whatever the number of completions."""
    return [1.0]


def test_a_reward_that_never_returns_is_stopped_by_default_and_named(caplog):
    spec = RewardSpec(fn=never_returns)
    assert spec.timeout == DEFAULT_REWARD_TIMEOUT == 60.0  # on unless a config turns it off with 0
    quick = dataclasses.replace(spec, timeout=0.3, failure_score=-1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="trgrpo.rewards"):
            start = time.perf_counter()
            first = compute_rewards([quick], ["p"] * 2, ["a", "b"], {})
            second = compute_rewards([quick], ["p"], ["c"], {})
            assert time.perf_counter() - start < 3
    finally:
        _release.set()
    assert first.total.tolist() == [-1.0, -1.0] and first.errors == 2 and second.errors == 1
    fired = [
        r.getMessage() for r in caplog.records if "took longer than its timeout of 0.3s" in r.getMessage()
    ]
    assert len(fired) == 2 and all("'never_returns'" in m and "model.rewards[].timeout" in m for m in fired)
    assert RewardSpec(fn=never_returns, timeout=0).timeout == 0  # 0 turns it off


def test_a_failed_batch_call_is_logged_once_with_the_reason_before_the_retries(caplog):
    spec = RewardSpec(fn=one_score)
    with caplog.at_level(logging.WARNING, logger="trgrpo.rewards"):
        res = compute_rewards([spec], ["p"] * 3, ["a", "b", "c"], {})
        compute_rewards([spec], ["p"] * 2, ["a", "b"], {})
    assert res.total.tolist() == [1.0, 1.0, 1.0]  # each sample alone gets its one score
    said = [r.getMessage() for r in caplog.records if "'one_score'" in r.getMessage()]
    assert len(said) == 1
    assert (
        "failed on the batch of 3 completions" in said[0] and "returned 1 scores for 3 completions" in said[0]
    )
    assert "retrying sample by sample" in said[0]
