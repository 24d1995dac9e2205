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


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The tiny model (hidden 32, one layer) saved as a Hugging Face folder: runs compared with each other
    load the same weights with from_pretrained (ZeRO-3 straight into its shards)."""
    from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer

    path = tmp_path_factory.mktemp("pretrained")
    cfg = PolicyConfig(
        tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    tok = load_tokenizer(cfg)
    load_model(cfg, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Any model or tokenizer load fails the test: the settings must be checked before one loads."""
    import trgrpo.module as module_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the settings were checked")

    monkeypatch.setattr(module_mod, "load_model", forbidden)
    monkeypatch.setattr(module_mod, "load_tokenizer", forbidden)
