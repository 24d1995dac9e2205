"""The fast sampler's decode loop on a shared CPU: small steps on one thread, the count restored after, the
tokens unchanged; and the benchmark's busy neighbours stop with all their processes."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from trgrpo.fastpath import sampler
from trgrpo.fastpath.sampler import decode_step_flops, sample_completions
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer
from trgrpo.threads import DECODE_ONE_THREAD_FLOPS, DECODE_THREADS_ENV, decode_threads, torch_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    cfg = PolicyConfig(
        tiny=TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    tok = load_tokenizer(cfg)
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = load_model(cfg, tok).eval()
    enc = tok(["1+2=", "Add: 30+4=", "7+7="], return_tensors="pt", padding=True)
    return model, tok, enc


def sample(tiny, seed: int, **kw):
    model, tok, enc = tiny
    torch.manual_seed(seed)
    return sample_completions(
        model,
        enc.input_ids,
        enc.attention_mask,
        4,
        12,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


# ------------------------------------------------------------------------------------- the choice


def test_auto_is_one_thread_below_the_threshold_and_the_process_count_above():
    for env in ({}, {DECODE_THREADS_ENV: "auto"}, {DECODE_THREADS_ENV: " AUTO "}):
        assert decode_threads(DECODE_ONE_THREAD_FLOPS * 0.99, 8, env) == 1
        assert decode_threads(DECODE_ONE_THREAD_FLOPS, 8, env) == 8


@pytest.mark.parametrize(("value", "expected"), [("0", 6), ("1", 1), ("3", 3)])
def test_the_variable_sets_the_count_whatever_the_size(value, expected):
    for flops in (1.0, DECODE_ONE_THREAD_FLOPS * 100):
        assert decode_threads(flops, 6, {DECODE_THREADS_ENV: value}) == expected


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_value_names_the_variable(value):
    with pytest.raises(ValueError, match=DECODE_THREADS_ENV):
        decode_threads(1.0, 2, {DECODE_THREADS_ENV: value})


def test_the_cli_refuses_a_bad_value_before_any_model_loads(tmp_path, monkeypatch):
    from helpers import arithmetic_args, run_cli

    import trgrpo.module

    monkeypatch.setenv(DECODE_THREADS_ENV, "many")
    monkeypatch.setattr(trgrpo.module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=f"{DECODE_THREADS_ENV}='many'"):
        run_cli(tmp_path, *arithmetic_args(), "--trainer.max_steps=1")


def test_step_flops_count_every_weight_of_the_layers_and_head_twice_per_row(tiny):
    model = tiny[0]
    cfg = model.config
    weights = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ("layers" in name or name.endswith("lm_head"))
    )
    hd = cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 4 * cfg.num_attention_heads * hd * 20  # q.k and p.v over 20 positions
    assert decode_step_flops(cfg, 24, 20) == 24 * (2 * weights + attention)


def test_the_demo_decodes_on_one_thread_and_the_30m_benchmark_model_on_all():
    demo = TinyModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    big = TinyModelConfig(hidden_size=512, num_hidden_layers=7, num_attention_heads=8, intermediate_size=2048)
    tok = load_tokenizer(PolicyConfig(tiny=demo))
    configs = [load_model(PolicyConfig(tiny=t), tok).config for t in (demo, big)]
    assert decode_threads(decode_step_flops(configs[0], 16 * 8, 20 + 48), 2, {}) == 1
    assert decode_threads(decode_step_flops(configs[1], 8 * 8, 20 + 48), 2, {}) == 2


# ------------------------------------------------------------------------------------- the sampler


def test_torch_threads_restores_the_count_also_after_an_error(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("value", "inside"), [(None, 1), ("0", 2), ("2", 2), ("1", 1)])
def test_the_decode_loop_runs_on_the_chosen_threads_and_restores_them(
    tiny, two_threads, monkeypatch, value, inside
):
    if value is None:
        monkeypatch.delenv(DECODE_THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(DECODE_THREADS_ENV, value)
    seen = []
    decode = sampler._decode_chunk

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return decode(*args, **kwargs)

    monkeypatch.setattr(sampler, "_decode_chunk", spy)
    sample(tiny, 0)
    assert seen == [inside] and torch.get_num_threads() == 2


def test_the_count_is_restored_when_the_decode_loop_fails(tiny, two_threads, monkeypatch):
    monkeypatch.delenv(DECODE_THREADS_ENV, raising=False)

    def fail(*args, **kwargs):
        assert torch.get_num_threads() == 1
        raise RuntimeError("decode failed")

    monkeypatch.setattr(sampler, "_decode_chunk", fail)
    with pytest.raises(RuntimeError, match="decode failed"):
        sample(tiny, 0)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("kw", [{"greedy": True}, {}, {"top_p": 0.9, "top_k": 20, "temperature": 0.8}])
def test_one_thread_gives_the_same_tokens_and_random_state_as_all(tiny, two_threads, monkeypatch, kw):
    results = []
    for value in ("2", "auto"):
        monkeypatch.setenv(DECODE_THREADS_ENV, value)
        tokens = sample(tiny, 3, **kw)
        results.append((tokens, torch.get_rng_state()))
    (a, state_a), (b, state_b) = results
    assert a.shape == (12, 12) and torch.equal(a, b) and torch.equal(state_a, state_b)


def test_a_chunked_rollout_is_unchanged_too(tiny, two_threads, monkeypatch):
    monkeypatch.setenv(DECODE_THREADS_ENV, "2")
    whole = sample(tiny, 5)
    monkeypatch.delenv(DECODE_THREADS_ENV)
    one_group = sampler.kv_cache_bytes(tiny[0].config, 4, 12, 4, 1, tiny[2].input_ids.shape[1])
    assert torch.equal(sample(tiny, 5, cache_bytes=one_group), whole)


# ------------------------------------------------------------------------------------- the neighbours


def neighbours():
    spec = importlib.util.spec_from_file_location("neighbours", ROOT / "scripts" / "neighbours.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def group_members(pgid: int) -> list[str]:
    """States of the live (not zombie) processes in a process group."""
    states = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                states.append(fields[0])
    return states


def test_an_unknown_kind_or_count_is_refused_before_anything_starts():
    nb = neighbours()
    with pytest.raises(ValueError, match="spin"):
        nb.start_neighbours("sleepy", 1)
    with pytest.raises(ValueError, match=">= 0"):
        nb.start_neighbours("busy", -1)
    assert nb.start_neighbours("busy", 0) == []


def test_stop_ends_every_process_of_each_neighbour_group():
    nb = neighbours()
    procs = nb.start_neighbours("busy", 2) + nb.start_neighbours("gloo", 1)
    try:
        gloo = procs[-1].pid
        deadline = time.monotonic() + 60
        # the launcher starts the two ranks: wait until the group holds all three processes
        while len(group_members(gloo)) < 3:
            assert time.monotonic() < deadline and procs[-1].poll() is None, "gloo ranks did not start"
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs) and all(Path(p.folder).is_dir() for p in procs)
    finally:
        nb.stop_neighbours(procs, timeout=10)
    assert all(p.returncode is not None for p in procs)
    assert not any(group_members(p.pid) for p in procs)
    assert not any(Path(p.folder).exists() for p in procs)
    nb.stop_neighbours(procs)  # twice is harmless
