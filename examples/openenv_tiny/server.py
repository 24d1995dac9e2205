"""A tiny OpenEnv environment: "reply with the sum", served by OpenEnv's FastAPI app.

``reset(seed)`` draws two digits and shows ``"3+4="``; each ``step`` reads the last integer of the reply
(``SumAction.message``): the right sum scores 1.0 and ends the episode, a wrong number scores 0.1 and says
"higher" or "lower", a reply without a number scores 0.0; the episode ends after ``MAX_STEPS`` steps.

Serve it on its own (the trainer's adapter does this for you with ``app: examples.openenv_tiny.server:app``)::

    python -m uvicorn examples.openenv_tiny.server:app --port 8000

``faulty_app`` serves the same environment with three replies that misbehave on purpose, for the adapter's
failure tests: ``die`` ends the server process, ``hang`` sleeps ``HANG_SECONDS`` before answering, and
``garbage`` answers with a reward that is not a number.
"""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from typing import Any

from openenv.core.env_server import Action, Environment, Observation, State, create_app

MAX_STEPS = 3
HANG_SECONDS = 60.0
SESSIONS = 256  # concurrent episodes the server accepts: at least batch_size * group_size of the trainer


class SumAction(Action):
    message: str


class SumObservation(Observation):
    text: str


class SumEnvironment(Environment):
    """Reply with the sum of two digits; 1.0 for the right sum, 0.1 for another number, 0.0 otherwise."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self) -> None:
        super().__init__()
        self._state = State(episode_id=None, step_count=0)
        self.target = 0

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> SumObservation:
        rng = random.Random(seed)
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        self.target = a + b
        self._state = State(episode_id=episode_id or str(uuid.uuid4()), step_count=0)
        return SumObservation(text=f"{a}+{b}=", done=False, reward=None)

    def step(self, action: SumAction, timeout_s: float | None = None, **kwargs: Any) -> SumObservation:
        self._state.step_count += 1
        numbers = re.findall(r"-?\d+", action.message)
        last = self._state.step_count >= MAX_STEPS
        if not numbers:
            return SumObservation(text="a number, please", reward=0.0, done=last)
        guess = int(numbers[-1])
        if guess == self.target:
            return SumObservation(text="right", reward=1.0, done=True)
        return SumObservation(text="higher" if guess < self.target else "lower", reward=0.1, done=last)

    @property
    def state(self) -> State:
        return self._state


class FaultySumEnvironment(SumEnvironment):
    """``SumEnvironment`` with replies that break the server on purpose (tests only)."""

    def step(self, action: SumAction, timeout_s: float | None = None, **kwargs: Any) -> SumObservation:
        reply = re.sub(r"</?answer>", "", action.message).strip()
        if reply == "die":
            os._exit(1)
        if reply == "hang":
            time.sleep(HANG_SECONDS)
        if reply == "garbage":  # skips validation: the reward goes out as a string
            return SumObservation.model_construct(text="?", reward="lots", done=False, metadata={})
        return super().step(action, timeout_s, **kwargs)


app = create_app(
    SumEnvironment, SumAction, SumObservation, env_name="openenv_tiny", max_concurrent_envs=SESSIONS
)
faulty_app = create_app(
    FaultySumEnvironment, SumAction, SumObservation, env_name="openenv_tiny", max_concurrent_envs=SESSIONS
)
