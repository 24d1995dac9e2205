"""Search-R1-style tool-augmented question answering: the model searches, reads passages, and answers.

The model reasons, calls the search tool as ``<search>query</search>`` (the tag format of
``model.sampling.agent``), reads the top passages inside ``<information>...</information>``, and answers
inside ``<answer>...</answer>``.  Reward and evaluation: exact match of the last answer against any gold
answer after SQuAD normalisation (lower case, punctuation, articles and extra whitespace removed), as in
Search-R1 (arXiv 2503.09516); ``search_qa_f1`` gives token F1 (log it with weight 0).

- ``SearchQATask``: NQ / HotpotQA-style question + answers files (jsonl / json / parquet, read with
  ``datasets``), with a corpus given to ``trgrpo.agent.retrieval.SearchEnvironment``;
- ``FactQATask``: an offline generated fact base (people, their city, their friend), one- and two-hop
  questions, each row with its own small set of passages (``documents``) for the search tool; train and
  held-out questions are about different people.  For CPU demos and tests.

    model:
      rewards:
        - {fn: trgrpo.tasks.search_qa.search_qa_reward, name: em}
        - {fn: trgrpo.tasks.search_qa.search_qa_f1, name: f1, weight: 0.0}
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path

from trgrpo.tasks.base import Split, Task
from trgrpo.tasks.common import check_data_file, check_prompt_template, fill_template, normalise

SEARCH_R1_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
    "by <search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
)
SHORT_TEMPLATE = "Search: <search>q</search>. Answer: <answer>a</answer>.\nQ: {question}\n"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def final_answer(completion: str) -> str | None:
    """The content of the last ``<answer>...</answer>``, or None."""
    found = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    return found[-1] if found else None


def exact_match_score(prediction: str | None, golds: list[str]) -> float:
    if prediction is None:
        return 0.0
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str | None, golds: list[str]) -> float:
    """Best token F1 of the normalised prediction against any gold answer."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


def search_qa_reward(
    prompts: list[str],
    completions: list[str],
    golden_answers: list[list[str]],
    format_score: float = 0.0,
    **_: object,
) -> list[float]:
    """1.0 when the last ``<answer>`` matches a gold answer exactly (normalised); ``format_score`` when it
    does not but an ``<answer>`` block is there; 0.0 without one."""
    out = []
    for c, golds in zip(completions, golden_answers, strict=True):
        pred = final_answer(c)
        out.append(1.0 if exact_match_score(pred, golds) else (format_score if pred is not None else 0.0))
    return out


def search_qa_f1(
    prompts: list[str], completions: list[str], golden_answers: list[list[str]], **_: object
) -> list[float]:
    """Token F1 of the last ``<answer>`` against the gold answers (for the metrics)."""
    return [f1_score(final_answer(c), golds) for c, golds in zip(completions, golden_answers, strict=True)]


class _QATask(Task):
    def verify(self, completion: str, row: dict) -> float:
        return exact_match_score(final_answer(completion), row["golden_answers"])

    def eval_scores(self, completions: list[str], rows: list[dict]) -> dict[str, list[float]]:
        """Held-out metrics ``val/em`` and ``val/f1`` (overall and per hop count, ``val/f1/level_2``)."""
        answers = [final_answer(c) for c in completions]
        return {
            "em": [exact_match_score(a, r["golden_answers"]) for a, r in zip(answers, rows, strict=True)],
            "f1": [f1_score(a, r["golden_answers"]) for a, r in zip(answers, rows, strict=True)],
        }


class SearchQATask(_QATask):
    """Question + gold answers from local files (NQ / HotpotQA style, as Search-R1 prepares them).

    Files are read (and their existence and columns checked) when the data module loads them, before any
    model is built.

    Args:
        path: jsonl / json / parquet file of training questions.
        val_path: file of held-out questions (empty = the last ``val_size`` rows of ``path``).
        val_size: held-out questions taken from ``path`` when ``val_path`` is empty.
        question_key: column of the question.
        answers_key: column of the gold answers (a list, or one string).
        level_key: column reported as the evaluation level (e.g. hop count); empty = none.
        prompt_template: the prompt, with ``{question}`` replaced (Search-R1's instruction by default).
        cache_dir: ``datasets`` cache folder (empty = its default).
    """

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_size: int = 100,
        question_key: str = "question",
        answers_key: str = "golden_answers",
        level_key: str | None = None,
        prompt_template: str = SEARCH_R1_TEMPLATE,
        cache_dir: str | None = None,
    ) -> None:
        check_prompt_template(prompt_template)
        self.path, self.val_path, self.val_size = path, val_path, val_size
        self.question_key, self.answers_key, self.level_key = question_key, answers_key, level_key
        self.prompt_template, self.cache_dir = prompt_template, cache_dir
        self._cache: dict[str, list[dict]] = {}

    def _load(self, path: str, key: str) -> list[dict]:
        """Rows of one file; checked when the data is loaded (parsing a recipe reads no file)."""
        import datasets

        if not Path(path).is_file():
            raise ValueError(f"{key}: {path!r} does not exist")
        check_data_file(path, key)

        builder = "parquet" if path.endswith(".parquet") else "json"
        data = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=self.cache_dir)
        for column, name in ((self.question_key, "question_key"), (self.answers_key, "answers_key")):
            if column not in data.column_names:
                raise ValueError(
                    f"data.task.init_args.{name}: {key} {path!r} has no column {column!r} "
                    f"(columns: {data.column_names})"
                )
        return [self._row(r) for r in data]

    def _row(self, r: dict) -> dict:
        golds = r[self.answers_key]
        golds = [str(g) for g in golds] if isinstance(golds, (list, tuple)) else [str(golds)]
        row = {
            "prompt": fill_template(self.prompt_template, str(r[self.question_key])),
            "question": str(r[self.question_key]),
            "golden_answers": golds,
            "answer": golds[0],
        }
        if self.level_key:
            row["level"] = r.get(self.level_key)
        return row

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            train = self._load(self.path, "data.task.init_args.path")
            if self.val_path is not None:
                val = self._load(self.val_path, "data.task.init_args.val_path")
            else:
                train, val = train[: -self.val_size], train[-self.val_size :]
            seen = {normalise(r["question"]) for r in train}
            self._cache = {"train": train, "val": [r for r in val if normalise(r["question"]) not in seen]}
        return self._cache[split]


def _names() -> list[str]:
    """Three-letter names (consonant, vowel, consonant) in a fixed shuffled order: every letter of a held-out
    person's name also appears, in the same place, in names that training questions ask about, so copying a
    name into a search can be learnt and carried over to people never asked about."""
    names = [c + v + e for c in "BDGKLMNPRST" for v in "aeiou" for e in "bdgklmnprst"]
    names = [n for n in names if n not in ("But", "Not")]  # English stop words: the search would drop them
    random.Random(0).shuffle(names)
    return names


NAMES = _names()
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Bern", "Cairo", "Delhi", "Seoul", "Quito"]


class FactQATask(_QATask):
    """A generated fact base: each person lives in a city and has a friend; questions of one hop ("Where does
    Ann live?") or two ("Where does the friend of Ann live?"), with a small document set per question.

    Rows carry ``documents`` (the passages the search tool indexes: the people the question needs plus
    ``distractors`` others), ``golden_answers`` and ``level`` (hops).  Held-out questions ask about people
    no training question asks about.  With ``worlds`` > 1 every question is asked once per world, each world
    a fact base of its own (the same people, other cities and friends): the answer to "Where does Ann live?"
    then changes from row to row, so only reading the passages pays, never memorising them.

    Args:
        people: persons in the fact base (at most 603).
        val_people: of those, the ones held-out questions ask about.
        distractors: passages about other people added to each question's documents.
        hops: question kinds, any of 1 and 2.
        worlds: fact bases drawn (training rows per person and hop); 1 = one fact base shared by every row.
        val_worlds: of those, the ones held-out questions are asked in (empty = all ``worlds``).
        demo_top_k: passages shown per search in the demonstrations: set it to the environment's ``top_k``,
            so the warm-start reads what the search tool returns.
        prompt_template: the prompt, with ``{question}`` replaced.
        seed: seed of the fact bases.
    """

    def __init__(
        self,
        people: int = 26,
        val_people: int = 6,
        distractors: int = 3,
        hops: list[int] | None = None,
        worlds: int = 1,
        val_worlds: int | None = None,
        demo_top_k: int = 3,
        prompt_template: str = SHORT_TEMPLATE,
        seed: int = 0,
    ) -> None:
        hops = list(hops) if hops is not None else [1, 2]
        if not 2 <= people <= len(NAMES) or not 1 <= val_people < people:
            raise ValueError(
                f"data.task.init_args.people must be in 2..{len(NAMES)} and val_people in 1..people-1"
            )
        if not hops or any(h not in (1, 2) for h in hops):
            raise ValueError(f"data.task.init_args.hops must be a non-empty list of 1 and 2, got {hops}")
        if worlds < 1 or demo_top_k < 1:
            raise ValueError(
                f"data.task.init_args.worlds and demo_top_k must be >= 1, got {worlds}, {demo_top_k}"
            )
        if val_worlds is not None and not 1 <= val_worlds <= worlds:
            raise ValueError(
                f"data.task.init_args.val_worlds must be in 1..worlds (or empty), got {val_worlds}"
            )
        check_prompt_template(prompt_template)
        self.people, self.val_people, self.distractors, self.hops = people, val_people, distractors, hops
        self.worlds, self.val_worlds, self.demo_top_k = worlds, val_worlds or worlds, demo_top_k
        self.prompt_template, self.seed = prompt_template, seed
        self._cache: dict[str, list[dict]] = {}

    def facts(self, world: int = 0) -> dict[str, tuple[str, str]]:
        """person -> (city, friend) in one world (world 0 is the fact base of ``worlds: 1``)."""
        rng = random.Random(self.seed if world == 0 else f"{self.seed}/{world}")
        names = NAMES[: self.people]
        return {n: (rng.choice(CITIES), rng.choice([m for m in names if m != n])) for n in names}

    @staticmethod
    def passage(name: str, facts: dict) -> str:
        city, friend = facts[name]
        return f'"{name}"\n{name} lives in {city}. The friend of {name} is {friend}.'

    def _row(self, name: str, hop: int, facts: dict, rng: random.Random) -> dict:
        chain = [name] if hop == 1 else [name, facts[name][1]]
        others = [n for n in facts if n not in chain]
        docs = [
            self.passage(n, facts) for n in chain + rng.sample(others, min(self.distractors, len(others)))
        ]
        rng.shuffle(docs)
        question = f"Where does {name} live?" if hop == 1 else f"Where does the friend of {name} live?"
        city = facts[chain[-1]][0]
        return {
            "prompt": fill_template(self.prompt_template, question),
            "question": question,
            "documents": docs,
            "golden_answers": [city],
            "answer": city,
            "level": hop,
            "chain": chain,
        }

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            rng = random.Random(self.seed + 1)
            names = NAMES[: self.people]
            held = set(names[-self.val_people :])
            self._cache = {"train": [], "val": []}
            for world in range(self.worlds):
                facts = self.facts(world)
                for part in ("train", "val") if world < self.val_worlds else ("train",):
                    who = [n for n in names if (n in held) == (part == "val")]
                    self._cache[part] += [self._row(n, h, facts, rng) for h in self.hops for n in who]
        return self._cache[split]

    def demonstration(self, row: dict) -> str:
        """Search each person of the chain, read what the search tool returns, answer."""
        from trgrpo.agent.retrieval import SearchEnvironment

        env = SearchEnvironment(top_k=self.demo_top_k)
        env.reset(row, 0)
        steps = "".join(
            f"<search>{n}</search>\n\n<information>{env.search(n)}</information>\n\n" for n in row["chain"]
        )
        return f"{steps}<answer>{row['answer']}</answer>"


__all__ = [
    "FactQATask",
    "SearchQATask",
    "exact_match_score",
    "f1_score",
    "final_answer",
    "normalize_answer",
    "search_qa_f1",
    "search_qa_reward",
]
