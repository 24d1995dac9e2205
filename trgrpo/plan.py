"""Know before you launch: the batch a run trains on and what it costs per GPU, from the parsed config alone.

``make_plan`` reads the trainer's, the module's and the data module's settings (the dataclasses, or the
namespaces the CLI parsed: only attributes are read) and the model's shape from its ``config.json`` (a local
folder, the Hugging Face cache of a hub id, a converted GGUF folder or the GGUF file's metadata, or the
embedded tiny model's settings), never its weights.  It gives:

- the world size (``trainer.devices x trainer.num_nodes``), prompts and completions per RL step per process
  and over all processes, and RL steps in total (``trainer.max_steps``) and per epoch when the number of
  training prompts is known;
- a per-GPU memory estimate by part: policy weights, gradients and AdamW state as the ZeRO stage and offload
  split them, the frozen reference model (``loss.beta > 0`` without LoRA), the full weights ZeRO-3 gathers
  for in-process sampling, the ``fast`` engine's KV cache (bounded per chunk), vLLM's share and the KV cache
  left in it, the largest logits of a micro-batch (``trgrpo.logprobs``: the logits and their gradient, plus
  float32 row chunks; only hidden states and chunks when ``model.optim.max_logits_mib`` sends the head to
  row chunks) and the checkpointed activations; a part that cannot be known says so.

``check_plan_fits`` refuses a plan whose held memory (everything but the logits and activations, which are
sized for a completion of ``max_new_tokens`` tokens) exceeds the GPU's memory, naming the keys that shrink
its largest parts, and warns when only that full-length peak does.

The CLI prints the plan in the first lines of every ``fit`` and stops after it with
``--print_plan`` (docs/scaling.md shows it for the 3B recipe on 1 and 8 GPUs).  No Lightning import.

    python -m trgrpo fit --config configs/kk_qwen2.5_3b.yaml --print_plan --plan_gpu_gib 80
"""

from __future__ import annotations

from typing import NamedTuple

from trgrpo.fastpath.sampler import kv_cache_bytes
from trgrpo.heads import PLAIN_HEAD_MODELS, logits_over_budget
from trgrpo.logprobs import CHUNK_ELEMENTS, budget_chunk_rows
from trgrpo.model_shape import ModelShape, lora_parameter_count, parameter_count, read_model_shape

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_STATE_BYTES = 8  # AdamW's two float32 moments per trainable parameter


class StrategyShape(NamedTuple):
    """What the strategy shards: ``kind`` single / ddp / deepspeed, the ZeRO stage (0 without DeepSpeed)."""

    kind: str
    stage: int
    offload_optimizer: bool
    offload_parameters: bool


class MemoryPart(NamedTuple):
    """One line of the estimate: bytes per GPU (None: unknown), how they were counted, the keys to change."""

    name: str
    bytes: int | None
    how: str
    keys: str
    at_full_length: bool = False  # sized for max_new_tokens: smaller while completions are shorter


class BatchPlan(NamedTuple):
    """The batch of one RL step; ``steps_per_epoch`` None when the training prompts are not known yet."""

    world: int
    prompts_per_process: int
    completions_per_process: int
    micro_batch: int  # sequences per forward/backward per process
    total_steps: int | None  # trainer.max_steps
    steps_per_epoch: int | None
    note: str = ""  # how the world size was resolved when the config leaves it to the machine

    @property
    def prompts_global(self) -> int:
        return self.prompts_per_process * self.world

    @property
    def completions_global(self) -> int:
        return self.completions_per_process * self.world


class RunPlan(NamedTuple):
    batch: BatchPlan
    shape: ModelShape | None
    shape_note: str  # why the shape is unknown, or the parameter count
    parts: list[MemoryPart]
    device_bytes: int | None  # the GPU's memory, None when none is visible or given

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes or 0 for p in self.parts)

    @property
    def held_bytes(self) -> int:
        """What the run holds whatever the completions' lengths (the parts not sized at full length)."""
        return sum(p.bytes or 0 for p in self.parts if not p.at_full_length)


# ---------------------------------------------------------------------------------------- the trainer


def _get(obj, key: str, default=None):
    """``obj.key`` for a dataclass, namespace or dict."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def read_strategy(strategy) -> StrategyShape:
    """What ``trainer.strategy`` (a name, a class_path/init_args namespace, or an instance) shards."""
    if isinstance(strategy, str):
        if strategy.startswith("deepspeed"):  # deepspeed_stage_3_offload and the like
            stage = int(strategy.split("_")[2]) if strategy.count("_") >= 2 else 2
            offload = strategy.endswith("offload")
            return StrategyShape("deepspeed", stage, offload, offload and stage == 3)
        return StrategyShape("ddp" if strategy.startswith("ddp") else "single", 0, False, False)
    config = getattr(strategy, "config", None)  # a built DeepSpeedStrategy
    if isinstance(config, dict) and "zero_optimization" in config:
        zero = config["zero_optimization"]
        return StrategyShape(
            "deepspeed", zero.get("stage", 0), "offload_optimizer" in zero, "offload_param" in zero
        )
    name = str(_get(strategy, "class_path", type(strategy).__name__))
    args = _get(strategy, "init_args", None) or strategy
    if "DeepSpeed" in name:
        return StrategyShape(
            "deepspeed",
            int(_get(args, "stage", 2)),
            bool(_get(args, "offload_optimizer", False)),
            bool(_get(args, "offload_parameters", False)),
        )
    return StrategyShape("ddp" if "DDP" in name else "single", 0, False, False)


def count_devices(devices, accelerator, visible_gpus: int) -> int | None:
    """Processes per node that ``trainer.devices`` asks for; None where it depends on the machine."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices >= 0:
        return devices
    if str(accelerator) == "cpu":  # Lightning runs one CPU process for "auto"
        return 1
    return visible_gpus or None  # "auto" / -1 take every visible GPU


def plan_batch(trainer, data, model, world: int, train_prompts: int | None) -> BatchPlan:
    """The RL step's batch per process and over ``world`` processes."""
    prompts = data.batch_size
    completions = prompts * model.sampling.group_size
    mini = model.optim.mini_batch_size or completions
    micro = model.optim.micro_batch_size or mini
    max_steps = _get(trainer, "max_steps", -1)
    per_epoch = train_prompts // (prompts * world) if train_prompts else None  # drop_last: whole batches
    total = max_steps if max_steps is not None and max_steps > 0 else None
    return BatchPlan(world, prompts, completions, micro, total, per_epoch)


# ----------------------------------------------------------------------------------------- the memory


class _Sizes(NamedTuple):
    """The numbers every memory part is computed from."""

    params: int  # P, the policy's parameters
    trainable: int  # LoRA adapters, or P
    world: int
    strategy: StrategyShape
    weight_bytes: int  # per stored weight on the GPU
    compute_bytes: int  # per activation / logit / cached key (bf16 under bf16 precision)


def _sizes(shape: ModelShape, model, precision: str, strategy: StrategyShape, world: int) -> _Sizes:
    params = parameter_count(shape)
    lora = model.policy.lora
    trainable = lora_parameter_count(shape, lora) if lora is not None else params
    half = str(precision).startswith(("bf16", "16"))
    stored = DTYPE_BYTES[model.policy.dtype]
    weight_bytes = 2 if strategy.kind == "deepspeed" and half else stored  # DeepSpeed's bf16 / fp16 mode
    return _Sizes(params, trainable, world, strategy, weight_bytes, 2 if half else stored)


def _training_parts(s: _Sizes, model) -> list[MemoryPart]:
    """Policy weights, gradients, AdamW state and the reference model, as the strategy places them."""
    st, n = s.strategy, s.world
    shard_w, shard_g, shard_o = (
        n if st.stage >= 3 else 1,
        n if st.stage >= 2 else 1,
        n if st.stage >= 1 else 1,
    )
    zero = f"ZeRO-{st.stage}" if st.kind == "deepspeed" else st.kind
    weights = 0 if st.offload_parameters else s.params * s.weight_bytes // shard_w
    # DeepSpeed accumulates gradients in float32; DDP keeps a second copy in its reducer buckets
    grad_bytes = 4 if st.kind == "deepspeed" else s.weight_bytes
    grads = s.trainable * grad_bytes * (2 if st.kind == "ddp" else 1) // shard_g
    master = 4 if st.kind == "deepspeed" and s.weight_bytes == 2 else 0  # float32 master copy of bf16 weights
    optim = 0 if st.offload_optimizer else s.trainable * (ADAM_STATE_BYTES + master) // shard_o
    strategy_keys = "trainer.strategy (a configs/strategy/ fragment), trainer.devices"
    parts = [
        MemoryPart(
            "policy weights",
            weights,
            f"{_count(s.params)} x {s.weight_bytes} B"
            + (f" / {shard_w} ({zero})" if shard_w > 1 else "")
            + (" (offloaded to CPU)" if st.offload_parameters else ""),
            f"model.policy.dtype, {strategy_keys}",
        ),
        MemoryPart(
            "gradients",
            grads,
            f"{_count(s.trainable)} trainable x {grad_bytes} B"
            + (" x 2 (DDP buckets)" if st.kind == "ddp" else "")
            + (f" / {shard_g} ({zero})" if shard_g > 1 else ""),
            f"model.policy.lora, {strategy_keys}",
        ),
        MemoryPart(
            "optimizer state (AdamW)",
            optim,
            "offloaded to CPU"
            if st.offload_optimizer
            else f"{_count(s.trainable)} x {ADAM_STATE_BYTES + master} B"
            + (f" / {shard_o} ({zero})" if shard_o > 1 else ""),
            f"model.policy.lora, {strategy_keys}",
        ),
    ]
    ref = model.loss.beta > 0 and model.policy.lora is None
    parts.append(
        MemoryPart(
            "reference model",
            s.params * s.weight_bytes // shard_w if ref else 0,
            "frozen copy of the weights" if ref else "none (loss.beta = 0, or LoRA disables the adapters)",
            "model.loss.beta, model.policy.lora",
        )
    )
    return parts


def _sampling_parts(s: _Sizes, shape: ModelShape, model, data, device_bytes: int | None) -> list[MemoryPart]:
    """What the rollout engine holds: gathered weights (ZeRO-3), the fast/hf KV cache, or vLLM's share."""
    sampling, engine = model.sampling, model.sampling.engine
    prompt, budget, g = data.max_prompt_tokens, sampling.max_new_tokens, sampling.group_size
    per_prompt = kv_cache_bytes(shape, g, budget, s.compute_bytes, 1, prompt)
    parts = []
    if engine != "vllm" and s.strategy.stage >= 3:
        parts.append(
            MemoryPart(
                "gathered weights while sampling",
                s.params * s.weight_bytes,
                "ZeRO-3 gathers the whole policy for in-process sampling",
                "model.sampling.engine: vllm",
            )
        )
    if engine == "fast":
        bound = int(sampling.fast_cache_gib * GIB)
        chunk = max(1, min(data.batch_size, bound // per_prompt)) if per_prompt <= bound else 0
        how = (
            f"{chunk} of {data.batch_size} prompts per chunk x {g} x ({prompt} + {budget}) tokens"
            if chunk
            else f"one group needs {per_prompt / GIB:.2f} GiB > fast_cache_gib: refused at the first rollout"
        )
        parts.append(
            MemoryPart(
                "fast engine KV cache",
                per_prompt * max(chunk, 1),
                how,
                "model.sampling.fast_cache_gib, model.sampling.max_new_tokens, model.sampling.engine",
            )
        )
    elif engine == "hf":
        parts.append(
            MemoryPart(
                "hf engine KV cache",
                kv_cache_bytes(shape, data.batch_size * g, prompt + budget, s.compute_bytes),
                f"{data.batch_size * g} sequences x ({prompt} + {budget}) tokens, unbounded",
                "data.batch_size, model.sampling.max_new_tokens, model.sampling.engine",
            )
        )
    else:
        parts += _vllm_parts(s, shape, model, data, device_bytes)
    return parts


def _vllm_parts(s: _Sizes, shape: ModelShape, model, data, device_bytes: int | None) -> list[MemoryPart]:
    cfg = model.sampling.vllm
    share = int(cfg.gpu_memory_utilization * device_bytes) if device_bytes else None
    vllm_dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if s.compute_bytes == 2 else "float32")
    weights = s.params * DTYPE_BYTES[vllm_dtype]
    kv = share - weights if share is not None else None
    per_token = kv_cache_bytes(shape, 1, 1, DTYPE_BYTES[vllm_dtype])
    sequence = data.max_prompt_tokens + model.sampling.max_new_tokens
    how = (
        f"{cfg.gpu_memory_utilization:g} x the GPU: {weights / GIB:.1f} GiB {vllm_dtype} weights + KV cache "
        + (
            f"{kv / GIB:.1f} GiB = {kv // per_token:,} tokens ({kv // per_token // sequence} sequences of "
            f"{sequence})"
            if kv is not None
            else "(no GPU visible: the share is unknown)"
        )
    )
    return [MemoryPart("vLLM share", share, how, "model.sampling.vllm.gpu_memory_utilization")]


def _logit_and_activation_parts(s: _Sizes, shape: ModelShape, model, data, micro: int) -> list[MemoryPart]:
    tokens = model.sampling.max_new_tokens
    budget = getattr(model.optim, "max_logits_mib", None)
    if (
        logits_over_budget(micro * tokens, shape.vocab_size, budget)
        and shape.model_type in PLAIN_HEAD_MODELS
        and s.strategy.stage < 3
    ):
        # the head runs a row chunk at a time (trgrpo.logprobs.head_chunk_scores): the hidden states and a
        # few float32 chunks (logits, probabilities, their gradient) are all that exist
        hidden = micro * tokens * shape.hidden_size * s.compute_bytes
        logits = 2 * hidden + 4 * budget_chunk_rows(shape.vocab_size, budget) * shape.vocab_size * 4
        how = (
            f"head in row chunks (over model.optim.max_logits_mib={budget:g}): 2 x {micro} x {tokens} x "
            f"{shape.hidden_size} x {s.compute_bytes} B hidden states + float32 chunks"
        )
    else:
        # trgrpo.logprobs keeps the [micro, T, V] logits for backward and makes their gradient of the same
        # size; the float32 work is bounded by row chunks (forward chunk, probabilities, their gradient)
        logits = 2 * micro * tokens * shape.vocab_size * s.compute_bytes + 4 * CHUNK_ELEMENTS * 4
        how = f"2 x {micro} x {tokens} x {shape.vocab_size:,} x {s.compute_bytes} B + float32 chunks"
    parts = [
        MemoryPart(
            "logits of a micro-batch",
            logits,
            how,
            "model.optim.micro_batch_size, model.sampling.max_new_tokens, model.optim.max_logits_mib",
            at_full_length=True,
        )
    ]
    seq = data.max_prompt_tokens + tokens
    if model.policy.gradient_checkpointing:
        act = shape.num_hidden_layers * micro * seq * shape.hidden_size * s.compute_bytes
        how = f"checkpointed layer inputs: {shape.num_hidden_layers} x {micro} x {seq} x {shape.hidden_size}"
    else:
        act, how = None, "not estimated without gradient checkpointing (many times the checkpointed size)"
    parts.append(
        MemoryPart(
            "activations",
            act,
            how,
            "model.policy.gradient_checkpointing, model.optim.micro_batch_size",
            at_full_length=True,
        )
    )
    return parts


def make_plan(
    trainer,
    model,
    data,
    *,
    visible_gpus: int = 0,
    device_bytes: int | None = None,
    train_prompts: int | None = None,
) -> RunPlan:
    """The plan of a run: ``trainer``, ``model``, ``data`` are the parsed groups (attributes only).

    ``visible_gpus`` resolves ``trainer.devices: auto``; ``device_bytes`` is one GPU's memory (None: no
    comparison); ``train_prompts`` the task's training prompts when known (RL steps per epoch)."""
    devices = count_devices(
        _get(trainer, "devices", "auto"), _get(trainer, "accelerator", "auto"), visible_gpus
    )
    world = (devices or 1) * int(_get(trainer, "num_nodes", 1) or 1)
    batch = plan_batch(trainer, data, model, world, train_prompts)
    if devices is None:
        batch = batch._replace(note="trainer.devices=auto and no GPU visible here: counted as 1 per node")
    shape, why = read_model_shape(model.policy)
    if shape is None:
        return RunPlan(batch, None, why, [], device_bytes)
    strategy = read_strategy(_get(trainer, "strategy", "auto"))
    s = _sizes(shape, model, str(_get(trainer, "precision", "32-true")), strategy, world)
    parts = _training_parts(s, model)
    parts += _sampling_parts(s, shape, model, data, device_bytes)
    parts += _logit_and_activation_parts(s, shape, model, data, batch.micro_batch)
    return RunPlan(batch, shape, f"{s.params:,} parameters ({shape.source})", parts, device_bytes)


# ------------------------------------------------------------------------------------ printing, refusing


def _gib(value: int | None) -> str:
    if value is None:
        return "     unknown"
    return f"{value / GIB:8.2f} GiB" if value >= GIB // 10 else f"{value / 2**20:8.2f} MiB"


def _count(n: int) -> str:
    """3.09B, 135M or 539,520 parameters."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e7 else f"{n:,}"


def _batch_lines(b: BatchPlan) -> list[str]:
    group = b.completions_per_process // b.prompts_per_process
    epoch = (
        f"{b.steps_per_epoch} RL steps per epoch"
        if b.steps_per_epoch is not None
        else f"RL steps per epoch: training prompts // {b.prompts_global} (the task loads after this plan)"
    )
    total = (
        f"{b.total_steps} RL steps in total (trainer.max_steps)" if b.total_steps else "no trainer.max_steps"
    )
    if b.total_steps and b.steps_per_epoch:
        total += f", {b.total_steps / b.steps_per_epoch:.1f} epochs"
    lines = [
        f"world size            {b.world} process{'es' * (b.world > 1)} (trainer.devices x trainer.num_nodes)"
        + (f"; {b.note}" if b.note else ""),
        f"per RL step           {b.prompts_per_process} prompts x {group} = {b.completions_per_process} "
        "completions per process (data.batch_size is per process)",
        f"global batch          {b.prompts_global} prompts, {b.completions_global} completions per RL step",
        f"micro-batch           {b.micro_batch} sequences per forward/backward per process",
        f"length                {total}; {epoch}",
    ]
    return lines


def format_plan(plan: RunPlan) -> str:
    """The plan as the lines ``fit`` prints first."""
    lines = ["Plan (from the config, before any model loads)", *_batch_lines(plan.batch)]
    if plan.shape is None:
        lines.append(f"memory per GPU        unknown: {plan.shape_note}")
        return "\n".join(lines)
    lines.append(f"model                 {plan.shape_note}")
    lines.append("memory per GPU (estimate)")
    for part in plan.parts:
        lines.append(f"  {part.name:<32}{_gib(part.bytes)}   {part.how}")
    lines.append(f"  {'total':<32}{_gib(plan.total_bytes)}   at full length")
    lines.append(
        f"  {'held whatever the length':<32}{_gib(plan.held_bytes)}   without logits and activations"
    )
    if plan.device_bytes:
        lines.append(f"  {'GPU memory':<32}{_gib(plan.device_bytes)}")
    else:
        lines.append("  no GPU memory to compare with (none visible; --plan_gpu_gib sets one)")
    return "\n".join(lines)


def _advice(plan: RunPlan, held_only: bool) -> str:
    parts = [p for p in plan.parts if p.bytes and not (held_only and p.at_full_length)]
    largest = sorted(parts, key=lambda p: p.bytes, reverse=True)[:3]
    return "; ".join(f"{p.name} {p.bytes / GIB:.1f} GiB: {p.keys}" for p in largest)


def check_plan_fits(plan: RunPlan) -> str | None:
    """ValueError naming the keys of the largest parts when what the run holds whatever the lengths exceeds
    the GPU's memory; a warning (returned) when only the full-length peak does; None when it fits."""
    if not plan.device_bytes or plan.shape is None or plan.total_bytes <= plan.device_bytes:
        return None
    gpu = f"the GPU's {plan.device_bytes / GIB:.1f} GiB (see the plan above)"
    if plan.held_bytes > plan.device_bytes:
        raise ValueError(
            f"the estimated memory per GPU, {plan.held_bytes / GIB:.1f} GiB before any logits or "
            f"activations, exceeds {gpu}. Largest parts and the keys that shrink them: {_advice(plan, True)}"
        )
    return (
        f"the estimated peak per GPU, {plan.total_bytes / GIB:.1f} GiB when a micro-batch holds a completion "
        f"of model.sampling.max_new_tokens tokens, exceeds {gpu}: such a step runs out of memory. Largest "
        f"parts and the keys that shrink them: {_advice(plan, False)}"
    )
