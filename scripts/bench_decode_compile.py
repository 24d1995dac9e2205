"""The fast sampler's decode step, eager against ``torch.compile``: does compiling it pay on this machine?

The decode loop of ``trgrpo/fastpath/sampler.py`` runs ``_decode_step`` once per generated token: some 15
small kernels per layer, each a Python call.  This script times one rollout (``--prompts`` x ``--group``
completions of ``--tokens`` tokens, EOS never sampled) with the step as it is and with the step wrapped in
``torch.compile(dynamic=True)``, in one process, alternating, median of ``--repeats`` rollouts each after
a warm-up rollout; the compile time is the compiled warm-up's extra time.  It also checks that both give
the same tokens (greedy).

What it showed on the 2-core CPU (torch 2.13): dynamo specialises the step on the completion position
(``state.cos[:, t]``), recompiles for each of the first 8 positions, hits its recompile limit and runs the
rest eagerly; the demo's compiled rollout was 1.33x slower after 190 s of compiling, and SmolLM2's did not
finish compiling in 15 minutes.  A step with static shapes (the position as a tensor, the cache read whole
under a mask) would be needed for one graph; see docs/benchmarks.md for why that was not pursued.

    python scripts/bench_decode_compile.py                 # SmolLM2-135M-Instruct, the benchmark's rollout
    python scripts/bench_decode_compile.py --model ''      # the demo's tiny model
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_flags(ap)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if min(args.prompts, args.group, args.tokens, args.repeats) < 1:
        sys.exit("--prompts, --group, --tokens and --repeats must be at least 1")

    import torch

    import trgrpo.fastpath.sampler as sampler
    from trgrpo.policy import PolicyConfig, load_model, load_tokenizer
    from trgrpo.rollout.engines import generate_rollout

    cfg = PolicyConfig(name_or_path=args.model or None)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tok).eval()
    prompts = addition_prompts(tok, args.prompts)
    sampling = fixed_length_sampling(args)
    eager_step = sampler._decode_step
    compiled_step = torch.compile(eager_step, dynamic=True)

    def rollout(step, greedy: bool = False):
        sampler._decode_step = step
        try:
            w, c = time.perf_counter(), time.process_time()
            out = generate_rollout(model, tok, prompts, sampling, greedy=greedy)
            return out, time.perf_counter() - w, time.process_time() - c
        finally:
            sampler._decode_step = eager_step

    _, eager_first, _ = rollout(eager_step)
    print(f"first eager rollout {eager_first:.1f} s", flush=True)
    _, compiled_first, _ = rollout(compiled_step)
    print(f"first compiled rollout (compiles) {compiled_first:.1f} s", flush=True)
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, step in (("eager", eager_step), ("compiled", compiled_step)):
            _, wall, cpu = rollout(step)
            times[name].append((wall, cpu))
    same = torch.equal(rollout(eager_step, True)[0].input_ids, rollout(compiled_step, True)[0].input_ids)

    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.prompts} prompts x "
        f"G {args.group} x {args.tokens} tokens, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}"
    )
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()
    }
    for name, (wall, cpu) in med.items():
        print(f"  {name:9s} rollout {wall:8.3f} s wall  {cpu:8.3f} s CPU")
    print(
        f"  compile time (first compiled rollout - first eager rollout): {compiled_first - eager_first:.1f} s"
    )
    print(
        f"compiled / eager: x{med['compiled'][0] / med['eager'][0]:.3f} wall, "
        f"x{med['compiled'][1] / med['eager'][1]:.3f} CPU (below 1: compiling is faster); "
        f"greedy tokens {'equal' if same else 'DIFFER'}"
    )


if __name__ == "__main__":
    main()
