"""A procedural arithmetic task small enough for a tiny model on a laptop CPU.

Prompts are bare expressions such as ``"37+58="``; the reference ``answer`` is the exact integer
result.  Train and held-out rows are drawn with different seeds and the held-out set excludes every
expression that appears in training, so held-out accuracy is measured on prompts never trained on.
"""

from __future__ import annotations

import random

from trgrpo.tasks.base import Split, Task


class ArithmeticTask(Task):
    """Integer arithmetic ``a <op> b =`` with an exact-integer answer.

    Args:
        train_size: number of training prompts.
        val_size: number of held-out prompts.
        min_value: smallest operand.
        max_value: largest operand.
        operators: operators to draw from, any of ``+``, ``-``, ``*``.
        seed: seed of the training draw; the held-out draw uses ``seed + 1``.
    """

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 200,
        min_value: int = 0,
        max_value: int = 99,
        operators: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        ops = operators if operators is not None else ["+"]
        bad = [o for o in ops if o not in "+-*" or len(o) != 1]
        if bad or not ops:
            raise ValueError(f"data.task.init_args.operators must be a non-empty list of '+', '-', '*', got {ops}")
        if min_value > max_value:
            raise ValueError(f"data.task.init_args.min_value ({min_value}) exceeds max_value ({max_value})")
        space = (max_value - min_value + 1) ** 2 * len(ops)
        if train_size + val_size > space:
            raise ValueError(
                f"data.task: train_size + val_size = {train_size + val_size} exceeds the {space} distinct "
                "expressions the operand range allows"
            )
        self.train_size, self.val_size = train_size, val_size
        self.min_value, self.max_value, self.operators, self.seed = min_value, max_value, ops, seed
        self._cache: dict[str, list[dict]] = {}

    def _draw(self, rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
        rows, seen = [], set(exclude)
        while len(rows) < n:
            a = rng.randint(self.min_value, self.max_value)
            b = rng.randint(self.min_value, self.max_value)
            op = rng.choice(self.operators)
            expr = f"{a}{op}{b}"
            if expr in seen:
                continue
            seen.add(expr)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            rows.append({"prompt": f"{expr}=", "answer": str(value)})
        return rows

    def rows(self, split: Split) -> list[dict]:
        if not self._cache:
            train = self._draw(random.Random(self.seed), self.train_size, set())
            exprs = {r["prompt"][:-1] for r in train}
            self._cache = {"train": train, "val": self._draw(random.Random(self.seed + 1), self.val_size, exprs)}
        return self._cache[split]

    def verify(self, completion: str, row: dict) -> float:
        return 1.0 if completion.strip() == row["answer"] else 0.0

    def demonstration(self, row: dict) -> str:
        return row["answer"]
