"""Callbacks: the supervised warm-start the demo uses, and the reward/accuracy plot.

``SupervisedWarmStart`` is a short, clearly labelled supervised fine-tune on the task's reference
completions before RL starts (a tiny random model starts near 0 accuracy; real RLVR starts from an
instruct model).  Its result is cached under ``cache_dir`` keyed by everything that determines it, so
reruns skip it.  ``RewardPlot`` writes ``reward_accuracy.png`` next to the logs at the end of fit.
``HFExport`` writes the policy as a Hugging Face model folder at the end of fit (``trgrpo.export``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class SupervisedWarmStart(L.Callback):
    """Supervised warm-start on the task's demonstrations, cached, run once before RL.

    Args:
        steps: optimiser steps of supervised training.
        lr: AdamW learning rate.
        batch_size: sequences per step.
        cache_dir: folder of cached warm-started weights (one file per distinct setting).
        seed: seed of the batch order.
    """

    def __init__(self, steps: int = 300, lr: float = 3e-3, batch_size: int = 64,
                 cache_dir: str = ".cache/trgrpo/warmstart", seed: int = 0) -> None:
        if steps < 0:
            raise ValueError(f"SupervisedWarmStart.steps must be >= 0, got {steps}")
        self.steps, self.lr, self.batch_size, self.cache_dir, self.seed = steps, lr, batch_size, cache_dir, seed

    def _cache_path(self, module, rows: list[dict]) -> Path:
        key = {
            "policy": asdict(module.policy_cfg),
            "vocab": len(module.tokenizer),
            "rows": hashlib.sha256(json.dumps([[r["prompt"], module.trainer.datamodule.task.demonstration(r)]
                                               for r in rows]).encode()).hexdigest(),
            "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return Path(self.cache_dir) / f"warmstart-{digest}.pt"

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.steps == 0 or trainer.ckpt_path:
            return
        rows = trainer.datamodule.splits["train"]
        path = self._cache_path(pl_module, rows)
        model = pl_module.policy_model
        if path.exists():
            model.load_state_dict(torch.load(path, map_location=pl_module.device, weights_only=True))
            log.info("supervised warm-start: loaded cached weights from %s", path)
            return
        log.info("supervised warm-start: %d steps on task demonstrations (cached to %s)", self.steps, path)
        self._train(pl_module, rows)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)

    def _train(self, module, rows: list[dict]) -> None:
        tok, model, task = module.tokenizer, module.policy_model, module.trainer.datamodule.task
        texts = [(r["prompt"], task.demonstration(r)) for r in rows]
        texts = [(p, d) for p, d in texts if d is not None]
        if not texts:
            raise ValueError("SupervisedWarmStart: the task provides no demonstrations")
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        model.train()
        for step in range(self.steps):
            pick = torch.randint(len(texts), (self.batch_size,), generator=gen).tolist()
            loss = self._batch_loss(tok, model, [texts[i] for i in pick], module.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == self.steps - 1:
                log.info("supervised warm-start step %d/%d loss %.4f", step + 1, self.steps, loss.item())

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
    """Write ``reward_accuracy.png`` (train reward and held-out accuracy against step) to the log folder."""

    def __init__(self, filename: str = "reward_accuracy.png") -> None:
        self.filename = filename

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
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
        out = Path(trainer.log_dir or ".") / self.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"plot written to {out}", flush=True)


class HFExport(L.Callback):
    """Write the policy as a Hugging Face model folder at the end of fit (see ``trgrpo.export``).

    Args:
        dirpath: output folder (empty = ``hf_model`` in the run's log folder).
        merge_lora: LoRA runs: write the full model with the adapters merged (the adapter goes to ``adapter/``).
        dtype: cast the exported weights (float32, bfloat16, float16; empty = as trained).
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = False, dtype: str | None = None) -> None:
        self.dirpath, self.merge_lora, self.dtype = dirpath, merge_lora, dtype

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        from trgrpo.export import export_from_trainer

        out = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"
        export_from_trainer(trainer, pl_module, out, merge_lora=self.merge_lora, dtype=self.dtype)
        if trainer.is_global_zero:
            print(f"Hugging Face model written to {out}", flush=True)
