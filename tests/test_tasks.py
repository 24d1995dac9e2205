"""Tasks: reasoning-gym tasks, Knights and Knaves, math from local files, and prompt rendering.

python -m pytest tests/test_tasks.py -q
"""

from __future__ import annotations

import json
import logging
import re

import pandas as pd
import pytest

from trgrpo.data import PromptDataModule
from trgrpo.policy import PolicyConfig, load_tokenizer
from trgrpo.policy.chartokenizer import save_char_tokenizer
from trgrpo.tasks import KnightsKnavesTask, MathTask, ReasoningGymTask, Task
from trgrpo.tasks.common import normalise
from trgrpo.tasks.knights_knaves import to_classic_roles
from trgrpo.tasks.reasoning_gym import draw_split, reasoning_gym_reward

OTHER_ROLES = r"\b(pioneer|laggard|saint|sinner|hero|villain|angel|devil|altruist|egoist|sage|fool)s?\b"


def _questions(rows):
    return {normalise(r["question"]) for r in rows}


# --------------------------------------------------------------------------- reasoning-gym


@pytest.mark.parametrize("name", ["knights_knaves", "countdown", "basic_arithmetic", "gsm_symbolic"])
def test_reasoning_gym_task_rows_disjoint_and_scored(name):
    task = ReasoningGymTask(name=name, train_size=30, val_size=10, seed=3)
    train, val = task.rows("train"), task.rows("val")
    assert (len(train), len(val)) == (30, 10)
    assert not _questions(train) & _questions(val)
    row = val[0]
    assert row["prompt"] == row["question"] and row["rg_task"] == name
    right, wrong = task.demonstration(row), "<answer>certainly not this</answer>"
    assert task.verify(right, row) == 1.0 and task.verify(wrong, row) == 0.0  # verify sets exactly 1.0 / 0.0
    cols = {
        k: [r[k] for r in (row, row, row)]
        for k in ("rg_task", "rg_options", "question", "answer", "metadata")
    }
    scores = reasoning_gym_reward(None, [right, wrong, row["answer"]], **cols)
    assert scores[0] == 1.0 and scores[1] < 1.0 and scores[2] < 1.0  # no <answer> tag: not the answer


def test_reasoning_gym_levels_options_and_seeds():
    task = ReasoningGymTask(
        name="basic_arithmetic",
        options={"min_digits": 1, "max_digits": 1},
        levels={"short": {"min_terms": 2, "max_terms": 2}, "long": {"min_terms": 5, "max_terms": 5}},
        train_size=8,
        val_size=4,
        prompt_template="Compute: {question}\n",
    )
    train = task.rows("train")
    assert [r["level"] for r in train] == ["short"] * 8 + ["long"] * 8
    assert all(r["prompt"] == f"Compute: {r['question']}\n" for r in train)
    # two terms vs five terms, one digit each
    short = [len(re.findall(r"\d+", r["question"])) for r in train if r["level"] == "short"]
    long_ = [len(re.findall(r"\d+", r["question"])) for r in train if r["level"] == "long"]
    assert set(short) == {2} and set(long_) == {5}
    # the same seed gives the same items; another seed gives others
    again = ReasoningGymTask(
        name="basic_arithmetic",
        options={"min_digits": 1, "max_digits": 1},
        levels=task.levels,
        train_size=8,
        val_size=4,
        prompt_template="Compute: {question}\n",
    )
    assert [r["question"] for r in again.rows("train")] == [r["question"] for r in train]


def test_held_out_skips_training_questions():
    items = [{"question": q} for q in ["a", "b", "c", "d", "e"]]
    assert [i["question"] for i in draw_split(items, 3, {"a", "c"}, "held-out")] == ["b", "d", "e"]
    # only one unseen item within the draw budget (10 * size + 100 = 120): an error, not a leak
    with pytest.raises(ValueError, match="found only 1 held-out items"):
        draw_split([{"question": "z"}] + [{"question": "a"}] * 130, 2, {"a"}, "held-out")


class _FewQuestions:
    """A stand-in reasoning-gym dataset whose item i is question ``(seed + i) % distinct``."""

    def __init__(self, seed: int, distinct: int):
        self.seed, self.distinct = seed, distinct

    def __getitem__(self, i):
        return {"question": f"q{(self.seed + i) % self.distinct}", "answer": "1", "metadata": {}}


@pytest.mark.parametrize("distinct", [5, 1024])
def test_held_out_never_repeats_a_training_item(monkeypatch, distinct):
    import trgrpo.tasks.reasoning_gym as rg_mod

    monkeypatch.setattr(
        rg_mod, "make_dataset", lambda name, opts, seed, size, key="": _FewQuestions(seed, distinct)
    )
    task = ReasoningGymTask(name="anything", train_size=20, val_size=10)
    if distinct == 5:  # every question is a training question: an error instead of a leak
        with pytest.raises(ValueError, match="found only 0 held-out anything items"):
            task.rows("val")
        return
    # the held-out seed is 2**30 = 0 mod 1024, so it starts at q0 and must skip the 20 training questions
    assert [r["question"] for r in task.rows("val")] == [f"q{i}" for i in range(20, 30)]


def test_reasoning_gym_bad_name_and_option():
    with pytest.raises(
        ValueError,
        match=r"data\.task\.init_args\.name: unknown reasoning-gym task 'knight_knave'.*"
        r"knights_knaves",
    ):
        ReasoningGymTask(name="knight_knave")
    with pytest.raises(ValueError, match=r"data\.task\.init_args\.options:.*\['people'\].*n_people"):
        ReasoningGymTask(name="knights_knaves", options={"people": 3})


# --------------------------------------------------------------------------- Knights and Knaves


def test_knights_knaves_levels_roles_and_disjoint():
    task = KnightsKnavesTask(n_people=[3, 5, 7], train_size=6, val_size=3, seed=1)
    train, val = task.rows("train"), task.rows("val")
    assert [r["level"] for r in val] == [3] * 3 + [5] * 3 + [7] * 3
    assert len(train) == 18 and not _questions(train) & _questions(val)
    for r in train + val:
        assert len(r["names"]) == len(r["roles"]) == r["level"]
        assert set(r["roles"]) <= {"knight", "knave"} and (r["knight_term"], r["knave_term"]) == (
            "knight",
            "knave",
        )
        assert not re.search(OTHER_ROLES, r["prompt"], flags=re.IGNORECASE), r["prompt"]
        assert all(n in r["prompt"] for n in r["names"])
        assert task.verify(task.demonstration(r), r) == 1.0
    row = val[0]
    flipped = row["answer"].replace("knight", "KN").replace("knave", "knight").replace("KN", "knave")
    assert task.verify(f"<think></think><answer>{flipped}</answer>", row) == 0.0
    assert task.verify(row["answer"], row) == 0.0  # right roles but no tags


def test_knights_knaves_short_names():
    task = KnightsKnavesTask(n_people=[2, 4], train_size=30, val_size=5, short_names=True)
    train, val = task.rows("train"), task.rows("val")
    assert not _questions(train) & _questions(val)  # compared after renaming
    for r in train + val:
        assert r["names"] == ["Ann", "Bob", "Cid", "Dan"][: r["level"]]
        assert f"You meet {r['level']} inhabitants: " + ", ".join(r["names"][:-1]) in r["prompt"]
        assert task.verify(task.demonstration(r), r) == 1.0


def test_knights_knaves_mixed_roles_keep_reasoning_gym_terms():
    rows = KnightsKnavesTask(n_people=[3], train_size=20, val_size=2, roles="mixed").rows("train")
    assert {r["knight_term"] for r in rows} - {"knight"}  # reasoning-gym varies the pair
    for r in rows:
        assert set(r["roles"]) <= {r["knight_term"], r["knave_term"]}


def test_to_classic_roles_rewrites_every_form():
    terms = {
        "knight": "altruist",
        "knave": "egoist",
        "a_knight": "an altruist",
        "a_knave": "an egoist",
        "Knight": "Altruist",
        "Knave": "Egoist",
    }
    text = (
        "inhabited only by altruists and egoists. Altruists always tell the truth, and egoists always lie. "
        'Ann said, "Bo is an egoist". So who is an altruist and who is an egoist? '
        '(Format your answer like: "Ann is a altruist/egoist")'
    )
    assert to_classic_roles(text, terms) == (
        "inhabited only by knights and knaves. Knights always tell the truth, and knaves always lie. "
        'Ann said, "Bo is a knave". So who is a knight and who is a knave? '
        '(Format your answer like: "Ann is a knight/knave")'
    )


def test_knights_knaves_bad_config():
    with pytest.raises(ValueError, match="n_people"):
        KnightsKnavesTask(n_people=[0, 3])
    with pytest.raises(ValueError, match=r"prompt_template must contain \{question\}"):
        KnightsKnavesTask(prompt_template="no placeholder")


# --------------------------------------------------------------------------- math from local files

GSM = [
    {
        "q": f"Tom has {i} apples and buys {i + 1} more. How many?",
        "sol": f"{i}+{i + 1}\n#### {2 * i + 1}",
        "lvl": i % 2,
    }
    for i in range(12)
]


def _write(tmp_path, fmt: str, rows=GSM) -> str:
    path = tmp_path / f"gsm.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_math_task_from_local_file(tmp_path, fmt):
    task = MathTask(
        path=_write(tmp_path, fmt),
        val_split=None,
        val_size=4,
        question_key="q",
        answer_key="sol",
        level_key="lvl",
        cache_dir=str(tmp_path / "cache"),
        prompt_template="Q: {question} \\boxed{}",
    )
    train, val = task.rows("train"), task.rows("val")
    assert (len(train), len(val)) == (8, 4) and not _questions(train) & _questions(val)
    by_question = {r["q"]: r for r in GSM}
    for row in train + val:
        src = by_question[row["question"]]
        assert row["answer"] == src["sol"].split("#### ")[1] and row["level"] == src["lvl"]
        assert row["prompt"] == f"Q: {row['question']} \\boxed{{}}"  # LaTeX braces untouched
    assert task.verify_batch([f"so \\boxed{{{val[0]['answer']}}}", "\\boxed{-1}"], val[:2]) == [1.0, 0.0]


def test_math_task_splits_from_data_files_and_overlap_check(tmp_path, caplog):
    train_rows = GSM[:8] + [{"q": "What is 2+2?", "sol": "\\boxed{4}", "lvl": 0}]
    test_rows = GSM[8:] + [{"q": "What is  2+2?", "sol": "#### 4", "lvl": 0}]  # same question as a train row
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    files = {
        "train": _write(tmp_path / "train", "jsonl", train_rows),
        "test": _write(tmp_path / "test", "jsonl", test_rows),
    }
    task = MathTask(
        path="json", data_files=files, question_key="q", answer_key="sol", cache_dir=str(tmp_path / "cache")
    )
    with caplog.at_level(logging.WARNING):
        val = task.rows("val")
    assert len(task.rows("train")) == 9 and len(val) == 4  # the shared question was dropped from held-out
    assert "dropped 1 held-out rows" in caplog.text
    assert (
        next(r for r in task.rows("train") if r["question"] == "What is 2+2?")["answer"] == "4"
    )  # from \\boxed{4}
    small = MathTask(
        path="json",
        data_files=files,
        question_key="q",
        answer_key="sol",
        train_size=5,
        val_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(small.rows("train")) == 5 and [r["question"] for r in small.rows("val")] == [
        r["q"] for r in GSM[8:10]
    ]


def test_math_task_bad_input(tmp_path):
    path = _write(tmp_path, "jsonl")
    cache = str(tmp_path / "cache")
    with pytest.raises(
        ValueError,
        match=r"question_key: column 'question' is not in the 'train' split.*"
        r"columns present: \['q', 'sol', 'lvl'\]",
    ):
        MathTask(path=path, val_split=None, val_size=2, cache_dir=cache).rows("train")
    with pytest.raises(ValueError, match=r"val_split='test'"):
        MathTask(path=path, question_key="q", answer_key="sol", cache_dir=cache).rows("train")
    bad = GSM[:3] + [{"q": "", "sol": "#### 1", "lvl": 0}]
    with pytest.raises(ValueError, match=r"row 3 has an empty or non-string question"):
        MathTask(
            path=_write(tmp_path, "json", bad),
            val_split=None,
            val_size=1,
            question_key="q",
            answer_key="sol",
            cache_dir=cache,
        ).rows("train")
    with pytest.raises(ValueError, match="val_size is required"):
        MathTask(path=path, val_split=None)


# --------------------------------------------------------------------------- prompts


class _ListTask(Task):
    def __init__(self, prompts):
        self.prompts = prompts

    def rows(self, split):
        return [{"prompt": p, "answer": "1"} for p in self.prompts]


def test_chat_template_with_a_local_tokenizer_and_system_prompt(tmp_path):
    tok = load_tokenizer(PolicyConfig(tokenizer=str(save_char_tokenizer(tmp_path / "tok"))))
    assert tok.chat_template is not None
    dm = PromptDataModule(task=_ListTask(["What is 1+0?"]), chat_template=True, system_prompt="Be brief.")
    rows = dm.load_split("train", tok)
    assert rows[0]["prompt"] == "<|system|>Be brief.\n<|user|>What is 1+0?\n<|assistant|>"
    assert rows[0]["raw_prompt"] == "What is 1+0?"
    raw = PromptDataModule(task=_ListTask(["What is 1+0?"])).load_split("train", tok)
    assert raw[0]["prompt"] == "What is 1+0?"  # base models get the raw text


def test_long_prompts_dropped_with_a_count_and_bad_rows_named(caplog):
    tok = load_tokenizer(PolicyConfig())
    dm = PromptDataModule(task=_ListTask(["short", "x" * 50, "also short"]), max_prompt_tokens=20)
    with caplog.at_level(logging.WARNING):
        rows = dm.load_split("train", tok)
    assert [r["prompt"] for r in rows] == ["short", "also short"]  # dropped whole, never cut
    assert "dropped 1 of 3 train prompts" in caplog.text
    with pytest.raises(ValueError, match="row 1 has an empty or non-string prompt"):
        PromptDataModule(task=_ListTask(["ok", ""])).load_split("train", tok)
