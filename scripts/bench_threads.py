"""Time a demo-sized CPU workload under different OpenMP / thread settings, alone and next to a busy process.

    python scripts/bench_threads.py                     # about 3 minutes on 2 cores
    python scripts/bench_threads.py --reps 3 --competitor torch

Why: on a machine whose cores another process keeps busy, OpenMP worker threads that spin while they
wait (libgomp's default) fight that process for the cores, and every parallel region waits for its
slowest thread.  The demo took six times as long that way.  This script measures which default
(``trgrpo.threads`` chose GOMP_SPINCOUNT=10000 from it and from whole demo runs) degrades gracefully.

Each measurement is a fresh process (the OpenMP runtime reads its environment when torch is imported)
running the same fixed workload with the demo's tiny model (hidden 128, 2 layers): supervised steps of
64 sequences, then RL-like steps (sample 32 prompts x 8 completions of 6 tokens, forward + backward on
them).  Settings run alternately, ``--reps`` times, quiet and with a competitor (``spin``: one pure-Python
busy loop per core; ``torch``: a float32 matmul loop with torch's default threads).  Printed: the load
average before each round, each time, the median per setting and its ratio to the default measured in the
same run.  Only the workload is timed (not the imports or the model build); a child whose workload
passes ``--budget`` seconds stops early and its time is extrapolated from the steps it made (marked ~).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> environment added to the child's; "default" is torch's own behaviour (libgomp spins about 3 ms)
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # every OpenMP runtime: idle threads sleep at once (trgrpo's)
    "spin1k": {"GOMP_SPINCOUNT": "1000"},  # libgomp only: spin about 10 us, then sleep
    "spin10k": {"GOMP_SPINCOUNT": "10000"},  # about 0.1 ms
    "threads1": {"OMP_NUM_THREADS": "1"},  # no worker threads at all
}
# variables the parent's environment could carry into a child and that would blur the comparison
CLEARED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "TRGRPO_THREADS")


def workload(sft_steps: int, rl_steps: int, budget: float) -> dict:
    """The timed part: runs in a child whose environment is already set."""
    import torch  # first: the OpenMP runtime reads the environment now, before trgrpo could set anything

    from trgrpo.policy import PolicyConfig, TinyModelConfig, load_model, load_tokenizer

    cfg = PolicyConfig(
        tiny=TinyModelConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512
        )
    )
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def operands(n: int) -> list[tuple[int, int]]:
        return [tuple(torch.randint(100, (2,), generator=gen).tolist()) for _ in range(n)]

    def train_on(texts: list[str]) -> None:
        batch = tok(texts, return_tensors="pt", padding=True)
        loss = model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run_phase(steps: int, step, budget: float) -> tuple[float, bool]:
        """Seconds for ``steps`` steps; past ``budget`` it stops (after at least one) and extrapolates."""
        start = time.perf_counter()
        for done in range(1, steps + 1):
            step()
            elapsed = time.perf_counter() - start
            if elapsed > budget and done < steps:
                return elapsed / done * steps, True
        return time.perf_counter() - start, False

    def sft_step() -> None:  # the supervised warm-start: 64 sequences a step
        model.train()
        train_on([f"{a}+{b}={a + b}" for a, b in operands(64)])

    def rl_step() -> None:  # one RL step: 32 prompts x 8 sampled completions, then an update on them
        batch = tok(
            [f"{a}+{b}=" for a, b in operands(32) for _ in range(8)], return_tensors="pt", padding=True
        )
        model.eval()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, max_new_tokens=6, pad_token_id=tok.pad_token_id)
        model.train()
        train_on(tok.batch_decode(out, skip_special_tokens=True))

    sft, sft_capped = run_phase(sft_steps, sft_step, budget / 2)
    rl, rl_capped = run_phase(rl_steps, rl_step, budget / 2)
    return {
        "sft": sft,
        "rl": rl,
        "total": sft + rl,
        "threads": torch.get_num_threads(),
        "capped": sft_capped or rl_capped,
    }


def spin() -> None:
    while True:
        pass


def torch_loop() -> None:
    import torch

    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)


def start_competitor(kind: str) -> list[subprocess.Popen]:
    if kind == "spin":
        code = "from scripts.bench_threads import spin; spin()"
        n = len(os.sched_getaffinity(0))
    else:
        code = "from scripts.bench_threads import torch_loop; torch_loop()"
        n = 1
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def measure(setting: str, args: argparse.Namespace) -> dict:
    """One fresh child under ``setting``."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(SETTINGS[setting], TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.getcwd())
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--sft-steps",
        str(args.sft_steps),
        "--rl-steps",
        str(args.rl_steps),
        "--budget",
        str(args.budget),
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2, help="rounds; each runs every setting once, alternating")
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--rl-steps", type=int, default=4)
    p.add_argument(
        "--budget",
        type=float,
        default=15.0,
        help="seconds of workload per child; a slower child stops early (after at least one step of "
        "each phase) and its time is extrapolated from the steps it made (marked ~)",
    )
    p.add_argument("--competitor", choices=["spin", "torch"], default="spin")
    p.add_argument("--settings", nargs="+", default=["default", "passive", "spin10k"], choices=list(SETTINGS))
    p.add_argument("--conditions", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(workload(args.sft_steps, args.rl_steps, args.budget)), flush=True)
        return

    times: dict[tuple[str, str], list[float]] = {}
    print(
        f"cores {len(os.sched_getaffinity(0))}, competitor {args.competitor!r}, "
        f"workload: {args.sft_steps} SFT steps + {args.rl_steps} RL steps",
        flush=True,
    )
    for rep in range(args.reps):
        for condition in args.conditions:
            order = args.settings if (rep % 2 == 0) else args.settings[::-1]
            load = "/".join(f"{x:.2f}" for x in os.getloadavg())
            procs = start_competitor(args.competitor) if condition == "busy" else []
            try:
                time.sleep(1.0 if procs else 0.0)  # let the competitor reach its loop
                for setting in order:
                    r = measure(setting, args)
                    times.setdefault((condition, setting), []).append(r["total"])
                    cap = "~" if r["capped"] else " "
                    print(
                        f"round {rep + 1} {condition:5s} load {load} {setting:9s} threads {r['threads']} "
                        f"sft {r['sft']:6.2f}s rl {r['rl']:6.2f}s total {cap}{r['total']:6.2f}s",
                        flush=True,
                    )
            finally:
                stop(procs)

    print("\nmedian workload seconds (ratio to default, same condition):")
    for condition in args.conditions:
        base = statistics.median(times[(condition, "default")]) if (condition, "default") in times else None
        for setting in args.settings:
            med = statistics.median(times[(condition, setting)])
            ratio = f"{med / base:5.2f}x" if base else "   -"
            print(f"  {condition:5s} {setting:9s} {med:7.2f}s  {ratio}")
    if "quiet" in args.conditions and "busy" in args.conditions:
        print("slowdown busy / quiet, same setting:")
        for setting in args.settings:
            q, b = statistics.median(times[("quiet", setting)]), statistics.median(times[("busy", setting)])
            print(f"  {setting:9s} {b / q:5.2f}x")


if __name__ == "__main__":
    main()
