"""Export the trained policy as a Hugging Face model folder: weights, tokenizer and a model card.

The folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` / ``AutoTokenizer.from_pretrained``
and is what inference engines (vLLM, SGLang, TGI, llama.cpp's converter) take: ``config.json``,
``generation_config.json``, ``model.safetensors``, the tokenizer files, and ``README.md`` holding the
resolved training configuration.  LoRA runs export the adapter (``adapter_config.json`` +
``adapter_model.safetensors``, load with peft on top of the base model); with ``--merge_lora`` the folder
is instead a full model with the adapters merged in, and the adapter goes to ``adapter/`` inside it.

From a checkpoint (a ``.ckpt`` file, or the folder of shards DeepSpeed ZeRO-2/3 writes, consolidated on
the CPU with DeepSpeed's ``zero_to_fp32``), needing no GPU::

    python -m trgrpo.export --ckpt logs/run/version_0/checkpoints/last.ckpt --out exported/ [--merge_lora]
        [--dtype bfloat16] [--config logs/run/version_0/config.yaml]

At the end of fit, with the ``trgrpo.callbacks.HFExport`` callback; under ZeRO-3 the processes gather the
shards module by module into one state dict on rank 0 (no checkpoint is written, no optimizer state read).

A checkpoint file is read with ``torch.load(weights_only=True)``: tensors and plain data only, so a crafted
``.ckpt`` cannot run code (it is refused with an error).  A DeepSpeed folder is consolidated by DeepSpeed's
own reader, which unpickles: export only DeepSpeed folders you wrote.  The consolidated checkpoint is
scratch in a hidden folder next to the output, never in ``/tmp``, and one a killed export left is replaced
by the next.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from trgrpo.config import LossConfig, OptimConfig
from trgrpo.evaluation import EvalConfig
from trgrpo.policy import (
    DTYPES,
    LoraConfig,
    PolicyConfig,
    TinyModelConfig,
    load_model,
    load_tokenizer,
    word_level,
)
from trgrpo.rollout import SamplingConfig

CONFIG_CLASSES = [
    PolicyConfig,
    TinyModelConfig,
    LoraConfig,
    SamplingConfig,
    LossConfig,
    OptimConfig,
    EvalConfig,
]
"""Plain option dataclasses a checkpoint's hyper-parameters may hold (a module built without the CLI):
allowed by the weights-only reader, which rebuilds them without running any of their code."""

CARD = """---
library_name: {library}
tags: [trgrpo, grpo, rlvr, reinforcement-learning]
{base}---

# {title}

Policy trained with trgrpo (GRPO / TR-GRPO, reinforcement learning with verifiable rewards){step}.
{kind}

```python
{usage}
```

## Training configuration

```yaml
{config}```
"""

USAGE_FULL = """from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}")
tokenizer = AutoTokenizer.from_pretrained("{out}")"""

USAGE_CHARS = """from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
model = AutoModelForCausalLM.from_pretrained("{out}")
# the character tokenizer: AutoTokenizer would map this qwen2 folder to Qwen2's own tokenizer class
tokenizer = PreTrainedTokenizerFast.from_pretrained("{out}")"""

USAGE_ADAPTER = (
    "from peft import AutoPeftModelForCausalLM   # needs the base model named in adapter_config.json\n"
    'model = AutoPeftModelForCausalLM.from_pretrained("{out}")'
)


def plain(obj):
    """Dataclasses / namespaces / tuples -> YAML-safe dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "as_dict"):
        return plain(obj.as_dict())
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def model_card(
    config: dict | str,
    lora: bool,
    merged: bool,
    base: str | None,
    step: int | None,
    out: str,
    char_tokenizer: bool = False,
) -> str:
    text = config if isinstance(config, str) else yaml.safe_dump(plain(config), sort_keys=False)
    adapter_only = lora and not merged
    kind = (
        "LoRA adapter weights only."
        if adapter_only
        else "Full weights with the LoRA adapters merged in."
        if lora
        else "Full weights."
    )
    usage = USAGE_ADAPTER if adapter_only else USAGE_CHARS if char_tokenizer else USAGE_FULL
    return CARD.format(
        library="peft" if adapter_only else "transformers",
        base=f"base_model: {base}\n" if base else "",
        title=Path(out).name,
        step=f", {step} optimiser steps" if step is not None else "",
        kind=kind,
        usage=usage.format(out=out),
        config=text,
    )


def export_policy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    config: dict | str,
    merge_lora: bool = False,
    dtype: str | None = None,
    step: int | None = None,
) -> Path:
    """Write ``model`` (a transformers causal LM or a peft ``PeftModel``) as a Hugging Face folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = hasattr(model, "peft_config")
    if dtype is not None:
        model = copy.deepcopy(model).to(DTYPES[dtype])
    if lora:
        adapter_dir = out / "adapter" if merge_lora else out
        model.save_pretrained(adapter_dir)
        if merge_lora:
            copy.deepcopy(model).merge_and_unload().save_pretrained(out)
            tokenizer.save_pretrained(adapter_dir)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    card = model_card(config, lora, merge_lora, base, step, str(out), char_tokenizer=word_level(str(out)))
    (out / "README.md").write_text(card)
    return out


def policy_config(saved) -> PolicyConfig:
    """The PolicyConfig of a checkpoint (the CLI stores it as a plain dict)."""
    if isinstance(saved, PolicyConfig):
        return saved
    values = {f.name: saved[f.name] for f in dataclasses.fields(PolicyConfig) if f.name in saved}
    values["tiny"] = TinyModelConfig(**values.get("tiny") or {})
    values["lora"] = LoraConfig(**values["lora"]) if values.get("lora") else None
    return PolicyConfig(**values)


def load_checkpoint_file(ckpt: str | Path) -> dict:
    """A checkpoint file read with ``weights_only=True``; ValueError when it holds anything that would need
    arbitrary unpickling (code could run)."""
    try:
        with torch.serialization.safe_globals(CONFIG_CLASSES):
            return torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"--ckpt {ckpt}: refused: the file holds objects other than tensors and plain data, and "
            f"loading them could run code (torch.load weights_only=True): {str(err)[:500]}"
        ) from err


def _scratch_beside(path: Path) -> Path:
    """A hidden scratch folder next to ``path`` (the same filesystem; not the system temp folder)."""
    return path.with_name(f".{path.name}.consolidated.partial")


def read_checkpoint(ckpt: str | Path, scratch: str | Path | None = None) -> dict:
    """A Lightning checkpoint as a dict; a DeepSpeed folder of shards is consolidated to float32 first, in
    the hidden folder ``scratch`` (default: next to ``ckpt``), removed afterwards."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return load_checkpoint_file(ckpt)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    scratch = Path(scratch) if scratch is not None else _scratch_beside(ckpt)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        return convert_zero_checkpoint_to_fp32_state_dict(ckpt, scratch / "consolidated.ckpt")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _find_run_config(ckpt: Path) -> Path | None:
    """The config.yaml LightningCLI saved for the run (logs/<name>/<version>/config.yaml), if any."""
    for parent in list(ckpt.resolve().parents)[:3]:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    merge_lora: bool = False,
    dtype: str | None = None,
    config: str | Path | None = None,
) -> Path:
    """Rebuild the policy of a GRPOModule checkpoint from its hyper-parameters, load its weights, export."""
    checkpoint = read_checkpoint(ckpt, scratch=_scratch_beside(Path(out)))
    hparams = checkpoint.get("hyper_parameters", {})
    if "policy" not in hparams:
        raise ValueError(
            f"--ckpt {ckpt}: not a trgrpo GRPOModule checkpoint (no policy config in its hyper-parameters)"
        )
    policy_cfg = policy_config(hparams["policy"])
    tokenizer = load_tokenizer(policy_cfg)
    model = load_model(policy_cfg, tokenizer)
    prefix = "policy_model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"--ckpt {ckpt}: the weights do not fit the model its config describes: {err}"
        ) from err
    config_path = Path(config) if config else _find_run_config(Path(ckpt))
    card_config = config_path.read_text() if config_path else {"model": hparams}
    return export_policy(
        model,
        tokenizer,
        out,
        card_config,
        merge_lora=merge_lora,
        dtype=dtype,
        step=checkpoint.get("global_step"),
    )


@contextmanager
def _without_zero3_construction() -> Iterator[None]:
    """transformers builds plain models inside, although a ZeRO-3 run registered its config (it would
    otherwise build a sharded model, a collective, on rank 0 alone)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def gather_zero3_state_dict(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The whole weights of a ZeRO-3 sharded ``model``, gathered one module at a time onto every process
    and copied to CPU memory where ``keep`` (rank 0); ``{}`` elsewhere.  Every process must call it.

    The peak extra GPU memory is one module's full weights, and no optimizer state is touched (a
    checkpoint would write all of it first).  Tied weights appear under each of their names, as in
    ``state_dict()``; persistent buffers (never sharded) are copied as they are.
    """
    import deepspeed

    names: dict[int, list[str]] = {}  # id(param) -> every name it has (tied weights have several)
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    state: dict[str, torch.Tensor] = {}
    done: set[int] = set()
    for module in model.modules():  # the same order on every process: the gathers pair up
        own = [p for p in module.parameters(recurse=False) if id(p) not in done]
        if not own:
            continue
        done.update(id(p) for p in own)
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if keep:
                for param in own:
                    for name in names[id(param)]:
                        state[name] = param.detach().to("cpu", copy=True)
    if keep:
        state.update({name: buf.detach().cpu() for name, buf in model.named_buffers()})
    return state


def _plain_policy(module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) CPU copy of the module's policy holding ``state``, built as training built it."""
    with _without_zero3_construction():
        model = load_model(module.policy_cfg, module.tokenizer)
    wanted = model.state_dict()  # persistent buffers only: the gathered non-persistent ones are dropped
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
    return model


def export_from_trainer(
    trainer, module, out: str | Path, merge_lora: bool = False, dtype: str | None = None
) -> None:
    """Export the module's current policy; every process must call this.

    Under ZeRO-3 the weights exist only as shards: every process takes part in gathering them module by
    module into one state dict on rank 0 (no checkpoint, no optimizer state), and rank 0 writes the folder
    from a plain copy of the policy while the others wait at the closing barrier.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    out = Path(out)
    log_dir = trainer.log_dir  # a collective: read on every process
    run_config = Path(log_dir) / "config.yaml" if log_dir else None
    model = module.policy_model
    if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
        state = gather_zero3_state_dict(model, keep=trainer.is_global_zero)
        model = _plain_policy(module, state) if trainer.is_global_zero else None
    if trainer.is_global_zero:
        config = (
            run_config.read_text() if run_config and run_config.is_file() else {"model": dict(module.hparams)}
        )
        export_policy(
            model, module.tokenizer, out, config, merge_lora=merge_lora, dtype=dtype, step=trainer.global_step
        )
    trainer.strategy.barrier("HFExport")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m trgrpo.export", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ckpt", required=True, help="Lightning checkpoint file, or DeepSpeed checkpoint folder"
    )
    parser.add_argument("--out", required=True, help="folder to write the Hugging Face model to")
    parser.add_argument("--merge_lora", action="store_true", help="LoRA runs: write the merged full model")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as trained)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="run config.yaml for the model card (default: found "
        "next to the checkpoint, else the checkpoint's hyper-parameters)",
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(
        args.ckpt, args.out, merge_lora=args.merge_lora, dtype=args.dtype, config=args.config
    )
    print(f"exported to {out}")
    return out


if __name__ == "__main__":
    main()
