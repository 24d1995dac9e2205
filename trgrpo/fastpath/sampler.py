"""Fast rollout sampling for Qwen2 / Qwen3 / Llama-style models: one prefill per prompt, a preallocated
KV cache and a lean decode loop.

``model.generate`` is general, and its generality costs on the small models and batches of RL rollouts:
every decoded token goes through cache objects, mask construction, logits-processor and stopping-criteria
plumbing, and a GRPO batch repeats the prompt G times, so the prompt is prefilled G times.  Here:

1. each distinct prompt is prefilled once by the model's own forward (any attention kernel, any rope);
2. its keys and values stay one copy per prompt; the completions' keys and values go to a cache
   preallocated at the final length (for a chunk of prompts whose cache fits a bound, below);
3. each decode step runs the decoder layers directly on the model's weights (one q/k/v matmul, rotary
   tables computed once for the whole rollout, cascade attention: the prompt's keys are read once per
   group, not once per sequence), then the same logits warpers and the draw ``torch.multinomial`` makes
   in ``generate``.

For the same random state the tokens match ``generate`` on the G-times-repeated prompts (greedy tokens are
identical; sampled ones too unless a float rounding difference moves a probability across the uniform draw,
see ``tests/test_generation.py``).

The completions' cache is ``N x layers x 2 x kv_heads x head_dim x max_new_tokens`` elements
(:func:`kv_cache_bytes`), 72 GiB for 512 sequences of 4096 tokens of a 3B Qwen2.5 in bfloat16, so it is never
allocated whole when it exceeds ``cache_bytes``: the prompts are decoded in chunks of whole groups whose cache
fits.  The tokens do not change with the chunking: each chunk replays the random stream from the rollout's
start and draws each step's noise for all N rows, as one chunk would (``torch.multinomial`` with one sample
is ``argmax(p / Exp(1) noise)``), keeping its own rows; the generator is left where one chunk leaves it.  The
price is the noise drawn once per chunk instead of once.

A peft LoRA model is decoded with its adapters' low-rank terms added to each adapted projection
(``trgrpo.fastpath.lora``: no merged copy, no parameter written).  Architectures and layers the decode loop
does not know fall back to ``generate`` (``fast_generation_refusal`` says why).  On the CPU a small decode
step runs on one torch thread (:func:`decode_step_flops`, ``trgrpo.threads.decode_threads``), restored after.
Pure torch + transformers, no Lightning import.

    python -c "from trgrpo.fastpath.sampler import fast_generation_supported; help(fast_generation_supported)"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from trgrpo.fastpath.lora import Projection, add_adapters, concatenated, is_lora, linear, projection, refusal
from trgrpo.fastpath.shared_prefix import cache_layers, model_cache, unwrapped
from trgrpo.heads import Float32Head
from trgrpo.threads import decode_threads, torch_threads

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


class _LayerWeights(NamedTuple):
    """Weights of one decoder layer, with q/k/v concatenated for one matmul."""

    ln1: Tensor  # [H]
    ln1_eps: float
    qkv: Projection  # [(nh + 2 nkv) * hd, H]
    q_norm: torch.nn.Module | None  # Qwen3 per-head norms
    k_norm: torch.nn.Module | None
    o: Projection  # [H, nh * hd]
    ln2: Tensor
    ln2_eps: float
    gate: Projection  # [I, H]
    up: Projection  # [I, H]
    down: Projection  # [H, I]
    act: torch.nn.Module
    scale: float  # attention softmax scale


def _decoder(model: torch.nn.Module):
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a causal LM (peft-wrapped or not),
    or None."""
    inner = getattr(unwrapped(model), "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    return inner if inner is not None and all(hasattr(inner, n) for n in needed) else None


def fast_generation_refusal(model: torch.nn.Module) -> str | None:
    """Why :func:`sample_completions` cannot decode ``model``, or None when it can: Qwen2/Qwen3/Llama with
    full attention whose projections, LM head and embedding are plain layers or plain LoRA layers over them
    (peft, any of them adapted; DoRA and other LoRA variants, quantised layers are refused)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        kind = getattr(cfg, "model_type", None)
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    dec, base = _decoder(model), unwrapped(model)
    if dec is None or not hasattr(base, "lm_head"):
        return "the model has no decoder stack (embed_tokens, layers, norm, rotary_emb) and lm_head"
    if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "pretraining_tp != 1 or partial rotary embeddings"
    for i, layer in enumerate(dec.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            part = attn if name[0] in "qkvo" else mlp
            why = refusal(getattr(part, name, None), f"layer {i} {name}", (torch.nn.Linear,))
            if why is not None:
                return why
        if getattr(attn, "sliding_window", None) is not None:
            return f"layer {i} uses sliding-window attention"
    head = base.lm_head
    why = refusal(head, "lm_head", (torch.nn.Linear, Float32Head))
    if why is None and (head.base_layer if is_lora(head) else head).bias is not None:
        why = "lm_head has a bias"
    return why or refusal(dec.embed_tokens, "embed_tokens", (torch.nn.Embedding,))


def fast_generation_supported(model: torch.nn.Module) -> bool:
    """True when :func:`sample_completions` can decode ``model`` (:func:`fast_generation_refusal` is None)."""
    return fast_generation_refusal(model) is None


def _layer_weights(layer) -> _LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    return _LayerWeights(
        ln1=layer.input_layernorm.weight,
        ln1_eps=layer.input_layernorm.variance_epsilon,
        qkv=concatenated(attn.q_proj, attn.k_proj, attn.v_proj),
        q_norm=getattr(attn, "q_norm", None),
        k_norm=getattr(attn, "k_norm", None),
        o=projection(attn.o_proj),
        ln2=layer.post_attention_layernorm.weight,
        ln2_eps=layer.post_attention_layernorm.variance_epsilon,
        gate=projection(mlp.gate_proj),
        up=projection(mlp.up_proj),
        down=projection(mlp.down_proj),
        act=mlp.act_fn,
        scale=attn.scaling,
    )


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # the same operations as the HF RMSNorm modules, so the numbers match
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (rotate-half convention) of x [N, heads, hd] with cos/sin [N, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Warpers:
    """The logits processing ``generate`` applies for these settings, in its order."""

    def __init__(
        self,
        temperature: float,
        top_k: int,
        top_p: float,
        eos_token_id: int,
        ignore_eos: bool,
        greedy: bool,
        pad_token_id: int = 0,
        stop: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.greedy, self.eos, self.ignore_eos = greedy, eos_token_id, ignore_eos
        self.pad, self.stop = pad_token_id, stop  # what a finished row emits; the stop-string check
        self.warpers = []
        if not greedy:
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def next_tokens(self, logits: Tensor, rows: slice, total: int) -> Tensor:
        """[n, V] float32 logits of rows ``rows`` of the ``total`` rollout rows -> [n] token ids.

        The noise is drawn for all ``total`` rows and sliced, so a chunk consumes the random stream exactly
        as the whole rollout would; for ``rows`` covering everything this is ``torch.multinomial``'s draw.
        """
        if self.ignore_eos:  # as MinNewTokensLengthLogitsProcessor does, before the warpers
            logits[:, self.eos] = -float("inf")
        if self.greedy:
            return logits.argmax(dim=-1)
        for warp in self.warpers:
            logits = warp(None, logits)
        probs = torch.softmax(logits, dim=-1)  # [n, V]
        noise = probs.new_empty(total, probs.shape[1]).exponential_(1)[rows]  # [n, V], Exp(1)
        return (probs / noise).argmax(dim=-1)


class _DecodeState(NamedTuple):
    prefix_keys: list[Tensor]  # per layer [U, nkv, P, hd]: each distinct prompt once
    prefix_values: list[Tensor]
    prefix_bias: Tensor | None  # [U, 1, 1, P] additive mask (-inf on prompt padding), None without padding
    keys: list[Tensor]  # per layer [N, nkv, T, hd]: the completions, filled step by step
    values: list[Tensor]
    cos: Tensor  # [N, T, 1, hd] rotary tables of the completion positions
    sin: Tensor


def _prefill(model, dec, prompt_ids: Tensor, prompt_mask: Tensor, g: int, budget: int):
    """Run the model once on each distinct prompt; returns ([N, V] first logits, the decode state)."""
    n = prompt_ids.shape[0] * g
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1].to(dtype=torch.float32).repeat_interleave(g, dim=0)  # [N, V]
    layers = cache_layers(model_cache(out))
    pk, pv = [layer.keys for layer in layers], [layer.values for layer in layers]  # [U, nkv, P, hd]
    keys = [k.new_empty(n, k.shape[1], budget, k.shape[3]) for k in pk]
    values = [v.new_empty(n, v.shape[1], budget, v.shape[3]) for v in pv]
    bias = None
    if not bool(prompt_mask.all()):
        bias = torch.zeros(prompt_mask.shape, dtype=pk[0].dtype, device=prompt_ids.device)
        bias = bias.masked_fill(prompt_mask == 0, -float("inf"))[:, None, None, :]
    start = prompt_mask.sum(-1).repeat_interleave(g, dim=0)  # [N] position of the first completion token
    pos = start.unsqueeze(1) + torch.arange(budget, device=prompt_ids.device)  # [N, T]
    cos, sin = dec.rotary_emb(pk[0], pos)  # [N, T, hd]
    return logits, _DecodeState(pk, pv, bias, keys, values, cos.unsqueeze(2), sin.unsqueeze(2))


def _attend(
    q: Tensor, pk: Tensor, pv: Tensor, bias: Tensor | None, k: Tensor, v: Tensor, scale: float
) -> Tensor:
    """One decode query per row over its prompt (shared by the G rows of a group) and its own completion.

    q [N, nh, hd]; pk, pv [U, nkv, P, hd]; bias [U, 1, 1, P] or None; k, v [N, nkv, t, hd] -> [N, nh * hd].
    The prompt keys are read once per group instead of once per row (cascade attention).
    """
    n, nh, hd = q.shape
    u, nkv, p = pk.shape[0], pk.shape[1], pk.shape[2]
    g, rep = n // u, nh // nkv
    q = q * scale
    # prompt part: the G rows (x rep query heads) of a group form one [G * rep, hd] block per kv head
    qg = q.view(u, g, nkv, rep, hd).permute(0, 2, 1, 3, 4).reshape(u, nkv, g * rep, hd)
    s_pre = torch.matmul(qg, pk.transpose(-1, -2))  # [U, nkv, G * rep, P]
    if bias is not None:
        s_pre = s_pre + bias
    s_pre = s_pre.view(u, nkv, g, rep, p).permute(0, 2, 1, 3, 4).reshape(n, nkv, rep, p)
    s_own = torch.matmul(q.view(n, nkv, rep, hd), k.transpose(-1, -2))  # [N, nkv, rep, t]
    # softmax in float32 as the eager attention of transformers does, for bfloat16 / float16 models
    probs = torch.softmax(torch.cat([s_pre, s_own], dim=-1), dim=-1, dtype=torch.float32).to(v.dtype)
    p_pre = probs[..., :p].reshape(u, g, nkv, rep, p).permute(0, 2, 1, 3, 4).reshape(u, nkv, g * rep, p)
    o_pre = torch.matmul(p_pre, pv).view(u, nkv, g, rep, hd).permute(0, 2, 1, 3, 4)  # [U, G, nkv, rep, hd]
    o_own = torch.matmul(probs[..., p:], v)  # [N, nkv, rep, hd]
    return (o_pre.reshape(n, nkv, rep, hd) + o_own).reshape(n, nh * hd)  # a view fails for one group (U = 1)


def _decode_step(
    dec,
    head: Projection,
    weights: list[_LayerWeights],
    state: _DecodeState,
    tokens: Tensor,
    t: int,
    heads: tuple[int, int, int],
    fp32_head: bool = False,
) -> Tensor:
    """Feed ``tokens`` [N] at completion position t; returns [N, V] float32 logits (``fp32_head``: the head's
    matmul in float32 outside any autocast, as ``trgrpo.heads.Float32Head`` computes it)."""
    nh, nkv, hd = heads
    n = tokens.shape[0]
    h = dec.embed_tokens(tokens)  # [N, H]
    cos, sin = state.cos[:, t], state.sin[:, t]  # [N, 1, hd]
    for i, w in enumerate(weights):
        kc, vc = state.keys[i], state.values[i]
        x = _rms_norm(h, w.ln1, w.ln1_eps)
        qkv = linear(x, w.qkv).view(n, nh + 2 * nkv, hd)
        q, k, v = qkv[:, :nh], qkv[:, nh : nh + nkv], qkv[:, nh + nkv :]
        if w.q_norm is not None:
            q, k = w.q_norm(q), w.k_norm(k)
        kc[:, :, t] = _rotate(k, cos, sin)
        vc[:, :, t] = v
        o = _attend(
            _rotate(q, cos, sin),
            state.prefix_keys[i],
            state.prefix_values[i],
            state.prefix_bias,
            kc[:, :, : t + 1],
            vc[:, :, : t + 1],
            w.scale,
        )
        h = h + linear(o, w.o)
        x = _rms_norm(h, w.ln2, w.ln2_eps)
        # gate and up stay two matmuls: one [H, 2I] matmul is slower on CPU at decode batch sizes
        up = linear(x, w.up)
        h = h + linear(w.act(linear(x, w.gate)) * up, w.down)
    h = _rms_norm(h, dec.norm.weight, dec.norm.variance_epsilon)
    if fp32_head:
        with torch.autocast(device_type=h.device.type, enabled=False):
            logits = F.linear(h.float(), head.weight)
    else:
        logits = F.linear(h.to(head.weight.dtype), head.weight)  # the head's own adapters see h as it comes
    return add_adapters(logits, h, head.adapters).to(torch.float32)


def kv_cache_bytes(
    config, sequences: int, tokens: int, element_bytes: int, prompts: int = 0, prompt_tokens: int = 0
) -> int:
    """Bytes of the keys and values of ``sequences`` x ``tokens`` (plus ``prompts`` x ``prompt_tokens``
    shared prompt positions) for a model config: layers x 2 (K and V) x kv_heads x head_dim per position."""
    nh = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    per_position = config.num_hidden_layers * 2 * nkv * hd * element_bytes
    return per_position * (sequences * tokens + prompts * prompt_tokens)


def decode_step_flops(config, rows: int, context: int) -> float:
    """Floating-point operations of one decode step of ``rows`` sequences attending to ``context`` positions
    (prompt + completion): 2 per weight of the layers and the LM head per row, plus the attention's two
    products.  What :func:`trgrpo.threads.decode_threads` compares to choose the decode loop's threads."""
    h, nh = config.hidden_size, config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or h // nh
    layer = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * config.intermediate_size
    weights = config.num_hidden_layers * layer + h * config.vocab_size
    attention = config.num_hidden_layers * 4 * nh * hd * context
    return float(rows * (2 * weights + attention))


def _cache_element_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes per cached key element: the autocast dtype when autocast is on, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type).itemsize
    return next(model.parameters()).dtype.itemsize


def prompts_per_chunk(
    model: torch.nn.Module, prompt_ids: Tensor, group_size: int, budget: int, cache_bytes: int | None
) -> int:
    """How many prompts (whole groups) to decode together so that their cache fits ``cache_bytes``.

    ValueError naming the keys when one group alone does not fit; None = no bound (one chunk)."""
    prompts, width = prompt_ids.shape
    if cache_bytes is None:
        return prompts
    elem = _cache_element_bytes(model, prompt_ids.device)
    per_prompt = kv_cache_bytes(model.config, group_size, budget, elem, 1, width)
    if per_prompt > cache_bytes:
        raise ValueError(
            f"the fast engine's KV cache for one group ({group_size} completions x {budget} tokens, "
            f"{per_prompt / 2**30:.2f} GiB) exceeds model.sampling.fast_cache_gib="
            f"{cache_bytes / 2**30:g}: raise model.sampling.fast_cache_gib, lower "
            "model.sampling.max_new_tokens or model.sampling.group_size, or use model.sampling.engine: vllm"
        )
    return max(1, min(prompts, cache_bytes // per_prompt))


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _Chunk(NamedTuple):
    """Where a chunk's rows sit in the rollout, and the decode settings every chunk shares."""

    rows: slice  # of the N = num_prompts * G completion rows
    total: int  # N
    heads: tuple[int, int, int]  # (query heads, kv heads, head dim)


def _decode_chunk(
    model, warpers: _Warpers, ids: Tensor, mask: Tensor, g: int, budget: int, chunk: _Chunk, ids_out
):
    """Prefill and decode one chunk of whole groups; ``ids_out`` [N, budget] receives its rows.
    Returns the number of steps decoded (= random draws made)."""
    dec = _decoder(model)
    logits, state = _prefill(model, dec, ids, mask, g, budget)
    weights = [_layer_weights(layer) for layer in dec.layers]
    lm_head = unwrapped(model).lm_head
    head = projection(lm_head)
    fp32_head = type(lm_head.base_layer if is_lora(lm_head) else lm_head) is Float32Head
    if fp32_head:
        head = head._replace(weight=head.weight.float())  # the hidden state follows it in the matmul
    out = ids_out[chunk.rows]  # [n, budget] a view
    unfinished = torch.ones(out.shape[0], dtype=torch.bool, device=ids.device)
    for t in range(budget):
        tokens = warpers.next_tokens(logits, chunk.rows, chunk.total)
        tokens = torch.where(unfinished, tokens, warpers.pad)
        out[:, t] = tokens
        unfinished &= tokens != warpers.eos
        if warpers.stop is not None:
            unfinished &= ~warpers.stop(out[:, : t + 1])
        if t + 1 == budget or not bool(unfinished.any()):
            return t + 1
        logits = _decode_step(dec, head, weights, state, tokens, t, chunk.heads, fp32_head)
    return budget


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    group_size: int,
    max_new_tokens: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    ignore_eos: bool = False,
    stop: Callable[[Tensor], Tensor] | None = None,
    cache_bytes: int | None = None,
) -> Tensor:
    """Sample ``group_size`` completions of each left-padded prompt.

    Args:
        model: a causal LM for which :func:`fast_generation_supported` is True (in eval mode).
        prompt_ids: [num_prompts, P] left-padded prompt ids; prompt_mask: [num_prompts, P].
        ignore_eos: EOS is never sampled (its logit is -inf), so every completion is ``max_new_tokens`` long.
        stop: ``[N, t]`` ids generated so far -> ``[N]`` bool, True where a sequence ends after its last token
            (a stop string of a multi-turn rollout); such a sequence is padded from then on, as after EOS.
        cache_bytes: bound on the KV cache of one chunk of prompts (None: all prompts in one chunk); the
            tokens are the same for any bound.
    Returns:
        [num_prompts * group_size, T] generated ids, completions of one prompt contiguous, ``pad_token_id``
        after a sequence's EOS; T <= max_new_tokens (the loop stops once every sequence has ended).
    """
    warpers = _Warpers(temperature, top_k, top_p, eos_token_id, ignore_eos, greedy, pad_token_id, stop)
    per_chunk = prompts_per_chunk(model, prompt_ids, group_size, max_new_tokens, cache_bytes)
    cfg, device = model.config, prompt_ids.device
    threads = torch.get_num_threads()
    if device.type == "cpu":  # small steps on one thread (trgrpo.threads.decode_threads says why)
        context = prompt_ids.shape[1] + max_new_tokens
        threads = decode_threads(decode_step_flops(cfg, per_chunk * group_size, context), threads)
    with torch_threads(threads):
        return _sample_chunks(model, prompt_ids, prompt_mask, group_size, max_new_tokens, warpers, per_chunk)


def _sample_chunks(model, prompt_ids, prompt_mask, group_size, max_new_tokens, warpers, per_chunk) -> Tensor:
    cfg = model.config
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    n, device = prompt_ids.shape[0] * group_size, prompt_ids.device
    out = torch.full((n, max_new_tokens), warpers.pad, dtype=torch.long, device=device)
    start, end_state, steps = _rng_state(device), None, 0
    for first in range(0, prompt_ids.shape[0], per_chunk):
        last = min(first + per_chunk, prompt_ids.shape[0])
        _set_rng_state(device, start)  # every chunk draws the noise one chunk would draw
        chunk = _Chunk(slice(first * group_size, last * group_size), n, (nh, nkv, hd))
        taken = _decode_chunk(
            model,
            warpers,
            prompt_ids[first:last],
            prompt_mask[first:last],
            group_size,
            max_new_tokens,
            chunk,
            out,
        )
        if taken > steps:  # the longest chunk made as many draws as one chunk would have
            steps, end_state = taken, _rng_state(device)
    if end_state is not None:
        _set_rng_state(device, end_state)
    return out[:, :steps]


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "decode_step_flops",
    "fast_generation_refusal",
    "fast_generation_supported",
    "kv_cache_bytes",
    "prompts_per_chunk",
    "sample_completions",
]
