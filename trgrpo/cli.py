"""The command line: ``python -m trgrpo fit|validate --config CONFIG.yaml [--key value ...]``.

Built on LightningCLI (jsonargparse): every constructor argument of ``GRPOModule`` (``--model.*``),
``PromptDataModule`` (``--data.*``) and ``Trainer`` (``--trainer.*``) is an option, documented from the
docstrings in ``--help``; ``--print_config`` prints a complete YAML that loads back.  Strategy fragments
(DDP, DeepSpeed ZeRO) compose with a second ``--config`` (docs/scaling.md); an unknown strategy name, or a
DeepSpeed fragment on a machine without CUDA, is refused at start-up naming the fragment (``check_strategy``).
``data.batch_size`` is linked to the module (its update layout is checked when it is built); the tokenizer,
the task's verifier and the dynamic-sampling filter are handed over once after instantiation; and an integer
``val_check_interval`` counts RL steps across epochs (``check_val_every_n_epoch`` set to null).

``fit`` first prints the run's plan (``trgrpo.plan``: world size, prompts and completions per RL step per
process and over all processes, RL steps, memory per GPU by part) computed from the parsed config, and refuses
a configuration whose estimate exceeds the GPU's memory, naming the keys to change; ``--print_plan`` stops
after it (before the strategy check, so a GPU fragment's plan prints on a laptop; ``--plan_gpu_gib`` sets the
GPU to compare with). Before any model is loaded, ``fit`` also checks what would otherwise fail late: every
reward against the columns of one task row (``trgrpo.rewards.check_rewards``), that the log and checkpoint
folders are writable, and it warns when ``val_check_interval`` or a checkpoint's ``every_n_train_steps``
exceeds ``max_steps`` (nothing would happen during training). Checkpoints load with ``weights_only``
(``torch.load(weights_only=True)``: a checkpoint cannot run code; ``--weights_only=false`` opts out for a
checkpoint you trust). SIGTERM stops a run promptly with a resumable checkpoint
(``trgrpo.checkpointing.SigtermHandler``) and the process exits with status 143 (``EXIT_SIGTERM``).

On resume (``--ckpt_path``) the configuration given is the one that runs and is saved: a checkpoint's
hyper-parameters never replace it, settings that cannot change are refused before training
(``check_checkpoint_fits``), and the optimiser keeps this run's learning rate
(``ConfiguredOptimizerSettings``).
A log folder used by a live run, or holding an earlier run's logs when not resuming, is refused
(``LogFolderLock``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from jsonargparse import set_docstring_parse_options
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trgrpo.checkpointing import EXIT_SIGTERM, SigtermHandler, use_staged_checkpoint_io
from trgrpo.data import PromptDataModule
from trgrpo.log_folder import LogFolderLock
from trgrpo.module import GRPOModule
from trgrpo.plan import check_plan_fits, format_plan, make_plan
from trgrpo.progress import default_progress_bar
from trgrpo.resume import ConfiguredOptimizerSettings
from trgrpo.rewards import check_rewards
from trgrpo.threads import decode_threads

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "devices": 1,  # never "auto": the global batch scales with the device count, so it is always explicit
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
        parser.add_argument(
            "--print_plan",
            action="store_true",
            help="Print the run's plan (batch per step, memory per GPU by part); exit before a model loads",
        )
        parser.add_argument(
            "--plan_gpu_gib",
            type=float | None,
            default=None,
            help="GPU memory (GiB) the plan compares against; empty = the visible GPU's (none: not compared)",
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration as given: LightningCLI would load a checkpoint file's hyper-parameters over
        it, silently dropping the command line's values (and with ``torch.load(weights_only=True)`` whatever
        ``--weights_only`` says).  The config given is the one that runs and is saved; the checkpoint supplies
        the state, and what cannot change on resume is refused (``checkpointing.check_checkpoint_fits``)."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        decode_threads(0.0, 1)  # a bad TRGRPO_DECODE_THREADS is refused here, before any model loads
        if self.subcommand == "fit":  # the plan first: --print_plan works for GPU fragments on any machine
            announce_plan(cfg)
        check_strategy(cfg.trainer.strategy, [str(p) for p in cfg.get("config") or []])
        trainer = cfg.trainer
        if isinstance(trainer.val_check_interval, int) and trainer.check_val_every_n_epoch == 1:
            # an RL run is bounded by max_steps, not epochs:
            # count val_check_interval in RL steps across epochs
            trainer.check_val_every_n_epoch = None
        if "weights_only" in cfg and cfg.weights_only is None:
            # --ckpt_path loads tensors and plain data only: a checkpoint runs no code
            cfg.weights_only = True

    def instantiate_trainer(self, **kwargs):
        # the RL-step bar by default: added to a YAML callbacks list, never replacing it; a configured
        # progress bar or enable_progress_bar: false wins
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return super().instantiate_trainer(**{**default_progress_bar(cfg.trainer), **kwargs})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise ValueError(union_error(str(err))) from None
        # hand each side what it needs once: the tokenizer (loaded at setup), the held-out verifier and
        # which groups each RL step keeps (dynamic sampling)
        self.datamodule.connect(lambda: self.model.tokenizer)
        self.model.connect(self.datamodule.task, self.datamodule.group_filter)
        self.sigterm = SigtermHandler()
        self.trainer.callbacks.append(self.sigterm)
        self.trainer.callbacks.append(ConfiguredOptimizerSettings())  # resume: this run's lr, not the ckpt's
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        resuming = self.subcommand == "fit" and bool(cfg.get("ckpt_path"))
        self.log_lock = LogFolderLock(resuming)  # taken in before_fit / before_validate
        use_staged_checkpoint_io(self.trainer.strategy)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            with self.sigterm.installed():
                super()._run_subcommand(subcommand)
        finally:
            self.log_lock.release()

    def before_fit(self) -> None:
        """Checks that need the built objects but no model (the tokenizer and the model load later)."""
        check_rewards(self.model.rewards, self.datamodule.task_columns())
        check_run_length(self.trainer)
        check_output_folders(self.trainer)
        self.log_lock.acquire(self.trainer)

    def before_validate(self) -> None:
        check_output_folders(self.trainer)
        self.log_lock.acquire(self.trainer)


def _gpu_memory(cfg) -> tuple[int, int | None]:
    """(visible GPUs, one GPU's memory in bytes): ``--plan_gpu_gib`` wins; no CUDA query for fork strategies
    (a CUDA context made here would break the forked processes)."""
    given = int(cfg.plan_gpu_gib * 2**30) if cfg.plan_gpu_gib else None
    if not torch.cuda.is_available():
        return 0, given
    count = torch.cuda.device_count()
    if given or "fork" in str(cfg.trainer.strategy):
        return count, given
    # this process's own GPU (a launched process trains on cuda:LOCAL_RANK), never another's
    local = min(int(os.environ.get("LOCAL_RANK", 0)), count - 1)
    return count, torch.cuda.get_device_properties(local).total_memory


def announce_plan(cfg) -> None:
    """Print the plan on the first process, refuse a plan that cannot fit, stop here with ``--print_plan``."""
    visible, memory = _gpu_memory(cfg)
    plan = make_plan(cfg.trainer, cfg.model, cfg.data, visible_gpus=visible, device_bytes=memory)
    if rank_zero_only.rank == 0:
        print(format_plan(plan), flush=True)
    warning = check_plan_fits(plan)
    if warning:
        log.warning(warning)
    if cfg.print_plan:
        raise SystemExit(0)


def union_error(message: str) -> str:
    """An optional class's own error out of jsonargparse's union report: ``weighting: TokenWeighting | None``
    fails both as the class (the message that names the key) and as None (an unrelated "Expected a
    <class 'NoneType'>"), and the report leads with neither.  Other messages come back unchanged."""
    if "Does not validate against any of the Union subtypes" not in message or "Errors:" not in message:
        return message
    errors = message.split("Errors:", 1)[1].split("\nGiven value", 1)[0]
    lines = [line.strip()[2:] for line in errors.splitlines() if line.strip().startswith("- ")]
    own = [line for line in lines if "NoneType" not in line]
    return "\n".join(own) if own else message


def check_run_length(trainer) -> None:
    """Warn, naming the key, when evaluation or checkpoint intervals exceed the run's length."""
    max_steps = trainer.max_steps
    if max_steps is None or max_steps < 0:
        return
    interval = trainer.val_check_interval
    if isinstance(interval, int) and interval > max_steps:
        log.warning(
            "trainer.val_check_interval=%d exceeds trainer.max_steps=%d: no held-out evaluation during "
            "training, only before and after it",
            interval,
            max_steps,
        )
    for callback in trainer.checkpoint_callbacks:
        every = getattr(callback, "_every_n_train_steps", 0) or 0
        if every > max_steps:
            log.warning(
                "%s every_n_train_steps=%d exceeds trainer.max_steps=%d: no checkpoint before the end of "
                "training",
                type(callback).__name__,
                every,
                max_steps,
            )


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create ``folder`` if needed and write and remove a file in it; ValueError naming ``key`` otherwise."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".trgrpo-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(
            f"{key}: cannot write to the folder {str(path)!r} ({exc.strerror or exc}); choose a "
            "writable folder"
        ) from exc


def check_output_folders(trainer) -> None:
    """The loggers' and checkpoint folders must be writable (local ones; remote are not checked)."""
    targets = [
        (getattr(lg, "save_dir", None), f"trainer.logger ({type(lg).__name__}).init_args.save_dir")
        for lg in trainer.loggers
    ]
    targets += [
        (cb.dirpath, f"trainer.callbacks ({type(cb).__name__}).init_args.dirpath")
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint)
    ]
    for folder, key in targets:
        if folder and "://" not in str(folder):
            check_writable(folder, key)


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
            raise ValueError(
                f"{_strategy_source(config_files)}: unknown trainer.strategy {strategy!r}; use a "
                f"fragment from configs/strategy/ or one of {sorted(known)}"
            )
        cls = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    elif isinstance(strategy, DeepSpeedStrategy):
        cls = type(strategy)
    else:
        module, _, name = str(getattr(strategy, "class_path", "")).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
    is_deepspeed = isinstance(cls, type) and issubclass(cls, DeepSpeedStrategy)
    if is_deepspeed and not getattr(cls, "runs_without_cuda", False) and not torch.cuda.is_available():
        raise ValueError(
            f"{_strategy_source(config_files)}: the DeepSpeed strategy needs CUDA GPUs, and none is "
            "visible here (torch.cuda.is_available() is False); on a CPU machine compose "
            "configs/strategy/ddp.yaml instead, or no strategy fragment at all"
        )


def check_config_syntax(argv: list[str]) -> None:
    """Parse every ``--config FILE`` once from the file itself, so a YAML syntax error names the file (the
    parser reads the text first and reports a ``"<unicode string>"``)."""
    paths = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except (OSError, UnicodeDecodeError):
            continue  # a missing or unreadable file: the parser's own message says so
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: not valid YAML: {exc}") from None


def main(args: list[str] | None = None, run: bool = True) -> TRGRPOCLI:
    """Entry point; ``args`` lets tests drive the real CLI in-process.
    ``compare`` goes to ``trgrpo.compare``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "compare":
        from trgrpo.compare import main as compare

        raise SystemExit(compare(argv[1:]))
    check_config_syntax(list(argv))
    set_docstring_parse_options(attribute_docstrings=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return TRGRPOCLI(
            GRPOModule,
            PromptDataModule,
            args=args,
            run=run,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except SIGTERMException as exc:  # Lightning's ends with status 0; a pre-empted run is not a finished one
        raise SystemExit(EXIT_SIGTERM) from exc
