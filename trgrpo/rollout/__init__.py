"""Rollouts: G sampled completions per prompt, laid out for the loss.

    base.py      the data types (``Rollout``, ``SamplingConfig``, ``VLLMConfig``), the ``RolloutEngine``
                 protocol
    engines.py   the ``fast`` and ``hf`` engines, ``make_engine`` (one per run) and ``generate_rollout``
    vllm.py      the ``vllm`` engine (optional extra)

The package's face is the data types only, so that the engines and the multi-turn loop
(``trgrpo.agent``), which both build on them, import it without a circle.
"""

from trgrpo.rollout.base import (
    EngineName,
    Rollout,
    RolloutEngine,
    SamplingConfig,
    VLLMConfig,
    assemble_rollout,
    completion_mask_from_ids,
    encode_prompts,
)

__all__ = [
    "EngineName",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMConfig",
    "assemble_rollout",
    "completion_mask_from_ids",
    "encode_prompts",
]
