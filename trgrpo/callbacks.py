"""Callbacks: the supervised warm-start the demo uses, the reward/accuracy plot, export, an RL-step limit.

``SupervisedWarmStart`` is a short, clearly labelled supervised fine-tune on the task's reference
completions before RL starts (a tiny random model starts near 0 accuracy; real RLVR starts from an
instruct model).  Its result is cached under ``cache_dir`` keyed by everything that determines it, so
reruns skip it.  ``RewardPlot`` writes ``reward_accuracy.png`` next to the logs at the end of fit.
``HFExport`` writes the policy as a Hugging Face model folder at the end of fit (``trgrpo.export``).
``RLStepLimit`` ends the fit after N RL steps however many optimiser updates each makes (``trainer.max_steps``
counts updates); ``python -m trgrpo compare --rl_steps N`` adds it to every run.
``HeldoutAccuracy`` measures greedy held-out accuracy before and after RL (``GRPOModule`` adds it itself),
sampling with the run's own rollout engine (``model.sampling.engine``: fast, hf or vllm).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch

from trgrpo.checkpointing import write_atomically
from trgrpo.progress import rl_steps_done

log = logging.getLogger(__name__)


class SupervisedWarmStart(L.Callback):
    """Supervised warm-start on the task's demonstrations, cached, run once before RL.

    It reports on stdout (rank 0, flushed): a line when it starts, the mean loss about every tenth of
    the steps, a line when it ends with the cache path, or one line naming the cached weights it loads
    instead.  ``verbose`` left empty follows the trainer's progress bar (``trainer.enable_progress_bar:
    false`` silences it, as in the tests); the lines always go to the ``trgrpo.callbacks`` logger at INFO.

    Args:
        steps: optimiser steps of supervised training.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        cache_dir: folder of cached warm-started weights (one file per distinct setting).
        seed: seed of the batch order.
        verbose: print progress to stdout (true / false; empty = when the trainer shows a progress bar).
    """

    def __init__(
        self,
        steps: int = 300,
        lr: float = 3e-3,
        batch_size: int = 64,
        cache_dir: str = ".cache/trgrpo/warmstart",
        seed: int = 0,
        verbose: bool | None = None,
    ) -> None:
        if steps < 0:
            raise ValueError(f"SupervisedWarmStart.steps must be >= 0, got {steps}")
        self.steps = steps
        self.lr = lr
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.seed = seed
        self.verbose = verbose
        self._print = False

    def _cache_path(self, module, rows: list[dict]) -> Path:
        key = {
            "policy": asdict(module.policy_cfg),
            "vocab": len(module.tokenizer),
            "rows": hashlib.sha256(
                json.dumps(
                    [[r["prompt"], module.trainer.datamodule.task.demonstration(r)] for r in rows]
                ).encode()
            ).hexdigest(),
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(self.cache_dir) / f"warmstart-{digest}.pt"

    def _report(self, message: str) -> None:
        log.info(message)
        if self._print:
            print(message, flush=True)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # it trains the policy with its own optimiser, outside DeepSpeed: ZeRO-3's shards are not whole
        # weights it can step (the optimiser meets 0-sized tensors), so refuse before any model is built
        if stage == "fit" and self.steps and getattr(trainer.strategy, "zero_stage_3", False):
            raise ValueError(
                "trgrpo.callbacks.SupervisedWarmStart does not run under DeepSpeed ZeRO-3 (sharded weights): "
                "remove it from trainer.callbacks, set its steps to 0, or train with DDP"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.steps == 0 or trainer.ckpt_path:
            return
        shown = trainer.progress_bar_callback is not None if self.verbose is None else self.verbose
        self._print = shown and trainer.is_global_zero
        rows = trainer.datamodule.splits["train"]
        path = self._cache_path(pl_module, rows)
        model = pl_module.policy_model
        # one decision for all processes (a collective, on every one): a process that trained while another
        # loaded would run the training's collectives (ZeRO's gradient hooks) alone; the file must be on
        # every process's disk for any to load it
        if trainer.strategy.reduce_boolean_decision(path.exists(), all=True):
            model.load_state_dict(torch.load(path, map_location=pl_module.device, weights_only=True))
            self._report(
                f"supervised warm-start: using cached weights {path} (delete the file to train again)"
            )
            return
        self._report(
            f"supervised warm-start: {self.steps} steps on the task's demonstrations ({self.batch_size} "
            f"a step, lr {self.lr}) before RL; cached afterwards, so reruns skip it"
        )
        start = time.perf_counter()
        loss = self._train(pl_module, rows)
        if trainer.is_global_zero:
            # staged as .NAME.partial beside it: a killed save leaves no half file,
            # and the next one replaces it
            write_atomically(path, lambda partial: torch.save(model.state_dict(), partial))
        self._report(
            f"supervised warm-start: done in {time.perf_counter() - start:.0f}s, loss {loss:.4f}; "
            f"weights cached to {path}"
        )

    def _train(self, module, rows: list[dict]) -> float:
        """Run the supervised steps; returns the mean loss of the last reporting interval."""
        tok, model, task = module.tokenizer, module.policy_model, module.trainer.datamodule.task
        texts = [(r["prompt"], task.demonstration(r)) for r in rows]
        texts = [(p, d) for p, d in texts if d is not None]
        if not texts:
            raise ValueError("SupervisedWarmStart: the task provides no demonstrations")
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        every = max(1, self.steps // 10)
        zero = torch.zeros((), device=module.device)
        total, count, mean, start = zero, 0, float("nan"), time.perf_counter()
        model.train()
        for step in range(self.steps):
            pick = torch.randint(len(texts), (self.batch_size,), generator=gen).tolist()
            loss = self._batch_loss(tok, model, [texts[i] for i in pick], module.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total, count = total + loss.detach(), count + 1  # read (a device sync) once per report only
            if (step + 1) % every == 0 or step + 1 == self.steps:
                mean, total, count = (total / count).item(), zero, 0
                self._report(
                    f"supervised warm-start: step {step + 1:>{len(str(self.steps))}}/{self.steps}  "
                    f"loss {mean:.4f}  {time.perf_counter() - start:5.0f}s"
                )
        return mean

    @staticmethod
    def _batch_loss(tok, model, pairs, device) -> torch.Tensor:
        """Cross-entropy on the completion tokens (prompt tokens are not trained)."""
        seqs, labels = [], []
        for prompt, demo in pairs:
            p = tok(prompt, add_special_tokens=False).input_ids
            c = tok(demo, add_special_tokens=False).input_ids + [tok.eos_token_id]
            seqs.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lbl) in enumerate(zip(seqs, labels, strict=True)):
            ids[i, : len(s)], lab[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), torch.tensor(lbl), 1
        return model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=lab.to(device)).loss


class RewardPlot(L.Callback):
    """Write ``reward_accuracy.png`` (train reward and held-out accuracy against step) to the log folder.

    Drawn at the end of fit, after the final held-out evaluation, so the last accuracy point is on it.  The
    plot is optional: one that cannot be written (a full disk, a read-only folder) is a warning, not an error.
    """

    def __init__(self, filename: str = "reward_accuracy.png") -> None:
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        # Trainer.log_dir broadcasts rank 0's folder (a collective): every process asks, then rank 0 draws
        out = Path(trainer.log_dir or ".") / self.filename
        if not trainer.is_global_zero or not pl_module.reward_history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps, rewards = zip(*pl_module.reward_history, strict=True)
        ax.plot(steps, rewards, color="tab:blue", alpha=0.8, label="train/reward")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("mean reward", color="tab:blue")
        if pl_module.eval_history:
            ax2 = ax.twinx()
            es, acc = zip(*sorted(pl_module.eval_history), strict=True)
            ax2.plot(es, acc, "o-", color="tab:red", label="val/accuracy (greedy, held-out)")
            ax2.set_ylabel("held-out accuracy", color="tab:red")
            ax2.set_ylim(0, 1)
        ax.set_title(f"{type(pl_module.weighting).__name__}: reward and held-out accuracy")
        fig.tight_layout()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=120)
        except OSError as err:  # an optional artefact: a full disk or read-only folder must not fail the fit
            log.warning("reward plot not written to %s (%s)", out, err)
            return
        finally:
            plt.close(fig)
        print(f"plot written to {out}", flush=True)


class HFExport(L.Callback):
    """Write the policy as a Hugging Face model folder at the end of fit (see ``trgrpo.export``).

    Args:
        dirpath: output folder (empty = ``hf_model`` in the run's log folder).
        merge_lora: LoRA runs: write the full model with the adapters merged
            (the adapter goes to ``adapter/``).
        dtype: cast the exported weights (float32, bfloat16, float16; empty = as trained).
    """

    def __init__(
        self, dirpath: str | None = None, merge_lora: bool = False, dtype: str | None = None
    ) -> None:
        self.dirpath, self.merge_lora, self.dtype = dirpath, merge_lora, dtype

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        from trgrpo.export import export_from_trainer

        out = (
            Path(self.dirpath)
            if self.dirpath
            else Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"
        )
        export_from_trainer(trainer, pl_module, out, merge_lora=self.merge_lora, dtype=self.dtype)
        if trainer.is_global_zero:
            print(f"Hugging Face model written to {out}", flush=True)


class RLStepLimit(L.Callback):
    """Stop training after ``steps`` RL steps (rollout + update), whatever the optimiser updates per step.

    ``trainer.max_steps`` counts optimiser updates: Lopti makes two per RL step and several mini-batches or
    epochs make more, so at equal ``max_steps`` strategies would get different numbers of RL steps.  This
    callback counts RL steps instead (resumed runs included); set ``trainer.max_steps: -1`` or leave it
    larger.  The comparison tool (``python -m trgrpo compare --rl_steps N``) adds it to every run.

    Args:
        steps: RL steps after which the fit ends (>= 1).
    """

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"RLStepLimit: steps must be >= 1, got {steps}")
        self.rl_step_limit = steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if rl_steps_done(trainer) >= self.rl_step_limit:
            trainer.should_stop = True


class HeldoutResult(NamedTuple):
    """Greedy accuracy on the whole held-out split, as ``GRPOModule.evaluate_heldout`` returns it."""

    accuracy: float
    prompts: int  # held-out prompts scored, over every process
    tool_calls: float | None  # multi-turn rollouts: mean tool calls per answer; None otherwise

    def metrics(self, rl_step: int) -> dict[str, float]:
        """The logged values: ``val/accuracy``, ``val/rl_step``, multi-turn also ``val/tool_calls``."""
        metrics = {"val/accuracy": self.accuracy, "val/rl_step": float(rl_step)}
        if self.tool_calls is not None:
            metrics["val/tool_calls"] = self.tool_calls
        return metrics


class HeldoutAccuracy(L.Callback):
    """Greedy accuracy on the whole held-out split before RL and after it: logged as ``val/accuracy`` at
    those steps, kept for the plot, and printed as one ``before -> after`` line at the end of fit (with
    multi-turn rollouts a second line, the mean tool calls per answer, logged as ``val/tool_calls``).

    ``GRPOModule`` adds it itself (``configure_callbacks``) and does the evaluating (``evaluate_heldout``);
    it does nothing without a data module.
    """

    def __init__(self) -> None:
        self.before = HeldoutResult(float("nan"), 0, None)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.datamodule is not None:
            self.before = self._evaluate(trainer, pl_module, "before")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.datamodule is None:
            return
        after = self._evaluate(trainer, pl_module, "after")
        if trainer.is_global_zero:
            print(self.summary(after), flush=True)

    def _evaluate(self, trainer: L.Trainer, pl_module, when: str) -> HeldoutResult:
        """Evaluate through the module, then log the result at this step to every logger."""
        result = pl_module.evaluate_heldout(trainer.datamodule.val_dataloader())
        for logger in trainer.loggers:
            logger.log_metrics(result.metrics(rl_steps_done(trainer)), step=trainer.global_step)
            logger.save()
        calls = "" if result.tool_calls is None else f" ({result.tool_calls:.2f} tool calls per answer)"
        log.info("held-out accuracy %s RL: %.3f%s", when, result.accuracy, calls)
        return result

    def summary(self, after: HeldoutResult) -> str:
        """The ``before RL -> after RL`` line (and the tool-call line of multi-turn rollouts)."""
        before = self.before
        gain = after.accuracy - before.accuracy
        lines = [
            f"\nheld-out accuracy (greedy, {after.prompts} prompts never trained on): "
            f"before RL {before.accuracy:.3f} -> after RL {after.accuracy:.3f} ({gain:+.3f})"
        ]
        if after.tool_calls is not None and before.tool_calls is not None:
            lines.append(
                f"held-out tool calls per answer (greedy): before RL {before.tool_calls:.2f} -> "
                f"after RL {after.tool_calls:.2f}"
            )
        return "\n".join(lines)
