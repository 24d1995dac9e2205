"""What the sweep and its report share: the run folders' file names, ``Run``, and JSON and log helpers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DONE, FAILED, SETTINGS = "done.json", "failed.json", "settings.json"


Grid = tuple[tuple[str, str], ...]
"""A grid point: ``((config key, value as given), ...)`` in the order of the ``--grid`` flags."""


def grid_label(grid: Grid) -> str:
    """``key=value,key=value``: the point's name in folders, the report and the progress lines."""
    return ",".join(f"{key}={value}" for key, value in grid)


@dataclass(frozen=True)
class Run:
    strategy: str
    fragment: str
    seed: int
    folder: Path
    grid: Grid = ()

    @property
    def point(self) -> str:
        return grid_label(self.grid)

    @property
    def label(self) -> str:
        return f"{self.strategy} seed {self.seed}" + (f" [{self.point}]" if self.grid else "")


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
