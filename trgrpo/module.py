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
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import NamedTuple

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import MeanMetric

from trgrpo.advantages import compute_advantages, group_reward_spread
from trgrpo.config import LossConfig, OptimConfig, check_batch_layout
from trgrpo.logprobs import differentiable_entropy, selective_log_softmax, token_entropy
from trgrpo.losses import policy_loss
from trgrpo.policy import PolicyConfig, load_model, load_tokenizer
from trgrpo.rewards import RewardSpec, compute_rewards, exact_match
from trgrpo.rollout import Rollout, SamplingConfig, generate_rollout
from trgrpo.weighting import TokenWeighting, UniformWeighting

log = logging.getLogger(__name__)


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
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_cfg, self.sampling, self.loss_cfg, self.optim_cfg = policy, sampling, loss, optim
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.rewards = rewards if rewards else [RewardSpec(fn=exact_match)]
        self.log_entropy = log_entropy
        self.save_hyperparameters(ignore=["weighting", "rewards"])
        # the tokenizer is light and needed by the data module's setup; the model waits for configure_model
        self.tokenizer = load_tokenizer(policy)
        self.policy_model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.val_accuracy = MeanMetric()
        self.eval_history: list[tuple[int, float]] = []
        self.reward_history: list[tuple[int, float]] = []
        self.timings: dict[str, float] = {}
        self._layout: tuple[int, int] | None = None
        self._shuffle = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ set-up

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit" and dm is not None:
            self._layout = check_batch_layout(dm.batch_size, self.sampling.group_size, self.optim_cfg)

    def configure_model(self) -> None:
        if self.policy_model is not None:
            return
        self.policy_model = load_model(self.policy_cfg, self.tokenizer)
        if self.loss_cfg.beta > 0:
            self.ref_model = load_model(self.policy_cfg, self.tokenizer).eval().requires_grad_(False)

    def configure_optimizers(self):
        params = [p for p in self.policy_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim_cfg.lr, betas=tuple(self.optim_cfg.betas),
                                weight_decay=self.optim_cfg.weight_decay)
        warmup = self.optim_cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # ------------------------------------------------------------------ scoring

    def score_tokens(self, model: torch.nn.Module, rollout: Rollout, idx: Tensor, entropy: str | None) -> TokenScores:
        """Log-probs (and optionally entropies) of the completion tokens of sequences ``idx``.

        ``entropy``: None, "detached" (for metrics and strategies) or "grad" (for the entropy bonus).
        Only the completion positions reach the LM head, and no float32 [B, T, V] tensor is kept.
        """
        ids, attn = rollout.input_ids[idx], rollout.attention_mask[idx]  # [B, P + T]
        p = rollout.prompt_len
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        t = ids.shape[1] - p
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False,
                       logits_to_keep=t + 1).logits[:, :-1]  # [B, T, V]
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

    # ------------------------------------------------------------------ the RL step

    def _all_reduce_sum(self, value: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        g = self.sampling.group_size
        t0 = time.perf_counter()
        rollout = generate_rollout(self.policy_model, self.tokenizer, batch["prompt"], self.sampling)
        t1 = time.perf_counter()
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items() if k != "prompt"}
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
        ref_logp = self._score_batch(self.ref_model, rollout, micro, False).logp if cfg.beta > 0 else None
        t1 = time.perf_counter()
        passes = w_strategy.passes(old.logp, mask, old.entropy) if multi_pass or w_strategy.needs_entropy else [mask]
        world = self.trainer.world_size if self.trainer is not None else 1
        opt = self.optimizers()
        sched = self.lr_schedulers()
        acc: dict = defaultdict(float)
        acc["weight_min"], acc["weight_max"] = math.inf, -math.inf
        ent_mode = "grad" if cfg.entropy_coef > 0 else ("detached" if self.log_entropy else None)
        for active in passes:
            for _ in range(self.optim_cfg.epochs):
                order = self._sequence_order(n)
                for start in range(0, n, mini):
                    idx = order[start:start + mini]
                    num_tokens = self._all_reduce_sum(mask[idx].sum()).item()
                    for micro_idx in idx.split(micro):
                        self._micro_step(rollout, micro_idx, adv, mask, active, old, ref_logp, ent_mode,
                                         num_tokens, float(mini * world), world, acc)
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
        """Clip the gradient norm, step optimiser and schedule; returns the pre-clip norm."""
        params = [p for p in self.policy_model.parameters() if p.grad is not None]
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item() if params else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return norm

    # ------------------------------------------------------------------ metrics

    def _log_step(self, rollout: Rollout, rewards, acc: dict) -> None:
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

    @torch.no_grad()
    def score_batch(self, batch: dict[str, list]) -> Tensor:
        """[B] greedy-completion correctness of a batch of held-out prompts."""
        task = self.trainer.datamodule.task
        rollout = generate_rollout(self.policy_model, self.tokenizer, batch["prompt"], self.sampling, greedy=True)
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        return torch.tensor([task.verify(c, r) for c, r in zip(rollout.completions, rows)], dtype=torch.float32)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.val_accuracy.update(self.score_batch(batch).to(self.device))

    def on_validation_epoch_end(self) -> None:
        acc = self.val_accuracy.compute()
        self.val_accuracy.reset()
        self.log("val/accuracy", acc, prog_bar=True)
        if self.trainer.state.fn == "fit":
            self.eval_history.append((self.global_step, acc.item()))

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
