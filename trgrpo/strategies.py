"""``CPUDeepSpeedStrategy``: DeepSpeed ZeRO-2/3 on CPU processes, for debugging and CI only.

Lightning's ``DeepSpeedStrategy`` refuses any accelerator but CUDA, while DeepSpeed itself has a CPU
accelerator (``DS_ACCELERATOR=cpu``) whose collectives run over gloo.  This subclass drops Lightning's CUDA
checks and hands DeepSpeed each process's real local rank, so that two CPU processes launched by Lightning
(``trainer.devices: 2``) shard, reduce and gather exactly as two GPUs would.  Nothing here is faster than
the plain strategies on a CPU: it exists so that the ZeRO code paths (sharded construction, gathered
generation, micro-batch accumulation, sharded checkpoints) run where no GPU is::

    DS_ACCELERATOR=cpu python -m trgrpo fit --config configs/demo.yaml \\
        --config configs/strategy/deepspeed_zero3.yaml --trainer.accelerator=cpu --trainer.devices=2 \\
        --trainer.precision=32-true --trainer.strategy.class_path=trgrpo.strategies.CPUDeepSpeedStrategy

The ``fit`` subcommand only (``validate`` builds an inference engine this class does not adapt).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


@contextmanager
def _without_shared_memory_collectives() -> Iterator[None]:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce when its process group starts (a
    compiler and a wait on first use); gloo's collectives give the same sums, so the build is skipped."""
    # by name: ``import deepspeed.comm.torch`` finds the torch module deepspeed.comm imported as ``torch``
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def _check_cpu_accelerator() -> None:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != "cpu":
        raise RuntimeError(
            f"CPUDeepSpeedStrategy needs DeepSpeed's CPU accelerator, but DeepSpeed chose {name!r}: set the "
            "environment variable DS_ACCELERATOR=cpu before starting the run"
        )


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes (CPU debugging and CI; takes every argument of the parent).

    Compose a DeepSpeed fragment and name this class with ``--trainer.strategy.class_path``; run with
    ``trainer.accelerator: cpu``, ``trainer.precision: 32-true`` and ``DS_ACCELERATOR=cpu``.
    """

    runs_without_cuda = True  # read by the CLI's start-up check, which refuses DeepSpeed without CUDA

    def setup_environment(self) -> None:
        _check_cpu_accelerator()
        DDPStrategy.setup_environment(self)  # the parent's CUDA check skipped; DDP's set-up calls ours below

    def setup_distributed(self) -> None:
        reset_seed()  # as every Lightning DDP process does
        self.set_world_ranks()
        with _without_shared_memory_collectives():
            self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # DeepSpeed reads the process's rank from device_rank (a CPU device has no index; -1 would make
        # every process rank 0 of a world of 1, and each would step on its own unreduced gradients)
        engine, opt, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, opt


__all__ = ["CPUDeepSpeedStrategy"]
