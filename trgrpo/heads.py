"""The LM head: in float32 (the option ``model.policy.float32_lm_head``), and set aside for one forward.

Under bf16 weights or bf16 autocast the last matmul, hidden state x head weight, rounds every logit to 8 bits
of mantissa before the softmax.  A token's log-probability then differs between the trainer and an inference
engine that computes its head in float32 (vLLM and most serving engines do) by more than the policy moves
in one update, and the importance ratio pi_theta / pi_sampler carries that noise.  Casting only the head's
inputs and weight to float32 removes it for the price of one [tokens, hidden] x [hidden, vocab] float32
matmul.

The head keeps its class's parameters and names (the class is swapped for a subclass of ``torch.nn.Linear``),
so checkpoints, exports, the vLLM weight push and DeepSpeed's parameter hooks see the same module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor


class Float32Head(torch.nn.Linear):
    """A ``Linear`` LM head computed in float32 whatever its weights' dtype and the autocast state;
    the logits come out float32 and the gradient reaches the weight in its own dtype."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


def use_float32_head(model: torch.nn.Module) -> None:
    """Make ``model``'s output embedding a :class:`Float32Head` in place; refuses a head that is not a
    plain ``Linear`` (quantised or otherwise wrapped heads compute their own way)."""
    head = model.get_output_embeddings()
    if type(head) is Float32Head:
        return
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            "model.policy.float32_lm_head: the model's output layer is "
            f"{type(head).__name__ if head is not None else 'missing'}, not a plain torch.nn.Linear; "
            "set float32_lm_head: false for this model"
        )
    head.__class__ = Float32Head


PLAIN_HEAD_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2", "smollm3"}
)
"""Model types whose logits are exactly ``lm_head(last hidden state)`` (no soft-capping or scaling after the
head), so the head may be applied outside the model's forward."""


def logits_over_budget(positions: int, vocab: int, max_logits_mib: float | None) -> bool:
    """Whether ``positions`` float32 logit rows of ``vocab`` pass ``max_logits_mib`` (None: never)."""
    return max_logits_mib is not None and positions * vocab * 4 > max_logits_mib * 2**20


class _HiddenStatesOut(torch.nn.Module):
    """Stands in for the LM head during one forward, so the model returns its last hidden states."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def output_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model``'s output embedding (its LM head); None for a model without one."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter is not None else None


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Module] | None:
    """(parent module, attribute name, head) of ``model``'s output embedding; None without one."""
    head = output_embedding(model)
    if head is None:
        return None
    for module in model.modules():
        for name, child in module.named_children():
            if child is head:
                return module, name, head
    return None


def head_vocab(head: torch.nn.Module) -> int:
    """The number of logits ``head`` makes per position (a Linear's, or a wrapped Linear's, out_features)."""
    size = getattr(head, "out_features", None)
    return int(size) if size is not None else int(head.weight.shape[0])


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds ``module``'s parameters in shards (gathered by its own hooks)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextmanager
def hidden_states_out(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, ``model``'s forward returns its last hidden states where it returned logits (the head is
    replaced by a pass-through, and put back on exit); yields the head, to be applied by the caller."""
    found = output_head(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no output embedding to set aside")
    parent, name, head = found
    setattr(parent, name, _HiddenStatesOut())
    try:
        yield head
    finally:
        setattr(parent, name, head)


__all__ = [
    "PLAIN_HEAD_MODELS",
    "Float32Head",
    "head_vocab",
    "hidden_states_out",
    "is_partitioned",
    "logits_over_budget",
    "output_embedding",
    "output_head",
    "use_float32_head",
]
