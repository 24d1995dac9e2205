"""The command line: ``python -m trgrpo fit|validate --config CONFIG.yaml [--key value ...]``.

Built on LightningCLI (jsonargparse): every constructor argument of ``GRPOModule`` (``--model.*``),
``PromptDataModule`` (``--data.*``) and ``Trainer`` (``--trainer.*``) is an option, documented from the
docstrings in ``--help``; ``--print_config`` prints a complete YAML that loads back.  Strategy fragments
(DDP, DeepSpeed ZeRO) compose with a second ``--config``.
"""

from __future__ import annotations

import os

from jsonargparse import set_docstring_parse_options
from lightning.pytorch.cli import LightningCLI

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
