"""GPU acceptance check: what a machine with one CUDA GPU should prove, in well under 20 minutes.

Runs a few RL steps of a randomly initialised Qwen2-shaped model with the shape of Qwen2.5-0.5B (hidden
896, 24 layers, 14 heads, MLP 4864; KV heads = heads, as in the tiny model; the vocabulary is the
embedded character tokenizer's, so nearly all of its ~390M parameters sit in the layers), bf16-mixed,
under DeepSpeed ZeRO-2 and ZeRO-3, with the ``fast`` and the ``vllm`` rollout engines, each run in a
fresh process, and prints one table of measured numbers: generation and training tokens per second
(medians over the steps after the first), peak GPU memory, and the train/sampler_kl of the vllm runs.
A run that fails prints its error in the table instead of numbers.
TRL's GRPOTrainer is not run here (scripts/bench_vs_trl.py is its CPU comparison).

    python scripts/gpu_check.py                         # everything installed already
    python scripts/gpu_check.py --wheels /path/wheels   # a bare machine with no network: install the
                                                        # project, deepspeed and vllm from wheels there first
    python scripts/gpu_check.py --steps 4 --engines fast --stages 2    # a subset
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "intermediate_size": 4864,
    "max_position_embeddings": 2048,
}


def install(wheels: str) -> None:
    """pip install, from the wheels folder only, whatever of the project, deepspeed and vllm is missing."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels]
    subprocess.run([*cmd, "-e", f"{ROOT}[deepspeed,vllm]"], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
        check=False,
    )


def one_run(stage: int, engine: str, steps: int, out: Path) -> None:
    """A child process: train ``steps`` RL steps and write {peak memory, metrics rows} to ``out``."""
    import torch

    sys.path.insert(0, str(ROOT))
    from trgrpo.cli import main

    logs = out.parent / f"logs-{stage}-{engine}"
    args = [
        "fit",
        "--config",
        str(ROOT / f"configs/strategy/deepspeed_zero{stage}.yaml"),
        "--trainer.devices=1",
        f"--trainer.max_steps={steps}",
        "--trainer.precision=bf16-mixed",
        "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.default_root_dir={logs}",
        "--model.policy.name_or_path=null",
        *[f"--model.policy.tiny.{k}={v}" for k, v in SHAPE.items()],
        "--data.task=trgrpo.tasks.ArithmeticTask",
        "--data.task.init_args.train_size=512",
        "--data.task.init_args.val_size=8",
        "--data.batch_size=16",
        "--model.sampling.group_size=8",
        "--model.sampling.max_new_tokens=256",
        "--model.sampling.ignore_eos=true",
        f"--model.sampling.engine={engine}",
        "--model.sampling.vllm.dtype=bfloat16",
        "--model.sampling.vllm.gpu_memory_utilization=0.3",
        "--model.optim.lr=1e-6",
        "--model.optim.micro_batch_size=32",
        "--model.loss.beta=0",
        '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": ".*[0-9].*"}}]',
    ]
    torch.cuda.reset_peak_memory_stats()
    main(args)
    (path,) = logs.glob("**/metrics.csv")
    with open(path) as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f) if r.get("train/loss")]
    out.write_text(json.dumps({"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "rows": rows}))


def summarise(result: dict, sequences: int) -> dict:
    """Median tokens/s over the steps after the first (warm-up, engine start-up)."""
    rows = result["rows"][1:] or result["rows"]
    tokens = [r["train/completion_length"] * sequences for r in rows]
    gen = statistics.median(t / r["train/time/generation"] for t, r in zip(tokens, rows, strict=True))
    train = statistics.median(
        t / (r["train/time/old_logprobs"] + r["train/time/update"]) for t, r in zip(tokens, rows, strict=True)
    )
    kl = [r["train/sampler_kl"] for r in rows if "train/sampler_kl" in r]
    return {
        "gen_tok_s": gen,
        "train_tok_s": train,
        "peak_gib": result["peak_gib"],
        "sampler_kl": statistics.median(kl) if kl else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--engines", nargs="+", default=["fast", "vllm"])
    parser.add_argument("--wheels", help="install missing packages from this folder (no network)")
    parser.add_argument("--one", nargs=3, metavar=("STAGE", "ENGINE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_run(int(args.one[0]), args.one[1], args.steps, Path(args.one[2]))
    if args.wheels:
        install(args.wheels)
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible")
    print(
        f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, steps {args.steps} "
        f"(16 prompts x G 8 x 256 tokens per step)"
    )
    print(f"{'run':<14}{'gen tok/s':>12}{'train tok/s':>13}{'peak GiB*':>10}{'sampler_kl':>12}{'wall s':>9}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for stage in args.stages:
        for engine in args.engines:
            out, t0 = tmp / f"{stage}-{engine}.json", time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--one", str(stage), engine, str(out)],
                capture_output=True,
                text=True,
            )
            wall, name = time.perf_counter() - t0, f"zero{stage} {engine}"
            if proc.returncode != 0 or not out.exists():
                print(
                    f"{name:<14}FAILED ({wall:.0f} s): "
                    f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
                )
                continue
            s = summarise(json.loads(out.read_text()), 16 * 8)
            kl = f"{s['sampler_kl']:.2e}" if s["sampler_kl"] is not None else "-"
            print(
                f"{name:<14}{s['gen_tok_s']:>12.0f}{s['train_tok_s']:>13.0f}{s['peak_gib']:>10.1f}{kl:>12}{wall:>9.0f}"
            )
    print(
        "* torch.cuda.max_memory_allocated of the process (vLLM's KV cache included, its sleep-mode pool not)"
    )
    print(f"logs: {tmp}")


if __name__ == "__main__":
    main()
