"""Shared-prompt forward passes: each distinct prompt of a batch runs through the model once.

A GRPO batch holds G completions of every prompt.  Scoring them the plain way runs the model on
``[prompt; completion]`` for each of the G sequences, so every prompt position is computed G times, in the
forward and again in the backward.  Here each distinct prompt is run once with ``use_cache=True``, its
per-layer keys and values are indexed out to the rows that share it (an ``index_select``, differentiable,
so the prompt's gradient is the sum over its completions), and the completions run on top of that cache::

    prompt pass      [U, P]      -> logits of the last prompt position, cache [U, heads, P, hd] per layer
    completion pass  [B, T - 1]  -> logits of completion positions 0 .. T-2  (cache rows = prompt of each row)
    logits           [B, T, V]   =  [last prompt logit of the row's prompt ; completion logits]

The numbers equal the plain ``model(input_ids=[prompt; completion])`` forward up to float rounding (tested in
``tests/test_shared_prefix.py``), and the work on prompt tokens falls by a factor of G.  Models whose cache
is not a plain per-layer key/value cache, and gradient-checkpointed models (which do not return a cache),
take the plain forward.  No Lightning import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
import transformers
from torch import Tensor

from trgrpo.world import is_distributed


def model_cache(out):
    """The cache returned by a forward (``out.cache`` in transformers >= 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_layers(cache) -> list | None:
    """Per-layer objects with ``keys`` / ``values`` tensors [rows, heads, len, hd],
    or None if not that kind."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(
        isinstance(getattr(layer, "keys", None), Tensor)
        and isinstance(getattr(layer, "values", None), Tensor)
        for layer in layers
    ):
        return None
    if any(type(layer).__name__ != "DynamicLayer" for layer in layers):  # sliding-window, quantised, ...
        return None
    return list(layers)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (whose LoRA layers sit in it), else ``model`` itself."""
    get_base = getattr(type(model), "get_base_model", None)
    return get_base(model) if get_base is not None else model


def _checkpointed(model: torch.nn.Module) -> bool:
    model = unwrapped(model)  # a peft wrapper does not say; the model inside does
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The forward's name for the cache: ``cache`` from transformers 5, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    # wrappers that pass **kwargs through (PEFT) take the name of the installed transformers
    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def full_completion_logits(model: torch.nn.Module, ids: Tensor, attn: Tensor, prompt_len: int) -> Tensor:
    """The plain forward: [B, P + T] ids and mask -> [B, T, V] logits predicting each completion token."""
    ids, attn = ids[:, :-1], attn[:, :-1]  # the last token predicts nothing that is scored
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    t = ids.shape[1] + 1 - prompt_len
    return model(
        input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=False, logits_to_keep=t
    ).logits


def agree_across_processes(ok: bool, device: torch.device | str) -> bool:
    """``ok`` on every process (one all-reduce; ``ok`` itself without a process group)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def completion_logits(
    model: torch.nn.Module,
    ids: Tensor,
    attn: Tensor,
    prompt_len: int,
    agree: Callable[[bool, torch.device], bool] = agree_across_processes,
) -> Tensor:
    """[B, P + T] left-padded prompts + completions -> [B, T, V] logits, each distinct prompt run once.

    Falls back to :func:`full_completion_logits` when no prompt repeats, when the model is gradient
    checkpointed, or when its cache is not a plain key/value cache.  Which way is taken is agreed by every
    process (``agree``): the shared way runs two forwards, the plain way one, and under ZeRO-3 each forward
    gathers every layer's weights with all processes, so a process whose own batch (a completion budget cut
    to one token, no repeated prompt) chose the other way would leave its peers waiting in a gather forever.
    """
    p = prompt_len
    t = ids.shape[1] - p
    prompts = torch.cat([ids[:, :p], attn[:, :p]], dim=1)  # the mask too: pad may equal a real token id
    uniq, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    shared = uniq.shape[0] < ids.shape[0] and t >= 2 and not _checkpointed(model)
    if not agree(shared, ids.device):
        return full_completion_logits(model, ids, attn, p)
    prompt_ids, prompt_attn = uniq[:, :p], uniq[:, p:]
    positions = (prompt_attn.cumsum(-1) - 1).clamp(min=0)
    first = model(
        input_ids=prompt_ids,
        attention_mask=prompt_attn,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    layers = cache_layers(model_cache(first))
    if layers is None:  # the model's class decides this: the same on every process
        return full_completion_logits(model, ids, attn, p)
    cache = model_cache(first)
    for layer in layers:  # [U, heads, P, hd] -> [B, heads, P, hd]; the backward sums over the G rows
        layer.keys = layer.keys.index_select(0, inverse)
        layer.values = layer.values.index_select(0, inverse)
    attn = attn[:, :-1]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, p:]
    rest = model(
        input_ids=ids[:, p:-1],
        attention_mask=attn,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=t - 1,
        **{_cache_kwarg(model): cache},
    ).logits  # [B, T - 1, V]
    return torch.cat([first.logits[:, -1:].index_select(0, inverse), rest], dim=1)


__all__ = [
    "agree_across_processes",
    "cache_layers",
    "completion_logits",
    "full_completion_logits",
    "model_cache",
    "unwrapped",
]
