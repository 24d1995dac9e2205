"""A procedural arithmetic task small enough for a tiny model on a laptop CPU.

Prompts are bare expressions such as ``"37+58="`` by default, or any text built from a template
(``prompt_template="What is {a} {op} {b}? Reply with only the number."`` for an instruct model with
``data.chat_template: true``); the reference ``answer`` is the exact integer result.  The verifier reads
the whole completion (``answer_from="whole"``: the bare number and nothing else, what a model trained on
``"37+58="`` writes) or its last integer (``"last_number"``: "37 + 58 = 95" counts, as an instruct model
tends to answer); ``last_number_match`` is the matching reward.  Train and held-out rows are drawn with
different seeds and the held-out set excludes every expression that appears in training, so held-out
accuracy is measured on prompts never trained on.
"""

from __future__ import annotations

import random
from typing import Literal, get_args

# last_number_match is the reward of answer_from="last_number"; importable from here, where the recipes
# name it
from trgrpo.rewards import last_number, last_number_match  # noqa: F401
from trgrpo.tasks.base import Split, Task

AnswerSource = Literal["whole", "last_number"]
"""What the verifier compares with the answer: the whole completion, or the last integer in it."""


class ArithmeticTask(Task):
    """Integer arithmetic ``a <op> b =`` with an exact-integer answer.

    Args:
        train_size: number of training prompts.
        val_size: number of held-out prompts.
        min_value: smallest operand.
        max_value: largest operand.
        operators: operators to draw from, any of ``+``, ``-``, ``*``.
        seed: seed of the training draw; the held-out draw uses ``seed + 1``.
        prompt_template: the prompt text, with ``{a}``, ``{b}`` and ``{op}`` replaced by the operands and
            the operator; empty = the bare expression ``"{a}{op}{b}="``.
        answer_from: what the verifier compares with the answer: the ``"whole"`` completion (stripped) or
            its ``"last_number"``.
    """

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 200,
        min_value: int = 0,
        max_value: int = 99,
        operators: list[str] | None = None,
        seed: int = 0,
        prompt_template: str | None = None,
        answer_from: AnswerSource = "whole",
    ) -> None:
        ops = operators if operators is not None else ["+"]
        bad = [o for o in ops if o not in "+-*" or len(o) != 1]
        if bad or not ops:
            raise ValueError(
                f"data.task.init_args.operators must be a non-empty list of '+', '-', '*', got {ops}"
            )
        if min_value > max_value:
            raise ValueError(f"data.task.init_args.min_value ({min_value}) exceeds max_value ({max_value})")
        space = (max_value - min_value + 1) ** 2 * len(ops)
        if train_size + val_size > space:
            raise ValueError(
                f"data.task: train_size + val_size = {train_size + val_size} exceeds the {space} distinct "
                "expressions the operand range allows"
            )
        template = prompt_template or "{a}{op}{b}="
        if "{a}" not in template or "{b}" not in template:
            raise ValueError(
                f"data.task.init_args.prompt_template must contain {{a}} and {{b}}, got {template!r}"
            )
        if answer_from not in get_args(AnswerSource):
            choices = " or ".join(map(repr, get_args(AnswerSource)))
            raise ValueError(f"data.task.init_args.answer_from must be {choices}, got {answer_from!r}")
        self.prompt_template, self.answer_from = template, answer_from
        self.train_size, self.val_size = train_size, val_size
        self.min_value, self.max_value, self.operators, self.seed = min_value, max_value, ops, seed
        self._cache: dict[str, list[dict]] = {}

    def _draw(self, rng: random.Random, n: int, seen: set[tuple]) -> list[dict]:
        """``n`` rows of expressions not in ``seen`` (which gains them)."""
        rows = []
        while len(rows) < n:
            a = rng.randint(self.min_value, self.max_value)
            b = rng.randint(self.min_value, self.max_value)
            op = rng.choice(self.operators)
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            value = a + b if op == "+" else a - b if op == "-" else a * b
            prompt = self.prompt_template.replace("{a}", str(a)).replace("{b}", str(b)).replace("{op}", op)
            rows.append({"prompt": prompt, "answer": str(value)})
        return rows

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            seen: set[tuple] = set()
            train = self._draw(random.Random(self.seed), self.train_size, seen)
            self._cache = {
                "train": train,
                "val": self._draw(random.Random(self.seed + 1), self.val_size, seen),
            }
        return self._cache[split]

    def verify(self, completion: str, row: dict) -> float:
        given = completion.strip() if self.answer_from == "whole" else last_number(completion)
        return 1.0 if given == row["answer"] else 0.0

    def demonstration(self, row: dict) -> str:
        return row["answer"]
