"""Several processes through the real CLI (``--trainer.devices=2`` or 3, DDP over gloo): random streams,
resume, SIGTERM and odd world sizes.

- Each process samples from its own stream: both processes are given the same prompt (``SameProbe``) and
  their sampled tokens differ (with one stream for all they were equal, token for token).
- A run resumed from a checkpoint of step 2 logs exactly the metrics of the uninterrupted run after it.
- SIGTERM to the launcher's process group after the first checkpoint: every process stops after the same
  step and saves (the checkpoint holds both processes' random states), the run exits with 143, and
  ``--ckpt_path last`` continues it to the metrics of the uninterrupted run.
- Three processes train where the batch fits, and refuse before any model loads where it does not.

Every run has a hard timeout and is killed with its whole process group (``test_multiprocess.launch``).

    python -m pytest -q tests/test_multiprocess_streams.py      (about 2 minutes on a quiet 2-core machine)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TINY, arithmetic_args, train_rows
from test_multiprocess import TIMEOUT, launch, logged, start
from torch import Tensor

PROBE = "7 + 5 ="  # the prompt every process samples from in SameProbe runs


def slow_digits(completions, **_):
    """The share of digits in 4 characters, a quarter second late (a SIGTERM lands inside a step)."""
    time.sleep(0.25)
    return [sum(ch.isdigit() for ch in c) / 4.0 for c in completions]


class ProbeEngine:
    """Samples ``PROBE`` in place of every training prompt and appends what it drew to ``rank<N>.jsonl``."""

    def __init__(self, inner, path: Path) -> None:
        self.inner, self.path = inner, path

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def generate(self, model, tokenizer, prompts, sampling, group_size, greedy):
        if greedy:
            return self.inner.generate(model, tokenizer, prompts, sampling, group_size, greedy)
        out = self.inner.generate(model, tokenizer, [PROBE] * len(prompts), sampling, group_size, greedy)
        tokens = out.input_ids[:, out.prompt_len :].tolist()  # [U * G, T]
        with open(self.path, "a") as f:
            f.write(json.dumps({"prompts": prompts, "tokens": tokens, "completions": out.completions}) + "\n")
        return out


class SameProbe(L.Callback):
    """Puts ``ProbeEngine`` around the run's engine; its records go under ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        path = Path(self.folder) / f"rank{trainer.global_rank}.jsonl"
        pl_module.engine = ProbeEngine(pl_module.engine, path)


def probes(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def run_args(run: Path, ckpt: Path, devices: int = 2, max_steps: int = 4) -> list[str]:
    """A DDP run of ``devices`` processes on CPU, a checkpoint after every step (all kept) in ``ckpt``."""
    return [
        "fit",
        *TINY,
        *arithmetic_args(batch_size=2, group_size=4),
        *logged(run),
        "--seed_everything=7",
        f"--trainer.devices={devices}",
        "--trainer.strategy=ddp",
        f"--trainer.max_steps={max_steps}",
        "--trainer.num_sanity_val_steps=0",
        "--model.rewards=[{fn: test_multiprocess_streams.slow_digits}]",
        "--trainer.callbacks+=test_multiprocess_streams.SameProbe",
        f"--trainer.callbacks.folder={run / 'probe'}",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt}",
        "--trainer.callbacks.filename={step}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
    ]


def same_metrics(got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]], steps) -> None:
    """Every logged ``train/*`` metric of ``steps`` equal (the wall times left out)."""
    for step in steps:
        want = {k: v for k, v in expected[step].items() if not k.startswith("train/time")}
        have = {k: v for k, v in got[step].items() if not k.startswith("train/time")}
        assert have == want, step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 processes, 4 RL steps, a checkpoint after each: (run folder, checkpoint folder)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    launch(run_args(run, run / "ckpt"), run)
    return run, run / "ckpt"


@pytest.mark.slow
def test_each_process_samples_its_own_stream(uninterrupted):
    run, _ = uninterrupted
    first, second = probes(run / "probe", 0), probes(run / "probe", 1)
    assert len(first) == len(second) == 4
    # the same prompt and (at step 0) the same weights: only the random stream can tell the two apart
    assert first[0]["tokens"] != second[0]["tokens"]
    assert all(a["tokens"] != b["tokens"] for a, b in zip(first, second, strict=True))
    # the data is still sharded from one order: the processes train on different prompts
    assert not set(first[0]["prompts"]) & set(second[0]["prompts"])


@pytest.mark.slow
def test_statistics_are_over_all_processes(uninterrupted):
    run, _ = uninterrupted
    rows = train_rows(run)
    for step in range(4):
        # every completion of the step on both processes, scored as slow_digits scores it
        texts = [c for rank in (0, 1) for c in probes(run / "probe", rank)[step]["completions"]]
        scores = torch.tensor(slow_digits(texts), dtype=torch.float64)
        assert rows[step]["train/rewards/slow_digits"] == pytest.approx(scores.mean().item(), rel=1e-6)
        assert rows[step]["train/rewards/slow_digits_std"] == pytest.approx(scores.std().item(), rel=1e-6)
        for phase in ("generation", "reward", "old_logprobs", "update"):  # the slowest process, and the mean
            assert rows[step][f"train/time_max/{phase}"] >= rows[step][f"train/time/{phase}"]


@pytest.mark.slow
def test_a_resumed_run_logs_what_the_uninterrupted_run_logged(uninterrupted, tmp_path):
    run, ckpt = uninterrupted
    resumed = tmp_path / "resumed"
    launch([*run_args(resumed, tmp_path / "ckpt"), f"--ckpt_path={ckpt / 'step=2.ckpt'}"], tmp_path)
    for rank in (0, 1):  # the prompts and sampled tokens of each process
        assert probes(resumed / "probe", rank) == probes(run / "probe", rank)[2:]
    expected, got = train_rows(run), train_rows(resumed)
    assert sorted(got) == [2, 3] and sorted(expected) == [0, 1, 2, 3]
    same_metrics(got, expected, [2, 3])


def sigterm_after_first_checkpoint(args: list[str], cwd: Path, ckpt: Path) -> tuple[int, str]:
    """Start a run, send SIGTERM to its whole process group once ``last.ckpt`` exists; (status, output)."""
    proc = start(args, cwd)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (ckpt / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its first checkpoint"
        os.killpg(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except BaseException as err:
        os.killpg(proc.pid, signal.SIGKILL)  # every process of the run, hung or not
        reader.join(timeout=30)
        if isinstance(err, subprocess.TimeoutExpired):
            pytest.fail(f"no end after SIGTERM (a process waits in a collective?):\n{''.join(out)[-6000:]}")
        raise
    reader.join(timeout=30)
    return status, "".join(out)


@pytest.mark.slow
def test_sigterm_saves_on_every_process_exits_143_and_resumes(uninterrupted, tmp_path):
    run, _ = uninterrupted
    stopped, ckpt = tmp_path / "stopped", tmp_path / "ckpt"
    status, out = sigterm_after_first_checkpoint(run_args(stopped, ckpt), tmp_path, ckpt)
    assert status == 143, out[-6000:]
    saved = torch.load(ckpt / "last.ckpt", weights_only=True)
    step = saved["global_step"]
    assert 1 <= step < 4, out[-3000:]
    assert len(saved["trgrpo"]["rng"]) == 2  # both processes' random states, in rank order
    for rank in (0, 1):  # every process took part in the save, after the same step
        assert f"SIGTERM: process {rank} saved its part of the checkpoint of step {step}" in out, out[-6000:]
    resumed = tmp_path / "resumed"
    launch([*run_args(resumed, ckpt), "--ckpt_path=last"], tmp_path)
    got, expected = train_rows(resumed), train_rows(run)
    assert sorted(got) == list(range(step, 4))
    same_metrics(got, expected, range(step, 4))


@pytest.mark.slow
def test_three_processes_train_where_the_batch_fits(tmp_path):
    launch(run_args(tmp_path, tmp_path / "ckpt", devices=3, max_steps=1), tmp_path)
    assert sorted(train_rows(tmp_path)) == [0]
    drawn = [probes(tmp_path / "probe", rank)[0]["tokens"] for rank in range(3)]
    assert drawn[0] != drawn[1] != drawn[2] != drawn[0]


@pytest.mark.slow
def test_three_processes_refuse_a_batch_that_does_not_fit_before_any_model_loads(tmp_path):
    # 5 training prompts over 3 processes: 1 each, fewer than data.batch_size = 2
    args = [
        *run_args(tmp_path, tmp_path / "ckpt", devices=3, max_steps=1),
        "--data.task.init_args.train_size=5",
    ]
    out = launch(args, tmp_path, returncode=1)
    assert "world size 3 (trainer.devices x trainer.num_nodes)" in out and "data.batch_size=2" in out
    assert "configure_model" not in out and "load_model" not in out  # raised in the data module's set-up


# --------------------------------------------------------------------------- units: agreement and pooling


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    return LlamaForCausalLM(cfg)


def _grouped_batch(completion_tokens: int) -> tuple[Tensor, Tensor]:
    """2 prompts x 2 completions, prompts of 3 tokens: [4, 3 + completion_tokens] ids and mask."""
    prompts = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]])
    ids = torch.cat([prompts, torch.arange(4 * completion_tokens).reshape(4, -1) % 7 + 7], dim=1)
    return ids, torch.ones_like(ids)


def _forwards(model: torch.nn.Module, completion_tokens: int, agree) -> int:
    from trgrpo.fastpath.shared_prefix import completion_logits

    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    ids, attn = _grouped_batch(completion_tokens)
    with torch.no_grad():
        completion_logits(model, ids, attn, 3, agree=agree)
    hook.remove()
    return len(calls)


def test_the_shared_prefix_way_is_taken_only_when_every_process_can_take_it():
    model = _tiny_llama()
    asked: list[bool] = []

    def peers_say(answer: bool):  # a fake all-reduce (min) with one other process answering ``answer``
        return lambda ok, device: asked.append(ok) or (ok and answer)

    assert _forwards(model, 3, peers_say(True)) == 2  # both can: prompt pass + completion pass
    assert _forwards(model, 3, peers_say(False)) == 1  # a peer cannot: the plain forward, as the peer
    assert _forwards(model, 1, peers_say(True)) == 1  # this one cannot (one completion token): the plain one
    assert asked == [True, True, False]


def _forwards_in_process_group(rank: int, world: int, port: int, folder: str) -> None:
    """Process ``rank`` of a gloo group: scores a batch of ``rank * 2 + 1`` completion tokens (one token on
    rank 0: it cannot share the prompt) and writes how many forwards that took."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trgrpo.fastpath.shared_prefix import agree_across_processes

        n = _forwards(_tiny_llama(), rank * 2 + 1, agree_across_processes)
        (Path(folder) / f"rank{rank}.txt").write_text(str(n))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_agree_on_the_number_of_forwards(tmp_path):
    # under ZeRO-3 every forward gathers each layer with all processes: 1 forward here and 2 there would hang
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _forwards_in_process_group, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["1", "1"]


def test_reward_terms_are_pooled_over_processes_not_averaged():
    from trgrpo.rewards import RewardResult
    from trgrpo.stats import ProcessReduce, reward_fields, term_moments

    nan = float("nan")
    mine = {"fmt": torch.tensor([1.0, 0.0, 1.0, 1.0]), "judge": torch.tensor([nan, nan, 0.5, nan])}
    theirs = {"fmt": torch.tensor([0.0, 0.0, 0.0, 1.0]), "judge": torch.tensor([0.0, 1.0, nan, 0.25])}
    other = term_moments(theirs)  # [terms, 3]: what the other process adds in the all-reduce
    two = ProcessReduce(lambda t: t + other, lambda t: torch.maximum(t, torch.ones_like(t)), 2)
    got = reward_fields(RewardResult(mine["fmt"], mine, 0), 2, two)["reward_terms"]
    for name in mine:
        both = torch.cat([mine[name], theirs[name]])
        both = both[~both.isnan()].double()
        assert got[f"train/rewards/{name}"] == pytest.approx(both.mean().item(), rel=1e-12)
        assert got[f"train/rewards/{name}_std"] == pytest.approx(both.std().item(), rel=1e-12)
    # fmt: 4 of 8 ones -> mean 0.5, std sqrt(8 * 0.5^2 / 7) = 0.53452; the mean of the two processes' stds
    # (0.5 each) would log 0.5; judge: one value here, three there -> the std of all four
    assert got["train/rewards/fmt_std"] == pytest.approx(0.534522484, rel=1e-8)
    alone = reward_fields(RewardResult(mine["fmt"], mine, 0), 2, ProcessReduce.current())["reward_terms"]
    assert alone["train/rewards/judge_std"] == 0.0 and alone["train/rewards/judge"] == 0.5


def test_the_slowest_process_phase_times_are_logged_beside_the_mean():
    from trgrpo.stats import ProcessReduce, StepTimings, slowest_timings

    other = torch.tensor([4.0, 0.5, 0.1, 2.0], dtype=torch.float64)  # the other process's times
    two = ProcessReduce(lambda t: t, lambda t: torch.maximum(t, other), 2)
    assert slowest_timings(StepTimings(1.0, 1.0, 1.0, 1.0), two) == StepTimings(4.0, 1.0, 1.0, 2.0)
    assert slowest_timings(StepTimings(1.0, 1.0, 1.0, 1.0), ProcessReduce.current()) is None  # one process


def test_process_seeds_keep_rank_zero_and_differ_elsewhere():
    from trgrpo.random_streams import process_seed

    assert process_seed(7, 0) == 7  # a one-process run draws what it always drew
    seeds = {process_seed(s, r) for s in range(4) for r in range(1, 9)}
    assert len(seeds) == 32 and not seeds & set(range(4))  # no process replays another's, nor a rank 0
    assert process_seed(0, 1) == process_seed(0, 1) < 2**63  # deterministic, a valid torch seed
