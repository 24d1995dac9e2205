"""scripts/bench_vs_trl.py: its flags are checked before any model is built, both trainers get the same
settings from one size, the phase clock counts each second once, and the FLOP accounting matches a direct
count (the benchmark itself is a script, not a test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "scripts" / "bench_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_vs_trl", None)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "demo,huge"], "--sizes: unknown ['huge']"),
        (["--scenarios", "fixed,slow"], "--scenarios: unknown ['slow']"),
        (["--trainers", "ours,verl"], "--trainers: unknown ['verl']"),
        (["--betas", "0,x"], "--betas: 'x' is not a number"),
        (["--betas", "-0.1"], "--betas: '-0.1' must be 0 or more"),
        (["--sizes", ","], "--sizes: empty"),
        (["--neighbours", "spin"], "--neighbours: 'spin' is not KIND:N"),
        (["--neighbours", "cats:2"], "--neighbours: 'cats:2' is not KIND:N"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_crosses_scenarios_with_betas(bench):
    args = Namespace(
        sizes="smollm2,smollm2_lora",
        scenarios="fixed,sampled",
        trainers="ours,trl",
        betas="0,0.04",
        neighbours="spin:2",
    )
    plan = bench.bench_plan(args, pytest.fail)
    assert plan["sizes"] == ["smollm2", "smollm2_lora"]
    assert plan["scenarios"] == [("fixed", 0.0), ("sampled", 0.0), ("fixed", 0.04), ("sampled", 0.04)]
    assert plan["neighbours"] == ("spin", 2)
    keys = [bench.scenario_key(s, b) for s, b in plan["scenarios"]]
    assert keys == ["fixed", "sampled", "fixed_beta0.04", "sampled_beta0.04"]


@pytest.mark.parametrize("size, scenario, beta", [("demo", "fixed", 0.0), ("smollm2_lora", "sampled", 0.04)])
def test_both_trainers_get_the_same_settings(bench, tmp_path, size, scenario, beta):
    pytest.importorskip("trl")
    folder = tmp_path / "model"
    bench.build_model_folder("demo", folder)  # the settings do not depend on the weights
    spec = bench.RunSpec("ours", size, scenario, str(folder), warmup=1, steps=2, beta=beta)
    ours = bench.ours_module(spec)
    args, peft = bench.trl_config(spec)
    dims = bench.SIZES[size]
    s, loss, optim = ours.sampling, ours.loss_cfg, ours.optim_cfg
    assert s.group_size == args.num_generations == dims["group_size"]
    assert args.per_device_train_batch_size == dims["prompts"] * dims["group_size"]
    assert s.max_new_tokens == args.max_completion_length == dims["max_new_tokens"]
    assert (s.temperature, s.top_p, s.top_k) == (args.temperature, args.top_p, args.top_k) == (1.0, 1.0, 0)
    assert optim.lr == args.learning_rate and optim.weight_decay == args.weight_decay
    assert tuple(optim.betas) == (args.adam_beta1, args.adam_beta2)
    assert optim.grad_clip == args.max_grad_norm
    assert loss.beta == args.beta == beta
    assert loss.clip_low == loss.clip_high == args.epsilon
    assert optim.epochs == args.num_iterations == 1
    fixed = scenario == "fixed"
    assert s.ignore_eos == fixed
    assert (args.generation_kwargs or {}).get("min_new_tokens") == (dims["max_new_tokens"] if fixed else None)
    assert not optim.skip_zero_advantage  # only the half_dead scenario's "ours" skips
    lora = ours.policy_cfg.lora
    if "lora" in dims:
        assert (lora.r, lora.alpha, lora.dropout) == (peft.r, peft.lora_alpha, peft.lora_dropout)
        assert lora.target_modules == peft.target_modules == "all-linear"
    else:
        assert lora is None and peft is None


def test_prompts_are_the_same_rows_for_both_and_chat_rendered(bench):
    class Template:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}<assistant>"

    plain = bench.prompt_rows(6, half_dead=True)
    assert plain == bench.prompt_rows(6, half_dead=True)
    assert [r["dead"] for r in plain] == [True, False] * 3
    chat = bench.prompt_rows(3, half_dead=False, tokenizer=Template())
    for row in chat:
        assert row["prompt"].startswith("<user>What is ") and row["prompt"].endswith("<assistant>")


def test_phase_clock_counts_a_nested_call_for_the_outer_phase_only(bench):
    clock = bench.PhaseClock()
    timed: list[str] = []  # a phase is named (and added) once per timed call

    def phase(name):
        return lambda: timed.append(name) or name

    inner = clock.wrap(lambda: sum(range(20000)), phase("inner"))
    outer = clock.wrap(lambda: inner() + inner(), phase("outer"))
    named = {"value": "first"}
    dynamic = clock.wrap(lambda: inner(), lambda: timed.append(named["value"]) or named["value"])
    outer()
    inner()
    dynamic()
    named["value"] = "second"
    dynamic()
    assert timed == ["outer", "inner", "first", "second"]  # the inner calls made inside others: not timed
    taken = clock.take()
    assert set(taken["wall"]) == set(taken["cpu"]) == {"outer", "inner", "first", "second"}
    assert clock.active == 0 and clock.take() == {"wall": {}, "cpu": {}}


def test_forward_flops_equal_a_direct_count(bench):
    # one layer with one 2 x 3 matmul, attention width 4, a head of 2 x 5
    dims = {"hidden": 2, "layers": 1, "attn_width": 4, "vocab": 5, "linear": [(2, 3)], "lora_params": 0}
    # 1 sequence, prompt of 2 tokens, 1 completion token:
    # body 2*6 per token (3 tokens); attention 4*4 per context position: prompt 2*2/2, completion 1*2 + 1/2;
    # head 2*2*5 on the completion token
    direct = 12 * 3 + 16 * (2 * 2 / 2) + 16 * (1 * 2 + 1 / 2) + 20
    assert bench.forward_flops(dims, 1, 2, 1, prompt_rows=1) == pytest.approx(direct)
    # a shared prompt is computed once per group; TRL computes it per sequence
    shared = bench.phase_flops(dims, sequences=4, group=4, prompt_len=2, completion_len=1, shared=True)
    each = bench.phase_flops(dims, sequences=4, group=4, prompt_len=2, completion_len=1, shared=False)
    assert shared["generation"] < each["generation"]
    assert shared["backward_optimizer"] == pytest.approx(2 * shared["logprob_forward"])
    with_lora = bench.phase_flops({**dims, "lora_params": 1}, 4, 4, 2, 1, shared=True)
    assert with_lora["backward_optimizer"] < 2 * with_lora["logprob_forward"]


def test_model_dims_count_the_saved_parameters(bench, tmp_path):
    folder = tmp_path / "model"
    params = bench.build_model_folder("demo", folder)
    assert bench.saved_parameters(folder) == params
    dims = bench.model_dims(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    linear = sum(i * o for i, o in dims["linear"]) * dims["layers"]
    norms = (2 * dims["layers"] + 1) * dims["hidden"]
    kv_width = dims["linear"][1][1]
    biases = dims["layers"] * (dims["attn_width"] + 2 * kv_width)  # Qwen2's q, k and v biases
    tied = cfg.get("tie_word_embeddings", False)
    assert linear + dims["vocab"] * dims["hidden"] * (1 if tied else 2) + norms + biases == params
    lora = bench.model_dims(str(folder), {"r": 4})
    assert lora["lora_params"] == 4 * sum(i + o for i, o in dims["linear"]) * dims["layers"]
