"""Two-process DDP (gloo, CPU): the same loss and updated weights as one process on the same global batch.

The global batch is 4 prompts x 4 completions.  One process takes all 4 prompts in 2 micro-batches of 8
sequences; two processes (launched with torchrun, as on a cluster) take 2 prompts each in 2 micro-batches of
4.  ``ResumableSampler`` deals prompt k of the single-process batch to rank k mod 2, so the union of the two
ranks' batches is the single-process batch.  Rollouts are replaced by a fixed function of the prompt (the
sampled tokens would differ between the runs) so that the two runs see the same completions; everything
after generation (rewards, advantages, reference log-probs, KL, loss, all-reduce, clipping, AdamW) is real.

Run by pytest; the file is also the worker script: ``python tests/test_distributed.py OUT.pt CLI_ARGS...``.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def fixed_rollout(model, tokenizer, prompts, sampling, group_size=None, greedy=False, rows=None, engine=None):
    """Completion j of prompt p: digit j+1, digit (sum of p's characters mod 10), EOS — no sampling."""
    from trgrpo.rollout import Rollout

    g = 1 if greedy else (group_size or sampling.group_size)
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    texts = [f"{j % 9 + 1}{sum(map(ord, p)) % 10}" for p in prompts for j in range(g)]
    completion = torch.tensor(
        [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    )  # [N, 3]
    ids = torch.cat([enc.input_ids.repeat_interleave(g, 0), completion], 1)
    attn = torch.cat([enc.attention_mask.repeat_interleave(g, 0), torch.ones_like(completion)], 1)
    return Rollout(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        completion_mask=torch.ones(completion.shape, device=device),
        truncated=torch.zeros(len(texts), dtype=torch.bool, device=device),
        prompt_len=enc.input_ids.shape[1],
        completions=texts,
    )


def common_args(tmp: Path) -> list[str]:
    from helpers import TINY, arithmetic_args

    return [
        "fit",
        *TINY,
        *arithmetic_args(batch_size=4, group_size=4, max_new_tokens=3),
        "--trainer.max_steps=2",
        "--trainer.precision=32-true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp}",
        f"--trainer.default_root_dir={tmp}",
        "--model.optim.lr=0.01",
        "--model.loss.beta=0.05",
        # the completions above start with 1..4: the format reward splits every group in two
        '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": "^[12]\\\\d$"}}, '
        '{"fn": "trgrpo.rewards.exact_match", "weight": 0.5}]',
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]


def _metrics(tmp: Path) -> dict[int, dict[str, float]]:
    (path,) = tmp.glob("**/metrics.csv")
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                rows[int(row["step"])] = {k: float(v) for k, v in row.items() if k.startswith("train/") and v}
    return rows


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _run(
        [
            sys.executable,
            str(HERE / "test_distributed.py"),
            str(one / "w.pt"),
            *common_args(one),
            "--model.optim.micro_batch_size=8",
        ],
        one,
    )
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            str(HERE / "test_distributed.py"),
            str(two / "w.pt"),
            *common_args(two),
            "--data.batch_size=2",
            "--model.optim.micro_batch_size=4",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
            f"--trainer.callbacks.dirpath={two / 'ckpt'}",
            "--trainer.callbacks.save_last=true",
        ],
        two,
    )

    # the first step's gradient (summed over processes and micro-batches) is the same; AdamW is blind to a
    # wrong gradient scale, so this and grad_norm are what catch a normaliser divided twice
    g1, g2 = torch.load(one / "w.pt.grad"), torch.load(two / "w.pt.grad")
    assert sorted(g1) == sorted(g2) and max(g.abs().max().item() for g in g1.values()) > 1e-3
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7, msg=k)
    # and the weights after two steps (tiny gradients near AdamW's eps amplify float noise: 1% of a step)
    w0, w1, w2 = torch.load(one / "w.pt.init"), torch.load(one / "w.pt"), torch.load(two / "w.pt")
    assert min((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-2  # every tensor moved by ~2 x lr
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=2e-4, msg=k)

    # the checkpoint holds each process's random state and the sharded data position
    ckpt = torch.load(two / "ckpt" / "last.ckpt", weights_only=False)
    assert len(ckpt["trgrpo"]["rng"]) == 2 and "ref_model.model.norm.weight" not in ckpt["state_dict"]
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader == {"epoch": 0, "batches": 2, "batch_size": 2, "num_replicas": 2, "seed": 0}

    m1, m2 = _metrics(one), _metrics(two)
    assert sorted(m1) == sorted(m2) and len(m1) == 2  # one row per step, logged once
    for step in m1:
        for key in (
            "train/loss",
            "train/grad_norm",
            "train/reward",
            "train/kl",
            "train/clip_ratio/low",
            "train/weight/mean",
            "train/completion_length",
        ):
            assert m2[step][key] == pytest.approx(m1[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert m1[0]["train/grad_norm"] > 0


def test_a_world_size_leaving_a_process_without_a_whole_batch_fails_before_training():
    """data.batch_size is per process: 12 prompts over 4 processes leave 3 each, not a batch of 4 groups."""
    from types import SimpleNamespace

    from trgrpo.data import PromptDataModule
    from trgrpo.tasks import ArithmeticTask

    datamodule = PromptDataModule(task=ArithmeticTask(), batch_size=4)
    datamodule.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(
        ValueError,
        match=r"world size 4 .* leaves 3 of the 12 training prompts to each process, "
        r"fewer than one batch of data.batch_size=4",
    ):
        datamodule.check_prompt_count(12)
    datamodule.trainer = SimpleNamespace(world_size=3)
    datamodule.check_prompt_count(12)  # 4 prompts each: fine


def test_processes_draw_disjoint_prompts_whose_union_is_the_single_process_batch():
    from trgrpo.data import ResumableSampler

    rows = list(range(40))
    single = list(ResumableSampler(rows, num_replicas=1, rank=0, seed=3, batch_size=4, progress=lambda: 0))
    ranks = [
        list(ResumableSampler(rows, num_replicas=2, rank=r, seed=3, batch_size=2, progress=lambda: 0))
        for r in (0, 1)
    ]
    for k in range(10):  # batch k of one process with 4 prompts = batches k of two processes with 2 each
        assert sorted(single[4 * k : 4 * k + 4]) == sorted(
            ranks[0][2 * k : 2 * k + 2] + ranks[1][2 * k : 2 * k + 2]
        )
    assert not set(ranks[0]) & set(ranks[1])


def test_the_backend_is_built_once_with_what_its_step_needs():
    """One process and DDP clip in the plain backend at ``optim.grad_clip``; a DeepSpeed strategy has its
    config adapted to the manual RL step when its backend is built (nothing is launched: no GPU needed)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from trgrpo.backend import DeepSpeedBackend, PlainBackend, training_backend
    from trgrpo.config import OptimConfig

    backward_calls = []
    plain = training_backend(None, OptimConfig(grad_clip=0.5), backward_calls.append, 0)
    assert type(plain) is PlainBackend
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (model(torch.tensor([[3.0, 4.0]])).sum()).backward()  # gradient [3, 4]: norm 5
    plain.note_backward()
    assert plain.step(model, opt, sched) == pytest.approx(5.0)  # the pre-clip norm
    # SGD at lr 1 moves the weights by the clipped gradient: [3, 4] * 0.5 / 5
    torch.testing.assert_close(before - model.weight.detach(), torch.tensor([[0.3, 0.4]]))
    assert backward_calls == []  # only DeepSpeed's step after no backward at all calls it

    pytest.importorskip("deepspeed")  # an optional dependency (pip install trgrpo[deepspeed])
    strategy = DeepSpeedStrategy(stage=2)
    deepspeed = training_backend(strategy, OptimConfig(grad_clip=0.5), backward_calls.append, 7)
    assert type(deepspeed) is DeepSpeedBackend and deepspeed.token_id == 7
    assert strategy.config["gradient_clipping"] == 0.5
    assert strategy.config["managed_gradient_accumulation"] is False  # the RL step owns the boundary


if __name__ == "__main__":
    out_path, cli_args = sys.argv[1], sys.argv[2:]
    import trgrpo.module
    from trgrpo.cli import main

    trgrpo.module.generate_rollout = fixed_rollout
    init = {}
    original = trgrpo.module.GRPOModule.on_train_start

    def on_train_start(self):
        init.update({k: v.detach().clone() for k, v in self.policy_model.state_dict().items()})
        original(self)

    trgrpo.module.GRPOModule.on_train_start = on_train_start
    grads = {}
    optimiser_step = trgrpo.module.GRPOModule.optimiser_step

    def record_first_gradient(self, opt, sched):
        if not grads:
            grads.update({k: p.grad.detach().clone() for k, p in self.policy_model.named_parameters()})
        return optimiser_step(self, opt, sched)

    trgrpo.module.GRPOModule.optimiser_step = record_first_gradient
    cli = main(cli_args)
    if cli.trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in cli.model.policy_model.state_dict().items()}, out_path)
        torch.save(init, out_path + ".init")
        torch.save(grads, out_path + ".grad")
