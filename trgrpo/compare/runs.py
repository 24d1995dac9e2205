"""What the sweep and its report share: the run folders' file names, ``Run``, and JSON and log helpers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DONE, FAILED, SETTINGS = "done.json", "failed.json", "settings.json"


@dataclass(frozen=True)
class Run:
    strategy: str
    fragment: str
    seed: int
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.strategy} seed {self.seed}"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
