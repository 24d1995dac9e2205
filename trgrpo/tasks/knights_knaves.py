"""Knights and Knaves puzzles with the reward of the published K&K RL setups (Logic-RL, Lopti, TR-GRPO).

Puzzles come from reasoning-gym's ``knights_knaves`` generator (the mem-kk-logic generator of Xie et
al., 2024), one difficulty level per number of people (3 to 7 in the published setups).  reasoning-gym
varies the role names (sages and fools, heroes and villains, ...); with ``roles: knight_knave`` (the
default) each puzzle is rewritten to knights and knaves as in the published data.

The model answers as ``<think>...</think><answer>...</answer>`` and the reward is the sum of two terms,
``trgrpo.rewards.think_answer_format`` (+1 / -1) and ``kk_answer_reward``: +2 when every person's role
in the ``<answer>`` block is right, -1.5 when any is wrong, -2 when the roles cannot be read from it
(a name missing, or a different number of role words than people).  As in Logic-RL, the answer is not
graded when the format is broken (the term is None there and counts 0 in the total), so the totals are
3 (right), -0.5 (wrong), -1 (unreadable or badly formatted); ``kk_reward`` is the same as one term::

    model:
      rewards:
        - {fn: trgrpo.rewards.think_answer_format, name: format, failure_score: -1.0}
        - {fn: trgrpo.tasks.knights_knaves.kk_answer_reward, name: answer, failure_score: -2.0}
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from trgrpo.rewards import THINK_TAGS, has_think_answer_format, with_prefilled_think
from trgrpo.tasks.base import Split, Task
from trgrpo.tasks.common import check_prompt_template, fill_template, normalise
from trgrpo.tasks.reasoning_gym import draw_levels

CLASSIC = {
    "knight": "knight",
    "knave": "knave",
    "a_knight": "a knight",
    "a_knave": "a knave",
    "Knight": "Knight",
    "Knave": "Knave",
}


def to_classic_roles(text: str, terms: dict[str, str]) -> str:
    """``text`` with reasoning-gym's role pair (e.g. sage / fool) replaced by knight / knave."""
    if terms["knight"] == "knight":
        return text
    pairs = []
    for key in ("a_knight", "a_knave", "Knight", "Knave", "knight", "knave"):
        pairs += [(str(terms[key]) + "s", CLASSIC[key] + "s"), (str(terms[key]), CLASSIC[key])]
    mapping = dict(pairs)
    rx = re.compile("|".join(rf"\b{re.escape(src)}\b" for src, _ in pairs))  # longest alternatives first
    return rx.sub(lambda m: mapping[m.group(0)], text)


SHORT_NAMES = ["Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lea"]


def rename_people(text: str, names: list[str]) -> tuple[str, list[str]]:
    """``text`` with the i-th person renamed to ``SHORT_NAMES[i]`` (one pass, so no name is renamed twice)."""
    new = SHORT_NAMES[: len(names)]
    mapping = dict(zip(names, new, strict=True))
    rx = re.compile("|".join(rf"\b{re.escape(n)}\b" for n in sorted(names, key=len, reverse=True)))
    return rx.sub(lambda m: mapping[m.group(0)], text), new


def solution_text(names: list[str], roles: list[str]) -> str:
    """``"A is a knight, B is a knave, and C is a knight."`` (reasoning-gym's reference answer form)."""
    parts = [f"{n} is {'an' if r[0] in 'aeiou' else 'a'} {r}" for n, r in zip(names, roles, strict=True)]
    return parts[0] + "." if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1] + "."


def parse_kk_answer(
    answer: str, names: list[str], knight: str = "knight", knave: str = "knave"
) -> list[str] | None:
    """The role of each person in ``names`` read from an answer text, or None when it cannot be read.

    As in Logic-RL's parser: the text must mention exactly one role word per person, and each name must
    be followed by ``is a(n) <role>``.
    """
    roles_rx = f"{re.escape(knight)}|{re.escape(knave)}"
    if len(re.findall(rf"\b(?:{roles_rx})s?\b", answer, flags=re.IGNORECASE)) != len(names):
        return None
    out = []
    for name in names:
        m = re.search(
            rf"(?<!\w){re.escape(name)}(?!\w)\s+is\s+an?\s+({roles_rx})\b", answer, flags=re.IGNORECASE
        )
        if m is None:
            return None
        out.append(m.group(1).lower())
    return out


def answer_block(text: str) -> str:
    """The text between ``<answer>`` and ``</answer>`` (call only on a well-formed completion)."""
    return text[text.find(THINK_TAGS[2]) + len(THINK_TAGS[2]) : text.find(THINK_TAGS[3])]


def grade_kk(
    prompt: str,
    completion: str,
    names: list[str],
    roles: list[str],
    knight: str = "knight",
    knave: str = "knave",
) -> Literal["format", "unparsable", "wrong", "right"]:
    """Which case of the K&K reward table a completion falls in."""
    text = with_prefilled_think(prompt, completion)
    if not has_think_answer_format(text):
        return "format"
    parsed = parse_kk_answer(answer_block(text), names, knight, knave)
    if parsed is None:
        return "unparsable"
    return "right" if parsed == [r.lower() for r in roles] else "wrong"


def kk_answer_reward(
    prompts: list[str],
    completions: list[str],
    names: list[list[str]],
    roles: list[list[str]],
    knight_term: list[str] | None = None,
    knave_term: list[str] | None = None,
    right: float = 2.0,
    wrong: float = -1.5,
    unparsable: float = -2.0,
    **_: object,
) -> list[float | None]:
    """The answer term of the published K&K reward: +2 right, -1.5 wrong, -2 unparsable, None (not graded)
    when the completion is not ``<think>...</think><answer>...</answer>``."""
    n = len(completions)
    knights, knaves = knight_term or ["knight"] * n, knave_term or ["knave"] * n
    scores = {"format": None, "unparsable": unparsable, "wrong": wrong, "right": right}
    return [
        scores[grade_kk(p, c, nm, r, kn, kv)]
        for p, c, nm, r, kn, kv in zip(prompts, completions, names, roles, knights, knaves, strict=True)
    ]


def kk_reward(
    prompts: list[str],
    completions: list[str],
    names: list[list[str]],
    roles: list[list[str]],
    **columns: object,
) -> list[float]:
    """Format and answer terms in one (Logic-RL's ``compute_score``): 3, -0.5, -1 or -1."""
    fmt = [
        1.0 if has_think_answer_format(with_prefilled_think(p, c)) else -1.0
        for p, c in zip(prompts, completions, strict=True)
    ]
    ans = kk_answer_reward(prompts, completions, names, roles, **columns)
    return [f + (a or 0.0) for f, a in zip(fmt, ans, strict=True)]


RoleNames = Literal["knight_knave", "mixed"]
"""``knight_knave``: every puzzle names its roles knight and knave; ``mixed``: varied role names."""


class KnightsKnavesTask(Task):
    """Knights and Knaves puzzles, one difficulty level per number of people.

    Rows carry ``names`` and ``roles`` (one role word per person), ``knight_term`` / ``knave_term``, the
    reference sentence ``answer`` and ``level`` (the number of people).

    Args:
        n_people: the levels: numbers of people per puzzle (the published setups use 3 to 7; default).
        train_size: training puzzles per level (the published 4,500 puzzles are 900 per level).
        val_size: held-out puzzles per level.
        depth_constraint: maximum nesting depth of a statement (reasoning-gym option).
        width_constraint: maximum number of clauses joined by and/or (reasoning-gym option).
        roles: ``knight_knave`` rewrites every puzzle to knights and knaves (as the published data);
            ``mixed`` keeps reasoning-gym's varied role pairs (sage/fool, hero/villain, ...).
        prompt_template: the prompt, with ``{question}`` replaced by the puzzle text.
        short_names: rename the people Ann, Bob, Cid, ... in order (the puzzle is unchanged); for tiny
            models, which then need not copy names from the prompt to give a readable answer.
        seed: seed of the training puzzles; held-out puzzles use ``seed + 2**30`` and skip training ones.
    """

    def __init__(
        self,
        n_people: list[int] | None = None,
        train_size: int = 900,
        val_size: int = 100,
        depth_constraint: int = 2,
        width_constraint: int = 2,
        roles: RoleNames = "knight_knave",
        prompt_template: str = "{question}",
        short_names: bool = False,
        seed: int = 0,
    ) -> None:
        levels = list(n_people) if n_people is not None else [3, 4, 5, 6, 7]
        if not levels or any(not 1 <= n <= 12 for n in levels):
            raise ValueError(
                f"data.task.init_args.n_people must be a non-empty list of integers in 1..12, got {levels}"
            )
        if train_size < 1 or val_size < 1:
            raise ValueError(
                f"data.task.init_args.train_size and val_size must be >= 1, got {train_size}, {val_size}"
            )
        if depth_constraint < 1 or width_constraint < 1:
            raise ValueError(
                "data.task.init_args.depth_constraint and width_constraint must be >= 1, "
                f"got {depth_constraint}, {width_constraint}"
            )
        if roles not in get_args(RoleNames):
            choices = " or ".join(get_args(RoleNames))
            raise ValueError(f"data.task.init_args.roles must be {choices}, got {roles!r}")
        check_prompt_template(prompt_template)
        self.n_people, self.train_size, self.val_size = sorted(set(levels)), train_size, val_size
        self.depth_constraint, self.width_constraint = depth_constraint, width_constraint
        self.roles, self.prompt_template, self.short_names, self.seed = (
            roles,
            prompt_template,
            short_names,
            seed,
        )
        self._cache: dict[str, list[dict]] = {}

    def _puzzle(self, item: dict) -> tuple[str, list[str], dict[str, str]]:
        """(question, names, role terms) as the model sees them: roles and names rewritten if asked."""
        meta = item["metadata"]
        terms = {k: str(v) for k, v in meta["knight_knave_terms"].items()}
        question, names = item["question"], [str(n) for n in meta["names"]]
        if self.roles == "knight_knave":
            question, terms = to_classic_roles(question, terms), dict(CLASSIC)
        if self.short_names:
            question, names = rename_people(question, names)
        return question, names, terms

    def _row(self, item: dict, level: int) -> dict:
        question, names, terms = self._puzzle(item)
        meta = item["metadata"]
        roles = [terms["knight"] if ok else terms["knave"] for ok in meta["solution"]]
        return {
            "prompt": fill_template(self.prompt_template, question),
            "question": question,
            "answer": solution_text(names, roles),
            "names": names,
            "roles": roles,
            "knight_term": terms["knight"],
            "knave_term": terms["knave"],
            "level": level,
        }

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            options = {
                n: {
                    "n_people": n,
                    "depth_constraint": self.depth_constraint,
                    "width_constraint": self.width_constraint,
                }
                for n in self.n_people
            }
            # rewritten puzzles are compared, so two that differ only in names or role words count as one
            train, val = draw_levels(
                "knights_knaves",
                options,
                self.train_size,
                self.val_size,
                self.seed,
                key=lambda item: normalise(self._puzzle(item)[0]),
            )
            self._cache = {
                split_name: [self._row(it, n) for n, items in by_level.items() for it in items]
                for split_name, by_level in (("train", train), ("val", val))
            }
        return self._cache[split]

    def verify(self, completion: str, row: dict) -> float:
        """1.0 when the format is right and every person's role is right (reward 3), else 0.0."""
        grade = grade_kk(
            row["prompt"], completion, row["names"], row["roles"], row["knight_term"], row["knave_term"]
        )
        return 1.0 if grade == "right" else 0.0

    def demonstration(self, row: dict) -> str:
        opened = str(row["prompt"]).rstrip().endswith("<think>")
        return ("" if opened else "<think>") + f"</think><answer>{row['answer']}</answer>"
