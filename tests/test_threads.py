"""The OpenMP defaults of ``trgrpo.threads``: applied before torch loads, never over a value the user set.

Each case is a fresh interpreter, because the environment only matters when torch is first imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trgrpo.threads import THREAD_DEFAULTS, apply_thread_defaults

# what the child sees in its environment at the moment torch is imported
PROBE = (
    "import os, {first}; import torch; "
    "print(os.environ.get('GOMP_SPINCOUNT', '<unset>'), os.environ.get('OMP_WAIT_POLICY', '<unset>'))"
)


def wait_policy(first: str, **env: str) -> str:
    """'<GOMP_SPINCOUNT> <OMP_WAIT_POLICY>' as the child's torch saw them."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_default_applied_before_torch_loads():
    assert wait_policy("trgrpo") == "10000 <unset>"


@pytest.mark.parametrize("value", ["ACTIVE", "passive"])
def test_user_wait_policy_wins(value):
    assert wait_policy("trgrpo", OMP_WAIT_POLICY=value) == f"<unset> {value}"


def test_user_spin_count_wins():
    assert wait_policy("trgrpo", GOMP_SPINCOUNT="300000") == "300000 <unset>"


def test_host_program_that_imported_torch_first_is_left_alone():
    assert wait_policy("torch, trgrpo") == "<unset> <unset>"


def test_entry_points_import_the_package_first():
    # `python -m trgrpo` runs trgrpo/__init__.py first; so does the console script, being inside the package
    tomllib = pytest.importorskip("tomllib")
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert all(target.startswith("trgrpo.") for target in scripts.values())


def test_apply_sets_only_missing_keys(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert apply_thread_defaults(env) == {} and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert apply_thread_defaults(env) == THREAD_DEFAULTS and env == THREAD_DEFAULTS
    env = {"GOMP_SPINCOUNT": "300000"}
    assert apply_thread_defaults(env) == {} and env == {"GOMP_SPINCOUNT": "300000"}
