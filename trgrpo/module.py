"""``GRPOModule``: one RL step of GRPO / TR-GRPO as a LightningModule.

``training_step`` reads top to bottom, each phase a named piece with its own home:

    rollout     G completions per prompt              trgrpo.rollout.engines (fast, hf), .vllm (vllm)
    rewards     the configured reward terms            trgrpo.rewards
    advantages  group-relative advantages              trgrpo.advantages
    prepare     old / reference log-probs, passes      trgrpo.scoring, the weighting's ``passes``
    update      mini/micro-batches, weighted loss      trgrpo.update (UpdatePlan), trgrpo.losses (GRPOLoss)
    log         typed step statistics                  trgrpo.stats (StepStats)

Normalisers (response tokens, sequences) are counted over the whole optimiser batch and all processes
before any micro-batch runs, so the gradient does not depend on how the batch is split.  Lightning's
``global_step`` counts optimiser updates (one per RL step with the defaults); RL steps are counted by
``trgrpo.progress.rl_steps_done`` and bounded by the ``trgrpo.callbacks.RLStepLimit`` callback.  The
rollout's data types are in ``trgrpo.rollout.base``, and the engine (``model.sampling.engine``: fast, hf or
vllm) is chosen in ``trgrpo.rollout.engines``.  DeepSpeed lives behind
``trgrpo.backend``; held-out evaluation in ``trgrpo.evaluation`` (``HeldoutEvaluator``) and the
``HeldoutAccuracy`` callback; checkpoint checks in ``trgrpo.checkpointing``; the random streams a resumed
run continues in ``trgrpo.random_streams`` (one ``RandomStreams``, owned here).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from trgrpo.advantages import compute_advantages
from trgrpo.backend import PlainBackend, all_gather_objects, all_reduce_sum, training_backend
from trgrpo.callbacks import HeldoutAccuracy, HeldoutResult
from trgrpo.checkpointing import check_checkpoint_fits
from trgrpo.config import LossConfig, OptimConfig, check_sampler_engine
from trgrpo.diagnostics import GradBuckets, check_edges
from trgrpo.dynamic_sampling import GroupFilter, apply_dynamic_sampling
from trgrpo.evaluation import EvalConfig, HeldoutEvaluator, save_sample_table
from trgrpo.losses import GRPOLoss, old_logprobs
from trgrpo.policy import PolicyConfig, load_model, load_tokenizer
from trgrpo.progress import rl_steps_done
from trgrpo.random_streams import RandomStreams
from trgrpo.rewards import RewardResult, RewardSpec, batch_rows, compute_rewards, exact_match, reward_columns
from trgrpo.rollout import Rollout, SamplingConfig
from trgrpo.rollout.engines import generate_rollout, make_engine
from trgrpo.scoring import TokenScorer
from trgrpo.stats import ProcessReduce, StepStats, StepTimings, UpdateStats
from trgrpo.update import UpdateBatch, UpdateInputs, UpdatePlan
from trgrpo.weighting import TokenWeighting, UniformWeighting
from trgrpo.world import trainer_world_size

log = logging.getLogger(__name__)

# counts of events in one RL step: summed over processes when logged (every other metric is their mean)
SUMMED_METRICS = ("train/reward_errors", "train/tool_errors")


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
        batch_size: prompts per RL step per process; the CLI links it to ``data.batch_size`` (empty = taken
            from the first batch).
        grad_buckets: probability edges of the ``train/grad_share/*`` diagnostics
            (``trgrpo.diagnostics``); () = off.
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
        batch_size: int | None = None,
        grad_buckets: tuple[float, ...] = (0.1, 0.5),
    ) -> None:
        super().__init__()
        check_sampler_engine(loss, sampling.engine)  # before any model loads
        self.automatic_optimization = False
        self.policy_cfg = policy
        self.sampling = sampling
        self.loss_cfg = loss
        self.optim_cfg = optim
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.rewards = rewards if rewards else [RewardSpec(fn=exact_match)]
        self.rewards_configured = bool(rewards)  # empty: a task that brings its own rewards may set them
        self.log_entropy = log_entropy
        self.eval_cfg = eval
        self.grad_buckets = check_edges(grad_buckets) if grad_buckets else None
        self.save_hyperparameters(ignore=["weighting", "rewards"])
        self.loss_fn = GRPOLoss(
            loss, self.weighting.placement, self.weighting.weight_kl, max_len=sampling.max_new_tokens
        )
        self.scorer = TokenScorer(sampling.temperature, optim.max_logits_mib)
        self.evaluator = HeldoutEvaluator(eval, sampling, self.rewards)
        self.plan: UpdatePlan | None = self._plan(batch_size) if batch_size else None  # layout errors: now
        self.backend: PlainBackend = PlainBackend(optim.grad_clip)  # the strategy's, from configure_model
        self._tokenizer = None  # loaded on first use (the data module's setup), the model in configure_model
        self.policy_model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.eval_history: list[tuple[int, float]] = []  # (step, held-out accuracy)
        self.reward_history: list[tuple[int, float]] = []  # (step, mean reward)
        self.last_stats: StepStats | None = None
        self.shuffle_generator = torch.Generator().manual_seed(0)  # the mini-batch order
        self.random_streams = RandomStreams(shuffle=self.shuffle_generator)  # checkpointed with the rest
        self.group_filter: GroupFilter | None = None  # dynamic sampling's, handed over by connect
        self.logged_keys: set[str] = set()  # every per-step metric logged so far (log_step)

    # ------------------------------------------------------------------ set-up

    @property
    def tokenizer(self):
        """The policy's tokenizer, loaded on first use (parsing a config downloads nothing)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy_cfg)
        return self._tokenizer

    def connect(self, task, group_filter: GroupFilter | None = None) -> None:
        """Hand over the task whose verifier scores held-out completions and, with dynamic sampling, which
        groups each RL step keeps (the data module's ``group_filter``); the CLI does this once.  A task with
        rewards of its own (``Task.rewards()``, e.g. an environment's rubric) supplies them when
        ``model.rewards`` is empty."""
        own = task.rewards() if not self.rewards_configured and hasattr(task, "rewards") else None
        if own:
            self.rewards = list(own)
            self.evaluator.rewards = list(own)
        self.evaluator.connect(task)
        self.group_filter = group_filter

    def _plan(self, prompts_per_step: int) -> UpdatePlan:
        world = trainer_world_size(self._trainer)
        return UpdatePlan.build(
            prompts_per_step, self.sampling.group_size, self.optim_cfg, self.loss_cfg, self.weighting, world
        )

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and self.evaluator.task is None:  # used without the CLI: connect here, once
            self.connect(dm.task, getattr(dm, "group_filter", None))
        if self.sampling.agent is not None:  # the tools' files (a corpus): fail before the model loads
            self.sampling.agent.check()
        if stage == "fit" and self.plan is not None:
            self.plan = self._plan(self.plan.sequences // self.plan.group_size)  # now with the world size

    def on_fit_start(self) -> None:
        # every process ran seed_everything with the same seed: give each its own sampling stream, after the
        # model is built (a tiny model's random init stays the run seed's) and before anything samples
        seed = os.environ.get("PL_GLOBAL_SEED")
        self.random_streams.derive_for_process(
            int(seed) if seed is not None else torch.initial_seed(), self.global_rank
        )
        if self.trainer.datamodule is not None and hasattr(self.trainer.datamodule, "check_positions"):
            positions = getattr(self.policy_model.config, "max_position_embeddings", None)
            self.trainer.datamodule.check_positions(self.sampling.max_new_tokens, positions)
        # every process brings its engine up here, together: vLLM's start, its first weight sync and ZeRO-3's
        # gathers are collectives, which a rollout one process skips (no held-out prompt) leaves unmatched
        engine_args = (self.policy_model, self.tokenizer, self.sampling)
        self.engine.start(*engine_args, precision=str(self.trainer.precision), local_rank=self.local_rank)

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference) here, so ZeRO-3 shards them while they are created."""
        if self.policy_model is not None:
            return
        self.backend = training_backend(
            self._trainer.strategy if self._trainer is not None else None,
            self.optim_cfg,
            self.manual_backward,
            self.tokenizer.eos_token_id,
        )
        self.policy_model = load_model(self.policy_cfg, self.tokenizer)
        self.backend.attach(
            self.policy_model, lambda: getattr(self.trainer.strategy.model, "optimizer", None)
        )
        # with LoRA the reference is the adapter-free base, reached by disabling the adapters
        if self.loss_cfg.beta > 0 and self.policy_cfg.lora is None:
            self.ref_model = load_model(self.policy_cfg, self.tokenizer).eval().requires_grad_(False)
        self.engine = make_engine(self.sampling)  # the run's one sampler (vLLM starts in on_fit_start)
        self.evaluator.use_engine(self.engine)

    def configure_optimizers(self):
        params = [p for p in self.policy_model.parameters() if p.requires_grad]
        opt = self.backend.optimizer_class()(
            params,
            lr=self.optim_cfg.lr,
            betas=tuple(self.optim_cfg.betas),
            weight_decay=self.optim_cfg.weight_decay,
        )
        warmup = self.optim_cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def configure_callbacks(self):
        return [HeldoutAccuracy()]

    def on_before_backward(self, loss: Tensor) -> None:
        self.backend.note_backward()

    @contextmanager
    def generation_weights(self):
        """Whole policy weights for sampling (ZeRO-3 gathers them; not for an engine that gathers them itself,
        vLLM's sync one parameter at a time), and the engine awake and in sync: every process enters it at
        the same points, since both can be collectives."""
        gather = None if self.engine.gathers_own_weights else self.policy_model
        with (
            self.backend.generation_weights(gather),
            self.engine.serving(self.policy_model, self.tokenizer, self.sampling),
        ):
            yield

    # ------------------------------------------------------------------ the RL step

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        g = self.sampling.group_size
        t0 = time.perf_counter()
        rollout = self.rollout(batch["prompt"], batch)
        t1 = time.perf_counter()
        rewards = compute_rewards(
            self.rewards,
            [p for p in batch["prompt"] for _ in range(g)],
            rollout.completions,
            reward_columns(batch, rollout.trainable_mask, rollout.truncated, g),
        )
        rollout, kept, groups = apply_dynamic_sampling(self.group_filter, rollout, rewards, g)
        t2 = time.perf_counter()
        adv = compute_advantages(kept.total, g, self.loss_cfg.advantage_scale, self.loss_cfg.advantage_eps)
        inputs = self.prepare(rollout, adv.to(self.device))
        t3 = time.perf_counter()
        update = self.update(rollout, inputs)
        t4 = time.perf_counter()
        self.log_step(rollout, rewards, update, StepTimings(t1 - t0, t2 - t1, t3 - t2, t4 - t3), groups)

    def rollout(self, prompts: list[str], batch: dict[str, list] | None = None) -> Rollout:
        """G sampled completions per prompt (multi-turn episodes with ``sampling.agent``) from the run's
        engine, with whole weights."""
        rows = batch_rows(batch) if batch else None
        with self.generation_weights():
            return generate_rollout(
                self.policy_model, self.tokenizer, prompts, self.sampling, rows=rows, engine=self.engine
            )

    def prepare(self, rollout: Rollout, adv: Tensor) -> UpdateInputs:
        """The update's inputs: trained-token mask, old / reference log-probs, the weighting's passes."""
        if self.plan is None or self.plan.sequences != len(adv):
            self.plan = self._plan(len(adv) // self.sampling.group_size)
        mask = rollout.trainable_mask
        if self.loss_cfg.mask_truncated:
            mask = mask * (~rollout.truncated).unsqueeze(1).to(mask.dtype)
        plan = self.plan
        old = (
            self.scorer.score_all(self.policy_model, rollout, plan.micro, plan.needs_entropy)
            if plan.needs_old_logp
            else None
        )
        ref = (
            self.scorer.reference(self.policy_model, self.ref_model, rollout, plan.micro)
            if self.loss_cfg.beta > 0
            else None
        )
        passes = (
            self.weighting.passes(old.logp, mask, old.entropy)
            if plan.multi_pass or plan.needs_entropy
            else [mask]
        )
        return UpdateInputs(adv, mask, old, ref, passes)

    def update(self, rollout: Rollout, inputs: UpdateInputs) -> UpdateStats:
        """Every optimiser update of one rollout batch; returns the summed statistics of this process."""
        stats = UpdateStats(buckets=GradBuckets(self.grad_buckets) if self.grad_buckets else None)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        for step in self.plan.steps(inputs, self.shuffle_generator, all_reduce_sum):
            for batch in step.micro_batches:
                self.train_micro_batch(rollout, batch, step.num_tokens, step.num_seqs, stats)
            stats.add_optimiser_step(self.optimiser_step(opt, sched))
        return stats

    def train_micro_batch(
        self, rollout: Rollout, batch: UpdateBatch, num_tokens: float, num_seqs: float, stats: UpdateStats
    ) -> None:
        """Forward, token weights, loss and backward of one micro-batch."""
        # ASPO's clip ranges read each token's entropy, so it is computed for ASPO even without log_entropy
        detached = self.log_entropy or self.loss_cfg.loss_type == "aspo"
        entropy = "grad" if self.loss_cfg.entropy_coef > 0 else ("detached" if detached else None)
        scores = self.scorer.score(
            self.policy_model, rollout, batch.idx, entropy, prob_sq=stats.buckets is not None
        )
        old_logp = old_logprobs(batch, scores)  # [b, T]; a single pass: the current ones, ratio exactly 1
        w = self.weighting.token_weights(  # [b, T]
            scores.logp.detach(), old_logp, batch.advantages, batch.mask, batch.old_entropy
        )
        sampler = rollout.sampler_logp[batch.idx] if rollout.sampler_logp is not None else None  # [b, T]
        out = self.loss_fn(batch, scores, w, sampler, num_tokens=num_tokens, num_seqs=num_seqs)
        # DDP averages gradients over processes; the normalisers are already global, so undo the mean
        self.manual_backward(out.loss * self.plan.world)
        stats.add_micro_batch(out, batch, scores, self.weighting.bounds)
        stats.add_grad_buckets(out, batch, scores)

    def optimiser_step(self, opt, sched) -> float:
        """Clip, step and schedule (the backend's way); returns the pre-clip gradient norm."""
        return self.backend.step(self.policy_model, opt, sched)

    def log_step(
        self, rollout: Rollout, rewards: RewardResult, update: UpdateStats, timings: StepTimings, groups=None
    ) -> None:
        stats = StepStats.collect(
            rewards,
            rollout,
            update.reduced(self.device),
            timings,
            group_size=self.sampling.group_size,
            lr=self.optimizers().param_groups[0]["lr"],
            bounded_weights=self.weighting.bounds is not None,
            kl=self.loss_cfg.beta > 0,
            groups=groups,
            rl_step=rl_steps_done(self.trainer) + 1,
            previous=self.last_stats,
            processes=ProcessReduce.current(self.device),
        )
        self.last_stats = stats
        n = len(rewards.total)
        metrics = stats.metrics()
        # Lightning writes a key logged at an earlier step again, with that step's value, at every later step
        # that does not log it: a metric this step has no value for (entropy, gradient shares when every
        # sequence was skipped) is logged as nan, never as a stale number
        metrics.update(dict.fromkeys(self.logged_keys - metrics.keys(), float("nan")))
        self.logged_keys |= metrics.keys()
        counts = {name: metrics.pop(name) for name in SUMMED_METRICS if name in metrics}
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        self.log_dict(counts, on_step=True, on_epoch=False, batch_size=n, sync_dist=True, reduce_fx="sum")
        self.log("reward", stats.reward, prog_bar=True, logger=False, batch_size=n)
        self.reward_history.append((self.global_step, stats.reward))

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        # validation samples too: keep it off the training streams, so that a resumed run (whose checkpoint
        # was written before the validation that followed it) and the value of val_check_interval do not
        # change what training draws (put back at the end of on_validation_epoch_end)
        self.random_streams.set_aside()
        self.evaluator.start()

    @torch.no_grad()
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        with self.generation_weights():  # every process runs as many batches (Lightning's sampler pads)
            self.evaluator.add_batch(
                self.policy_model, self.tokenizer, batch, keep_table=self.trainer.is_global_zero
            )

    def on_validation_epoch_end(self) -> None:
        metrics = self.evaluator.finish(all_gather_objects)
        acc = metrics.pop("val/accuracy", 0.0)
        self.log("val/accuracy", acc, prog_bar=True)
        self.log_dict({**metrics, "val/rl_step": float(rl_steps_done(self.trainer))})
        if self.trainer.state.fn == "fit":
            self.eval_history.append((self.global_step, acc))
        # Trainer.log_dir broadcasts rank 0's folder, a collective: every process asks, then rank 0 writes
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "val_samples"
        if self.evaluator.table and self.trainer.is_global_zero:
            save_sample_table(folder, self.global_step, self.evaluator.table)  # a failed write only warns
        self.random_streams.put_back()  # before any on_validation_end: a checkpoint saved there has them

    def evaluate_heldout(self, loader) -> HeldoutResult:
        """Greedy accuracy on a held-out loader, its prompts dealt out over processes and sampled from whole
        weights (gathered and released within this call); kept for the plot (``eval_history``)."""
        accuracy, prompts = self._greedy_accuracy(loader)
        self.eval_history.append((self.global_step, accuracy))
        return HeldoutResult(accuracy, prompts, self.evaluator.tool_calls)

    def _greedy_accuracy(self, loader) -> tuple[float, int]:
        """(accuracy, prompts) over every process, with whole weights inside this call only."""
        world = self.trainer.world_size
        rank = self.global_rank
        # every world-th prompt of each batch, not every world-th batch: with fewer batches than processes
        # a process would get none and skip the generation (vLLM's start, ZeRO-3's gathers) the others run
        shares = ({column: values[rank::world] for column, values in b.items()} for b in loader)
        mine = (share for share in shares if share["prompt"])
        with self.generation_weights():
            return self.evaluator.accuracy(
                self.policy_model,
                self.tokenizer,
                mine,
                lambda t: all_reduce_sum(t.float().to(self.device)).double().cpu(),
            )

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add every process's random state; leave out the frozen reference (rebuilt from the config)."""
        world = trainer_world_size(self._trainer)
        checkpoint["trgrpo"] = {
            "rng": self.random_streams.gather(world),
            "reward_history": self.reward_history,
            "eval_history": self.eval_history,
            "grad_norm": self.last_stats.grad_norm if self.last_stats else None,
        }
        for key in [k for k in checkpoint.get("state_dict") or {} if k.startswith("ref_model.")]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model shape before anything is loaded; queue the random state."""
        check_checkpoint_fits(checkpoint, self)
        state = checkpoint.get("state_dict")
        if state is not None and self.ref_model is not None:
            state.update({f"ref_model.{k}": v for k, v in self.ref_model.state_dict().items()})
        extra = checkpoint.get("trgrpo", {})
        self.reward_history = list(extra.get("reward_history", []))
        self.eval_history = list(extra.get("eval_history", []))
        self.last_stats = (
            StepStats(grad_norm=extra["grad_norm"]) if extra.get("grad_norm") is not None else None
        )
        if extra.get("rng"):
            self.random_streams.resume_from(extra["rng"], self.global_rank, trainer_world_size(self._trainer))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # restored here, right before the first step after resume, so that nothing run in between (held-out
        # evaluation, loader start-up) shifts the streams relative to the uninterrupted run
        self.random_streams.restore_pending()
