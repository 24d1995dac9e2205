"""Jobs and rewards the sandbox tests run in worker processes (importable by name, nothing heavy imported)."""

from __future__ import annotations

import os


def add(a, b):
    return a + b


def environment_names() -> list[str]:
    return sorted(os.environ)


def allocate(gib: int) -> int:
    return len(bytearray(gib << 30))


def spin() -> None:
    while True:
        pass


def write_file(path: str) -> str:
    with open(path, "w") as f:
        f.write("ran")
    return "written"


def eval_reward(prompts, completions, **_):
    """An untrusted reward: evaluates the completion (as a code-execution reward would)."""
    out = []
    for c in completions:
        try:
            out.append(float(bool(eval(c))))  # noqa: S307 - the point of the test
        except Exception:  # noqa: BLE001
            out.append(0.0)
    return out
