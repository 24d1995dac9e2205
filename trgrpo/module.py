"""``GRPOModule``: one RL step of GRPO / TR-GRPO as a LightningModule.

Each training step takes a batch of prompts and:

1. rolls out ``group_size`` completions per prompt (``trgrpo.rollout``),
2. scores them with the configured rewards (``trgrpo.rewards``),
3. computes group-relative advantages (``trgrpo.advantages``),
4. runs ``optim.epochs`` epochs of mini-batch updates of the token-weighted clipped loss
   (``trgrpo.losses`` + the weighting strategy from ``trgrpo.weighting``), once per token pass the
   strategy asks for (Lopti trains low-probability tokens first, then the rest).

Normalisers (response tokens, sequences) are counted over the whole optimiser batch and all
processes before any micro-batch runs, so the gradient does not depend on how the batch is split.
Lightning's ``global_step`` counts optimiser updates (one per RL step with the defaults).

Scale and long runs (docs/scaling.md): the models are built in ``configure_model`` (sharded at creation under
ZeRO-3, sampled from gathered weights via ``generation_weights``); under DeepSpeed the engine accumulates the
micro-batches and clips; checkpoints add every process's random state and leave out the frozen reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from trgrpo.advantages import compute_advantages, group_reward_spread
from trgrpo.checkpointing import capture_rng_states, restore_rng_states
from trgrpo.config import LossConfig, OptimConfig, check_batch_layout
from trgrpo.evaluation import (
    EvalConfig,
    SampleRow,
    level_metrics,
    level_sums,
    sort_levels,
    write_sample_table,
)
from trgrpo.fastpath.shared_prefix import completion_logits
from trgrpo.logprobs import differentiable_entropy, selective_log_softmax, token_entropy
from trgrpo.losses import policy_loss
from trgrpo.policy import PolicyConfig, load_model, load_tokenizer
from trgrpo.rewards import RewardSpec, compute_rewards, exact_match
from trgrpo.rollout import Rollout, SamplingConfig, generate_rollout
from trgrpo.weighting import TokenWeighting, UniformWeighting

log = logging.getLogger(__name__)


def completion_columns(rollout: Rollout) -> dict[str, list]:
    """What the trainer adds to the task's columns for the rewards: token lengths and truncation."""
    return {"completion_length": rollout.completion_mask.sum(1).long().tolist(),
            "truncated": rollout.truncated.tolist()}


class TokenScores(NamedTuple):
    logp: Tensor  # [B, T] float32 log-probs of the completion tokens
    entropy: Tensor | None  # [B, T] float32 token entropy (None when not asked for)


class GRPOModule(L.LightningModule):
    """GRPO with a pluggable token weighting (TR-GRPO, AR, Lopti, top-entropy, uniform).

    Args:
        policy: which model and tokenizer to train.
        sampling: how completions are sampled (group size, temperature, budget).
        loss: the clipped surrogate, KL, entropy bonus, aggregation and advantage scaling.
        optim: AdamW settings, warm-up, epochs and mini/micro-batch sizes.
        weighting: the token weighting strategy (empty = ``UniformWeighting``, plain GRPO).
        rewards: reward terms and their weights (empty = exact match on the ``answer`` column).
        log_entropy: compute the mean token entropy for ``train/entropy`` (one extra pass over the logits).
        eval: held-out evaluation: sampled mean@k / pass@k and the sample table (greedy accuracy always).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        weighting: TokenWeighting | None = None,
        rewards: list[RewardSpec] | None = None,
        log_entropy: bool = True,
        eval: EvalConfig = EvalConfig(),
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_cfg, self.sampling, self.loss_cfg, self.optim_cfg = policy, sampling, loss, optim
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.rewards = rewards if rewards else [RewardSpec(fn=exact_match)]
        self.log_entropy = log_entropy
        self.eval_cfg = eval
        self.save_hyperparameters(ignore=["weighting", "rewards"])
        self._tokenizer = None  # loaded on first use (the data module's setup), the model in configure_model
        self.policy_model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.eval_history: list[tuple[int, float]] = []
        self.reward_history: list[tuple[int, float]] = []
        self.timings: dict[str, float] = {}
        self._layout: tuple[int, int] | None = None
        self._shuffle = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ set-up

    @property
    def tokenizer(self):
        """The policy's tokenizer, loaded on first use (parsing a config downloads nothing)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy_cfg)
        return self._tokenizer

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit" and dm is not None:
            self._layout = check_batch_layout(dm.batch_size, self.sampling.group_size, self.optim_cfg)
            world, rows = self.trainer.world_size, len(getattr(dm, "splits", {}).get("train", []))
            if rows and rows // world < dm.batch_size:
                raise ValueError(
                    f"world size {world} (trainer.devices x trainer.num_nodes) leaves {rows // world} of the {rows} "
                    f"training prompts to each process, fewer than one batch of data.batch_size={dm.batch_size} "
                    "prompts (data.batch_size is per process; each process samples whole groups for its own "
                    "prompts): lower data.batch_size or the number of processes, or add prompts"
                )

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference) here, so ZeRO-3 shards them while they are created."""
        if self.policy_model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DeepSpeedStrategy):
            self._configure_deepspeed(strategy)
        self.policy_model = load_model(self.policy_cfg, self.tokenizer)
        if isinstance(strategy, DeepSpeedStrategy):
            self.policy_model.register_forward_pre_hook(self._start_zero_micro_step)
        if self.loss_cfg.beta > 0 and self.policy_cfg.lora is None:  # LoRA: the reference is the adapter-free base
            self.ref_model = load_model(self.policy_cfg, self.tokenizer).eval().requires_grad_(False)

    def _configure_deepspeed(self, strategy: DeepSpeedStrategy) -> None:
        """Adapt the DeepSpeed config (already formatted by Lightning, not yet used) to the manual RL step.

        Several ``manual_backward`` calls (micro-batches) accumulate locally and one ``opt.step()`` reduces,
        clips and steps (``managed_gradient_accumulation: false``: the caller owns the boundary, and the loss
        is not divided by gradient_accumulation_steps); clipping is DeepSpeed's, from ``optim.grad_clip``.
        """
        cfg = strategy.config
        cfg["managed_gradient_accumulation"] = False
        cfg["zero_allow_untested_optimizer"] = True
        cfg["gradient_clipping"] = self.optim_cfg.grad_clip or 0.0
        if strategy.zero_stage_3:
            from transformers.integrations import HfDeepSpeedConfig

            # lets from_pretrained load weights straight into the shards (kept alive: transformers holds a weakref)
            self._hf_ds_config = HfDeepSpeedConfig(cfg)

    def on_before_backward(self, loss: Tensor) -> None:
        self._backwards_since_step = getattr(self, "_backwards_since_step", 0) + 1

    def _start_zero_micro_step(self, module, args) -> None:
        """Forward pre-hook on the policy under DeepSpeed: do what ``DeepSpeedEngine.forward`` does first.

        Lightning runs the whole training step inside one engine forward, so the engine never sees the
        micro-batches; without this ZeRO-3 counts them all as micro-step 0 and each backward overwrites the
        previous micro-batch's gradient instead of adding to it.
        """
        optimizer = getattr(self.trainer.strategy.model, "optimizer", None)
        if hasattr(optimizer, "clear_backward_seen_flag"):
            optimizer.clear_backward_seen_flag()

    def configure_optimizers(self):
        params = [p for p in self.policy_model.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DeepSpeedStrategy) and \
                strategy.config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
            # ZeRO-Offload steps on the CPU; DeepSpeed refuses a torch optimizer there. Same AdamW update.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            adamw = DeepSpeedCPUAdam
        opt = adamw(params, lr=self.optim_cfg.lr, betas=tuple(self.optim_cfg.betas),
                    weight_decay=self.optim_cfg.weight_decay)
        warmup = self.optim_cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # ------------------------------------------------------------------ scoring

    def score_tokens(self, model: torch.nn.Module, rollout: Rollout, idx: Tensor, entropy: str | None) -> TokenScores:
        """Log-probs (and optionally entropies) of the completion tokens of sequences ``idx``.

        ``entropy``: None, "detached" (for metrics and strategies) or "grad" (for the entropy bonus).
        Only the completion positions reach the LM head, and no float32 [B, T, V] tensor is kept.
        Each distinct prompt runs through the model once for all its completions (``trgrpo.shared_prefix``).
        """
        ids, attn = rollout.input_ids[idx], rollout.attention_mask[idx]  # [B, P + T]
        p = rollout.prompt_len
        logits = completion_logits(model, ids, attn, p)  # [B, T, V]
        if self.sampling.temperature != 1.0:
            logits = logits / self.sampling.temperature
        logp = selective_log_softmax(logits, ids[:, p:])  # [B, T]
        ent = None
        if entropy == "grad":
            ent = differentiable_entropy(logits)
        elif entropy == "detached":
            ent = token_entropy(logits)
        return TokenScores(logp, ent)

    @torch.no_grad()
    def _score_batch(self, model, rollout: Rollout, micro: int, entropy: bool) -> TokenScores:
        parts = [self.score_tokens(model, rollout, idx, "detached" if entropy else None)
                 for idx in torch.arange(rollout.input_ids.shape[0], device=self.device).split(micro)]
        ent = torch.cat([s.entropy for s in parts]) if entropy else None
        return TokenScores(torch.cat([s.logp for s in parts]), ent)

    def _reference_logp(self, rollout: Rollout, micro: int) -> Tensor:
        """[N, T] log-probs under the frozen reference: the separate copy, or with LoRA the same model with
        its adapters disabled (the base weights never train, so no second copy is needed)."""
        if self.ref_model is not None:
            return self._score_batch(self.ref_model, rollout, micro, False).logp
        model, was_training = self.policy_model, self.policy_model.training
        model.eval()
        try:
            with model.disable_adapter():
                return self._score_batch(model, rollout, micro, False).logp
        finally:
            model.train(was_training)

    @contextmanager
    def generation_weights(self):
        """Whole policy weights for sampling; a no-op except under DeepSpeed ZeRO-3.

        ZeRO-3 keeps 1/world of every weight per GPU and all-gathers each layer inside its forward, which
        during decoding means one gather per layer per token, and a hang if processes decode different
        numbers of tokens.  Here every process gathers the policy once and decodes with the gather hooks
        removed: the cost is one all-gather of the policy per call and a full copy of its weights on each
        GPU while sampling (docs/scaling.md).  Every process must enter together.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3) or self.policy_model is None:
            yield
            return
        import deepspeed

        engine = strategy.model
        opt = getattr(engine, "optimizer", None)
        offload = getattr(opt, "parameter_offload", opt)
        with deepspeed.zero.GatheredParameters(list(self.policy_model.parameters()), modifier_rank=None):
            hooked = offload is not None and hasattr(offload, "forward_hooks")
            if hooked:  # as TRL's unwrap_model_for_generation: decode without the per-layer gather hooks
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

    # ------------------------------------------------------------------ the RL step

    def _all_reduce_sum(self, value: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        g = self.sampling.group_size
        t0 = time.perf_counter()
        with self.generation_weights():
            rollout = generate_rollout(self.policy_model, self.tokenizer, batch["prompt"], self.sampling)
        t1 = time.perf_counter()
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items() if k != "prompt"}
        columns.update(completion_columns(rollout))
        prompts = [p for p in batch["prompt"] for _ in range(g)]
        rewards = compute_rewards(self.rewards, prompts, rollout.completions, columns)
        t2 = time.perf_counter()
        adv = compute_advantages(rewards.total, g, self.loss_cfg.advantage_scale, self.loss_cfg.advantage_eps)
        mask = rollout.completion_mask
        if self.loss_cfg.mask_truncated:
            mask = mask * (~rollout.truncated).unsqueeze(1).to(mask.dtype)
        stats = self.update(rollout, adv.to(self.device), mask)
        t3 = time.perf_counter()
        self.timings = {"generation": t1 - t0, "reward": t2 - t1, "update": t3 - t2, **stats.pop("_timings")}
        self._log_step(rollout, rewards, stats)

    def update(self, rollout: Rollout, adv: Tensor, mask: Tensor) -> dict:
        """All optimiser updates for one rollout batch; returns summed statistics."""
        n = rollout.input_ids.shape[0]
        mini, micro = self._layout or check_batch_layout(n // self.sampling.group_size, self.sampling.group_size,
                                                         self.optim_cfg)
        w_strategy, cfg = self.weighting, self.loss_cfg
        multi_pass = type(w_strategy).passes is not TokenWeighting.passes
        need_old = self.optim_cfg.epochs > 1 or n > mini or multi_pass or w_strategy.needs_entropy
        t0 = time.perf_counter()
        old = self._score_batch(self.policy_model, rollout, micro, w_strategy.needs_entropy) if need_old else None
        ref_logp = self._reference_logp(rollout, micro) if cfg.beta > 0 else None
        t1 = time.perf_counter()
        passes = w_strategy.passes(old.logp, mask, old.entropy) if multi_pass or w_strategy.needs_entropy else [mask]
        world = self.trainer.world_size if self.trainer is not None else 1
        opt = self.optimizers()
        sched = self.lr_schedulers()
        acc: dict = defaultdict(float)
        acc["weight_min"], acc["weight_max"] = math.inf, -math.inf
        ent_mode = "grad" if cfg.entropy_coef > 0 else ("detached" if self.log_entropy else None)
        # a zero advantage zeroes the clipped surrogate and its gradient exactly; without KL or entropy bonus
        # such sequences add nothing, so they are left out (the normalisers below still count them)
        skip = self.optim_cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0 and world == 1
        for active in passes:
            for _ in range(self.optim_cfg.epochs):
                order = self._sequence_order(n)
                for start in range(0, n, mini):
                    idx = order[start:start + mini]
                    num_tokens = self._all_reduce_sum(mask[idx].sum()).item()
                    trained = idx[adv[idx] != 0] if skip else idx
                    for micro_idx in trained.split(micro) if len(trained) else ():
                        self._micro_step(rollout, micro_idx, adv, mask, active, old, ref_logp, ent_mode,
                                         num_tokens, float(mini * world), world, acc)
                    if not len(trained):  # the full pass would have left zero gradients: so does this one
                        for p in self.policy_model.parameters():
                            if p.requires_grad and p.grad is None:
                                p.grad = torch.zeros_like(p)
                    acc["grad_norm"] += self._clip_and_step(opt, sched)
                    acc["updates"] += 1
        acc["_timings"] = {"old_logprobs": t1 - t0}
        return acc

    def _sequence_order(self, n: int) -> Tensor:
        """Sequence indices for one epoch: whole groups, shuffled when there are several mini-batches."""
        g = self.sampling.group_size
        groups = torch.randperm(n // g, generator=self._shuffle) if self._layout and self._layout[0] < n else \
            torch.arange(n // g)
        return (groups.unsqueeze(1) * g + torch.arange(g)).reshape(-1).to(self.device)

    def _micro_step(self, rollout, idx, adv, mask, active, old, ref_logp, ent_mode, num_tokens, num_seqs,
                    world, acc) -> None:
        scores = self.score_tokens(self.policy_model, rollout, idx, ent_mode)
        m, a = mask[idx], active[idx]
        logp_d = scores.logp.detach()
        old_logp = old.logp[idx] if old is not None else logp_d  # single pass: ratio exactly 1
        w = self.weighting.weights(logp_d, old_logp, adv[idx], m)
        cfg = self.loss_cfg
        out = policy_loss(
            scores.logp, old_logp, adv[idx], w, m, a,
            num_tokens=num_tokens, num_seqs=num_seqs, max_len=self.sampling.max_new_tokens,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
            placement=self.weighting.placement, aggregation=cfg.aggregation,
            ref_logp=ref_logp[idx] if ref_logp is not None else None, beta=cfg.beta,
            kl_estimator=cfg.kl_estimator, weight_kl=self.weighting.weight_kl,
            entropy=scores.entropy if cfg.entropy_coef > 0 else None, entropy_coef=cfg.entropy_coef,
        )
        # DDP averages gradients over processes; the normalisers are already global, so undo the mean
        self.manual_backward(out.loss * world)
        acc["loss"] += out.loss.item()
        acc["clipped_low"] += out.clipped_low.item()
        acc["clipped_high"] += out.clipped_high.item()
        acc["kl"] += out.kl.item()
        acc["active_tokens"] += a.sum().item()
        acc["tokens"] += m.sum().item()
        if scores.entropy is not None:
            acc["entropy"] += (scores.entropy.detach() * m).sum().item()
        sel = w[a.bool()]
        if sel.numel():
            acc["weight_sum"] += sel.sum().item()
            acc["weight_min"] = min(acc["weight_min"], sel.min().item())
            acc["weight_max"] = max(acc["weight_max"], sel.max().item())
            if self.weighting.bounds is not None:
                acc["weight_at_lower"] += (sel <= self.weighting.bounds[0]).sum().item()
                acc["weight_at_upper"] += (sel >= self.weighting.bounds[1]).sum().item()

    def _clip_and_step(self, opt, sched) -> float:
        """Clip the gradient norm, step optimiser and schedule; returns the pre-clip norm.

        Under DeepSpeed the gradients live in the engine's (partitioned) buffers: ``opt.step()`` is the
        engine's step, which reduces the accumulated micro-batches, clips at ``gradient_clipping`` (set from
        ``optim.grad_clip`` in ``_configure_deepspeed``) and reports the global pre-clip norm.
        """
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            if not getattr(self, "_backwards_since_step", 0):
                # every sequence was left out (zero advantage): the engine cannot step on no backward at all,
                # so give it the zero gradient the plain path steps with, through a zero loss on one token
                for p in self.policy_model.parameters():
                    p.grad = None  # gradients live in the engine's buffers, not in .grad (ZeRO-3: shard-sized)
                ids = torch.full((1, 1), self.tokenizer.eos_token_id, device=self.device)
                self.manual_backward(self.policy_model(input_ids=ids).logits.sum() * 0.0)
            self._backwards_since_step = 0
            opt.step()
            sched.step()
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.policy_model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item() if params else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return norm

    # ------------------------------------------------------------------ metrics

    def _reduce_stats(self, acc: dict) -> dict:
        """The step's statistics summed over processes (min / max for the weight range), so every ratio
        logged is the global one; grad_norm and updates are already identical on every process."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return acc
        same = {"grad_norm", "updates", "weight_min", "weight_max"}
        keys = sorted(k for k, v in acc.items() if k not in same and isinstance(v, (int, float)))
        sums = torch.tensor([float(acc[k]) for k in keys], dtype=torch.float64, device=self.device)
        low = torch.tensor([acc["weight_min"], -acc["weight_max"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        out = dict(acc)
        out.update(zip(keys, sums.tolist(), strict=True))
        out["weight_min"], out["weight_max"] = low[0].item(), -low[1].item()
        return out

    def _log_step(self, rollout: Rollout, rewards, acc: dict) -> None:
        acc = self._reduce_stats(acc)
        g = self.sampling.group_size
        total = rewards.total
        spread = group_reward_spread(total, g)
        tokens, active = max(acc["tokens"], 1.0), max(acc["active_tokens"], 1.0)
        metrics = {
            "train/reward": total.mean().item(),
            "train/reward_std": spread.mean().item(),
            "train/frac_reward_zero_std": (spread < 1e-8).float().mean().item(),
            "train/completion_length": rollout.completion_mask.sum(1).mean().item(),
            "train/truncated_ratio": rollout.truncated.float().mean().item(),
            "train/reward_errors": float(rewards.errors),
            "train/loss": acc["loss"] / max(acc["updates"], 1.0),
            "train/clip_ratio/low": acc["clipped_low"] / active,
            "train/clip_ratio/high": acc["clipped_high"] / active,
            "train/grad_norm": acc["grad_norm"] / max(acc["updates"], 1.0),
            "train/lr": self.optimizers().param_groups[0]["lr"],
            "train/weight/mean": acc["weight_sum"] / active,
            "train/weight/min": acc["weight_min"] if acc["active_tokens"] else 0.0,
            "train/weight/max": acc["weight_max"] if acc["active_tokens"] else 0.0,
        }
        if self.weighting.bounds is not None:
            metrics["train/weight/at_lower"] = acc["weight_at_lower"] / active
            metrics["train/weight/at_upper"] = acc["weight_at_upper"] / active
        if self.loss_cfg.beta > 0:
            metrics["train/kl"] = acc["kl"] / tokens
        if "entropy" in acc:
            metrics["train/entropy"] = acc["entropy"] / tokens
        for name, values in rewards.per_term.items():
            valid = values[~torch.isnan(values)]
            metrics[f"train/rewards/{name}"] = valid.mean().item() if valid.numel() else 0.0
            metrics[f"train/rewards/{name}_std"] = valid.std().item() if valid.numel() > 1 else 0.0
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(total), sync_dist=True)
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False, batch_size=len(total))
        self.reward_history.append((self.global_step, metrics["train/reward"]))

    # ------------------------------------------------------------------ evaluation

    def _greedy(self, batch: dict[str, list]) -> tuple[Rollout, list[dict], Tensor]:
        """Greedy completions of a batch of held-out prompts, its rows, and [B] correctness."""
        rollout = generate_rollout(self.policy_model, self.tokenizer, batch["prompt"], self.sampling, greedy=True)
        rows = [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        scores = self.trainer.datamodule.task.verify_batch(rollout.completions, rows)
        return rollout, rows, torch.tensor(scores, dtype=torch.float32)

    @torch.no_grad()
    def score_batch(self, batch: dict[str, list]) -> Tensor:
        """[B] greedy-completion correctness of a batch of held-out prompts."""
        return self._greedy(batch)[2]

    def _sampled_scores(self, batch: dict[str, list], rows: list[dict]) -> list[list[float]]:
        """[B][n] correctness of ``eval.samples`` sampled completions per held-out prompt."""
        n = self.eval_cfg.samples
        sampling = dataclasses.replace(self.sampling, temperature=self.eval_cfg.temperature or self.sampling.temperature)
        rollout = generate_rollout(self.policy_model, self.tokenizer, batch["prompt"], sampling, group_size=n)
        flat = self.trainer.datamodule.task.verify_batch(rollout.completions, [r for r in rows for _ in range(n)])
        return [flat[i * n:(i + 1) * n] for i in range(len(rows))]

    def _sample_rows(self, rollout: Rollout, rows: list[dict], correct: Tensor, count: int) -> list[SampleRow]:
        """The first ``count`` prompts of a batch for the sample table, scored by every reward term."""
        rows, texts = rows[:count], rollout.completions[:count]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        columns.update({k: v[:count] for k, v in completion_columns(rollout).items()})
        result = compute_rewards(self.rewards, [r["prompt"] for r in rows], texts, columns)
        out = []
        for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
            scores = {name: (None if v[i].isnan() else v[i].item()) for name, v in result.per_term.items()}
            scores["total"] = result.total[i].item()
            out.append(SampleRow(row.get("level"), str(row.get("raw_prompt", row["prompt"])), str(row.get("answer", "")),
                                 text, correct[i].item(), scores))
        return out

    def on_validation_epoch_start(self) -> None:
        self._levels = sort_levels(r.get("level") for r in self.trainer.datamodule.splits["val"])
        self._level_index = {level: i for i, level in enumerate(self._levels)}
        self._eval_sums = torch.zeros(len(self._levels), 4, dtype=torch.float64)
        self._table: list[SampleRow] = []

    @torch.no_grad()
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        rollout, rows, correct = self._greedy(batch)
        sampled = self._sampled_scores(batch, rows) if self.eval_cfg.k else None
        levels = [r.get("level") for r in rows]
        self._eval_sums += level_sums(self._level_index, levels, correct.tolist(), sampled, self.eval_cfg.k)
        missing = self.eval_cfg.table_rows - len(self._table)
        if missing > 0 and self.trainer.is_global_zero:
            self._table += self._sample_rows(rollout, rows, correct, missing)

    def on_validation_epoch_end(self) -> None:
        sums = self._all_reduce_sum(self._eval_sums.float().to(self.device)).double().cpu()  # float32: MPS, NCCL
        metrics = level_metrics(self._levels, sums, self.eval_cfg.k)
        acc = metrics.pop("val/accuracy", 0.0)
        self.log("val/accuracy", acc, prog_bar=True)
        self.log_dict(metrics)
        if self.trainer.state.fn == "fit":
            self.eval_history.append((self.global_step, acc))
        if self._table and self.trainer.is_global_zero:
            folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "val_samples"
            path = write_sample_table(folder, self.global_step, self._table)
            log.info("held-out samples written to %s", path)

    def heldout_accuracy(self) -> float:
        """Greedy accuracy on the whole held-out split, shared out over processes."""
        loader = self.trainer.datamodule.val_dataloader()
        rank, world = self.global_rank, self.trainer.world_size
        correct = torch.zeros(2, device=self.device)
        for i, batch in enumerate(loader):
            if i % world == rank:
                scores = self.score_batch(batch)
                correct += torch.tensor([scores.sum().item(), scores.numel()], device=self.device)
        correct = self._all_reduce_sum(correct)
        return (correct[0] / correct[1].clamp(min=1)).item()

    def _log_heldout(self, when: str) -> float:
        with self.generation_weights():
            acc = self.heldout_accuracy()
        self.eval_history.append((self.global_step, acc))
        for logger in self.loggers:
            logger.log_metrics({"val/accuracy": acc}, step=self.global_step)
            logger.save()
        log.info("held-out accuracy %s RL: %.3f", when, acc)
        return acc

    def on_train_start(self) -> None:
        if self.trainer.datamodule is not None:
            self._acc_before = self._log_heldout("before")

    def on_train_end(self) -> None:
        if self.trainer.datamodule is None:
            return
        after = self._log_heldout("after")
        before = getattr(self, "_acc_before", float("nan"))
        n = len(self.trainer.datamodule.splits.get("val", []))
        if self.trainer.is_global_zero:
            print(f"\nheld-out accuracy (greedy, {n} prompts never trained on): "
                  f"before RL {before:.3f} -> after RL {after:.3f} ({after - before:+.3f})", flush=True)

    # ------------------------------------------------------------------ checkpoints

    def on_validation_start(self) -> None:
        # validation samples too: keep it off the training streams, so that a resumed run (whose checkpoint
        # was written before the validation that followed it) and the value of val_check_interval do not
        # change what training draws
        self._rng_before_validation = capture_rng_states(shuffle=self._shuffle)
        self._validation_weights = self.generation_weights()
        self._validation_weights.__enter__()

    def on_validation_end(self) -> None:
        weights, self._validation_weights = getattr(self, "_validation_weights", None), None
        if weights is not None:
            weights.__exit__(None, None, None)
        state, self._rng_before_validation = getattr(self, "_rng_before_validation", None), None
        if state is not None:
            restore_rng_states(state, shuffle=self._shuffle)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add every process's random state; leave out the frozen reference (rebuilt from the config)."""
        rng = [capture_rng_states(shuffle=self._shuffle)]
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_initialized():
            rng = [None] * self.trainer.world_size
            dist.all_gather_object(rng, capture_rng_states(shuffle=self._shuffle))
        checkpoint["trgrpo"] = {"rng": rng, "reward_history": self.reward_history,
                                "eval_history": self.eval_history}
        state = checkpoint.get("state_dict")
        if state is not None:
            for key in [k for k in state if k.startswith("ref_model.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model shape before anything is loaded; queue the random state."""
        self._check_checkpoint_shapes(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None and self.ref_model is not None:
            state.update({f"ref_model.{k}": v for k, v in self.ref_model.state_dict().items()})
        extra = checkpoint.get("trgrpo", {})
        self.reward_history = list(extra.get("reward_history", []))
        self.eval_history = list(extra.get("eval_history", []))
        rng = extra.get("rng")
        if rng:
            rank = self.global_rank if self._trainer is not None else 0
            if len(rng) != (self.trainer.world_size if self._trainer is not None else 1):
                log.warning("resuming on %d processes from a checkpoint of %d: random streams are not continued "
                            "exactly", self.trainer.world_size, len(rng))
            self._pending_rng = rng[rank % len(rng)]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # restored here, right before the first step after resume, so that nothing run in between (held-out
        # evaluation, loader start-up) shifts the streams relative to the uninterrupted run
        pending, self._pending_rng = getattr(self, "_pending_rng", None), None
        if pending is not None:
            restore_rng_states(pending, shuffle=self._shuffle)

    def _check_checkpoint_shapes(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("policy")
        if saved is not None:  # a dict when written through the CLI, else a PolicyConfig
            saved = dataclasses.asdict(saved) if dataclasses.is_dataclass(saved) else dict(saved)
            current = dataclasses.asdict(self.policy_cfg)
            for key in ("name_or_path", "tiny", "lora"):
                old, new = saved.get(key), current.get(key)
                if key == "tiny" and self.policy_cfg.name_or_path:
                    continue
                if old != new:
                    raise ValueError(f"--ckpt_path: the checkpoint was trained with model.policy.{key}={old}, "
                                     f"this run has model.policy.{key}={new}; resume with the same model")
        state = checkpoint.get("state_dict")
        if state is None:  # DeepSpeed keeps the weights in its shard files; the policy check above applies
            return
        current = {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.startswith("ref_model.")}
        current.update({k: tuple(p.ds_shape) for k, p in self.named_parameters() if hasattr(p, "ds_shape")})
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {current[k]}"
                 for k, v in state.items() if k in current and tuple(v.shape) != current[k]]
        missing = sorted(k for k in current if k not in state)
        if wrong or missing:
            raise ValueError("--ckpt_path: the checkpoint does not fit this model (different model shape?): "
                             + "; ".join(wrong[:5] + [f"missing {k}" for k in missing[:5]]))
