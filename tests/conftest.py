"""Shared test set-up: an isolated cache for the embedded tokenizer, quiet logs, helpers."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("TRGRPO_CACHE", tempfile.mkdtemp(prefix="trgrpo-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of retrying
# the package's thread default (trgrpo.threads), set here too because the tests import torch before trgrpo:
# idle OpenMP threads spin briefly, then sleep, so the suite slows gracefully on shared cores
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    yield
