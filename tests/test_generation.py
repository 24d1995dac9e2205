"""The fast sampler (``trgrpo.fastpath.sampler``) gives ``model.generate``'s tokens for the same seed."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from helpers import hf_and_fast_rollouts, record_fast_cache
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from trgrpo.fastpath.sampler import fast_generation_supported, kv_cache_bytes, prompts_per_chunk
from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer
from trgrpo.rollout import EngineName, Rollout, SamplingConfig
from trgrpo.rollout.engines import ENGINES, FastEngine, HFEngine, generate_rollout

# prompts of different lengths, so the batch is left-padded
PROMPTS = ["12+34=", "7+5=", "The sum of 99 and 1 is ", "3+3="]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PolicyConfig())


def _qwen2(tokenizer, kv_heads=None):
    model = load_model(
        PolicyConfig(
            tiny=TinyModelConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            )
        ),
        tokenizer,
    )
    if kv_heads is None:
        return model
    cfg = model.config
    cfg.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    return type(model)(cfg)


def _other(cls, config_cls, tokenizer, **extra):
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    return cls(cfg)


MODELS = {
    "qwen2": lambda tok: _qwen2(tok),
    "qwen2_gqa": lambda tok: _qwen2(tok, kv_heads=2),
    "llama_gqa": lambda tok: _other(LlamaForCausalLM, LlamaConfig, tok),
    "qwen3_gqa": lambda tok: _other(Qwen3ForCausalLM, Qwen3Config, tok, head_dim=8),
}


def _rollouts(model, tokenizer, greedy, seed=1, **sampling):
    return hf_and_fast_rollouts(model, tokenizer, PROMPTS, greedy, seed, **sampling)


def _assert_same(a, b):
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.truncated, b.truncated)
    assert a.completions == b.completions and a.prompt_len == b.prompt_len


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_engine_is_used_and_greedy_tokens_are_identical(tokenizer, name):
    model = MODELS[name](tokenizer)
    assert fast_generation_supported(model)
    _assert_same(*_rollouts(model, tokenizer, greedy=True))


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"ignore_eos": True}],
    ids=["plain", "temperature_topk_topp", "ignore_eos"],
)
@pytest.mark.parametrize("name", ["qwen2", "qwen2_gqa"])
def test_sampled_tokens_are_identical_for_the_same_seed(tokenizer, name, sampling):
    # the same multinomial draws on the same probabilities (up to float rounding, which does not move a draw
    # across a boundary for these seeds)
    model = MODELS[name](tokenizer)
    for seed in (1, 2):
        _assert_same(*_rollouts(model, tokenizer, greedy=False, seed=seed, **sampling))


def _group_cache_gib(model, tokenizer, group_size=3, budget=12):
    """The fast engine's cache of one prompt group of PROMPTS (left-padded width), in GiB."""
    width = tokenizer(PROMPTS, padding=True, return_tensors="pt").input_ids.shape[1]
    return kv_cache_bytes(model.config, group_size, budget, 4, 1, width) / 2**30  # float32 weights


def _fast(model, tokenizer, seed, cache_gib, greedy=False, **sampling):
    cfg = SamplingConfig(group_size=3, max_new_tokens=12, engine="fast", fast_cache_gib=cache_gib, **sampling)
    torch.manual_seed(seed)
    rollout = generate_rollout(model, tokenizer, PROMPTS, cfg, greedy=greedy)
    return rollout, torch.rand(4)  # the next draws show where the generator was left


@pytest.mark.parametrize(
    "name,sampling", [("qwen2", {"temperature": 5.0}), ("qwen2_gqa", {"ignore_eos": True})], ids=str
)
def test_chunked_fast_cache_gives_the_same_tokens_and_leaves_the_same_random_state(tokenizer, name, sampling):
    # 1 and 3 prompts per chunk (4 prompts: chunks of unequal size too) against one chunk of all 4; a hot
    # temperature ends rows at different steps, so chunks stop at different steps
    model = MODELS[name](tokenizer)
    group = _group_cache_gib(model, tokenizer)
    for seed in (1,):
        whole, after = _fast(model, tokenizer, seed, 100.0, **sampling)
        for per_chunk in (1, 3):
            chunked, chunked_after = _fast(model, tokenizer, seed, group * (per_chunk + 0.5), **sampling)
            _assert_same(whole, chunked)
            assert torch.equal(after, chunked_after)


def test_one_chunk_is_generate_and_chunks_equal_it(tokenizer):
    # one chunk is today's draw (generate's tokens); chunked draws equal it, so chunks equal generate
    model = _qwen2(tokenizer)
    hf, fast = _rollouts(model, tokenizer, greedy=False, seed=3, temperature=2.0)
    _assert_same(hf, fast)
    _assert_same(hf, _fast(model, tokenizer, 3, _group_cache_gib(model, tokenizer) * 1.5, temperature=2.0)[0])


def test_the_allocated_cache_stays_within_the_bound(tokenizer, monkeypatch):
    # the completions' keys and values actually allocated per chunk, measured on the tensors _prefill makes
    model = _qwen2(tokenizer)
    allocated = record_fast_cache(monkeypatch)
    bound = _group_cache_gib(model, tokenizer) * 2.5  # two groups fit, three do not
    _fast(model, tokenizer, 1, bound, ignore_eos=True)
    assert len(allocated) == 2 and max(allocated) <= bound * 2**30
    allocated.clear()
    _fast(model, tokenizer, 1, 100.0, ignore_eos=True)
    assert len(allocated) == 1 and allocated[0] > bound * 2**30  # unbounded, the same rollout needs more


def test_a_group_larger_than_the_bound_is_refused_naming_the_keys(tokenizer):
    model = _qwen2(tokenizer)
    ids = tokenizer(PROMPTS, padding=True, return_tensors="pt").input_ids
    assert prompts_per_chunk(model, ids, 3, 12, None) == 4
    with pytest.raises(ValueError) as err:
        _fast(model, tokenizer, 1, _group_cache_gib(model, tokenizer) / 2)
    for key in ("model.sampling.fast_cache_gib", "model.sampling.max_new_tokens", "model.sampling.engine"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="model.sampling.fast_cache_gib must be > 0"):
        SamplingConfig(fast_cache_gib=0)


def test_eos_stops_sequences_and_ignore_eos_fills_the_budget(tokenizer):
    model = _qwen2(tokenizer)
    stopped = 0
    for seed in range(1, 11):  # a hot temperature makes EOS (1 of ~120 tokens) show up within a few seeds
        hf, fast = _rollouts(model, tokenizer, greedy=False, seed=seed, temperature=5.0)
        _assert_same(hf, fast)
        stopped += int((~fast.truncated).sum())
    assert stopped > 0
    fixed = _rollouts(model, tokenizer, greedy=False, temperature=5.0, ignore_eos=True)[1]
    assert fixed.completion_mask.shape[1] == 12 and bool(fixed.completion_mask.all())
    assert bool(fixed.truncated.all())
    assert not (fixed.input_ids[:, fixed.prompt_len :] == tokenizer.eos_token_id).any()


def test_unsupported_models_fall_back_to_generate(tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=1,
            n_head=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    assert not fast_generation_supported(model)
    hf, fast = _rollouts(model, tokenizer, greedy=False)
    _assert_same(hf, fast)


def test_training_mode_is_restored(tokenizer):
    model = _qwen2(tokenizer).train()
    generate_rollout(model, tokenizer, PROMPTS, SamplingConfig(group_size=2, max_new_tokens=3))
    assert model.training


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_single_turn_rollouts_train_every_completion_token(tokenizer, engine):
    torch.manual_seed(1)
    r = generate_rollout(
        _qwen2(tokenizer),
        tokenizer,
        PROMPTS,
        SamplingConfig(group_size=3, max_new_tokens=12, engine=engine, temperature=5.0),
    )
    assert r.trainable_mask.dtype == r.completion_mask.dtype
    assert torch.equal(r.trainable_mask, r.completion_mask)
    assert r.sampler_logp is None or r.sampler_logp.shape == r.completion_mask.shape


def test_a_hand_built_rollout_trains_its_completion_mask():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    r = Rollout(
        input_ids=torch.zeros(2, 3, dtype=torch.long),
        attention_mask=torch.ones(2, 3, dtype=torch.long),
        completion_mask=mask,
        truncated=torch.zeros(2, dtype=torch.bool),
        prompt_len=1,
        completions=["", ""],
    )
    assert r.trainable_mask is mask and r.sampler_logp is None
    tool = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # a context-only token is not trained
    assert r._replace(trainable_mask=tool).trainable_mask is tool


def test_every_engine_name_has_an_engine_and_selects_it(tokenizer, monkeypatch):
    assert set(get_args(EngineName)) == set(ENGINES)
    assert ENGINES["fast"] is FastEngine and ENGINES["hf"] is HFEngine
    with pytest.raises(ValueError, match="model.sampling.engine"):
        SamplingConfig(engine="nope")
    calls = []

    class RecordingEngine(HFEngine):  # any class with generate(...) -> Rollout plugs in
        def generate(self, model, tokenizer, prompts, sampling, group_size, greedy):
            calls.append((group_size, greedy))
            return super().generate(model, tokenizer, prompts, sampling, group_size, greedy)

    monkeypatch.setitem(ENGINES, "hf", RecordingEngine)
    r = generate_rollout(
        _qwen2(tokenizer), tokenizer, PROMPTS[:2], SamplingConfig(group_size=2, max_new_tokens=3, engine="hf")
    )
    assert calls == [(2, False)] and r.input_ids.shape[0] == 4


def test_the_module_builds_one_engine_for_every_rollout_and_held_out_evaluation(monkeypatch):
    """The run's engine is built once (``configure_model``) and every rollout and held-out rollout uses it."""
    from trgrpo.evaluation import EvalConfig
    from trgrpo.module import GRPOModule

    built = []

    class RecordingEngine(HFEngine):
        def __init__(self):
            built.append(self)
            self.calls = []

        def generate(self, model, tokenizer, prompts, sampling, group_size, greedy):
            self.calls.append((len(prompts), group_size, greedy))
            return super().generate(model, tokenizer, prompts, sampling, group_size, greedy)

    class Task:
        def verify_batch(self, completions, rows):
            return [0.0] * len(completions)

    monkeypatch.setitem(ENGINES, "hf", RecordingEngine)
    tiny = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    module = GRPOModule(
        policy=PolicyConfig(tiny=tiny),
        sampling=SamplingConfig(group_size=2, max_new_tokens=3, engine="hf"),
        eval=EvalConfig(k=2, n=3),
    )
    module.connect(Task())
    module.configure_model()
    assert built == [module.engine] and module.evaluator.engine is module.engine
    module.rollout(PROMPTS[:2])
    module.rollout(PROMPTS[2:])
    module.evaluator.add_batch(module.policy_model, module.tokenizer, {"prompt": PROMPTS[:2]}, False)
    module.configure_model()  # Lightning calls it again for a second fit or validate: the same engine
    assert built == [module.engine]
    assert module.engine.calls == [(2, 2, False), (2, 2, False), (2, 1, True), (2, 3, False)]
