"""``RLStepProgressBar``: one bar for the whole fit reading ``RL step N/TOTAL``, on tiny real Trainer runs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from trgrpo.progress import RLStepProgressBar, default_progress_bar


class TwoBatchModule(L.LightningModule):
    """Two batches an epoch, so a run of several steps crosses epochs; ``updates`` optimiser steps a batch."""

    def __init__(self, updates: int = 1) -> None:
        super().__init__()
        self.layer, self.updates = torch.nn.Linear(2, 1), updates
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(self.updates):  # like several mini-batches per RL step: global_step counts each
            opt.zero_grad()
            loss = self.layer(batch[0]).pow(2).mean()
            self.manual_backward(loss)
            opt.step()
        self.log("reward", 0.5, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)


def fit(tmp_path, bar, updates: int = 1, **trainer_kwargs):
    trainer_kwargs = {"max_epochs": -1, **trainer_kwargs}  # as the CLI sets it
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[bar],
        **trainer_kwargs,
    )
    trainer.fit(TwoBatchModule(updates))
    return trainer


def test_bar_counts_rl_steps_across_epochs(tmp_path, capsys):
    bar = RLStepProgressBar()
    trainer = fit(tmp_path, bar, max_steps=3)
    assert trainer.current_epoch >= 1  # 3 steps of a 2-batch epoch: crossed into the second epoch
    text = str(bar.train_progress_bar)
    assert text.startswith("RL step 3/3 |") and "reward=0.5" in text, text
    out = capsys.readouterr().out
    assert out.lstrip("\r").startswith("RL step 0/3 |") and "RL step 3/3" in out
    assert "Epoch" not in out and "/?" not in out


def test_total_follows_updates_per_rl_step(tmp_path):
    # max_steps counts optimiser updates: 6 updates at 2 per RL step is 3 RL steps
    bar = RLStepProgressBar()
    trainer = fit(tmp_path, bar, updates=2, max_steps=6)
    assert trainer.global_step == 6
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)


def test_an_rl_step_limit_stops_the_fit_and_bounds_the_total(tmp_path):
    """Two updates per RL step: RLStepLimit(3) stops after 3 RL steps (6 updates), well before max_steps."""
    from trgrpo.callbacks import RLStepLimit

    bar = RLStepProgressBar()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        max_epochs=-1,
        max_steps=100,
        callbacks=[bar, RLStepLimit(3)],
    )
    trainer.fit(TwoBatchModule(updates=2))
    assert trainer.global_step == 6
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        RLStepLimit(0)


def test_without_max_steps_the_total_comes_from_the_epochs(tmp_path):
    bar = RLStepProgressBar()
    fit(tmp_path, bar, max_steps=-1, max_epochs=2)
    assert str(bar.train_progress_bar).startswith("RL step 4/4 |")


def test_default_progress_bar_keeps_the_configured_callbacks():
    plot = L.Callback()
    added = default_progress_bar({"callbacks": [plot]})["callbacks"]
    assert added[0] is plot and isinstance(added[1], RLStepProgressBar)
    assert isinstance(default_progress_bar({"callbacks": None})["callbacks"][0], RLStepProgressBar)
    assert default_progress_bar({"callbacks": [plot], "enable_progress_bar": False}) == {}
    assert default_progress_bar({"callbacks": [RichProgressBar()]}) == {}


class BarCLI(LightningCLI):
    """The override proposed for ``trgrpo.cli.TRGRPOCLI``."""

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return super().instantiate_trainer(**{**default_progress_bar(cfg.trainer), **kwargs})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], RLStepProgressBar),
        (["--trainer.callbacks=lightning.pytorch.callbacks.LearningRateMonitor"], RLStepProgressBar),
        (["--trainer.callbacks=lightning.pytorch.callbacks.RichProgressBar"], RichProgressBar),
        (["--trainer.enable_progress_bar=false"], type(None)),
    ],
)
def test_cli_default_survives_a_callbacks_list(tmp_path, args, expected):
    cli = BarCLI(
        BoringModel,
        BoringDataModule,
        run=False,
        save_config_kwargs={"overwrite": True},
        args=[f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *args],
    )
    assert type(cli.trainer.progress_bar_callback) is expected
    if args and "LearningRateMonitor" in args[0]:
        assert any(type(c).__name__ == "LearningRateMonitor" for c in cli.trainer.callbacks)


def test_resumed_run_continues_the_count(tmp_path):
    for max_steps, ckpt_path in [(3, None), (5, "last")]:
        bar = RLStepProgressBar()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=-1,
            max_steps=max_steps,
            logger=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[bar, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        )
        trainer.fit(TwoBatchModule(), ckpt_path=ckpt_path)
    assert bar.train_progress_bar.initial == 3 and str(bar.train_progress_bar).startswith("RL step 5/5 |")
