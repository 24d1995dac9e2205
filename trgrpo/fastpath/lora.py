"""The linear maps the fast decode loop reads: a plain ``Linear``, or a LoRA layer (peft) over one.

A peft LoRA layer computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` for each active adapter.
Generation runs in eval mode, where the dropout is the identity, so the decode loop computes exactly these
terms, in this order, from the layer's own tensors (:func:`linear`): no merged copy of the weights is made
and no parameter is written, so the trained adapters and the frozen base stay bit for bit what they were.
The extra work per token is two thin matmuls (rank r) per adapted projection.

LoRA layers are recognised by their attributes (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``,
``active_adapters``), so this module imports no peft.  What the loop cannot compute (a LoRA variant such as
DoRA, a quantised base layer, merged adapters that are disabled) is named by :func:`refusal`, and the
sampler leaves such a model to ``generate``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Adapter(NamedTuple):
    """One active LoRA adapter of a projection: adds ``B(A(x)) * scaling`` to output features ``rows``."""

    a: Tensor  # [r, in] lora_A's weight
    b: Tensor  # [out, r] lora_B's weight
    b_bias: Tensor | None  # lora_B's bias (peft's lora_bias)
    scaling: float
    dtype: torch.dtype | None  # the input is cast to it first (peft casts to lora_A's dtype); None: as is
    rows: slice | None  # the output features it adds to within a concatenated projection; None: all


class Projection(NamedTuple):
    """``x @ weight.T + bias`` plus the low-rank terms of its active adapters."""

    weight: Tensor  # [out, in]
    bias: Tensor | None
    adapters: tuple[Adapter, ...] = ()


def is_lora(module: torch.nn.Module) -> bool:
    """Whether ``module`` looks like a peft LoRA layer (over a Linear or an Embedding)."""
    return all(hasattr(module, n) for n in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


def _active(module: torch.nn.Module, table: str) -> list[str]:
    """The active adapters that ``module`` holds weights for (in ``table``: lora_A, lora_embedding_A)."""
    if module.disable_adapters or module.merged:  # merged: the base weight already holds the update
        return []
    return [name for name in module.active_adapters if name in getattr(module, table)]


def refusal(module: torch.nn.Module | None, name: str, base_types: tuple[type, ...]) -> str | None:
    """Why the decode loop cannot compute ``module`` (called ``name`` in the message), or None when it can:
    a module of one of ``base_types``, or a plain LoRA layer over one."""
    if module is not None and type(module) in base_types:
        return None
    kind = type(module).__name__ if module is not None else "missing"
    expected = " / ".join(t.__name__ for t in base_types)
    if module is None or not is_lora(module):
        return f"{name} is {kind}, not a plain {expected} or a LoRA layer over one"
    base = module.base_layer
    if type(base) not in base_types:
        return f"{name} is a LoRA layer over a {type(base).__name__} (quantised or wrapped), not a {expected}"
    if module.disable_adapters and module.merged:
        return f"{name} holds merged LoRA adapters that are disabled (peft would unmerge them first)"
    table = "lora_embedding_A" if isinstance(base, torch.nn.Embedding) else "lora_A"
    variants = getattr(module, "lora_variant", None) or {}
    dora = getattr(module, "use_dora", None) or {}  # peft before lora_variant
    if any(a in variants or dora.get(a) for a in _active(module, table)):
        return f"{name} uses a LoRA variant (DoRA or another), not plain LoRA"
    return None


def projection(module: torch.nn.Module, rows: slice | None = None) -> Projection:
    """The weight, bias and active adapters of a plain ``Linear`` or a LoRA layer over one (its output
    features placed at ``rows`` of a concatenated projection)."""
    if not is_lora(module):
        return Projection(module.weight, module.bias)
    base = module.base_layer
    cast = getattr(module, "cast_input_dtype_enabled", True)
    adapters = tuple(
        Adapter(
            module.lora_A[n].weight,
            module.lora_B[n].weight,
            module.lora_B[n].bias,
            module.scaling[n],
            module.lora_A[n].weight.dtype if cast else None,
            rows,
        )
        for n in _active(module, "lora_A")
    )
    return Projection(base.weight, base.bias, adapters)


def concatenated(*modules: torch.nn.Module) -> Projection:
    """One projection computing ``modules`` side by side (q, k and v in one matmul)."""
    parts, start = [], 0
    for module in modules:
        out = (module.base_layer if is_lora(module) else module).out_features
        parts.append(projection(module, slice(start, start + out)))
        start += out
    bias = None
    if any(p.bias is not None for p in parts):
        zeros = [p.weight.new_zeros(p.weight.shape[0]) for p in parts]
        bias = torch.cat([p.bias if p.bias is not None else z for p, z in zip(parts, zeros, strict=True)])
    adapters = tuple(a for p in parts for a in p.adapters)
    return Projection(torch.cat([p.weight for p in parts]), bias, adapters)


def add_adapters(out: Tensor, x: Tensor, adapters: tuple[Adapter, ...]) -> Tensor:
    """``out`` (the base layer's output for input ``x``) plus each adapter's ``B(A(x)) * scaling``, summed in
    the promoted dtype and returned in ``out``'s, as peft's forward does."""
    if not adapters:
        return out
    dtype = out.dtype
    for ad in adapters:
        xa = x if ad.dtype is None or x.dtype == ad.dtype else x.to(ad.dtype)
        delta = F.linear(F.linear(xa, ad.a), ad.b, ad.b_bias) * ad.scaling
        out = out.to(torch.promote_types(out.dtype, delta.dtype))
        if ad.rows is None:
            out = out + delta
        else:  # out is this step's own tensor (no autograd under generation): add in place to its rows
            out[..., ad.rows] += delta
    return out.to(dtype)


def linear(x: Tensor, proj: Projection) -> Tensor:
    """``x`` through ``proj``: the base matmul, then the adapters' low-rank terms."""
    return add_adapters(F.linear(x, proj.weight, proj.bias), x, proj.adapters)


__all__ = [
    "Adapter",
    "Projection",
    "add_adapters",
    "concatenated",
    "is_lora",
    "linear",
    "projection",
    "refusal",
]
