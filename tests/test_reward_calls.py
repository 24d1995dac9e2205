"""How rewards are called: a default timeout that says which reward it stopped, no silent fallback, and a
reward that returns the wrong number of scores counted as failing, then stopping the run.

python -m pytest tests/test_reward_calls.py -q
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from trgrpo.rewards import DEFAULT_REWARD_TIMEOUT, RewardContractError, RewardSpec, compute_rewards

_release = threading.Event()


def never_returns(prompts, completions, **_):
    _release.wait()  # until the test ends
    return [1.0] * len(completions)


def one_score(prompts, completions, **_):
    """A broken reward: one score whatever the number of completions."""
    return [1.0]


def short_on_marked(prompts, completions, **_):
    """A reward that drops a score when a completion says "short"."""
    return [1.0] * (len(completions) - ("short" in completions))


def fails_on_boom(prompts, completions, **_):
    if "boom" in completions:
        raise RuntimeError("cannot score boom")
    return [1.0] * len(completions)


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
    spec = RewardSpec(fn=fails_on_boom)
    with caplog.at_level(logging.WARNING, logger="trgrpo.rewards"):
        res = compute_rewards([spec], ["p"] * 3, ["a", "boom", "c"], {})
        compute_rewards([spec], ["p"] * 2, ["boom", "b"], {})
    assert res.total.tolist() == [1.0, 0.0, 1.0] and res.errors == 1  # the others scored one by one
    said = [r.getMessage() for r in caplog.records if "on the batch" in r.getMessage()]
    assert len(said) == 1 and "'fails_on_boom'" in said[0] and "RuntimeError: cannot score boom" in said[0]
    assert "retrying sample by sample" in said[0]


def test_a_wrong_number_of_scores_fails_every_sample_then_stops_the_run(caplog):
    """No sample-by-sample retry (each sample alone would get the broken reward's one score): every sample of
    the call fails and is counted, each time with a warning, and the third such call in a row ends the run."""
    spec = RewardSpec(fn=one_score, failure_score=-1.0)
    with caplog.at_level(logging.WARNING, logger="trgrpo.rewards"):
        first = compute_rewards([spec], ["p"] * 3, ["a", "b", "c"], {})
        second = compute_rewards([spec], ["p"] * 2, ["a", "b"], {})
        with pytest.raises(RewardContractError) as stopped:
            compute_rewards([spec], ["p"] * 2, ["a", "b"], {})
    assert first.total.tolist() == [-1.0, -1.0, -1.0] and first.errors == 3
    assert second.total.tolist() == [-1.0, -1.0] and second.errors == 2
    said = [r.getMessage() for r in caplog.records if "'one_score'" in r.getMessage()]
    assert len(said) == 2 and "returned 1 scores for 3 completions" in said[0]
    assert not any("retrying" in m for m in said)
    message = str(stopped.value)
    assert "'one_score' returned 1 scores for 2 completions on each of its last 3 calls" in message
    assert "model.rewards[].fn" in message


def test_a_reward_that_breaks_its_contract_now_and_then_is_counted_not_stopped():
    spec = RewardSpec(fn=short_on_marked)
    errors = []
    for completions in (["short", "a"], ["short", "a"], ["a", "b"], ["short", "a"], ["short", "a"]):
        errors.append(compute_rewards([spec], ["p"] * 2, completions, {}).errors)
    assert errors == [2, 2, 0, 2, 2]  # never three in a row: the run goes on, every breach counted
