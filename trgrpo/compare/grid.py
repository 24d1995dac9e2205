"""Grids of ``python -m trgrpo compare``: ``--grid KEY=V1,V2`` flags, their product, and each point's values.

A grid point is a tuple of ``(config key, value as given)``; a run at that point gets ``--KEY=VALUE`` after
its configs, so the value overrides the base and the fragment.  A value ``xF`` (``x4``, ``x0.5``) is F times
the number the base config sets for the key, written with 6 significant digits.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from trgrpo.compare.runs import Grid

GRID_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
MULTIPLIER = re.compile(r"^x([0-9]*\.?[0-9]+(e[-+]?[0-9]+)?)$", re.IGNORECASE)


def grid_points(specs: Sequence[str]) -> list[Grid]:
    """``["a=1,2", "b=x,y"]`` -> the product ``[(("a","1"),("b","x")), ...]``; ``[()]`` without a grid."""
    axes, keys = [], []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not GRID_KEY.match(key):
            raise ValueError(
                f"--grid {spec!r}: give KEY=V1,V2,... with KEY a config key such as model.optim.lr"
            )
        if key in keys:
            raise ValueError(f"--grid {key}: given twice; put all its values in one flag")
        tokens = [v.strip() for v in values.split(",")]
        if any(not v or "/" in v for v in tokens):
            raise ValueError(f"--grid {spec!r}: values must be non-empty and contain no '/' (folder names)")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"--grid {spec!r}: repeated values")
        keys.append(key)
        axes.append([(key, v) for v in tokens])
    return [tuple(p) for p in itertools.product(*axes)]


def grid_value(base: str, key: str, token: str) -> str:
    """The value a run gets for ``key``: ``token`` itself, or for ``xF`` F times the base config's value."""
    m = MULTIPLIER.match(token)
    if not m:
        return token
    node = yaml.safe_load(Path(base).read_text()) or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"--grid {key}={token}: the base config {base} sets no {key} to multiply")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float, str)):
        raise ValueError(f"--grid {key}={token}: {key} in {base} is {node!r}, not a number")
    try:
        value = float(node) * float(m.group(1))
    except ValueError:
        raise ValueError(f"--grid {key}={token}: {key} in {base} is {node!r}, not a number") from None
    return f"{value:.6g}"


__all__ = ["grid_points", "grid_value"]
