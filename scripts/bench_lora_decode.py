"""LoRA in the fast decode loop: the low-rank terms applied per token, against merging the adapters into the
base weights for the rollout and unmerging them after.

The fast sampler computes ``base(x) + B(A(x)) * scaling`` for every adapted projection at every decoded
token (``trgrpo/fastpath/lora.py``).  The alternative is peft's ``merge_adapter()`` before generation
(the loop then reads plain weights) and ``unmerge_adapter()`` after.  This script times, on one model:

- ``adapters``: one rollout of the LoRA model through the fast sampler (the low-rank terms in the loop);
- ``merged``: ``merge_adapter()``, the same rollout (the loop reads a merged layer as a plain one), then
  ``unmerge_adapter()``;
- ``merge + unmerge`` alone, the part of ``merged`` that is not decoding.

The tokens of the two rollouts are not compared here: merged weights round differently.  It also prints how
far the base weights are from where they started after one merge/unmerge cycle (float rounding: the base
would drift a little on every step it is merged, which the loop avoids by writing no weight).  Median of
``--repeats`` calls after a warm-up call, wall and CPU seconds, the settings of ``scripts/bench_vs_trl.py``'s
``smollm2_lora`` size.

    python scripts/bench_lora_decode.py                   # SmolLM2-135M-Instruct, LoRA r 16 on all linears
    python scripts/bench_lora_decode.py --model ''        # the demo's tiny model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_rollout import add_rollout_flags, addition_prompts, fixed_length_sampling  # noqa: E402

import trgrpo  # noqa: E402,F401  (the OpenMP defaults the trainer runs with, before torch loads)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_flags(ap)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.prompts < 1 or args.group < 1 or args.tokens < 1 or args.repeats < 1 or args.rank < 1:
        sys.exit("--prompts, --group, --tokens, --rank and --repeats must be at least 1")

    import torch

    from trgrpo.policy import LoraConfig, PolicyConfig, load_model, load_tokenizer
    from trgrpo.rollout.engines import generate_rollout

    cfg = PolicyConfig(name_or_path=args.model or None, lora=LoraConfig(r=args.rank, alpha=2.0 * args.rank))
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tok).eval()
    with torch.no_grad():  # non-zero adapters, so the merge changes the weights as after training
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    prompts = addition_prompts(tok, args.prompts)
    sampling = fixed_length_sampling(args)

    def rollout() -> None:
        generate_rollout(model, tok, prompts, sampling)

    def merged_rollout() -> None:  # the loop reads merged layers as plain ones (trgrpo/fastpath/lora.py)
        model.merge_adapter()
        try:
            generate_rollout(model, tok, prompts, sampling)
        finally:
            model.unmerge_adapter()

    def merge_unmerge() -> None:
        model.merge_adapter()
        model.unmerge_adapter()

    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    merge_unmerge()
    drift = max(float((p.detach() - base[n]).abs().max()) for n, p in model.named_parameters() if n in base)
    for n, p in model.named_parameters():  # back to the exact base before timing
        if n in base:
            p.data.copy_(base[n])

    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters (LoRA r {args.rank} on all "
        f"linear layers), {args.prompts} prompts x G {args.group} x {args.tokens} tokens, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = {
        "adapters in the loop": timed(rollout, args.repeats),
        "merge, rollout, unmerge": timed(merged_rollout, args.repeats),
        "merge + unmerge alone": timed(merge_unmerge, args.repeats),
    }
    for name, (wall, cpu) in rows.items():
        print(f"  {name:22s} {wall:8.3f} s wall  {cpu:8.3f} s CPU")
    (loop_wall, loop_cpu), (merged_wall, merged_cpu) = (
        rows["adapters in the loop"],
        rows["merge, rollout, unmerge"],
    )
    print(
        f"adapters in the loop / merged: x{loop_wall / merged_wall:.2f} wall, "
        f"x{loop_cpu / merged_cpu:.2f} CPU "
        "(above 1: merging is faster)"
    )
    print(f"largest change of a base weight after one merge/unmerge cycle: {drift:.3e}")


if __name__ == "__main__":
    main()
