"""Time one RL step, phase by phase, for UniformWeighting (plain GRPO) against TR-GRPO.

    python scripts/bench.py                      # demo-sized tiny model, 5 rounds
    python scripts/bench.py --rounds 7 --steps 6 --hidden 256 --layers 4

Each round runs both strategies, alternating, each in a fresh process (so peak resident memory is
measured per strategy) with the same seed, prompts and model.  Within a process the first step is a
warm-up and is excluded.  Reported: median seconds per phase (generation, reward, update = log-prob
forward + loss + backward + optimiser) and per whole step, peak RSS, and the TR-GRPO / uniform ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

WEIGHTINGS = {"uniform": "UniformWeighting", "tr_grpo": "TokenRegulatedWeighting"}


def digit_share(prompts, completions, **_):
    """A dense reward with spread in every group, so that every step trains on every sequence."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from trgrpo.cli import main

    torch.set_num_threads(args.threads)
    records: list[dict] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = pl_module.last_stats.timings()
            # "update" as reported here includes the no-grad old / reference log-prob passes
            records.append(
                {
                    "step": time.perf_counter() - self.t0,
                    "generation": t.generation,
                    "reward": t.reward,
                    "update": t.old_logprobs + t.update,
                }
            )

    cli = main(
        [
            "--seed_everything=0",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tempfile.mkdtemp(prefix='trgrpo-bench-')}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0",
            f"--trainer.max_steps={args.steps + 1}",
            "--data.task=trgrpo.tasks.ArithmeticTask",
            "--data.task.init_args.train_size=512",
            f"--data.batch_size={args.prompts}",
            f"--model.sampling.group_size={args.group}",
            f"--model.sampling.max_new_tokens={args.tokens}",
            f"--model.policy.tiny.hidden_size={args.hidden}",
            f"--model.policy.tiny.num_hidden_layers={args.layers}",
            f"--model.policy.tiny.intermediate_size={4 * args.hidden}",
            "--model.optim.lr=1e-4",
            f"--model.weighting={WEIGHTINGS[args.worker]}",
        ],
        run=False,
    )
    from trgrpo.rewards import RewardSpec

    cli.model.rewards = [RewardSpec(fn=digit_share)]
    cli.trainer.callbacks.append(Timer())
    # the RL step only: no held-out evaluation around fit
    cli.model.on_train_start = lambda: None
    cli.model.on_train_end = lambda: None
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": records[1:], "peak_mb": peak_mb}))


def run_round(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "rounds")
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per strategy")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--tokens", type=int, default=16, help="max new tokens")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model width")
    ap.add_argument("--layers", type=int, default=2, help="tiny model depth")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--worker", choices=sorted(WEIGHTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[str, dict] = {k: {"records": [], "peak_mb": []} for k in WEIGHTINGS}
    for r in range(args.rounds):
        for name in WEIGHTINGS if r % 2 == 0 else reversed(list(WEIGHTINGS)):
            res = run_round(name, args)
            results[name]["records"] += res["records"]
            results[name]["peak_mb"].append(res["peak_mb"])
    phases = ["generation", "reward", "update", "step"]
    med = {
        k: {p: statistics.median(rec[p] for rec in v["records"] if p in rec) for p in phases}
        for k, v in results.items()
    }
    print(
        f"setting: {args.prompts} prompts x {args.group} completions, <= {args.tokens} new tokens, "
        f"tiny Qwen2 hidden={args.hidden} layers={args.layers}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps each"
    )
    print(f"{'strategy':<10}" + "".join(f"{p + ' s':>14}" for p in phases) + f"{'peak RSS MB':>14}")
    for k in WEIGHTINGS:
        print(
            f"{k:<10}"
            + "".join(f"{med[k][p]:>14.4f}" for p in phases)
            + f"{max(results[k]['peak_mb']):>14.1f}"
        )
    ratio = med["tr_grpo"]["step"] / med["uniform"]["step"]
    upd = med["tr_grpo"]["update"] / med["uniform"]["update"]
    mem = max(results["tr_grpo"]["peak_mb"]) / max(results["uniform"]["peak_mb"])
    print(f"ratio tr_grpo/uniform: step time {ratio:.3f}, update phase {upd:.3f}, peak memory {mem:.3f}")


if __name__ == "__main__":
    main()
