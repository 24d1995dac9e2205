"""The shape and parameter count of a causal LM from its configuration, without loading any weights.

The shape is read from ``config.json`` (a local folder, or the local Hugging Face cache of a hub id: no
download), from a GGUF file's converted folder or the GGUF metadata itself, or from the embedded tiny model's
settings (``model.policy.tiny``).  ``parameter_count`` counts a Qwen2 / Qwen3 / Llama-style decoder (the
architectures the package trains); ``trgrpo.plan`` turns it into memory per GPU.  No Lightning import.

    python -c "from trgrpo.model_shape import *; from trgrpo.policy import PolicyConfig as P
    print(parameter_count(read_model_shape(P())[0]))"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


class ModelShape(NamedTuple):
    """The parts of a causal LM's config the estimate needs (Hugging Face names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    model_type: str
    source: str  # where the shape was read


def parameter_count(shape: ModelShape) -> int:
    """Parameters of a Qwen2 / Qwen3 / Llama-style decoder (embeddings, attention, gated MLP, RMSNorms)."""
    h, q_width = shape.hidden_size, shape.num_attention_heads * shape.head_dim
    kv_width = shape.num_key_value_heads * shape.head_dim
    attention = h * q_width + 2 * h * kv_width + q_width * h  # q, k, v, o
    if shape.model_type == "qwen2":
        attention += q_width + 2 * kv_width  # Qwen2's q/k/v biases
    if shape.model_type == "qwen3":
        attention += 2 * shape.head_dim  # per-head q/k norms
    layer = attention + 3 * h * shape.intermediate_size + 2 * h  # gate, up, down; two norms
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return embeddings + shape.num_hidden_layers * layer + h  # + the final norm


def lora_parameter_count(shape: ModelShape, lora) -> int:
    """Adapter parameters: r x (in + out) for each adapted projection of each layer."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    sizes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    targets = sizes if lora.target_modules == "all-linear" else lora.target_modules
    per_layer = sum(lora.r * sum(sizes[name]) for name in targets if name in sizes)
    return shape.num_hidden_layers * per_layer


def shape_from_config(config: dict, source: str) -> ModelShape:
    """A ``config.json`` dict -> ModelShape."""
    heads = config["num_attention_heads"]
    return ModelShape(
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        model_type=str(config.get("model_type", "")),
        source=source,
    )


def _tiny_shape(tiny) -> ModelShape:
    from trgrpo.policy.chartokenizer import build_char_tokenizer

    config = {
        "hidden_size": tiny.hidden_size,
        "num_hidden_layers": tiny.num_hidden_layers,
        "num_attention_heads": tiny.num_attention_heads,
        "intermediate_size": tiny.intermediate_size,
        "vocab_size": len(build_char_tokenizer()),  # the tiny model's vocabulary is the character tokenizer's
        "tie_word_embeddings": True,
        "model_type": "qwen2",
    }
    return shape_from_config(config, "model.policy.tiny")


def _gguf_shape(path: Path) -> ModelShape:
    """The shape from a GGUF file's metadata (the tensors are not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    config = {
        "hidden_size": field(f"{arch}.embedding_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": field(f"{arch}.attention.head_count"),
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "vocab_size": len(field("tokenizer.ggml.tokens") or []),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "model_type": arch,
    }
    return shape_from_config(config, f"{path} (GGUF metadata)")


def _config_file(source: str, gguf_file: str | None) -> Path | None:
    """The config.json (or GGUF file) describing ``source`` on this machine, without downloading; None."""
    from trgrpo.policy.sources import cache_dir, gguf_path, is_complete, is_gguf, resolve_package

    source = resolve_package(source, "model.policy.name_or_path")
    if is_gguf(source, gguf_file):
        path = gguf_path(source, gguf_file, "model.policy.name_or_path")
        if path is None:
            return None
        converted = cache_dir(path) / "config.json"
        return converted if is_complete(cache_dir(path)) else path
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser() / "config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")  # the local hub cache only: no network
    return Path(cached) if isinstance(cached, str) else None


def read_model_shape(policy) -> tuple[ModelShape | None, str]:
    """The policy's shape without loading weights, or (None, why it is unknown)."""
    if not policy.name_or_path:
        return _tiny_shape(policy.tiny), ""
    try:
        path = _config_file(policy.name_or_path, policy.gguf_file)
    except (ValueError, OSError) as exc:
        return None, f"cannot locate it ({exc})"
    if path is None or not path.is_file():
        return None, f"no config.json of {policy.name_or_path!r} on this machine (it is downloaded at load)"
    if path.suffix == ".gguf":
        try:
            return _gguf_shape(path), ""
        except ImportError:
            return None, "reading GGUF metadata needs the 'gguf' package"
    try:
        return shape_from_config(json.loads(path.read_text()), str(path)), ""
    except (KeyError, ValueError) as exc:
        return None, f"{path} lacks a field the estimate needs ({exc})"
