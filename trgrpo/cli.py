"""The command line: ``python -m trgrpo fit|validate --config CONFIG.yaml [--key value ...]``.

Built on LightningCLI (jsonargparse): every constructor argument of ``GRPOModule`` (``--model.*``),
``PromptDataModule`` (``--data.*``) and ``Trainer`` (``--trainer.*``) is an option, documented from the
docstrings in ``--help``; ``--print_config`` prints a complete YAML that loads back.  Strategy fragments
(DDP, DeepSpeed ZeRO) compose with a second ``--config`` (docs/scaling.md); an unknown strategy name, or a
DeepSpeed fragment on a machine without CUDA, is refused at start-up naming the fragment (``check_strategy``).
``data.batch_size`` is linked to the module (its update layout is checked when it is built), the tokenizer
and the task's verifier are handed over once after instantiation, and an integer ``val_check_interval``
counts RL steps across epochs (``check_val_every_n_epoch`` set to null).
"""

from __future__ import annotations

import importlib
import os

import torch
import yaml
from jsonargparse import set_docstring_parse_options
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

from trgrpo.data import PromptDataModule
from trgrpo.module import GRPOModule

TRAINER_DEFAULTS = {
    "max_epochs": -1,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
}


class TRGRPOCLI(LightningCLI):
    """LightningCLI limited to the subcommands that make sense for RL training."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        # the update layout (mini/micro-batches in whole groups) is checked when the module is built
        parser.link_arguments("data.batch_size", "model.batch_size")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_strategy(cfg.trainer.strategy, [str(p) for p in cfg.get("config") or []])
        trainer = cfg.trainer
        if isinstance(trainer.val_check_interval, int) and trainer.check_val_every_n_epoch == 1:
            # an RL run is bounded by max_steps, not epochs: count val_check_interval in RL steps across epochs
            trainer.check_val_every_n_epoch = None

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # hand each side what it needs once: the tokenizer (loaded at setup) and the held-out verifier
        self.datamodule.connect(lambda: self.model.tokenizer)
        self.model.connect(self.datamodule.task)


def _strategy_source(config_files: list[str]) -> str:
    """The last config file that sets trainer.strategy (else the command line)."""
    for path in reversed(config_files):
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError:
            continue
        if isinstance(data, dict) and "strategy" in (data.get("trainer") or {}):
            return path
    return "--trainer.strategy"


def check_strategy(strategy, config_files: list[str]) -> None:
    """Fail at start-up, naming the config fragment, on an unknown strategy or DeepSpeed without CUDA."""
    if isinstance(strategy, str):
        known = {"auto", "ddp_spawn", *StrategyRegistry.available_strategies()}
        if strategy not in known:
            raise ValueError(f"{_strategy_source(config_files)}: unknown trainer.strategy {strategy!r}; use a "
                             f"fragment from configs/strategy/ or one of {sorted(known)}")
        cls = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    elif isinstance(strategy, DeepSpeedStrategy):
        cls = DeepSpeedStrategy
    else:
        module, _, name = str(getattr(strategy, "class_path", "")).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
    is_deepspeed = isinstance(cls, type) and issubclass(cls, DeepSpeedStrategy)
    if is_deepspeed and not torch.cuda.is_available():
        raise ValueError(f"{_strategy_source(config_files)}: the DeepSpeed strategy needs CUDA GPUs, and none is "
                         "visible here (torch.cuda.is_available() is False); on a CPU machine compose "
                         "configs/strategy/ddp.yaml instead, or no strategy fragment at all")


def main(args: list[str] | None = None, run: bool = True) -> TRGRPOCLI:
    """Entry point; ``args`` lets tests drive the real CLI in-process."""
    set_docstring_parse_options(attribute_docstrings=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return TRGRPOCLI(
        GRPOModule,
        PromptDataModule,
        args=args,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
