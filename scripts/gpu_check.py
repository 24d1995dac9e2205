"""GPU acceptance check: what one lent CUDA GPU (an H100) should prove in under 8 minutes, as one table.

A randomly initialised Qwen2 model of Qwen2.5-0.5B's layer shape (hidden 896, 24 layers, 14 heads, MLP 4864)
whose vocabulary is padded to Qwen's 151,936 (the LM head and the logits cost what they cost in a real run;
ids past the character tokenizer's ~110 decode to nothing), bf16, every row in its own process with its own
timeout and its whole log kept under ``--out``:

    plain          bf16-mixed without DeepSpeed, fixed completions: the step-0 reference
    zero2, zero3   the same under ZeRO-2 / ZeRO-3: step-0 loss and grad norm equal plain's (bf16 tolerance)
    zero3-ref      ZeRO-3 with beta > 0: the sharded frozen reference model; KL logged and > 0 after a step
    zero3-resume   ZeRO-3 writing sharded checkpoints and the export, then resumed from them for one more step
    zero2-fast     sampled rollouts with the ``fast`` engine: generation and training tokens per second
    zero2-vllm     the ``vllm`` engine beside DeepSpeed (a process group exists: vLLM's external launcher):
                   train/sampler_kl small after each weight sync; "not installed" where vLLM is missing

The target machine has no network and torch, lightning and transformers but not deepspeed or jsonargparse:
prepare a folder of wheels on a machine that has them (same Python version), carry it along, install there::

    python scripts/gpu_check.py wheels .whl              # here: deepspeed's wheel + small pure-Python ones
    python scripts/gpu_check.py run --wheels .whl        # there: install from .whl (no index), then check
    python scripts/gpu_check.py run --rows plain zero2   # a subset; --dry-run prints the plan only
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
QWEN_VOCAB = 151_936
SHAPE = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "intermediate_size": 4864}
WHEEL_BUDGET_MB = 60
TOTAL_BUDGET_S = 8 * 60
# what the target lacks, by import name -> distribution; deepspeed is built from its sdist (no wheel on PyPI)
NEEDED = {
    "deepspeed": "deepspeed",
    "hjson": "hjson",
    "cpuinfo": "py-cpuinfo",
    "einops": "einops",
    "msgpack": "msgpack",
    "ninja": "ninja",
    "jsonargparse": "jsonargparse",
    "docstring_parser": "docstring-parser",
    "typeshed_client": "typeshed-client",
}


class Row(NamedTuple):
    """One run of the table: a ``python -m trgrpo fit`` process."""

    name: str
    args: list[str]  # CLI arguments after the shared ones
    timeout_s: int
    needs: str | None = None  # a module the row cannot run without (its cell says "not installed")


# --------------------------------------------------------------------------- planning (runs on any CPU)


def shared_args(model_dir: Path, logs: Path) -> list[str]:
    """Every row: the padded model, bf16, the arithmetic task, CSV metrics under ``logs``."""
    return [
        "fit",
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        "--trainer.precision=bf16-mixed",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.default_root_dir={logs}",
        f"--model.policy.name_or_path={model_dir}",
        "--data.task=trgrpo.tasks.ArithmeticTask",
        "--data.task.init_args.train_size=512",
        "--data.task.init_args.val_size=8",
        "--model.sampling.group_size=8",
        "--model.optim.lr=1e-6",
        "--model.optim.micro_batch_size=16",
        '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": "^[1-4]"}}]',
    ]


def zero(stage: int) -> list[str]:
    return ["--config", str(ROOT / "configs" / "strategy" / f"deepspeed_zero{stage}.yaml")]


def plan_rows(out: Path, steps: int) -> list[Row]:
    """The table's rows in running order (names as in the module docstring)."""
    fixed = [  # completions fixed per prompt: the plain and ZeRO runs see the same tokens
        "--trainer.max_steps=1",
        "--data.batch_size=8",
        "--model.loss.beta=0",
        "--trainer.callbacks+=test_multiprocess.FixedCompletions",
    ]
    sampled = [f"--trainer.max_steps={steps}", "--data.batch_size=16", "--model.sampling.max_new_tokens=256"]
    sampled += ["--model.sampling.ignore_eos=true", "--model.loss.beta=0"]
    ckpt = out / "zero3-resume" / "ckpt"
    saving = [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks+=trgrpo.callbacks.HFExport",
        f"--trainer.callbacks.dirpath={out / 'zero3-resume' / 'hf'}",
        "--data.batch_size=8",
        "--model.sampling.max_new_tokens=32",
    ]
    vllm = ["--model.sampling.engine=vllm", "--model.sampling.vllm.dtype=bfloat16"]
    vllm += ["--model.sampling.vllm.gpu_memory_utilization=0.3"]
    return [
        Row("plain", ["--trainer.strategy=auto", *fixed], 50),
        Row("zero2", [*zero(2), *fixed], 55),
        Row("zero3", [*zero(3), *fixed], 55),
        Row(
            "zero3-ref",
            [*zero(3), *fixed[:2], "--model.loss.beta=0.04", fixed[3], "--trainer.max_steps=2"],
            55,
        ),
        Row("zero3-resume", [*zero(3), *saving, "--trainer.max_steps=2", "--model.loss.beta=0"], 65),
        Row(
            "zero3-resumed",
            [*zero(3), *saving, "--trainer.max_steps=3", "--model.loss.beta=0", "--ckpt_path=last"],
            55,
        ),
        Row("zero2-fast", [*zero(2), *sampled], 70),
        Row("zero2-vllm", [*zero(2), *sampled, *vllm], 75, needs="vllm"),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="build the wheel folder the target machine installs from")
    wheels.add_argument("folder", type=Path)
    run = sub.add_parser("run", help="run the check on the GPU")
    run.add_argument("--wheels", type=Path, help="install what is missing from this folder first (no index)")
    run.add_argument("--out", type=Path, default=Path("gpu-check"), help="logs, metrics and the table")
    run.add_argument("--steps", type=int, default=3, help="RL steps of the throughput rows (>= 2)")
    run.add_argument("--rows", nargs="+", help="run only these rows (default: all)")
    run.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.steps < 2:
            parser.error(f"--steps: at least 2 (the first step warms up), got {args.steps}")
        known = [r.name for r in plan_rows(args.out, args.steps)]
        unknown = sorted(set(args.rows or ()) - set(known))
        if unknown:
            parser.error(f"--rows: unknown {unknown}; the rows are {known}")
    return args


def selected(rows: list[Row], names: list[str] | None) -> list[Row]:
    """The rows named (all when none), with the rows they depend on (a resume needs its first run)."""
    if not names:
        return rows
    wanted = set(names) | ({"plain"} if {"zero2", "zero3"} & set(names) else set())
    wanted |= {"zero3-resume"} if "zero3-resumed" in wanted else set()
    return [r for r in rows if r.name in wanted]


# --------------------------------------------------------------------------- wheels (no network there)


def missing_modules(names=NEEDED) -> list[str]:
    """The distributions whose modules this Python cannot import."""
    return [dist for module, dist in names.items() if importlib.util.find_spec(module) is None]


def build_wheels(folder: Path) -> list[Path]:
    """deepspeed's wheel built from its sdist plus the small ones it and jsonargparse need, pinned to the
    versions installed here; refuses a folder over ``WHEEL_BUDGET_MB``."""
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for dist in NEEDED.values():
        pinned = f"{dist}=={importlib.metadata.version(dist)}"
        if dist == "deepspeed":  # its ops compile on first use on the GPU: the wheel is Python only
            cmd = [*pip, "wheel", "--no-deps", "--no-build-isolation", pinned, "-w", str(folder)]
            subprocess.run(cmd, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        else:
            subprocess.run(
                [*pip, "download", "--no-deps", "--only-binary=:all:", pinned, "-d", folder], check=True
            )
    wheels = sorted(folder.glob("*.whl"))
    check_wheel_budget(wheels)
    return wheels


def check_wheel_budget(wheels: list[Path]) -> float:
    """The folder's size in MB; ValueError past the budget (what a lent machine's upload allows)."""
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > WHEEL_BUDGET_MB:
        raise ValueError(
            f"wheels: {size:.0f} MB, over the {WHEEL_BUDGET_MB} MB budget: {[w.name for w in wheels]}"
        )
    return size


def install(folder: Path) -> None:
    """pip install the wheels (no index, no dependency resolution) and the project itself, without deps."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps"]
    subprocess.run([*pip, *map(str, sorted(folder.glob("*.whl")))], check=True)
    subprocess.run([*pip, "--no-build-isolation", "-e", str(ROOT)], check=True)


# --------------------------------------------------------------------------- running (on the GPU)


def write_padded_model(folder: Path) -> Path:
    """A random Qwen2 of ``SHAPE`` with a ``QWEN_VOCAB`` vocabulary and the character tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, Qwen2Config

    sys.path.insert(0, str(ROOT))
    from trgrpo.policy import PolicyConfig, load_tokenizer

    tok = load_tokenizer(PolicyConfig())
    cfg = Qwen2Config(
        vocab_size=QWEN_VOCAB,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **SHAPE,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_row(row: Row, shared: list[str], out: Path) -> dict:
    """The row's process, in its own process group, killed with its children at ``row.timeout_s``; its
    whole log goes to ``out/<name>.log``.  Returns {status, wall_s, rows (metrics.csv), log}."""
    if row.needs and importlib.util.find_spec(row.needs) is None:
        return {"status": "not installed", "wall_s": 0.0, "rows": {}}
    log = out / f"{row.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "trgrpo", *shared, *row.args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=row.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    wall = time.perf_counter() - t0
    status = "ok" if code == 0 else f"FAILED ({code}): {log.read_text().strip().splitlines()[-1:]}"
    return {"status": status, "wall_s": wall, "rows": read_metrics(out / row.name), "log": str(log)}


def read_metrics(logs: Path) -> dict[int, dict[str, float]]:
    """step -> train/* metrics of a run's metrics.csv ({} when there is none)."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted(logs.glob("**/metrics.csv")):
        with open(path) as f:
            for r in csv.DictReader(f):
                if r.get("train/loss"):
                    rows[int(r["step"])] = {k: float(v) for k, v in r.items() if k.startswith("train/") and v}
    return rows


def check(name: str, results: dict[str, dict], out: Path) -> str:
    """The row's assertion, as a table cell: "pass", "FAIL: why", or "-" (a row that only measures)."""
    got = results[name]["rows"]
    if name in ("zero2", "zero3"):
        ref = results.get("plain", {}).get("rows", {})
        if 0 not in ref or 0 not in got:
            return "FAIL: no step 0 here or in plain"
        a, b = got[0], ref[0]
        if not math.isclose(a["train/grad_norm"], b["train/grad_norm"], rel_tol=2e-2):
            return f"FAIL: grad_norm {a['train/grad_norm']:.4g} vs plain {b['train/grad_norm']:.4g}"
        if abs(a["train/loss"] - b["train/loss"]) > 1e-2 * max(1.0, abs(b["train/loss"])):
            return f"FAIL: loss {a['train/loss']:.4g} vs plain {b['train/loss']:.4g}"
        return "pass"
    if name == "zero3-ref":
        kl = got.get(1, {}).get("train/kl")
        return "pass" if kl is not None and 0 < kl < 1 else f"FAIL: step-1 kl {kl}"
    if name == "zero3-resumed":
        exported = (out / "zero3-resume" / "hf" / "config.json").is_file()
        return "pass" if sorted(got) == [2] and exported else f"FAIL: steps {sorted(got)}, export {exported}"
    if name == "zero2-vllm":
        kls = [r["train/sampler_kl"] for r in got.values() if "train/sampler_kl" in r]
        return "pass" if kls and max(kls) < 1e-2 else f"FAIL: sampler_kl {kls}"
    return "-"


def throughput(rows: dict[int, dict[str, float]], sequences: int) -> tuple[float, float]:
    """Median generation and training tokens per second over the steps after the first (warm-up)."""
    later = [r for step, r in sorted(rows.items()) if step > 0] or list(rows.values())
    if not later or "train/time/generation" not in later[0]:
        return math.nan, math.nan
    tokens = [r["train/completion_length"] * sequences for r in later]
    gen = sorted(t / r["train/time/generation"] for t, r in zip(tokens, later, strict=True))
    train = sorted(
        t / (r["train/time/old_logprobs"] + r["train/time/update"])
        for t, r in zip(tokens, later, strict=True)
    )
    return gen[len(gen) // 2], train[len(train) // 2]


def table(results: dict[str, dict], out: Path) -> str:
    lines = [f"{'row':<15}{'status':<16}{'check':<40}{'gen tok/s':>10}{'train tok/s':>12}{'wall s':>8}"]
    for name, res in results.items():
        gen, train = throughput(res["rows"], 16 * 8) if name.startswith("zero2-") else (math.nan, math.nan)
        cell = check(name, results, out) if res["status"] == "ok" else "-"
        lines.append(
            f"{name:<15}{res['status'][:15]:<16}{cell[:39]:<40}{gen:>10.0f}{train:>12.0f}{res['wall_s']:>8.0f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = selected(plan_rows(args.out, args.steps), args.rows)
    planned = sum(r.timeout_s for r in rows)
    print(f"plan: {len(rows)} rows, at most {planned} s of {TOTAL_BUDGET_S} s: {[r.name for r in rows]}")
    if args.dry_run:
        return 0
    if args.wheels:
        install(args.wheels)
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible")
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_padded_model(args.out / "model")
    results = {r.name: run_row(r, shared_args(model, args.out / r.name), args.out) for r in rows}
    text = f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n{table(results, args.out)}"
    print(text)
    (args.out / "table.txt").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] in ("ok", "not installed") for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "wheels":
        wheels = build_wheels(args.folder)
        print(f"{len(wheels)} wheels, {check_wheel_budget(wheels):.1f} MB in {args.folder}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
