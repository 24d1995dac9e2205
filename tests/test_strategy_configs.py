"""Strategy fragments: each composes with a base config; DeepSpeed is refused without CUDA; bad keys fail.

DeepSpeed itself only runs on CUDA in Lightning, but DeepSpeed's CPU accelerator can run ZeRO-2/3 on CPU
processes (one here; two in tests/test_multiprocess.py).  ``test_zero_on_cpu_matches_a_plain_run`` uses it
through ``trgrpo.strategies.CPUDeepSpeedStrategy`` (Lightning's strategy without its CUDA checks), to run
the real code paths of the fragments (sharded construction, generation on gathered ZeRO-3 weights,
micro-batch accumulation, DeepSpeed clipping, sharded checkpoints written atomically, export from the
shards) and compare with a run without DeepSpeed.
The file is also that run's script: ``python tests/test_strategy_configs.py FRAGMENT FACTS.json CLI_ARGS...``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, arithmetic_args, run_cli, train_rows
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from trgrpo.cli import main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FRAGMENTS = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
DEEPSPEED = [f for f in FRAGMENTS if f.name.startswith("deepspeed")]
DEMO = str(ROOT / "configs" / "demo.yaml")


# what a strategy fragment may set: how and where the processes run, and the memory trade of the policy
STRATEGY_KEYS = {
    "trainer": {"strategy", "accelerator", "devices", "num_nodes", "precision"},
    "model": {"policy"},
}


def test_the_scaling_table_lists_exactly_the_fragments():
    # docs/scaling.md's table is where a user picks a strategy: no fragment missing from it, no row naming a
    # file that is gone (and an empty folder, over which the tests below would run nothing, fails here)
    rows = re.findall(r"^\| `configs/strategy/([\w.]+)` \|", (ROOT / "docs" / "scaling.md").read_text(), re.M)
    assert sorted(rows) == [f.name for f in FRAGMENTS] and len(rows) == 4


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_a_fragment_sets_strategy_keys_only(fragment):
    # composed after any recipe, a fragment must leave the recipe's RL settings (task, loss, sampling) alone
    data = yaml.safe_load(fragment.read_text())
    assert set(data) <= set(STRATEGY_KEYS)
    for section, keys in data.items():
        assert set(keys) <= STRATEGY_KEYS[section], f"{fragment.name}: {section}.{sorted(keys)}"
    assert set(data.get("model", {}).get("policy", {})) <= {"gradient_checkpointing"}


def test_ddp_fragment_composes_with_a_base_config():
    cli = main(
        ["--config", DEMO, "--config", str(ROOT / "configs/strategy/ddp.yaml"), "--trainer.logger=false"],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.model.policy_cfg.gradient_checkpointing is False
    assert cli.model.sampling.group_size == 8  # the base config's settings survive


@pytest.mark.parametrize("fragment", DEEPSPEED, ids=lambda p: p.stem)
def test_deepspeed_fragment_builds_its_strategy(fragment):
    """Each fragment's keys are real DeepSpeedStrategy arguments and give the intended ZeRO config."""
    pytest.importorskip("deepspeed")  # an optional dependency (pip install trgrpo[deepspeed])
    data = yaml.safe_load(fragment.read_text())
    strategy = data["trainer"]["strategy"]
    module, _, name = strategy["class_path"].rpartition(".")
    built = getattr(importlib.import_module(module), name)(**strategy["init_args"])
    assert isinstance(built, DeepSpeedStrategy)
    zero = built.config["zero_optimization"]
    assert zero["stage"] == (2 if "zero2" in fragment.name else 3)
    assert ("offload_optimizer" in zero and "offload_param" in zero) == ("offload" in fragment.name)
    assert data["trainer"]["precision"] == "bf16-mixed"
    assert data["model"]["policy"]["gradient_checkpointing"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
@pytest.mark.parametrize("fragment", DEEPSPEED, ids=lambda p: p.stem)
def test_deepspeed_fragment_without_cuda_fails_at_start_naming_it(fragment):
    with pytest.raises(ValueError, match=rf"{fragment.name}: the DeepSpeed strategy needs CUDA GPUs"):
        main(["--config", DEMO, "--config", str(fragment)], run=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_deepspeed_by_name_on_the_command_line_fails_too():
    with pytest.raises(ValueError, match="--trainer.strategy: the DeepSpeed strategy needs CUDA"):
        main(["--config", DEMO, "--trainer.strategy=deepspeed_stage_3"], run=False)


def test_the_cpu_deepspeed_strategy_composes_with_a_fragment_without_cuda():
    """``trgrpo.strategies.CPUDeepSpeedStrategy`` (CPU debugging and CI) passes the start-up check that
    refuses DeepSpeed without CUDA, and keeps the fragment's ZeRO settings."""
    pytest.importorskip("deepspeed")
    from trgrpo.strategies import CPUDeepSpeedStrategy

    cli = main(
        [
            "--config",
            DEMO,
            "--config",
            str(ROOT / "configs/strategy/deepspeed_zero3.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--trainer.strategy.class_path=trgrpo.strategies.CPUDeepSpeedStrategy",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, CPUDeepSpeedStrategy)
    assert cli.trainer.strategy.config["zero_optimization"]["stage"] == 3


def test_unknown_strategy_name_fails_naming_it():
    with pytest.raises(ValueError, match="unknown trainer.strategy 'deepspeed_stage_9'"):
        main(["--config", DEMO, "--trainer.strategy=deepspeed_stage_9"], run=False)


def test_unknown_key_in_a_fragment_fails_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DeepSpeedStrategy\n"
        "    init_args: {stag: 3}\n"
    )
    with pytest.raises(SystemExit):
        main(["--config", DEMO, "--config", str(bad)], run=False)
    assert "'stag' is not accepted" in capsys.readouterr().err


# ------------------------------------------------------------------- ZeRO on DeepSpeed's CPU accelerator

ZERO_RUN = [
    *TINY,
    *arithmetic_args(batch_size=2, group_size=4),
    "--trainer.max_steps=2",
    "--model.optim.micro_batch_size=4",
    "--model.loss.beta=0.05",
    "--model.optim.lr=0.01",
    '--model.rewards=[{"fn": "trgrpo.rewards.regex_format", "kwargs": {"pattern": ".*[0-9].*"}}]',
]


# without KL, 2 optimiser steps per RL step of one group each: groups with equal rewards are skipped whole,
# and the engine still steps (on a zero gradient) as the plain run does
SKIP = ["--model.loss.beta=0", "--model.optim.mini_batch_size=4", "--trainer.max_steps=4"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, lora, extra",
    [(2, False, SKIP), (3, False, []), (3, True, []), (3, False, SKIP)],
    ids=["zero2-skip", "zero3", "zero3-lora", "zero3-skip"],
)
def test_zero_on_cpu_matches_a_plain_run(tmp_path, pretrained, stage, lora, extra):
    pytest.importorskip("deepspeed")  # an optional dependency (pip install trgrpo[deepspeed])
    import copy

    from safetensors.torch import load_file

    from trgrpo.export import export_checkpoint

    model = [f"--model.policy.name_or_path={pretrained}", *extra]
    if lora:  # the exports below are then the merged models
        model += [
            "--model.policy.lora.r=4",
            "--model.policy.lora.alpha=8",
            "--model.policy.lora.target_modules=all-linear",
        ]
    plain = run_cli(tmp_path / "plain", *ZERO_RUN, *model)
    policy = copy.deepcopy(plain.model.policy_model).merge_and_unload() if lora else plain.model.policy_model
    reference = {k: v.detach() for k, v in policy.state_dict().items()}

    run = tmp_path / "zero"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "no-jit-builds"),
    }
    cmd = [
        sys.executable,
        str(HERE / "test_strategy_configs.py"),
        f"deepspeed_zero{stage}.yaml",
        str(run / "facts.json"),
        "fit",
        *ZERO_RUN,
        *model,
        "--trainer.precision=32-true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run}",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=trgrpo.checkpointing.AtomicModelCheckpoint",
        f"--trainer.callbacks.dirpath={run / 'ckpt'}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=0",
        "--trainer.callbacks+=trgrpo.callbacks.HFExport",
        f"--trainer.callbacks.dirpath={run / 'hf'}",
        f"--trainer.callbacks.merge_lora={str(lora).lower()}",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    facts = json.loads((run / "facts.json").read_text())
    if stage == 3:  # built inside configure_model: every weight was a shard from its creation on
        assert facts["policy_sharded"] and facts["ref_sharded"] is not False
    if lora or extra:  # LoRA: the reference is the policy with its adapters disabled; beta = 0: none at all
        assert facts["ref_sharded"] is None and facts["ref_frozen_eval"] is None
    else:
        assert facts["ref_frozen_eval"]
    assert facts["managed_gradient_accumulation"] is False
    assert facts["gradient_clipping"] == 1.0 and facts["gradient_checkpointing"]

    # same gradients (pre-clip norm), losses, KL and samples as without DeepSpeed, step by step: two
    # micro-batches per step accumulate (a lost micro-batch changes grad_norm), generation sees the weights
    expected, got = train_rows(tmp_path / "plain"), train_rows(run)
    assert sorted(got) == sorted(expected) == [0, 1]
    for step in expected:
        for key in (
            "train/loss",
            "train/grad_norm",
            "train/reward",
            "train/completion_length",
            *(() if extra else ("train/kl",)),
        ):
            # float32 through other reduction orders, and step 1 runs on weights that already carry AdamW's
            # amplified noise (below): measured up to 2.2e-6 relative
            assert got[step][key] == pytest.approx(expected[step][key], rel=2e-5, abs=1e-7), (step, key)
    if extra:  # some group had equal rewards and was skipped, and the weights still moved
        assert max(r["train/frac_reward_zero_std"] for r in expected.values()) > 0
    else:
        assert expected[1]["train/kl"] > 0

    exported = load_file(run / "hf" / "model.safetensors")
    for k, v in exported.items():  # AdamW amplifies float noise on near-zero gradients: ~0.1% of a step
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-4, msg=k)
    last = run / "ckpt" / "last.ckpt"
    assert last.is_symlink() and last.is_dir()  # a folder of shards, published through a symlink
    again = export_checkpoint(last, tmp_path / "from-shards", merge_lora=lora)  # on the CPU, from the shards
    for k, v in load_file(
        again / "model.safetensors"
    ).items():  # the same stored values, no arithmetic: exact
        torch.testing.assert_close(v, exported[k], rtol=0, atol=0, msg=k)


if __name__ == "__main__":
    fragment, facts_path, cli_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    import trgrpo.cli
    import trgrpo.module

    configure_model = trgrpo.module.GRPOModule.configure_model

    def configure_and_record(self):
        configure_model(self)
        cfg, ref = self.trainer.strategy.config, self.ref_model
        Path(facts_path).parent.mkdir(parents=True, exist_ok=True)
        Path(facts_path).write_text(
            json.dumps(
                {
                    "policy_sharded": all(
                        p.numel() == 0 and hasattr(p, "ds_id") for p in self.policy_model.parameters()
                    ),
                    "ref_sharded": None
                    if ref is None
                    else all(p.numel() == 0 and hasattr(p, "ds_id") for p in ref.parameters()),
                    "ref_frozen_eval": None
                    if ref is None
                    else not ref.training and not any(p.requires_grad for p in ref.parameters()),
                    "managed_gradient_accumulation": cfg["managed_gradient_accumulation"],
                    "gradient_clipping": cfg["gradient_clipping"],
                    "gradient_checkpointing": self.policy_model.is_gradient_checkpointing,
                }
            )
        )

    trgrpo.module.GRPOModule.configure_model = configure_and_record
    trgrpo.cli.main(
        [
            *cli_args[:1],
            "--config",
            str(ROOT / "configs/strategy" / fragment),
            *cli_args[1:],
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy.class_path=trgrpo.strategies.CPUDeepSpeedStrategy",
        ]
    )


def test_the_supervised_warm_start_refuses_zero3_before_any_model_is_built():
    """It steps the policy with its own optimiser, which ZeRO-3's shards cannot take: a clear refusal at
    set-up, not a tensor-size error from inside the optimiser."""
    from types import SimpleNamespace

    from trgrpo.callbacks import SupervisedWarmStart

    zero3 = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True))
    with pytest.raises(ValueError, match=r"SupervisedWarmStart does not run under DeepSpeed ZeRO-3"):
        SupervisedWarmStart(steps=5).setup(zero3, None, "fit")
    SupervisedWarmStart(steps=0).setup(zero3, None, "fit")  # switched off: nothing to refuse
    SupervisedWarmStart(steps=5).setup(
        SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=False)), None, "fit"
    )
