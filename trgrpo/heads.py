"""The LM head in float32: the option ``model.policy.float32_lm_head``.

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


__all__ = ["Float32Head", "use_float32_head"]
