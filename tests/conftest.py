"""Shared test set-up: an isolated cache for the embedded tokenizer, quiet logs, helpers."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("TRGRPO_CACHE", tempfile.mkdtemp(prefix="trgrpo-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of retrying


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    yield
