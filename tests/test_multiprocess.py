"""Two processes through the real CLI: ``python -m trgrpo fit ... --trainer.devices=2`` (Lightning launches).

Every run takes the paths a real run takes (held-out evaluation before, during and after RL with the sample
table, the reward plot, checkpoints, the Hugging Face export) and has a hard timeout: a process waiting in a
collective its peer never joins fails the test in minutes, with its log, instead of hanging CI.

- DDP with a held-out set of one batch (fewer batches than processes) and a supervised warm-start: the run
  ends, and a reward that fails on one process only is counted once in ``train/reward_errors``.
- ZeRO-2 (two micro-batches per optimiser step) and ZeRO-3 on DeepSpeed's CPU accelerator
  (``trgrpo.strategies.CPUDeepSpeedStrategy``) against one plain process on the same global batch: every
  step's loss, grad norm, KL and reward, and the exported weights.  The sampled completions are a fixed
  function of the prompt (``FixedCompletions``; sampling on two processes draws other random numbers than
  on one), greedy held-out generation is the real engine's.

    python -m pytest -q tests/test_multiprocess.py      (under 2 minutes on a quiet 2-core machine)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import TINY, arithmetic_args, run_cli, train_rows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT = 240  # seconds per run; a healthy one takes under a minute here


# --------------------------------------------------------------------------- what the runs load by name


def fails_on_rank_one(completions, **_):
    """Has a digit (1.0 / 0.0); on process 1 the first sample of every call fails: one error per RL step."""
    import torch.distributed as dist

    from trgrpo.rewards import SampleFailures

    scores = [float(any(ch.isdigit() for ch in c)) for c in completions]
    if dist.is_initialized() and dist.get_rank() == 1:
        raise SampleFailures(scores, [0], "fails on process 1 by design")
    return scores


class FixedEngine:
    """Sampled completions that are a fixed function of the prompt; greedy ones from the wrapped engine.

    Completion j of prompt p is digit j+1, then the digit (sum of p's characters mod 10), then EOS.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def generate(self, model, tokenizer, prompts, sampling, group_size, greedy):
        if greedy:
            return self.inner.generate(model, tokenizer, prompts, sampling, group_size, greedy)
        from trgrpo.rollout.base import assemble_rollout, encode_prompts

        enc = encode_prompts(model, tokenizer, prompts)
        texts = [f"{j % 9 + 1}{sum(map(ord, p)) % 10}" for p in prompts for j in range(group_size)]
        ids = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
        completion = torch.tensor(ids, device=enc.input_ids.device)  # [U * G, 3]
        return assemble_rollout(tokenizer, enc.input_ids, enc.attention_mask, completion, group_size)


class FixedCompletions(L.Callback):
    """Puts ``FixedEngine`` around the run's engine (training rollouts and held-out evaluation)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        pl_module.engine = FixedEngine(pl_module.engine)
        pl_module.evaluator.use_engine(pl_module.engine)


class EngineFacts(L.Callback):
    """Writes ``rank<N>.txt`` under ``folder``: the rank and world size DeepSpeed's engine believes in; and
    at the end ``rank<N>.chunked``: how many scoring forwards ran the LM head in chunks."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.chunked = 0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        engine = trainer.strategy.deepspeed_engine
        path = Path(self.folder) / f"rank{trainer.global_rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{engine.global_rank} {engine.world_size}")
        decide = pl_module.scorer.chunked_head

        def counted(*args, **kwargs):
            out = decide(*args, **kwargs)
            self.chunked += out is not None
            return out

        pl_module.scorer.chunked_head = counted

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        (Path(self.folder) / f"rank{trainer.global_rank}.chunked").write_text(str(self.chunked))


# --------------------------------------------------------------------------- running and reading


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python -m trgrpo`` with ``args`` in its own process group (Lightning's launcher starts the other
    processes in it), output in ``proc.stdout``."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(cwd / "no-jit-builds"),
    }
    cmd = [sys.executable, "-m", "trgrpo", *args]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def launch(args: list[str], cwd: Path, returncode: int = 0) -> str:
    """``start`` and wait; its output. A run that exceeds ``TIMEOUT`` is killed with every process it
    started, and the test fails with the end of its log; so does another exit status than ``returncode``."""
    proc = start(args, cwd)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Lightning's launcher started the other process in this group
        out, _ = proc.communicate()
        pytest.fail(f"no end after {TIMEOUT}s (a process waits in a collective?):\n{out[-6000:]}")
    assert proc.returncode == returncode, out[-8000:]
    return out


def logged(run: Path) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run}",
        f"--trainer.default_root_dir={run}",
    ]


def outputs(run: Path) -> list[str]:
    """Held-out table, plot, a checkpoint every step (last.ckpt) and the export, all under ``run``."""
    return [
        "--trainer.val_check_interval=1",
        "--model.eval.table_rows=2",
        "--trainer.callbacks+=trgrpo.callbacks.RewardPlot",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={run / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=0",
        "--trainer.callbacks+=trgrpo.callbacks.HFExport",
        f"--trainer.callbacks.dirpath={run / 'hf'}",
    ]


def assert_outputs(run: Path, out: str) -> None:
    assert "held-out accuracy (greedy, 8 prompts never trained on)" in out
    assert list(run.glob("**/val_samples/step_*.md")), "no held-out sample table"
    assert list(run.glob("**/reward_accuracy.png")), "no reward plot"
    assert (run / "ckpt" / "last.ckpt").exists() and (run / "hf" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """2 DDP processes, 2 RL steps; 8 held-out prompts in one batch; warm-start; a reward failing on one."""
    run = tmp_path_factory.mktemp("ddp")
    args = [
        "fit",
        *TINY,
        *arithmetic_args(batch_size=2, group_size=4),
        *logged(run),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": ".*[0-9].*"}}, '
        '{"fn": "test_multiprocess.fails_on_rank_one", "weight": 0.1}]',
        "--trainer.callbacks+=trgrpo.callbacks.SupervisedWarmStart",
        "--trainer.callbacks.steps=2",
        "--trainer.callbacks.batch_size=4",
        f"--trainer.callbacks.cache_dir={run / 'warmstart'}",
        *outputs(run),
    ]
    return run, launch(args, run)


@pytest.mark.slow
def test_ddp_run_with_fewer_heldout_batches_than_processes_ends(ddp_run):
    run, out = ddp_run
    assert_outputs(run, out)
    assert len(list((run / "warmstart").glob("warmstart-*.pt"))) == 1  # written once, by rank 0
    assert sorted(train_rows(run)) == [0, 1]


@pytest.mark.slow
def test_a_reward_error_on_one_process_is_counted_once(ddp_run):
    run, _ = ddp_run
    rows = train_rows(run)
    assert [rows[step]["train/reward_errors"] for step in sorted(rows)] == [1.0, 1.0]  # summed, not 0.5


def test_heldout_prompts_are_dealt_to_every_process():
    """One held-out batch of 8 prompts over 2 processes: 4 each, not the whole batch to one process."""
    from trgrpo.module import GRPOModule

    batch = {"prompt": [f"p{i}" for i in range(8)], "answer": [str(i) for i in range(8)]}
    seen: dict[int, list] = {0: [], 1: []}
    for rank in (0, 1):
        module = GRPOModule()
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank, global_step=0)
        module.generation_weights = torch.no_grad  # any context manager: nothing to gather here
        module.evaluator.accuracy = lambda model, tok, batches, reduce, rank=rank: (
            seen[rank].extend(batches) or (0.0, 8)
        )
        module.evaluate_heldout([batch])
    assert seen[0] == [{"prompt": ["p0", "p2", "p4", "p6"], "answer": ["0", "2", "4", "6"]}]
    assert seen[1] == [{"prompt": ["p1", "p3", "p5", "p7"], "answer": ["1", "3", "5", "7"]}]


# ----------------------------------------------------------------------- ZeRO-2 / ZeRO-3 on 2 CPU processes

# 4 prompts x 4 completions per RL step in all; the format reward splits every fixed group in two
COMPARED = [
    *TINY,
    *arithmetic_args(group_size=4),
    "--trainer.max_steps=2",
    "--trainer.precision=32-true",
    "--model.optim.micro_batch_size=4",
    "--model.loss.beta=0.05",
    "--model.optim.lr=0.01",
    '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": "^[12]\\\\d$"}}]',
    "--trainer.callbacks+=test_multiprocess.FixedCompletions",
]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, pretrained):
    """One process without DeepSpeed, 4 prompts a step in 4 micro-batches: (log folder, final weights)."""
    run = tmp_path_factory.mktemp("plain")
    cli = run_cli(run, *COMPARED, f"--model.policy.name_or_path={pretrained}", "--data.batch_size=4")
    return run, {k: v.detach().clone() for k, v in cli.model.policy_model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, head_chunks", [(2, False), (3, False), (2, True)], ids=["zero2", "zero3", "zero2_head_in_chunks"]
)
def test_zero_on_two_cpu_processes_matches_one_plain_process(
    tmp_path, pretrained, plain_run, stage, head_chunks
):
    """ZeRO-2/3 on two processes trains as one plain process; with ``head_chunks`` the LM head runs a row
    chunk at a time (its parameters get their gradient inside the backward, under DeepSpeed's hooks) against
    the plain run's whole logits."""
    pytest.importorskip("deepspeed")  # an optional dependency (pip install trgrpo[deepspeed])
    from safetensors.torch import load_file

    run = tmp_path / f"zero{stage}"
    run.mkdir()
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "strategy" / f"deepspeed_zero{stage}.yaml"),
        *COMPARED,
        *logged(run),
        f"--model.policy.name_or_path={pretrained}",
        "--data.batch_size=2",  # per process: 2 x 4 sequences, 2 micro-batches per optimiser step
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy.class_path=trgrpo.strategies.CPUDeepSpeedStrategy",
        "--trainer.callbacks+=test_multiprocess.EngineFacts",
        f"--trainer.callbacks.folder={run / 'facts'}",
        *outputs(run),
        *(["--model.optim.max_logits_mib=1e-6"] if head_chunks else []),
    ]
    out = launch(args, run)
    assert_outputs(run, out)
    # DeepSpeed was told each process's own rank (not every process rank 0 of a world of 1)
    assert [(run / "facts" / f"rank{r}.txt").read_text() for r in (0, 1)] == ["0 2", "1 2"]
    chunked = [int((run / "facts" / f"rank{r}.chunked").read_text()) for r in (0, 1)]
    assert all(n > 0 for n in chunked) if head_chunks else chunked == [0, 0]

    plain, weights = plain_run
    expected, got = train_rows(plain), train_rows(run)
    assert sorted(got) == sorted(expected) == [0, 1]
    for step in expected:
        for key in ("train/loss", "train/grad_norm", "train/kl", "train/reward", "train/completion_length"):
            # float32 summed in other orders (over processes and micro-batches), and step 1 runs on weights
            # that already carry AdamW's amplified noise: measured up to 1.9e-6 relative (the step-0 loss is
            # a sum of advantages, zero up to rounding)
            assert got[step][key] == pytest.approx(expected[step][key], rel=2e-5, abs=1e-7), (step, key)
    assert expected[1]["train/kl"] > 0 and expected[0]["train/grad_norm"] > 0
    start = load_file(pretrained / "model.safetensors")
    exported = load_file(run / "hf" / "model.safetensors")
    assert min((weights[k] - start[k]).abs().max().item() for k in exported) > 1e-2  # every tensor moved
    for k, v in exported.items():
        # AdamW amplifies float noise on near-zero gradients: measured up to 2e-5, 0.2% of a step of lr 0.01
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-4, msg=k)
