"""Weighting fragments compose with every base recipe and yield their weighting with the published values.

A fragment in ``configs/weighting/`` sets ``model.weighting`` only and is given after a base recipe:
``python -m trgrpo fit --config configs/kk_qwen2.5_3b.yaml --config configs/weighting/ar.yaml``.
jsonargparse merges a later ``class_path`` over an earlier one by dropping the earlier class's ``init_args``
when the class changes (TR-GRPO's ``alpha`` never reaches ``Lopti``) and by merging them key by key when it is
the same class, which is why the TR-GRPO fragments name ``placement``, ``weight_kl`` and ``reverse`` and
``lopti.yaml`` names ``ar_alpha``.
Parsing only (``run=False``): the 3B recipes build no model, so nothing is downloaded.

    python -m pytest tests/test_weighting_configs.py -q
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import yaml
from helpers import recipe_params
from lightning.pytorch.strategies import DDPStrategy

import trgrpo.weighting
from trgrpo.cli import main
from trgrpo.losses import sequence_ratio

ROOT = Path(__file__).resolve().parents[1]
BASES = sorted((ROOT / "configs").glob("*.yaml"))  # every top-level recipe is a base
FRAGMENTS = sorted((ROOT / "configs" / "weighting").glob("*.yaml"))
TR_GRPO = {"alpha": 2.0, "tau": 0.1111111111, "mu": 0.25, "lower": 1.0, "upper": 1.4}
# fragment -> (class, the values it must give; every other argument keeps the class default)
PUBLISHED = {
    "grpo": ("UniformWeighting", {}),
    "tr_grpo": ("TokenRegulatedWeighting", {**TR_GRPO, "placement": "surrogate"}),
    "tr_grpo_ratio": ("TokenRegulatedWeighting", {**TR_GRPO, "placement": "ratio"}),
    "tr_grpo_weight_kl": (
        "TokenRegulatedWeighting",
        {**TR_GRPO, "placement": "surrogate", "weight_kl": True},
    ),
    "tr_grpo_reverse": ("TokenRegulatedWeighting", {**TR_GRPO, "placement": "surrogate", "reverse": True}),
    "ar": ("AdvantageReweighting", {"alpha": 0.3}),
    "lopti": ("LoptiWeighting", {"eta": 0.5, "low_first": True, "ar_alpha": 0.0}),
    "ar_lopti": ("LoptiWeighting", {"eta": 0.5, "low_first": True, "ar_alpha": 0.3}),
    "high_entropy": ("HighEntropyWeighting", {"q": 0.2}),
    "entropy_shaped": ("EntropyShapedWeighting", {"beta": 0.5, "negative_only": False}),
}
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1"]  # the GPU recipes keep theirs in the file


def _expected(stem: str) -> tuple[type, dict]:
    name, values = PUBLISHED[stem]
    cls = getattr(trgrpo.weighting, name)
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    return cls, {**defaults, **values}


def _parse(*configs: Path, extra: tuple[str, ...] = ()):
    return main([a for c in configs for a in ("--config", str(c))] + CPU + list(extra), run=False)


@functools.cache
def _base_alone(base: Path) -> dict:
    return _parse(base).config.as_dict()


def _without_weighting(config: dict) -> dict:
    config = {**config, "model": {k: v for k, v in config["model"].items() if k != "weighting"}}
    config.pop("config", None)  # the list of config files given
    return config


def test_the_fragments_are_the_published_weightings():
    assert sorted(f.stem for f in FRAGMENTS) == sorted(PUBLISHED)
    assert {
        "demo.yaml",
        "kk_tiny_cpu.yaml",
        "kk_qwen2.5_3b.yaml",
        "math_gsm8k_qwen2.5_3b.yaml",
        "agentic_tiny_cpu.yaml",
        "search_r1_qwen2.5_3b.yaml",
    } <= {b.name for b in BASES}  # Search-R1's GRPO twin: with grpo.yaml


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_a_fragment_sets_the_weighting_only_and_says_how_to_compose_it(fragment):
    text = fragment.read_text()
    data = yaml.safe_load(text)
    assert list(data) == ["model"] and list(data["model"]) == ["weighting"]
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and "arXiv" in header[0]  # what it is and which paper, first
    assert f"--config configs/weighting/{fragment.name}" in text


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("base", recipe_params(BASES, lambda p: p.stem))
def test_every_base_composes_with_every_fragment(base, fragment):
    cls, init_args = _expected(fragment.stem)
    cli = _parse(base, fragment)
    assert type(cli.model.weighting) is cls
    parsed = cli.config.model.weighting
    assert parsed.class_path == f"trgrpo.weighting.{cls.__name__}"
    # nothing of the base's TR-GRPO arguments leaks in (a base without a weighting parses none at all)
    given = parsed.init_args.as_dict() if "init_args" in parsed else {}
    assert given == init_args
    # the fragment changes the weighting and nothing else: same task, model, loss, and the base's log folder
    assert _without_weighting(cli.config.as_dict()) == _without_weighting(_base_alone(base))


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_a_fragment_replaces_every_weighting_before_it(fragment):
    """Given after every other fragment (those of its own class last), it still yields exactly its values."""
    cls, init_args = _expected(fragment.stem)
    others = sorted(
        (f for f in FRAGMENTS if f != fragment), key=lambda f: PUBLISHED[f.stem][0] == cls.__name__
    )
    cli = _parse(ROOT / "configs" / "demo.yaml", *others, fragment)
    assert type(cli.model.weighting) is cls
    assert cli.config.model.weighting.init_args.as_dict() == init_args


def test_the_logger_name_gives_each_weighting_its_own_folder():
    base, ar = ROOT / "configs" / "kk_qwen2.5_3b.yaml", ROOT / "configs" / "weighting" / "ar.yaml"
    assert _parse(base, ar).trainer.logger.name == "kk_qwen2.5_3b"
    cli = _parse(base, ar, extra=("--trainer.logger.init_args.name=kk_qwen2.5_3b_ar",))
    assert (cli.trainer.logger.save_dir, cli.trainer.logger.name) == ("logs", "kk_qwen2.5_3b_ar")
    assert type(cli.model.weighting).__name__ == "AdvantageReweighting"


def test_strategy_and_weighting_fragments_compose_together():
    cli = _parse(
        ROOT / "configs" / "demo.yaml",
        ROOT / "configs" / "strategy" / "ddp.yaml",
        ROOT / "configs" / "weighting" / "lopti.yaml",
        extra=("--trainer.logger=false",),
    )
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert type(cli.model.weighting).__name__ == "LoptiWeighting"


@pytest.mark.parametrize(
    ("old", "new", "init_args"),
    [
        ("Lopti", "LoptiWeighting", {"eta": 0.3, "low_first": False, "ar_alpha": 0.1}),
        ("HighEntropyTokens", "HighEntropyWeighting", {"q": 0.3}),
    ],
)
def test_the_former_class_names_still_load_from_the_command_line_and_yaml(old, new, init_args, tmp_path):
    """Configs written before the rename: the short name on the command line and the full class path."""
    cls = getattr(trgrpo.weighting, new)
    args = [f"--model.weighting.init_args.{k}={v}" for k, v in init_args.items()]
    short = _parse(ROOT / "configs" / "demo.yaml", extra=(f"--model.weighting={old}", *args))
    fragment = tmp_path / f"{old}.yaml"
    weighting = {"class_path": f"trgrpo.weighting.{old}", "init_args": init_args}
    fragment.write_text(yaml.safe_dump({"model": {"weighting": weighting}}))
    full = _parse(ROOT / "configs" / "demo.yaml", fragment)
    for cli in (short, full):
        assert isinstance(cli.model.weighting, cls)
        assert {k: getattr(cli.model.weighting, k) for k in init_args} == init_args
        assert cli.model.plan.multi_pass == cls.multi_pass  # the same update as under the new name


def test_print_config_of_a_composed_recipe_names_the_fragment_weighting(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                "--config",
                str(ROOT / "configs" / "weighting" / "ar.yaml"),
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["weighting"] == {
        "class_path": "trgrpo.weighting.AdvantageReweighting",
        "init_args": {"alpha": 0.3},
    }
    assert printed["data"]["task"]["class_path"] == "trgrpo.tasks.ArithmeticTask"  # still the demo


GSPO = ROOT / "configs" / "loss" / "gspo.yaml"


@pytest.mark.parametrize("base", recipe_params(BASES, lambda p: p.stem))
def test_the_gspo_fragment_changes_the_ratio_and_keeps_the_rest_of_the_loss(base):
    cli = _parse(base, GSPO)
    loss, alone = cli.config.model.loss.as_dict(), _base_alone(base)["model"]["loss"]
    assert loss == {
        **alone,
        "ratio_level": "sequence",
        "aggregation": "seq_mean_token_mean",
        "clip_low": 0.0003,
        "clip_high": 0.0004,
    }
    assert type(cli.model.weighting).__name__ == "UniformWeighting"
    assert cli.model.loss_fn.ratio is sequence_ratio  # the loss computes GSPO's sequence ratio
