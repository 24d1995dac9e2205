"""Peak memory of the training log-prob pass (forward with entropy, then backward) on a real vocabulary:
whole logits against the LM head a chunk of rows at a time (``model.optim.max_logits_mib``): 16 MiB chunks,
and the default budget's chunks (a quarter of 256 MiB).

Each mode runs in a fresh process: load the model, sample one rollout (``--prompts`` x ``--group``
completions of ``--tokens`` tokens, EOS never sampled), run the pass once so every gradient buffer exists,
reset the kernel's resident-memory high-water mark (``/proc/self/clear_refs``, Linux) and run it again,
timed (wall and CPU seconds: what the chunked head's second head matmul costs).  The
figure is that pass's peak resident memory over its start: the activations and logits the pass builds,
without the weights or gradient buffers, which are the same in both modes.  It includes what glibc keeps of
freed blocks (set ``MALLOC_MMAP_THRESHOLD_=1048576`` to see only what the tensors hold).  Below the measured
rows the same arithmetic is done for Qwen2.5-3B's vocabulary (151,936).

    python scripts/bench_logprob_memory.py              # SmolLM2-135M-Instruct (needs the smollm2 extra)
    python scripts/bench_logprob_memory.py --model ''   # the demo's tiny model (character vocabulary)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_rollout import add_rollout_flags, addition_prompts, fixed_length_sampling  # noqa: E402

QWEN25_3B_VOCAB = 151_936
# max_logits_mib of the scorer: never chunk; always chunk, 16 MiB chunks; the default budget (256 MiB), whose
# chunks are a quarter of it (trgrpo.logprobs.budget_chunk_rows) when the batch's logits pass it
MODES = {"whole": None, "chunked": 1e-6, "default": 256.0}


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak() -> float:
    """Reset the high-water mark to the current resident memory (Linux); returns it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_mib()


def child(args: argparse.Namespace) -> dict:
    import torch

    from trgrpo.policy import PolicyConfig, load_model, load_tokenizer
    from trgrpo.rollout.engines import generate_rollout
    from trgrpo.scoring import TokenScorer

    cfg = PolicyConfig(name_or_path=args.model or None)
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tok)
    prompts = addition_prompts(tok, args.prompts)
    sampling = fixed_length_sampling(args)
    rollout = generate_rollout(model, tok, prompts, sampling)
    scorer = TokenScorer(max_logits_mib=MODES[args.child])
    rows = torch.arange(rollout.input_ids.shape[0])
    model.train()

    def training_pass() -> None:
        scores = scorer.score(model, rollout, rows, "detached")
        (scores.logp * rollout.completion_mask).sum().backward()

    training_pass()  # gradient buffers now exist: the measured pass allocates only its own tensors
    start = reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    training_pass()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_mib()
    b, length = rollout.input_ids.shape
    return {
        "mode": args.child,
        "peak_over_start_mib": peak - start,
        "pass_wall_s": wall,
        "pass_cpu_s": cpu,
        "sequences": b,
        "completion_tokens": length - rollout.prompt_len,
        "prompt_len": rollout.prompt_len,
        "vocab": model.config.vocab_size,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_rollout_flags(ap)
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    results = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model]
        cmd += ["--prompts", str(args.prompts), "--group", str(args.group), "--tokens", str(args.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    from trgrpo.logprobs import budget_chunk_rows, default_chunk_rows

    r = results[0]
    n = r["sequences"] * r["completion_tokens"]
    print(
        f"{r['params'] / 1e6:.1f}M parameters, vocabulary {r['vocab']}, {r['sequences']} sequences x "
        f"{r['completion_tokens']} completion tokens (prompt {r['prompt_len']}), float32"
    )
    print(f"whole float32 logits of the batch: {n * r['vocab'] * 4 / 2**20:.0f} MiB")
    for res in results:
        print(
            f"  {res['mode']:8s} peak of the log-prob pass over its start: "
            f"{res['peak_over_start_mib']:7.0f} MiB; the pass took {res['pass_wall_s']:.2f} s wall, "
            f"{res['pass_cpu_s']:.2f} s CPU"
        )
    for vocab, name in ((r["vocab"], "this vocabulary"), (QWEN25_3B_VOCAB, "Qwen2.5-3B's vocabulary")):
        rows, budget_rows = default_chunk_rows(vocab), budget_chunk_rows(vocab, MODES["default"])
        print(
            f"by arithmetic, {name} ({vocab}): whole logits {n * vocab * 4 / 2**20:.0f} MiB per copy; "
            f"16 MiB chunks {rows} rows x {vocab} = {rows * vocab * 4 / 2**20:.0f} MiB per copy; the default "
            f"budget's chunks {budget_rows} rows = {budget_rows * vocab * 4 / 2**20:.0f} MiB per copy"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
