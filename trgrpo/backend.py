"""Where the DeepSpeed glue lives: one object that knows how the policy is stored and stepped.

``training_backend(strategy, optim, backward, token_id)`` builds, once and before the models are built,
``PlainBackend`` (one process, DDP) or ``DeepSpeedBackend`` (ZeRO-2/3, offload; building it adapts the
engine config to the manual RL step).  The RL step calls the same methods either way, and nothing else in
the package checks the strategy's type:

    attach(model, optimizer_of)       once the policy is built: the ZeRO micro-step hook on it
    optimizer_class()                 AdamW, or DeepSpeed's CPU AdamW under ZeRO-Offload
    generation_weights(model)         context: whole weights while sampling (ZeRO-3 gathers them once)
    step(model, opt, sched)           clip, optimiser step, schedule; returns the pre-clip gradient norm
    note_backward()                   count backward passes (a step after none needs zero gradients)

Also ``all_reduce_sum`` (the counts the loss normalisers need) and ``all_gather_objects``.
See docs/scaling.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from torch import Tensor

from trgrpo.config import OptimConfig
from trgrpo.world import is_distributed

MIN_DEEPSPEED = "0.19.4"  # the first release with managed_gradient_accumulation (caller-owned boundaries)


def all_reduce_sum(value: Tensor) -> Tensor:
    """``value`` summed over every process (a copy; the value itself without a process group)."""
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class PlainBackend:
    """One process or DDP: gradients in ``.grad``, clipped here, a torch optimiser steps.

    Args:
        grad_clip: the largest gradient norm (``optim.grad_clip``; None: no clipping).
    """

    def __init__(self, grad_clip: float | None = None) -> None:
        self.grad_clip = grad_clip
        self.backwards_since_step = 0

    def attach(self, model: torch.nn.Module, optimizer_of: Callable[[], object]) -> None:
        """Called once the policy is built."""

    def optimizer_class(self) -> type:
        return torch.optim.AdamW

    @contextmanager
    def generation_weights(self, model: torch.nn.Module | None):
        """Whole policy weights for sampling: here they always are."""
        yield

    def note_backward(self) -> None:
        self.backwards_since_step += 1

    def step(self, model: torch.nn.Module, opt, sched) -> float:
        """Clip the gradient norm, step optimiser and schedule; returns the pre-clip norm.

        After no backward at all (every sequence skipped for a zero advantage) the step still runs on zero
        gradients, as the full pass would have (AdamW's moments and weight decay move either way).
        """
        if not self.backwards_since_step:
            for p in model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item() if params else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        self.backwards_since_step = 0
        return norm


def check_deepspeed_version() -> None:
    """Refuse a DeepSpeed older than ``MIN_DEEPSPEED``: it ignores ``managed_gradient_accumulation`` without
    a word and would reduce and step after every micro-batch."""
    import deepspeed
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version(MIN_DEEPSPEED):
        raise RuntimeError(
            f"trainer.strategy: DeepSpeed {deepspeed.__version__} is installed, the RL step needs "
            f">= {MIN_DEEPSPEED} (managed_gradient_accumulation: false): "
            f"pip install 'deepspeed>={MIN_DEEPSPEED}'"
        )


def check_engine(engine) -> None:
    """The built engine does what the RL step relies on: caller-owned accumulation boundaries and float32
    gradient accumulation (a config key it does not know would be ignored silently)."""
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is None or managed():
        raise RuntimeError(
            "trainer.strategy: the DeepSpeed engine manages gradient accumulation itself "
            f"(managed_gradient_accumulation is not false); DeepSpeed >= {MIN_DEEPSPEED} is needed"
        )
    accum = engine.get_data_types()[1]
    if accum != torch.float32:
        raise RuntimeError(
            f"trainer.strategy: DeepSpeed accumulates gradients in {accum}, not float32 "
            "(data_types.grad_accum_dtype in the DeepSpeed config)"
        )


class DeepSpeedBackend(PlainBackend):
    """DeepSpeed ZeRO under Lightning's strategy, driven by the RL step's manual optimisation.

    Several ``manual_backward`` calls (micro-batches) accumulate locally and one ``opt.step()`` reduces,
    clips and steps (``managed_gradient_accumulation: false``: the caller owns the boundary, and the loss is
    not divided by gradient_accumulation_steps); clipping is DeepSpeed's, from ``optim.grad_clip``; gradients
    accumulate and are reduced in float32 under bf16, as DDP's are.  Built before the models, it adapts the
    strategy's config for that (refusing a DeepSpeed older than ``MIN_DEEPSPEED``), and at the policy's first
    forward it checks that the engine took those settings.

    Args:
        strategy: Lightning's DeepSpeed strategy (its config formatted, not yet used).
        optim: the optimiser settings (``grad_clip``).
        backward: the module's ``manual_backward``, for the zero-loss backward of a step that had none.
        token_id: a token of the policy's vocabulary (its EOS) for that zero-loss forward.
    """

    def __init__(
        self,
        strategy: DeepSpeedStrategy,
        optim: OptimConfig,
        backward: Callable[[Tensor], None],
        token_id: int,
    ) -> None:
        super().__init__(optim.grad_clip)
        self.strategy = strategy
        self.backward = backward
        self.token_id = token_id
        self._hf_ds_config = None
        self._engine_checked = False
        self._configure(optim)

    def _configure(self, optim: OptimConfig) -> None:
        """Adapt the DeepSpeed config (already formatted by Lightning, not yet used) to the manual RL step."""
        check_deepspeed_version()
        cfg = self.strategy.config
        cfg["managed_gradient_accumulation"] = False
        # Under bf16 DeepSpeed would otherwise sum the micro-batches' gradients and reduce them over the
        # processes in bf16 (8 mantissa bits; a K&K step sums 64 micro-batches).  DDP's bf16-mixed keeps
        # float32 gradients: accumulate and reduce in float32 here too, unless the config says otherwise.
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        cfg.setdefault("communication_data_type", "fp32")
        cfg["zero_allow_untested_optimizer"] = True
        cfg["gradient_clipping"] = optim.grad_clip or 0.0
        if self.strategy.zero_stage_3:
            from transformers.integrations import HfDeepSpeedConfig

            # lets from_pretrained load weights straight into the shards
            # (kept alive: transformers holds a weakref)
            self._hf_ds_config = HfDeepSpeedConfig(cfg)

    def attach(self, model: torch.nn.Module, optimizer_of: Callable[[], object]) -> None:
        """Forward pre-hook on the policy: do what ``DeepSpeedEngine.forward`` does first.

        Lightning runs the whole training step inside one engine forward, so the engine never sees the
        micro-batches; without this ZeRO-3 counts them all as micro-step 0 and each backward overwrites the
        previous micro-batch's gradient instead of adding to it.
        """

        def start_micro_step(module, args) -> None:
            if not self._engine_checked:  # the first forward: the engine exists, no gradient does yet
                check_engine(self.strategy.deepspeed_engine)
                self._engine_checked = True
            optimizer = optimizer_of()
            if hasattr(optimizer, "clear_backward_seen_flag"):
                optimizer.clear_backward_seen_flag()

        model.register_forward_pre_hook(start_micro_step)

    def optimizer_class(self) -> type:
        offload = self.strategy.config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
        if offload == "cpu":
            # ZeRO-Offload steps on the CPU; DeepSpeed refuses a torch optimizer there. Same AdamW update.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam
        return torch.optim.AdamW

    @contextmanager
    def generation_weights(self, model: torch.nn.Module | None):
        """Whole policy weights for sampling under ZeRO-3 (a no-op for ZeRO-2).

        ZeRO-3 keeps 1/world of every weight per GPU and all-gathers each layer inside its forward, which
        during decoding means one gather per layer per token, and a hang if processes decode different
        numbers of tokens.  Here every process gathers the policy once and decodes with the gather hooks
        removed: the cost is one all-gather of the policy per call and a full copy of its weights on each
        GPU while sampling (docs/scaling.md).  Every process must enter together.
        """
        if not self.strategy.zero_stage_3 or model is None:
            yield
            return
        import deepspeed

        opt = getattr(self.strategy.model, "optimizer", None)
        offload = getattr(opt, "parameter_offload", opt)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            hooked = offload is not None and hasattr(offload, "forward_hooks")
            if hooked:  # decode without the per-layer gather hooks, then put them back
                for p in offload.module.parameters():
                    p.ds_active_sub_modules.clear()
                for hook in offload.forward_hooks + offload.backward_hooks:
                    hook.remove()
                offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                if hooked:
                    coordinator = getattr(offload, "param_coordinator", None)
                    if coordinator is not None and not coordinator.is_invalid_trace():
                        coordinator._invalidate_trace()
                    offload._register_deepspeed_module(offload.module)

    def step(self, model: torch.nn.Module, opt, sched) -> float:
        """The engine's step: reduces the accumulated micro-batches, clips at ``gradient_clipping`` and
        reports the global pre-clip norm.  The gradients live in the engine's (partitioned) buffers."""
        if not self.backwards_since_step:
            # every sequence was left out (zero advantage): the engine cannot step on no backward at all,
            # so give it the zero gradient the plain path steps with, through a zero loss on one token
            for p in model.parameters():
                p.grad = None  # gradients live in the engine's buffers, not in .grad (ZeRO-3: shard-sized)
            ids = torch.full((1, 1), self.token_id, device=next(model.parameters()).device)
            self.backward(model(input_ids=ids).logits.sum() * 0.0)
        self.backwards_since_step = 0
        opt.step()
        sched.step()
        norm = self.strategy.deepspeed_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


def training_backend(
    strategy: Strategy | None, optim: OptimConfig, backward: Callable[[Tensor], None], token_id: int
) -> PlainBackend:
    """The backend for a Lightning strategy (``PlainBackend`` without a trainer), built with all it needs.

    Args:
        strategy: the trainer's strategy (None without a trainer).
        optim: the optimiser settings (``grad_clip``).
        backward: the module's ``manual_backward`` (DeepSpeed's step after no backward calls it).
        token_id: a token id of the policy's vocabulary, its EOS (the same step's zero-loss forward).
    """
    if isinstance(strategy, DeepSpeedStrategy):
        return DeepSpeedBackend(strategy, optim, backward, token_id)
    return PlainBackend(optim.grad_clip)


__all__ = [
    "MIN_DEEPSPEED",
    "DeepSpeedBackend",
    "PlainBackend",
    "all_gather_objects",
    "all_reduce_sum",
    "check_deepspeed_version",
    "check_engine",
    "training_backend",
]
