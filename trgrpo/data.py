"""``PromptDataModule``: turns a task's rows into batches of prompts for rollouts and evaluation.

Each training batch is ``batch_size`` prompts (per process); the module samples ``group_size``
completions for each.  Prompts are rendered to text here: raw text for base models, or chat messages
through the tokenizer's chat template (with an optional system prompt) for instruct models.  Prompts
longer than ``max_prompt_tokens`` are dropped when the data is loaded, with a counted warning; they are
never truncated mid-question.  The training order is sharded over processes and checkpointed, so a resumed
run continues with the prompts an uninterrupted run would have drawn (``ResumableSampler``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from trgrpo.dynamic_sampling import DynamicSampling, GroupFilter
from trgrpo.rewards import collate_rows
from trgrpo.tasks import Task
from trgrpo.world import trainer_world_size

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """The training order: shuffled per epoch, sharded over processes, resumable mid-epoch.

    Epoch ``e`` is ``randperm(len(rows))`` seeded with ``seed + e`` (for one process, epoch 0 is the order
    ``DataLoader(shuffle=True)`` gives with that seed); process ``r`` of ``w`` takes every ``w``-th index from
    ``r``, so the ``k``-th batches of all processes together are the ``k``-th batch a single process with a
    ``w`` times larger batch would draw.
    Being a ``DistributedSampler`` already, Lightning does not replace it.

    ``progress()`` returns how many batches of the current epoch were trained; a checkpoint stores that
    count (not what the loader has prefetched), and the first epoch iterated after ``load_state_dict``
    skips those batches.
    """

    def __init__(
        self,
        rows: list,
        num_replicas: int,
        rank: int,
        seed: int,
        batch_size: int,
        progress: Callable[[], int],
    ) -> None:
        super().__init__(rows, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.progress = batch_size, progress
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] * self.batch_size :]
        self._resume = None
        return iter(indices)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.progress(),
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["batch_size"], state["num_replicas"], state["seed"]) != (
            self.batch_size,
            self.num_replicas,
            self.seed,
        ):
            log.warning(
                "resuming with a different data.batch_size, world size or data.seed than the checkpoint "
                "(%s): the data order restarts at the beginning of the epoch",
                state,
            )
            return
        self._resume = (state["epoch"], state["batches"])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position Lightning saves in checkpoints and restores on resume."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class PromptDataModule(L.LightningDataModule):
    """Prompts from a task, rendered and length-checked.

    Args:
        task: where rows come from (class_path of a ``trgrpo.tasks.Task``).
        batch_size: prompts per training step on each process (rollout batch = batch_size * group_size).
        val_batch_size: prompts per evaluation batch.
        chat_template: render prompts with the tokenizer's chat template (instruct models).
        system_prompt: system message prepended when ``chat_template`` is on.
        max_prompt_tokens: prompts longer than this are dropped at load time (0 = no limit).
        seed: seed of the training-order shuffle.
        dynamic_sampling: draw more prompts than ``batch_size`` per step and train on the ``batch_size``
            groups whose rewards differ (DAPO; ``trgrpo.dynamic_sampling``); empty = off.
    """

    def __init__(
        self,
        task: Task,
        batch_size: int = 8,
        val_batch_size: int = 64,
        chat_template: bool = False,
        system_prompt: str | None = None,
        max_prompt_tokens: int = 512,
        seed: int = 0,
        dynamic_sampling: DynamicSampling | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1, got {val_batch_size}")
        self.task = task
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        self.dynamic_sampling = dynamic_sampling
        self.splits: dict[str, list[dict]] = {}
        self.prompt_tokens: dict[str, list[int]] = {}  # split -> tokens of each kept prompt
        self._tokenizer_source: Callable[[], object] | None = None

    def connect(self, tokenizer) -> None:
        """Hand over the policy's tokenizer (the CLI does this once): the tokenizer itself, or a function
        returning it, called at ``setup`` (so a config that is only parsed loads nothing)."""
        self._tokenizer_source = (
            tokenizer if callable(tokenizer) and not hasattr(tokenizer, "encode") else (lambda: tokenizer)
        )

    def _tokenizer(self):
        if self._tokenizer_source is None:
            if self.trainer is None or self.trainer.lightning_module is None:
                raise RuntimeError(
                    "PromptDataModule: no tokenizer connected (connect(tokenizer) before setup)"
                )
            self.connect(lambda: self.trainer.lightning_module.tokenizer)  # Trainer.fit without the CLI
        return self._tokenizer_source()

    def task_columns(self) -> list[str]:
        """Names of the task columns rewards receive, read from the first training row (the task keeps its
        rows, so the data set is read once): the row's keys without ``prompt``, plus ``raw_prompt``."""
        rows = self.task.rows("train")
        if not rows:
            raise ValueError("data.task: the train split has no rows")
        return sorted({*rows[0], "raw_prompt"} - {"prompt"})

    def render(self, prompt, tokenizer) -> str:
        """A row's prompt as the exact text the policy continues."""
        if isinstance(prompt, str) and not self.chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if tokenizer.chat_template is None:
            raise ValueError("data.chat_template is on but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def load_split(self, split: str, tokenizer) -> list[dict]:
        """Rows of a split with ``prompt`` rendered to text; over-long prompts dropped and counted."""
        rows, dropped, lengths = [], 0, []
        for i, row in enumerate(self.task.rows(split)):
            prompt = row.get("prompt")
            if not prompt or not isinstance(prompt, (str, list)):
                raise ValueError(f"data.task: {split} row {i} has an empty or non-string prompt: {prompt!r}")
            text = self.render(prompt, tokenizer)
            length = len(tokenizer(text, add_special_tokens=False).input_ids)
            if self.max_prompt_tokens and length > self.max_prompt_tokens:
                dropped += 1
                continue
            lengths.append(length)
            rows.append(
                {**row, "prompt": text, "raw_prompt": prompt if isinstance(prompt, str) else str(prompt)}
            )
        self.prompt_tokens[split] = lengths
        if dropped:
            log.warning(
                "dropped %d of %d %s prompts longer than data.max_prompt_tokens=%d",
                dropped,
                dropped + len(rows),
                split,
                self.max_prompt_tokens,
            )
        if not rows:
            raise ValueError(f"data.task: the {split} split has no usable rows")
        return rows

    def check_positions(self, max_new_tokens: int, positions: int | None) -> None:
        """Warn when a prompt plus ``max_new_tokens`` outgrows the policy's ``positions``
        (``max_position_embeddings``): nothing fails, but those tokens sit at positions it never learned."""
        if not positions:
            return
        for split, lengths in self.prompt_tokens.items():
            over = sum(1 for n in lengths if n + max_new_tokens > positions)
            if over:
                log.warning(
                    "%d of %d %s prompts (longest %d tokens) plus model.sampling.max_new_tokens=%d exceed "
                    "the policy's %d positions (max_position_embeddings); lower data.max_prompt_tokens "
                    "(longer prompts are dropped) or model.sampling.max_new_tokens",
                    over,
                    len(lengths),
                    split,
                    max(lengths),
                    max_new_tokens,
                    positions,
                )

    def setup(self, stage: str) -> None:
        tok = self._tokenizer()
        for split in ("train", "val") if stage == "fit" else ("val",):
            if split not in self.splits:
                self.splits[split] = self.load_split(split, tok)
        if stage == "fit":
            self.check_prompt_count(len(self.splits["train"]))

    @property
    def draw_size(self) -> int:
        """Prompts drawn per training step on each process: ``batch_size``, more with dynamic sampling."""
        ds = self.dynamic_sampling
        return ds.draw_size(self.batch_size) if ds is not None else self.batch_size

    @property
    def group_filter(self) -> GroupFilter | None:
        """Which groups each RL step keeps with ``dynamic_sampling`` (None: all); the CLI hands it over."""
        ds = self.dynamic_sampling
        return ds.group_filter(self.batch_size) if ds is not None else None

    def check_prompt_count(self, rows: int) -> None:
        if rows < self.draw_size:
            what = (
                ""
                if self.dynamic_sampling is None
                else f" (x data.dynamic_sampling.oversample = {self.draw_size})"
            )
            raise ValueError(f"data.batch_size={self.batch_size}{what} exceeds the {rows} training prompts")
        world = trainer_world_size(self.trainer)
        if rows // world < self.draw_size:
            drawn = (
                "" if self.dynamic_sampling is None else f" (drawn: {self.draw_size}, data.dynamic_sampling)"
            )
            raise ValueError(
                f"world size {world} (trainer.devices x trainer.num_nodes) leaves {rows // world} of the "
                f"{rows} training prompts to each process, fewer than one batch of "
                f"data.batch_size={self.batch_size}{drawn} prompts (data.batch_size is per process; "
                "each process samples whole groups for its own prompts): lower data.batch_size or the "
                "number of processes, or add prompts"
            )

    def _loader(self, rows: list[dict], batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        # a private generator also keeps the loader from drawing its worker seed from the global RNG,
        # which would shift the sampling stream of a resumed run
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            rows,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=collate_rows,
            generator=gen,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world = trainer_world_size(trainer)
        rank = trainer.global_rank if trainer is not None else 0
        sampler = ResumableSampler(
            self.splits["train"],
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            batch_size=self.draw_size,
            progress=self._trained_batches,
        )
        return ResumableLoader(
            self.splits["train"],
            batch_size=self.draw_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate_rows,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _trained_batches(self) -> int:
        """Training batches of the current epoch that have been through a training step."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["val"], self.val_batch_size, shuffle=False, drop_last=False)
