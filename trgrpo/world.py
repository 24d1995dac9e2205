"""How many processes train together, asked the two ways the package needs.

``is_distributed()`` says whether torch.distributed's default process group holds more than this process; it
guards every all-reduce and all-gather, so that one process, or a module used without a process group (tests,
scripts), skips the collectives.  ``trainer_world_size(trainer)`` is the Lightning trainer's count (devices x
nodes), 1 for a module or data module used without a trainer.

Pure: the trainer is only read, Lightning is not imported.
"""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group was started and other processes share it (collectives have peers)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def trainer_world_size(trainer) -> int:
    """``trainer.world_size``, or 1 without a trainer (``None``)."""
    return trainer.world_size if trainer is not None else 1
