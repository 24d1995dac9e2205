"""Side-by-side benchmark of trgrpo's ``GRPOModule`` against TRL's ``GRPOTrainer`` (float32, CPU).

Both trainers load the same randomly initialised Qwen2-shaped model from a temporary folder, the same
character tokenizer, the same prompts (no shuffling, so step k sees the same prompts in both) and a
seeded per-completion coin-flip reward, with equal settings: G, prompts per step, max completion length,
temperature 1 / top-p 1 / top-k off, learning rate, beta = 0 (no reference model), one optimisation epoch
and one optimiser step per rollout batch, token-mean ("dapo") loss, clip 0.2, grad clip 1.0, no gradient
checkpointing, entropy computed (TRL always does), no completion logging.

Scenarios (each at two model sizes):
    fixed      EOS never sampled (ours: ``ignore_eos``; TRL: ``min_new_tokens = max_completion_length``):
               identical work, the headline ratio.  Ours runs with zero-advantage skipping off.
    sampled    natural EOS stops; throughput = completion tokens generated and trained per second.
    half_dead  fixed length, half of the groups get a constant reward (no spread, as is common in RLVR):
               ours may skip those sequences' forward/backward (``optim.skip_zero_advantage``), reported
               separately together with ours without skipping.

Every (scenario, trainer) run is a fresh process (so its peak RSS is its own), the trainers alternate,
the first steps of each process are warm-up and are not timed, and medians over all timed steps are
reported.  The float32 matmul rate of the machine is measured in the same invocation.

    pip install -e '.[bench]'                # TRL
    python scripts/bench_vs_trl.py           # full run, both sizes (about 25 minutes on 2 CPU cores)
    python scripts/bench_vs_trl.py --sizes demo --steps 3 --rounds 1   # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # the demo model of configs/demo.yaml
    "demo": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 prompts=16, group_size=8, max_new_tokens=48),
    # about 30M parameters (the character vocabulary of ~120 tokens, so nearly all of it is in the layers)
    "30m": dict(hidden_size=512, num_hidden_layers=7, num_attention_heads=8, intermediate_size=2048,
                prompts=8, group_size=8, max_new_tokens=48),
}
LR = 1e-5
PREFIXES = ["", "Add: ", "Compute ", "What is the sum? ", "Give only the number. ", "Question: how much is ",
            "Work it out and answer with digits only: "]


@dataclass
class RunSpec:
    """One child process: one trainer on one scenario."""

    trainer: str  # "ours", "ours_noskip", "ours_tr" or "trl"
    size: str
    scenario: str
    folder: str
    warmup: int
    steps: int
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- shared pieces

def prompt_rows(n: int, half_dead: bool) -> list[dict]:
    rng = random.Random(1234)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        rows.append({"prompt": f"{rng.choice(PREFIXES)}{a}+{b}=", "dead": bool(half_dead and i % 2 == 0)})
    return rows


_REWARD_RNG = random.Random(0)
_ZERO_SPREAD: list[float] = []
_GROUP = [8]


def coin_flip_reward(prompts, completions, dead=None, **kwargs) -> list[float]:
    """A seeded coin per completion (1 or 0); groups marked ``dead`` all score 0 (no spread)."""
    dead = dead if dead is not None else [False] * len(completions)
    scores = [0.0 if d else float(_REWARD_RNG.random() < 0.5) for d in dead]
    g = _GROUP[0]
    groups = [scores[i:i + g] for i in range(0, len(scores), g)]
    _ZERO_SPREAD.append(sum(max(s) == min(s) for s in groups) / len(groups))
    return scores


def collate_rows(rows: list[dict]) -> dict[str, list]:
    """Rows -> column lists (what ``trgrpo.data.collate_rows`` does)."""
    return {key: [r[key] for r in rows] for key in rows[0]}


def build_model_folder(size: str, folder: Path) -> int:
    """Save a randomly initialised Qwen2 model and the character tokenizer; returns the parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trgrpo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.padding_side = "left"
    dims = SIZES[size]
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"], num_key_value_heads=dims["num_attention_heads"],
        intermediate_size=dims["intermediate_size"], max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseClock:
    """Accumulates wall time of wrapped callables per phase name."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, fn, phase: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0
        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


# ---------------------------------------------------------------------------------------- our trainer

def run_ours(spec: RunSpec) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from trgrpo.config import LossConfig, OptimConfig
    from trgrpo.module import GRPOModule
    from trgrpo.policy import PolicyConfig
    from trgrpo.rewards import RewardSpec
    from trgrpo.rollout import SamplingConfig
    from trgrpo.weighting import TokenRegulatedWeighting, UniformWeighting

    dims = SIZES[spec.size]
    fixed = spec.scenario != "sampled"
    steps = spec.warmup + spec.steps
    rows = prompt_rows(dims["prompts"] * steps, spec.scenario == "half_dead")
    optim_kwargs = {"lr": LR, "grad_clip": 1.0}
    if spec.trainer == "ours_noskip" or spec.scenario != "half_dead":
        optim_kwargs["skip_zero_advantage"] = False
    module = GRPOModule(
        policy=PolicyConfig(name_or_path=spec.folder),
        sampling=SamplingConfig(group_size=dims["group_size"], max_new_tokens=dims["max_new_tokens"],
                                temperature=1.0, top_p=1.0, top_k=0, ignore_eos=fixed,
                                engine=spec.extra.get("engine", "fast")),
        loss=LossConfig(clip_low=0.2, clip_high=0.2, beta=0.0),
        optim=OptimConfig(**optim_kwargs),
        weighting=TokenRegulatedWeighting() if spec.trainer == "ours_tr" else UniformWeighting(),
        rewards=[RewardSpec(fn=coin_flip_reward)],
        log_entropy=True,
    )
    clock = PhaseClock()
    module.score_tokens = clock.wrap(module.score_tokens, "logprob_forward")
    module.manual_backward = clock.wrap(module.manual_backward, "backward_optimizer")
    module._clip_and_step = clock.wrap(module._clip_and_step, "backward_optimizer")
    captured: dict = {}
    update = module.update

    def capture_update(rollout, adv, mask):
        captured["args"] = (rollout, adv, mask)
        return update(rollout, adv, mask)

    module.update = capture_update
    records: list[dict] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.take()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            phases = clock.take()
            t = pl_module.timings
            rollout = captured["args"][0]
            records.append({
                "total": total,
                "cpu": cpu,
                "generation": t["generation"],
                "reward": t["reward"],
                "logprob_forward": phases.get("logprob_forward", 0.0),
                "backward_optimizer": phases.get("backward_optimizer", 0.0),
                "completion_tokens": rollout.completion_mask.sum().item(),
                "sequences": rollout.input_ids.shape[0],
                "prompt_len": rollout.prompt_len,
                "max_len": rollout.completion_mask.shape[1],
            })
            if batch_idx == steps - 1 and spec.extra.get("weighting_check"):
                records[-1]["weighting_check"] = weighting_check(pl_module, captured["args"], update)

    torch.manual_seed(spec.seed)
    module.configure_model()
    base = rss_mb()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[StepTimer()])
    loader = DataLoader(rows, batch_size=dims["prompts"], shuffle=False, collate_fn=collate_rows, drop_last=True)
    trainer.fit(module, train_dataloaders=loader)
    return {"records": records, "rss_after_load_mb": base}


def weighting_check(module, args, update, reps: int = 9) -> dict:
    """Median time of the update phase with uniform vs TR-GRPO weighting on one fixed rollout, alternated."""
    from trgrpo.weighting import TokenRegulatedWeighting, UniformWeighting

    strategies = {"uniform": UniformWeighting(), "tr_grpo": TokenRegulatedWeighting()}
    times: dict[str, list[float]] = {k: [] for k in strategies}
    saved = module.weighting
    for i in range(reps * 2):
        name = list(strategies)[i % 2]
        module.weighting = strategies[name]
        t0 = time.perf_counter()
        update(*args)
        times[name].append(time.perf_counter() - t0)
    module.weighting = saved
    return {k: statistics.median(v[1:]) for k, v in times.items()}


# ---------------------------------------------------------------------------------------- TRL

def run_trl(spec: RunSpec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dims = SIZES[spec.size]
    fixed = spec.scenario != "sampled"
    steps = spec.warmup + spec.steps
    g, n_prompts, budget = dims["group_size"], dims["prompts"], dims["max_new_tokens"]
    rows = prompt_rows(n_prompts * steps, spec.scenario == "half_dead")
    tok = AutoTokenizer.from_pretrained(spec.folder)
    tok.padding_side = "left"
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=n_prompts * g, gradient_accumulation_steps=1,
        num_generations=g, max_completion_length=budget, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=10_000, log_completions=False, shuffle_dataset=False,
        max_steps=steps, seed=spec.seed, dataloader_num_workers=0, disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
        generation_kwargs={"min_new_tokens": budget} if fixed else None,
    )
    clock = PhaseClock()
    records: list[dict] = []
    state: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            clock.take()
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, st, control, **kwargs):
            total, cpu = time.perf_counter() - state["t0"], time.process_time() - state["c0"]
            phases = clock.take()
            after_step = time.perf_counter() - state.get("train_step_end", state["t0"])
            c = state["completion_mask"]
            records.append({
                "total": total,
                "cpu": cpu,
                "generation": phases.get("generation", 0.0),
                "reward": phases.get("reward", 0.0),
                "logprob_forward": phases.get("logprob_forward", 0.0),
                "backward_optimizer": phases.get("backward", 0.0) + after_step,
                "completion_tokens": float(c.sum()),
                "sequences": c.shape[0],
                "prompt_len": state["prompt_len"],
                "max_len": c.shape[1],
            })

    torch.manual_seed(spec.seed)
    trainer = GRPOTrainer(model=spec.folder, reward_funcs=coin_flip_reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[StepTimer()])
    trainer._generate_single_turn = clock.wrap(trainer._generate_single_turn, "generation")
    trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "reward")
    trainer._get_per_token_logps_and_entropies = clock.wrap(trainer._get_per_token_logps_and_entropies,
                                                             "logprob_forward")
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward")
    score = trainer._generate_and_score_completions

    def capture(*a, **k):
        out = score(*a, **k)
        state["completion_mask"] = out["completion_mask"]
        state["prompt_len"] = out["prompt_ids"].shape[1]
        return out

    trainer._generate_and_score_completions = capture
    training_step = trainer.training_step

    def timed_training_step(*a, **k):
        out = training_step(*a, **k)
        state["train_step_end"] = time.perf_counter()
        return out

    trainer.training_step = timed_training_step
    base = rss_mb()
    trainer.train()
    return {"records": records, "rss_after_load_mb": base}


def child_main(spec: RunSpec) -> None:
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    _GROUP[0] = SIZES[spec.size]["group_size"]
    _REWARD_RNG.seed(spec.seed)
    with contextlib.redirect_stdout(sys.stderr):
        result = run_trl(spec) if spec.trainer == "trl" else run_ours(spec)
    result["records"] = result["records"][spec.warmup:]
    result["peak_rss_mb"] = peak_rss_mb()
    result["zero_spread"] = statistics.mean(_ZERO_SPREAD[spec.warmup:]) if _ZERO_SPREAD else float("nan")
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------- the parent

def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    """Float32 matmul rate of this machine with torch's default threads (median of short bursts)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        rates.append(4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def model_flops(size: str, params: int, sequences: int, prompts: int, prompt_len: float, completion_len: float,
                shared_prompts: bool) -> dict:
    """FLOPs each trainer executes: 2 * matmul parameters per token and 4 * hidden * context per token and layer
    for attention in a forward; a backward costs twice the forward.

    With ``shared_prompts`` (ours) each prompt is computed once per group, in the prefill and in the training
    forward/backward; otherwise (TRL) once per sequence.  The LM head runs on completion positions only.
    """
    d = SIZES[size]
    h, layers = d["hidden_size"], d["num_hidden_layers"]
    vocab_params = params - layers * (4 * h * h + 3 * h * d["intermediate_size"]) - (2 * layers + 1) * h
    body = params - vocab_params  # the tied embedding is a lookup in the body and a matmul in the head
    p, t = prompt_len, completion_len
    prompt_rows = prompts if shared_prompts else sequences
    attn = 4 * h * layers
    prompt = 2 * body * prompt_rows * p + attn * prompt_rows * p * p / 2
    completion = (2 * body + 2 * vocab_params) * sequences * t + attn * sequences * (t * p + t * t / 2)
    return {"generation": prompt + completion, "training": 3 * (prompt + completion)}


def run_child(spec: RunSpec, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec.trainer} {spec.size} {spec.scenario} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


PHASES = ["generation", "reward", "logprob_forward", "backward_optimizer", "other"]


def summarise(runs: list[dict]) -> dict:
    recs = [r for run in runs for r in run["records"]]
    med = {k: statistics.median(r[k] for r in recs) for k in
           ["total", "cpu", "generation", "reward", "logprob_forward", "backward_optimizer"]}
    med["other"] = max(med["total"] - sum(med[k] for k in PHASES[:-1]), 0.0)
    tokens = statistics.median(r["completion_tokens"] for r in recs)
    seqs = recs[0]["sequences"]
    return {
        **med,
        "steps": len(recs),
        "steps_per_s": 1.0 / med["total"],
        "tokens_per_s": statistics.median(r["completion_tokens"] / r["total"] for r in recs),
        "mean_completion_len": tokens / seqs,
        "prompt_len": statistics.median(r["prompt_len"] for r in recs),
        "sequences": seqs,
        "zero_spread": statistics.mean(run["zero_spread"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "rss_after_load_mb": max(run["rss_after_load_mb"] for run in runs),
        "weighting_check": next((r["weighting_check"] for r in recs if "weighting_check" in r), None),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="demo,30m", help="comma-separated: demo, 30m")
    ap.add_argument("--scenarios", default="fixed,sampled,half_dead")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per trainer and scenario (alternated)")
    ap.add_argument("--json", default=None, help="write all results to this file")
    ap.add_argument("--plot", default=None, help="write the phase plot (PNG) to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = default)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    args = ap.parse_args(argv)
    if args.child:
        child_main(RunSpec(**json.loads(args.child)))
        return

    import platform

    import torch
    import transformers
    import trl

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {"sizes": {}}
    for size in args.sizes.split(","):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{size}-"))
        params = build_model_folder(size, folder)
        d = SIZES[size]
        print(f"\n[{size}] {params / 1e6:.2f}M parameters, {d['prompts']} prompts x G={d['group_size']}, "
              f"max completion {d['max_new_tokens']} tokens", flush=True)
        rates = [matmul_gflops()]
        size_out: dict = {"params": params, "scenarios": {}}
        for scenario in args.scenarios.split(","):
            trainers = ["ours", "trl"] + (["ours_noskip"] if scenario == "half_dead" else [])
            runs: dict[str, list] = {t: [] for t in trainers}
            for r in range(args.rounds):
                order = trainers if r % 2 == 0 else trainers[::-1]
                for name in order:
                    extra = {"weighting_check": scenario == "fixed" and name == "ours" and r == 0}
                    spec = RunSpec(name, size, scenario, str(folder), args.warmup, args.steps, seed=r,
                                   threads=args.threads, extra=extra)
                    t0 = time.perf_counter()
                    runs[name].append(run_child(spec, args.timeout))
                    print(f"  {scenario:9s} {name:11s} round {r}: {time.perf_counter() - t0:6.1f}s", flush=True)
                rates.append(matmul_gflops(1.0))
            size_out["scenarios"][scenario] = {t: summarise(v) for t, v in runs.items()}
        size_out["matmul_gflops"] = statistics.median(rates)
        results["sizes"][size] = size_out
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


def report(results: dict) -> None:
    print("\n| size | scenario | trainer | steps/s | completion tok/s | mean len | zero-spread groups | "
          "peak RSS MB | step s | CPU s | gen s | reward s | logp fwd s | bwd+opt s | other s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, so in results["sizes"].items():
        for scenario, trainers in so["scenarios"].items():
            for name, s in trainers.items():
                print(f"| {size} | {scenario} | {name} | {s['steps_per_s']:.3f} | {s['tokens_per_s']:.0f} | "
                      f"{s['mean_completion_len']:.1f} | {s['zero_spread']:.2f} | {s['peak_rss_mb']:.0f} | "
                      f"{s['total']:.3f} | {s['cpu']:.3f} | " + " | ".join(f"{s[k]:.3f}" for k in PHASES) + " |")
    print("\nFLOP/s of our step (fixed scenario) against the measured float32 matmul rate:")
    for size, so in results["sizes"].items():
        sc = so["scenarios"].get("fixed")
        if not sc:
            continue
        for name in ("ours", "trl"):
            s = sc[name]
            n, p, t = s["sequences"], s["prompt_len"], s["mean_completion_len"]
            groups = n // SIZES[size]["group_size"]
            fl = model_flops(size, so["params"], n, groups, p, t, shared_prompts=name == "ours")
            gen = fl["generation"] / s["generation"] / 1e9
            train = fl["training"] / (s["logprob_forward"] + s["backward_optimizer"]) / 1e9
            rate = so["matmul_gflops"]
            print(f"  {size:5s} {name:5s} generation {gen:6.1f} GFLOP/s ({gen / rate:4.0%}), training (fwd+bwd+opt) "
                  f"{train:6.1f} GFLOP/s ({train / rate:4.0%}) of {rate:.1f} GFLOP/s matmul")
    print("\nTR-GRPO weighting vs uniform (update phase, same rollout, alternated):")
    for size, so in results["sizes"].items():
        wc = so["scenarios"].get("fixed", {}).get("ours", {}).get("weighting_check")
        if wc:
            print(f"  {size:5s} uniform {wc['uniform']:.4f}s  tr_grpo {wc['tr_grpo']:.4f}s  "
                  f"ratio {wc['tr_grpo'] / wc['uniform']:.3f}")
    print("\nRatios (ours / TRL; throughput higher is better, memory lower is better):")
    for size, so in results["sizes"].items():
        for scenario, trainers in so["scenarios"].items():
            ours, ref = trainers["ours"], trainers["trl"]
            line = (f"  {size:5s} {scenario:9s} throughput x{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}  "
                    f"steps/s x{ours['steps_per_s'] / ref['steps_per_s']:.2f}  "
                    f"peak RSS x{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}")
            if "ours_noskip" in trainers:
                ns = trainers["ours_noskip"]
                line += (f"  (without skipping: throughput x{ns['tokens_per_s'] / ref['tokens_per_s']:.2f}; "
                         f"skipping alone x{ours['tokens_per_s'] / ns['tokens_per_s']:.2f})")
            print(line + ("   <- headline" if scenario == "fixed" else ""))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in results["sizes"] if "fixed" in results["sizes"][s]["scenarios"]]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for ax, size in zip(axes[0], sizes, strict=True):
        sc = results["sizes"][size]["scenarios"]["fixed"]
        names = ["ours", "trl"]
        bottom = [0.0] * len(names)
        for phase, color in zip(PHASES, colors, strict=True):
            vals = [sc[n][phase] for n in names]
            ax.bar(["trgrpo", "TRL"], vals, bottom=bottom, color=color, label=phase.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_title(f"{size} model, fixed length: step time by phase")
        ax.set_ylabel("seconds per step (median)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
