"""tiny-addition: a verifiers environment (taskset) of two-digit additions, small enough for a CPU demo.

A verifiers environment is a package (or module) named after its id (``tiny-addition`` -> ``tiny_addition``)
that exports one ``Taskset`` subclass through ``__all__``.  This one generates its rows as a small
``datasets.Dataset`` (``12+34=`` -> ``46``) and scores a reply with two weighted rewards: ``correct`` (1.0,
the parsed answer equals the reference) and ``format`` (0.2, the reply is a bare integer).  The ``test``
split is drawn with another seed, so the environment has an evaluation set of its own.

Use it from trgrpo with ``configs/verifiers_tiny_cpu.yaml``, or install it like a published environment
(``pip install -e examples/verifiers_tiny``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Literal

import verifiers.v1 as vf
from datasets import Dataset

_INT = re.compile(r"-?\d+")


def parse_answer(reply: str) -> str | None:
    """The environment's parser: the last integer written in the reply (None when there is none)."""
    found = _INT.findall(reply)
    return found[-1] if found else None


def make_dataset(num_examples: int, seed: int) -> Dataset:
    """``num_examples`` additions of two two-digit numbers drawn with ``seed``."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(num_examples)]
    return Dataset.from_dict(
        {"question": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    )


class TinyAdditionConfig(vf.TasksetConfig):
    """Load-time settings (``env_args`` in trgrpo, ``--env.taskset.*`` in verifiers' own tools)."""

    num_examples: int = 300
    split: Literal["train", "test"] = "train"
    seed: int = 0


class AdditionData(vf.TaskData):
    answer: str
    """The exact sum."""


class AdditionTask(vf.Task[AdditionData, vf.State, vf.TaskConfig]):
    @vf.reward(weight=1.0)
    async def correct(self, task: AdditionData, trace: vf.Trace) -> float:
        return 1.0 if parse_answer(trace.last_reply) == task.answer else 0.0

    @vf.reward(weight=0.2)
    async def format(self, trace: vf.Trace) -> float:
        return 1.0 if re.fullmatch(r"-?\d+", trace.last_reply) else 0.0


class TinyAddition(vf.Taskset[AdditionTask, TinyAdditionConfig]):
    def load(self) -> Iterator[AdditionTask]:
        seed = self.config.seed + (0 if self.config.split == "train" else 1_000_003)
        for i, row in enumerate(make_dataset(self.config.num_examples, seed)):
            data = AdditionData(id=f"{self.config.split}-{i}", prompt=row["question"], answer=row["answer"])
            yield AdditionTask(data, self.config.task)


__all__ = ["TinyAddition"]
