"""Rollouts: sample G completions per prompt and lay them out for the loss.

Layout of a rollout of N = num_prompts * G sequences (completions of one prompt contiguous)::

    input_ids       [N, P + T]   prompt left-padded to P, completion right-padded to T
    attention_mask  [N, P + T]   1 on real prompt and completion tokens (EOS included)
    completion_mask [N, T]       1 on completion tokens up to and including the first EOS
    truncated       [N]          True when no EOS was produced within max_new_tokens

Two sampling engines give the same tokens for the same random state: ``fast`` (``trgrpo.generation``:
one prefill per prompt shared by its G samples, a preallocated KV cache, a lean decode loop; Qwen2, Qwen3
and Llama-style models) and ``hf`` (``model.generate`` on the G-times-repeated prompts; any causal LM).
``fast`` falls back to ``hf`` for a model it does not support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from trgrpo.generation import fast_generation_supported, sample_completions


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    group_size: int = 8
    """G: completions sampled per prompt (>= 2: the advantage compares them)."""
    max_new_tokens: int = 256
    """Generation budget per completion; a completion that hits it is marked truncated."""
    temperature: float = 1.0
    """Sampling temperature (log-probs in the loss use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    engine: Literal["fast", "hf"] = "fast"
    """Sampler: "fast" (one prefill per prompt, preallocated KV cache, lean decode loop; Qwen2/Qwen3/Llama,
    falls back to "hf" for other models) or "hf" (``model.generate``; any causal LM). Same tokens for the
    same seed."""
    ignore_eos: bool = False
    """Never sample EOS, so every completion is max_new_tokens long (fixed-length benchmarks; marks every
    completion truncated). Equivalent to ``generate(min_new_tokens=max_new_tokens)``."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"model.sampling.group_size must be >= 2 (group advantages compare samples), got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"model.sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"model.sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"model.sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.engine not in ("fast", "hf"):
            raise ValueError(f"model.sampling.engine must be 'fast' or 'hf', got {self.engine!r}")


class Rollout(NamedTuple):
    input_ids: Tensor  # [N, P + T]
    attention_mask: Tensor  # [N, P + T]
    completion_mask: Tensor  # [N, T] float
    truncated: Tensor  # [N] bool
    prompt_len: int  # P
    completions: list[str]  # N decoded completions (special tokens removed)


def completion_mask_from_ids(completion: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """[N, T] generated ids -> ([N, T] mask up to and including the first EOS, [N] truncated)."""
    is_eos = completion == eos_token_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), completion.shape[1])  # [N]
    positions = torch.arange(completion.shape[1], device=completion.device)
    mask = positions.unsqueeze(0) <= first.unsqueeze(1)
    return mask.float(), ~has_eos


@torch.no_grad()
def generate_rollout(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingConfig,
    group_size: int | None = None,
    greedy: bool = False,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt (or one greedy completion with ``greedy``)."""
    g = 1 if greedy else (group_size or sampling.group_size)
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    was_training = model.training
    model.eval()
    try:
        if sampling.engine == "fast" and fast_generation_supported(model):
            completion = sample_completions(
                model, enc.input_ids, enc.attention_mask, g, sampling.max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                greedy=greedy, ignore_eos=sampling.ignore_eos,
            )  # [N, T]
        else:
            completion = _hf_generate(model, tokenizer, enc.input_ids.repeat_interleave(g, dim=0),
                                      enc.attention_mask.repeat_interleave(g, dim=0), sampling, greedy)
    finally:
        model.train(was_training)
    ids = enc.input_ids.repeat_interleave(g, dim=0)  # [N, P]
    attn = enc.attention_mask.repeat_interleave(g, dim=0)
    prompt_len = ids.shape[1]
    mask, truncated = completion_mask_from_ids(completion, tokenizer.eos_token_id)
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([ids, completion], dim=1),
        attention_mask=torch.cat([attn, mask.long()], dim=1),
        completion_mask=mask,
        truncated=truncated,
        prompt_len=prompt_len,
        completions=texts,
    )


def _hf_generate(model, tokenizer, ids: Tensor, attn: Tensor, sampling: SamplingConfig, greedy: bool) -> Tensor:
    """``model.generate`` on already repeated prompts [N, P]; returns the [N, T] generated ids."""
    gen_cfg = GenerationConfig(
        do_sample=not greedy,
        temperature=sampling.temperature if not greedy else None,
        top_p=sampling.top_p if not greedy else None,
        top_k=sampling.top_k if not greedy else None,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg)
    return out[:, ids.shape[1]:]
