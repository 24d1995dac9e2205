"""Search-R1-style QA: the exact-match reward, the question files, the BM25 search environment and its cached
index, the generated fact base, and both recipes through the real CLI on the tiny model (CPU, no download).

    python -m pytest tests/test_search_qa.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_task_configs import TINY, _columns, _logged, _run

import trgrpo.agent.retrieval as retrieval
from trgrpo.agent.retrieval import SearchEnvironment
from trgrpo.agent.tools import ToolCall
from trgrpo.tasks.search_qa import (
    NAMES,
    FactQATask,
    SearchQATask,
    f1_score,
    normalize_answer,
    search_qa_f1,
    search_qa_reward,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOOL_METRICS = {"train/tool_calls", "train/tool_errors", "train/turns", "train/no_tool_ratio"}


def test_exact_match_after_squad_normalisation():
    assert normalize_answer("  The Eiffel Tower!! ") == "eiffel tower"
    assert (
        normalize_answer("Eiffel-Tower") == "eiffeltower"
    )  # punctuation is removed, not made a space (SQuAD)
    assert normalize_answer("An apple, a pear") == "apple pear"
    completions = [
        "<answer>the Paris.</answer>",
        "<answer>Rome</answer>",
        "Paris",
        "<answer>x</answer><answer>PARIS</answer>",
    ]
    golds = [["Paris", "City of Light"]] * 4
    assert search_qa_reward([""] * 4, completions, golds) == [1.0, 0.0, 0.0, 1.0]  # the last answer counts
    assert search_qa_reward([""] * 4, completions, golds, format_score=0.1) == [1.0, 0.1, 0.0, 1.0]
    # F1: "new york city" vs "new york": 2 common tokens, precision 2/3, recall 1 -> 2 * (2/3) / (5/3) = 0.8
    assert f1_score("New York City", ["new york"]) == pytest.approx(0.8)
    assert search_qa_f1([""], ["<answer>New York City</answer>"], [["LA", "New York"]]) == [
        pytest.approx(0.8)
    ]


def _qa_rows(n, start=0):
    return [
        {"question": f"Where is item {i}?", "golden_answers": [f"place {i}", f"spot {i}"], "hops": 1 + i % 2}
        for i in range(start, start + n)
    ]


def test_question_files_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _qa_rows(6)))
    task = SearchQATask(path=str(jsonl), val_size=2, level_key="hops", cache_dir=str(tmp_path / "hf"))
    train, val = task.rows("train"), task.rows("val")
    assert len(train) == 4 and len(val) == 2 and val[0]["golden_answers"] == ["place 4", "spot 4"]
    assert val[0]["level"] == 1 and "Question: Where is item 4?" in val[0]["prompt"]
    assert task.verify("<answer>Spot 4</answer>", val[0]) == 1.0
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(_qa_rows(2) + _qa_rows(3, start=10)), parquet)
    task = SearchQATask(path=str(jsonl), val_path=str(parquet), cache_dir=str(tmp_path / "hf"))
    assert len(task.rows("train")) == 6  # all of the training file
    assert [r["question"] for r in task.rows("val")] == [
        f"Where is item {i}?" for i in (10, 11, 12)
    ]  # no train one


def test_question_file_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.task.init_args.path: .* does not exist"):
        SearchQATask(path=str(tmp_path / "none.jsonl")).rows("train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "golden_answers": ["y"]}))
    with pytest.raises(ValueError, match="data.task.init_args.question_key: .* no column 'question'"):
        SearchQATask(path=str(bad), cache_dir=str(tmp_path / "hf")).rows("train")


def _corpus(path: Path, extra: str = "") -> Path:
    rows = [
        {"id": 0, "contents": '"Paris"\nParis is the capital of France.' + extra},
        {"id": 1, "contents": '"Rome"\nRome is the capital of Italy.'},
        {"id": 2, "contents": '"Oslo"\nOslo is the capital of Norway.'},
        {"id": 3, "contents": '"Cats"\nCats are small pets.'},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_bm25_over_a_corpus_file_is_indexed_once_and_cached_by_content(tmp_path, monkeypatch):
    builds = []
    real = retrieval.build_index
    monkeypatch.setattr(retrieval, "build_index", lambda passages: builds.append(1) or real(passages))
    monkeypatch.setattr(retrieval, "_INDEXES", type(retrieval._INDEXES)())
    corpus = _corpus(tmp_path / "corpus.jsonl")
    env = SearchEnvironment(corpus=str(corpus), top_k=2, cache_dir=str(tmp_path / "bm25"))
    for _ in range(3):  # three episodes, one index
        episode = env.episode()
        episode.reset({}, 0)
    out = episode.step(ToolCall("search", {"query": "capital of Italy"}))
    assert (
        out.splitlines()[0] == "Doc 1(Title: Rome) Rome is the capital of Italy."
        and len(out.splitlines()) == 2
    )
    assert len(builds) == 1
    retrieval._INDEXES.clear()  # a new process: the index is loaded from disk, not rebuilt
    env.episode().reset({}, 0)
    assert len(builds) == 1
    _corpus(corpus, extra=" It is on the Seine.")  # new content: a new index
    env.episode().reset({}, 0)
    assert len(builds) == 2


def test_corpus_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="environment.init_args.corpus: .* does not exist"):
        SearchEnvironment(corpus=str(tmp_path / "none.jsonl")).reset({}, 0)
    with pytest.raises(ValueError, match="environment.init_args.corpus: .* does not exist"):
        SearchEnvironment(corpus=str(tmp_path / "none.jsonl")).check()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"passage": "x"}]), bad)
    with pytest.raises(
        ValueError, match="environment.init_args.corpus: .* needs a 'contents' or a 'text' column"
    ):
        SearchEnvironment(corpus=str(bad), cache_dir=str(tmp_path / "bm25")).reset({}, 0)
    with pytest.raises(ValueError, match="needs a 'contents' or a 'text' column, has \\['passage'\\]"):
        SearchEnvironment(corpus=str(bad)).check()
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"passage": "x"}) + "\n")
    with pytest.raises(
        ValueError, match="environment.init_args.corpus: .* needs a 'contents' or a 'text' column"
    ):
        SearchEnvironment(corpus=str(bad_jsonl)).check()
    SearchEnvironment(corpus=str(_corpus(tmp_path / "ok.jsonl"))).check()  # a good one passes
    SearchEnvironment().check()  # no corpus: the rows' documents, nothing to check


@pytest.mark.parametrize("corpus", ["missing", "wrong_columns"])
def test_a_bad_corpus_fails_at_start_up_before_the_model_loads(tmp_path, monkeypatch, corpus):
    import trgrpo.module

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(trgrpo.module, "load_model", no_model)
    path = tmp_path / "corpus.jsonl"
    if corpus == "wrong_columns":
        path.write_text(json.dumps({"passage": "x"}) + "\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(r) for r in _qa_rows(4)))
    args = [
        "fit",
        "--config",
        str(CONFIGS / "search_r1_qwen2.5_3b.yaml"),
        *TINY,
        f"--data.task.init_args.path={qa}",
        "--data.task.init_args.val_path=null",
        "--data.task.init_args.val_size=1",
        f"--data.task.init_args.cache_dir={tmp_path / 'hf'}",
        "--model.optim.mini_batch_size=4",
        f"--model.sampling.agent.environment.init_args.corpus={path}",
    ]
    with pytest.raises(ValueError, match="model.sampling.agent.environment.init_args.corpus: "):
        _run(args, tmp_path)


def test_generated_fact_base_splits_by_person_and_its_demonstrations_are_right():
    task = FactQATask(people=10, val_people=3, distractors=2)
    train, val = task.rows("train"), task.rows("val")
    asked = lambda rows: {r["chain"][0] for r in rows}  # noqa: E731
    assert not asked(train) & asked(val) and {r["level"] for r in val} == {1, 2}
    for row in train + val:
        assert all(any(d.startswith(f'"{n}"') for d in row["documents"]) for n in row["chain"])
        assert len(row["documents"]) == len(row["chain"]) + 2
        assert task.verify(task.demonstration(row), row) == 1.0
    env = SearchEnvironment(top_k=1)
    env.reset(val[0], 0)
    name = val[0]["chain"][0]
    assert env.step(ToolCall("search", {"query": name})).startswith(f"Doc 1(Title: {name}) {name} lives in")


def test_worlds_repeat_each_question_with_other_answers_and_demonstrations_show_the_search_results():
    one, many = FactQATask(people=8, val_people=2), FactQATask(people=8, val_people=2, worlds=5)
    assert len(many.rows("train")) == 5 * len(one.rows("train")) and len(many.rows("val")) == 5 * 2 * 2
    assert many.facts(0) == one.facts() and many.facts(1) != many.facts(0)
    answers = {}
    for row in many.rows("train"):
        answers.setdefault(row["question"], set()).add(row["answer"])
    assert max(len(a) for a in answers.values()) > 1  # the same question, another world, another answer
    assert {r["chain"][0] for r in many.rows("val")} == set(NAMES[6:8])  # held-out people only
    row = many.rows("val")[-1]
    demo = many.demonstration(row)
    env = SearchEnvironment(top_k=3)
    env.reset(row, 0)
    for name in row["chain"]:  # what the search tool returns, as the rollouts will see it
        assert f"<search>{name}</search>\n\n<information>{env.search(name)}</information>" in demo
    assert demo.endswith(f"<answer>{row['answer']}</answer>") and many.verify(demo, row) == 1.0
    assert FactQATask(people=8, val_people=2, demo_top_k=1).demonstration(row).count("Doc 2") == 0
    with pytest.raises(ValueError, match="worlds"):
        FactQATask(worlds=0)
    fewer = FactQATask(people=8, val_people=2, worlds=5, val_worlds=2)
    assert len(fewer.rows("train")) == len(many.rows("train")) and len(fewer.rows("val")) == 2 * 2 * 2
    with pytest.raises(ValueError, match="val_worlds"):
        FactQATask(worlds=2, val_worlds=3)


def test_qa_tasks_give_em_and_f1_per_prompt_for_the_held_out_metrics():
    rows = [{"golden_answers": ["New York"]}, {"golden_answers": ["Paris"]}, {"golden_answers": ["Rome"]}]
    completions = ["<answer>new york city</answer>", "<answer>The Paris</answer>", "no answer"]
    scores = FactQATask().eval_scores(completions, rows)
    assert scores == {"em": [0.0, 1.0, 0.0], "f1": [pytest.approx(0.8), 1.0, 0.0]}


def test_cpu_recipe_runs_with_tool_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the warm-start cache stays in tmp_path
    cfg = yaml.safe_load((CONFIGS / "agentic_tiny_cpu.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["steps"] = 2
    config = tmp_path / "agentic_tiny_cpu.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _run(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.enable_progress_bar=false",
            "--data.task.init_args.people=8",
            "--data.task.init_args.val_people=2",
            "--data.val_batch_size=4",
            "--model.sampling.max_new_tokens=16",
        ],
        tmp_path / "fit",
    )
    columns = _columns(_logged(tmp_path / "fit"))
    held_out = {
        f"val/{m}{lvl}"
        for m in ("accuracy", "em", "f1", "tool_calls")
        for lvl in ("", "/level_1", "/level_2")
    }
    assert TOOL_METRICS | held_out | {"train/rewards/em", "train/rewards/f1"} <= columns


def test_gpu_recipe_mirrors_search_r1_and_runs_on_cpu_with_the_tiny_model(tmp_path):
    cfg = yaml.safe_load((CONFIGS / "search_r1_qwen2.5_3b.yaml").read_text())
    sampling, agent = cfg["model"]["sampling"], cfg["model"]["sampling"]["agent"]
    assert (agent["format"], agent["max_turns"], agent["max_turn_tokens"]) == ("tags", 2, 500)
    assert (
        sampling["max_new_tokens"] == 500 * 3 and agent["max_tool_tokens"] == 500 * 2
    )  # 2 calls, then answer
    assert (sampling["group_size"], cfg["data"]["batch_size"], cfg["trainer"]["max_steps"]) == (5, 512, 1005)
    text = (CONFIGS / "search_r1_qwen2.5_3b.yaml").read_text()
    assert "--config configs/weighting/grpo.yaml" in text  # its GRPO twin (tests/test_weighting_configs.py)
    assert agent["environment"]["init_args"]["top_k"] == 3 and sampling["temperature"] == 1.0
    assert (
        cfg["model"]["optim"]["lr"],
        cfg["model"]["loss"]["beta"],
        cfg["model"]["loss"]["kl_estimator"],
    ) == (1e-6, 0.001, "k3")
    qa, val = tmp_path / "qa.parquet", tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist(_qa_rows(6)), qa)
    pq.write_table(pa.Table.from_pylist(_qa_rows(2, start=10)), val)
    corpus = _corpus(tmp_path / "corpus.jsonl")
    cli = _run(
        [
            "fit",
            "--config",
            str(CONFIGS / "search_r1_qwen2.5_3b.yaml"),
            *TINY,
            "--model.sampling.engine=fast",  # vLLM's CPU attention has no kernel for the tiny head size
            f"--data.task.init_args.path={qa}",
            f"--data.task.init_args.val_path={val}",
            f"--data.task.init_args.cache_dir={tmp_path / 'hf'}",
            "--model.optim.mini_batch_size=4",
            f"--model.sampling.agent.environment.init_args.corpus={corpus}",
            f"--model.sampling.agent.environment.init_args.cache_dir={tmp_path / 'bm25'}",
        ],
        tmp_path,
    )
    assert cli.trainer.global_step == 1 and cli.model.policy_cfg.name_or_path is None
    assert TOOL_METRICS | {"train/rewards/em", "val/accuracy"} <= _columns(_logged(tmp_path))
