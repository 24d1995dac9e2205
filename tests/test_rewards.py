"""Reward functions on hand-written completions, and the code that calls them.

python -m pytest tests/test_rewards.py -q
"""

from __future__ import annotations

import logging
import math
import time

import pytest

from trgrpo.rewards import (
    RewardSpec,
    SampleFailures,
    check_rewards,
    compute_rewards,
    exact_match,
    has_think_answer_format,
    integer_match,
    regex_format,
    sandbox_call_limit,
    soft_overlong_punishment,
    think_answer_format,
)
from trgrpo.stats import reward_fields
from trgrpo.tasks.knights_knaves import kk_answer_reward, kk_reward, parse_kk_answer
from trgrpo.tasks.math_data import extract_model_answer, extract_reference, last_boxed, math_verify_reward

# Scores compared with == in this file are multiples of 0.25 and their sums with weights 0.5 and 2: exact in
# binary floating point whatever the order of the additions.

# --------------------------------------------------------------------------- simple built-ins


def test_exact_integer_regex():
    comps, answers = [" 42 ", "42.0", "x=42", "-7"], ["42", "42", "42", "-7"]
    assert exact_match(None, comps, answer=answers) == [1.0, 0.0, 0.0, 1.0]
    assert integer_match(None, comps, answer=answers) == [1.0, 1.0, 1.0, 1.0]
    assert regex_format(None, comps) == [1.0, 0.0, 0.0, 1.0]


def test_think_answer_format_cases():
    p = ["Q"] * 6
    comps = [
        "<think>a</think><answer>b</answer>",  # right
        "<answer>b</answer>",  # no think block
        "<think>a</think><answer>b</answer><answer>c</answer>",  # repeated tag
        "<answer>b</answer><think>a</think>",  # wrong order
        "<think>a<answer>b</think></answer>",  # interleaved
        "",  # empty
    ]
    assert think_answer_format(p, comps) == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0]
    # a prompt that ends by opening <think> (prefilled assistant turn) supplies the first tag
    assert think_answer_format(["Q <think>"], ["a</think><answer>b</answer>"]) == [1.0]
    assert not has_think_answer_format("<think><think></think><answer></answer>")


def test_soft_overlong_punishment_values():
    # max 10, cache 4: free up to 6 tokens, then (6 - n) / 4, -1 beyond 10
    lengths = [5, 6, 8, 10, 12]
    assert soft_overlong_punishment(
        None, [""] * 5, completion_length=lengths, max_length=10, cache_length=4
    ) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_length"):
        soft_overlong_punishment(None, [""], completion_length=[1], max_length=4, cache_length=5)


# --------------------------------------------------------------------------- Knights and Knaves

NAMES, ROLES = ["Zoey", "Oliver", "Mia"], ["knight", "knave", "knave"]


def _kk(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


KK_CASES = [
    # completion, answer term, format term
    (_kk("(1) Zoey is a knight\n(2) Oliver is a knave\n(3) Mia is a knave"), 2.0, 1.0),
    (_kk("Mia is a knave, Oliver is a knave, and Zoey is a knight."), 2.0, 1.0),  # order does not matter
    (_kk("Zoey is a knight, Oliver is a knight, and Mia is a knave."), -1.5, 1.0),  # one role wrong
    (_kk("Zoey is a knight, Oliver is a knave."), -2.0, 1.0),  # a person missing
    (_kk("Zoey is a knight, Oliver is a knave, Mia is a knave, knights rule"), -2.0, 1.0),  # extra role word
    (_kk("Zoey: knight, Oliver: knave, Mia: knave"), -2.0, 1.0),  # not "X is a role"
    ("Zoey is a knight, Oliver is a knave, and Mia is a knave.", None, -1.0),  # no tags: not graded
    (_kk("Zoey is a knight") + _kk("Zoey is a knight, Oliver is a knave, and Mia is a knave."), None, -1.0),
]


@pytest.mark.parametrize(("completion", "answer_score", "format_score"), KK_CASES)
def test_kk_reward_table(completion, answer_score, format_score):
    got = kk_answer_reward(["Q"], [completion], names=[NAMES], roles=[ROLES])
    assert got == [answer_score]
    assert think_answer_format(["Q"], [completion]) == [format_score]
    assert kk_reward(["Q"], [completion], names=[NAMES], roles=[ROLES]) == [
        format_score + (answer_score or 0.0)
    ]


def test_kk_totals_through_compute_rewards():
    """format + answer as two terms: 3 right, -0.5 wrong, -1 unparsable, -1 broken format (Logic-RL)."""
    comps = [KK_CASES[0][0], KK_CASES[2][0], KK_CASES[3][0], KK_CASES[6][0]]
    specs = [
        RewardSpec(fn=think_answer_format, name="format"),
        RewardSpec(fn=kk_answer_reward, name="answer"),
    ]
    res = compute_rewards(specs, ["Q"] * 4, comps, {"names": [NAMES] * 4, "roles": [ROLES] * 4})
    assert res.total.tolist() == [3.0, -0.5, -1.0, -1.0]
    assert res.per_term["answer"][3].isnan()  # None: left out of the answer term's mean
    assert res.errors == 0


def test_kk_parser_other_terms_and_adversarial():
    assert parse_kk_answer("A is an angel and B is a devil", ["A", "B"], "angel", "devil") == [
        "angel",
        "devil",
    ]
    # names with regex characters are matched literally
    assert parse_kk_answer("J.R. is a knight, Al+ is a knave", ["J.R.", "Al+"]) == ["knight", "knave"]
    huge = "Zoey is a knight " + "blah " * 200_000
    start = time.perf_counter()
    assert parse_kk_answer(huge, ["Zoey"]) == ["knight"]
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------- math


def test_reference_and_answer_extraction():
    assert extract_reference("Natalia sold 48/2 = 24 clips.\n#### 1,234") == "1234"
    assert extract_reference("so the answer is $\\boxed{\\frac{3}{4}}$") == "\\frac{3}{4}"
    assert extract_reference(" 17 ") == "17"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # the last one
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # unbalanced braces
    assert last_boxed("\\boxed 7.") == "7."
    assert last_boxed("no box") is None
    assert extract_model_answer("The answer is 12. The answer is 13", r"answer is (\d+)") == "13"


MATH_CASES = [
    ("42", "so \\boxed{42}", 1.0),
    ("\\frac{1}{2}", "it is \\boxed{0.5}", 1.0),  # equivalent forms
    ("1234", "\\boxed{1,234}", 1.0),
    ("42", "\\boxed{41}", 0.0),  # wrong
    ("42", "the answer is 42", 0.0),  # no \boxed
    ("42", "\\boxed{42", 0.0),  # unbalanced brace
    ("42", "\\boxed{42} no wait \\boxed{7}", 0.0),  # the last box counts
    ("42", "\\boxed{}", 0.0),  # empty
    ("42", "\\boxed{" + "9" * 5000 + "}", 0.0),  # a huge number is still just wrong
]


def test_math_verify_reward_cases():
    golds, comps, want = zip(*MATH_CASES, strict=True)
    assert math_verify_reward(None, list(comps), answer=list(golds), timeout=5.0) == list(want)


def test_math_verify_reward_pattern():
    out = math_verify_reward(
        None, ["ANSWER: 12", "ANSWER: 13"], answer=["12", "12"], answer_pattern=r"ANSWER: (\d+)", timeout=5.0
    )
    assert out == [1.0, 0.0]


def test_math_verify_hanging_expression_is_bounded(caplog):
    """10^(10^10) sends sympy into a C-level power that SIGALRM cannot stop; the worker is killed instead."""
    spec = RewardSpec(fn=math_verify_reward, name="math_adversarial", kwargs={"timeout": 1.0})
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        res = compute_rewards(
            [spec], ["Q"] * 2, ["\\boxed{10^{10^{10}}}", "\\boxed{42}"], {"answer": ["42", "42"]}
        )
    elapsed = time.perf_counter() - start
    assert res.total.tolist() == [0.0, 1.0]
    assert res.errors == 1
    assert elapsed < 15, elapsed  # 1 s timeout plus a worker restart, not the hours the power would take
    assert "took longer than 1.0s" in caplog.text


def test_slow_answers_cost_no_correct_answer_its_check(caplog):
    """Two answers that each use their whole 1 s check (and a worker restart) ahead of a correct one, one
    worker, and a call limit of 1.5 s: the correct answer still gets checked and scores 1, because the call's
    limit is raised to what every answer's own 1 s needs."""
    spec = RewardSpec(
        fn=math_verify_reward, name="math_slow", timeout=1.5, kwargs={"timeout": 1.0, "workers": 1}
    )
    hang = "\\boxed{10^{10^{10}}}"
    with caplog.at_level(logging.WARNING):
        res = compute_rewards([spec], ["Q"] * 3, [hang, hang, "\\boxed{42}"], {"answer": ["42"] * 3})
    assert res.total.tolist() == [0.0, 0.0, 1.0]
    assert res.errors == 2  # the two slow answers, blamed on their own 1 s check
    assert "took longer than 1.0s" in caplog.text and "not checked" not in caplog.text


def test_the_call_limit_of_a_sandboxed_verifier_follows_its_per_answer_limit():
    # 64 answers, 4 workers by default: 16 rounds of (5 s + 10 s to replace a killed worker) = 240 s
    assert sandbox_call_limit(RewardSpec(fn=math_verify_reward), 64) == 16 * (5.0 + 10.0)
    # a small batch keeps the configured 60 s; 0 turns the limit off; answers without a bound of their own
    # leave the configured limit as it is
    assert sandbox_call_limit(RewardSpec(fn=math_verify_reward), 4) == 60.0
    assert sandbox_call_limit(RewardSpec(fn=math_verify_reward, timeout=0), 64) is None
    unbounded = RewardSpec(fn=math_verify_reward, timeout=30, kwargs={"timeout": 0})
    assert sandbox_call_limit(unbounded, 64) == 30
    one = RewardSpec(fn=math_verify_reward, kwargs={"timeout": 2.0, "workers": 1})
    assert sandbox_call_limit(one, 8) == 8 * (2.0 + 10.0)


# --------------------------------------------------------------------------- the calling machinery


def test_none_is_left_out_of_the_mean_and_weights_apply():
    def half(prompts, completions, **_):
        return [None if c == "skip" else 1.0 for c in completions]

    specs = [RewardSpec(fn=half, weight=2.0), RewardSpec(fn=exact_match, weight=0.5)]
    res = compute_rewards(specs, ["p"] * 3, ["a", "skip", "b"], {"answer": ["a", "a", "a"]})
    assert res.total.tolist() == [2.5, 0.0, 2.0]
    values = res.per_term["half"]
    assert values[~values.isnan()].tolist() == [1.0, 1.0]


def test_a_term_that_applies_to_no_sample_is_logged_as_nan_not_zero():
    def never(prompts, completions, **_):
        return [None] * len(completions)

    def half(prompts, completions, **_):
        return [None if c == "skip" else 1.0 for c in completions]

    specs = [RewardSpec(fn=never), RewardSpec(fn=half), RewardSpec(fn=exact_match)]
    res = compute_rewards(specs, ["p"] * 4, ["a", "skip", "b", "skip"], {"answer": ["a", "a", "b", "x"]})
    terms = reward_fields(res, group_size=2)["reward_terms"]
    assert math.isnan(terms["train/rewards/never"]) and math.isnan(terms["train/rewards/never_std"])
    assert terms["train/rewards/half"] == 1.0 and terms["train/rewards/half_std"] == 0.0  # mean of 2 scores
    assert terms["train/rewards/exact_match"] == 0.5  # (1 + 0 + 1 + 0) / 4
    assert res.total.tolist() == [2.0, 0.0, 2.0, 0.0]  # None counts 0 in the total


def test_failing_reward_scores_failed_counts_and_logs_once(caplog):
    def flaky_once(prompts, completions, **_):
        if "boom" in completions:
            raise RuntimeError("cannot score boom")
        return [1.0] * len(completions)

    spec = RewardSpec(fn=flaky_once, failure_score=-1.0)
    with caplog.at_level(logging.WARNING):
        res = compute_rewards([spec], ["p"] * 3, ["a", "boom", "b"], {})
        res2 = compute_rewards([spec], ["p"] * 2, ["boom", "c"], {})
    assert res.total.tolist() == [1.0, -1.0, 1.0] and res.errors == 1
    assert res2.total.tolist() == [-1.0, 1.0] and res2.errors == 1
    logged = [
        r for r in caplog.records if "flaky_once" in r.getMessage() and "failed on sample" in r.getMessage()
    ]
    assert (
        len(logged) == 1 and "RuntimeError: cannot score boom" in logged[0].getMessage()
    )  # first traceback, once
    batch = [r for r in caplog.records if "flaky_once" in r.getMessage() and "on the batch" in r.getMessage()]
    assert len(batch) == 1 and "retrying sample by sample" in batch[0].getMessage()  # the fallback, said once


def test_hanging_reward_times_out_and_the_run_goes_on():
    def sleepy(prompts, completions, **_):
        time.sleep(60)
        return [1.0] * len(completions)

    specs = [RewardSpec(fn=sleepy, timeout=0.5, failure_score=-2.0), RewardSpec(fn=exact_match)]
    start = time.perf_counter()
    res = compute_rewards(specs, ["p"] * 3, ["a", "b", "c"], {"answer": ["a", "x", "x"]})
    assert time.perf_counter() - start < 3.0
    assert res.total.tolist() == [-1.0, -2.0, -2.0]
    assert res.errors == 3


def test_sample_failures_and_non_finite_scores():
    def partial(prompts, completions, **_):
        raise SampleFailures([1.0, 0.0, 1.0], [1], "sample 1 could not be checked")

    def nan_on_b(prompts, completions, **_):
        return [float("nan") if c == "b" else 1.0 for c in completions]

    res = compute_rewards([RewardSpec(fn=partial, failure_score=-1.0)], ["p"] * 3, ["a", "b", "c"], {})
    assert res.total.tolist() == [1.0, -1.0, 1.0] and res.errors == 1
    res = compute_rewards([RewardSpec(fn=nan_on_b, name="nan_on_b")], ["p"] * 2, ["a", "b"], {})
    assert res.total.tolist() == [1.0, 0.0] and res.errors == 1


def test_keyword_calls_and_column_filtering():
    def trl_style(completions, **kwargs):  # TRL calls rewards by keyword
        return [float(len(c)) for c in completions]

    def strict(prompts, completions, answer):  # no **kwargs: gets only the columns it names
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    cols = {"answer": ["ab", "x"], "level": [1, 2], "completion_length": [2, 1]}
    res = compute_rewards([RewardSpec(fn=trl_style), RewardSpec(fn=strict)], ["p", "q"], ["ab", "c"], cols)
    assert res.total.tolist() == [3.0, 1.0] and res.errors == 0


def test_missing_column_names_it_and_lists_present():
    # checked once before training (the CLI runs check_rewards); the trainer adds its own two columns
    present = r"\['completion_length', 'level', 'question', 'truncated'\]"
    with pytest.raises(ValueError, match=rf"needs the column 'answer'.*columns present: {present}"):
        check_rewards([RewardSpec(fn=exact_match)], ["question", "level"])


def test_bad_reward_path_fails_at_startup_before_any_model(monkeypatch, capsys):
    import trgrpo.module as module_mod
    from trgrpo.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(module_mod, "load_model", forbidden)
    monkeypatch.setattr(module_mod, "load_tokenizer", forbidden)
    for path in ("not_a_module.reward", "trgrpo.rewards.no_such_reward"):
        with pytest.raises(SystemExit):
            main(
                [
                    "fit",
                    "--data.task=trgrpo.tasks.ArithmeticTask",
                    f"--model.rewards=[{{fn: {path}}}]",
                    "--trainer.logger=false",
                ]
            )
        err = capsys.readouterr().err
        assert "model.rewards" in err and path.split(".")[-1] in err
