"""No config or doc cites a file that does not exist in the repository.

Scans ``configs/**/*.yaml``, ``README.md`` and ``docs/*.md`` for three kinds of reference and fails naming the
file and each missing path:

- repository paths starting with ``configs/``, ``scripts/``, ``docs/``, ``tests/`` or ``trgrpo/`` (from the
  repository root; ``{a,b}`` alternatives are expanded, ``*`` must match at least one file, a trailing ``/``
  names a folder);
- bare names of top-level documents, ``NAME.md`` or ``NAME.toml`` (from the root or the citing file's folder);
- markdown link targets, ``[text](target)`` (from the citing file's folder; URLs and ``#anchors`` skipped).

Outputs are not references: they live outside those five folders (``logs/``, ``.cache/``, checkpoint and
export folders) and a reference must begin a path, so ``logs/x/configs/...`` or ``.cache/trgrpo/`` never
count.

    python -m pytest tests/test_references.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = sorted([*ROOT.glob("configs/**/*.yaml"), ROOT / "README.md", *ROOT.glob("docs/*.md")])

_START = r"(?<![\w./~$-])"  # a reference begins a path: not inside logs/..., .cache/..., a URL or $VAR/...
REPO_PATH = re.compile(_START + r"((?:configs|scripts|docs|tests|trgrpo)/(?:[\w.*/-]|\{[\w.,-]*\})*)")
TOP_DOCUMENT = re.compile(_START + r"([\w-]+\.(?:md|toml))\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def expand_braces(path: str) -> list[str]:
    """``a_{x,y}.yaml`` -> ``[a_x.yaml, a_y.yaml]``, recursively."""
    match = re.search(r"\{([^{}]*)\}", path)
    if match is None:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [p for alt in match.group(1).split(",") for p in expand_braces(head + alt + tail)]


def _exists(path: str, bases: list[Path]) -> bool:
    if "*" in path:
        return any(any(base.glob(path)) for base in bases)
    return any((base / path).is_dir() if path.endswith("/") else (base / path).exists() for base in bases)


def missing_references(text: str, folder: Path) -> list[str]:
    """The paths cited in ``text`` that exist neither in the repository nor (relative ones) beside
    ``folder``."""
    missing = []
    for match in REPO_PATH.finditer(text):
        cited = match.group(1).rstrip(".")  # a sentence may end right after a path
        missing += [p for p in expand_braces(cited) if not _exists(p, [ROOT])]
    for match in TOP_DOCUMENT.finditer(text):
        if not _exists(match.group(1), [ROOT, folder]):
            missing.append(match.group(1))
    for match in MD_LINK.finditer(text):
        target = match.group(1).split("#")[0]
        if (
            target
            and "://" not in target
            and not target.startswith("mailto:")
            and not _exists(target, [folder])
        ):
            missing.append(target)
    return sorted(set(missing))


def test_the_scan_covers_configs_readme_and_docs():
    names = {p.relative_to(ROOT).as_posix() for p in SCANNED}
    assert {"README.md", "configs/demo.yaml", "configs/strategy/ddp.yaml", "docs/scaling.md"} <= names


def test_the_scanner_finds_what_it_should_and_nothing_else():
    text = """
    from PAPER.md; see README.md and pyproject.toml; [figure](docs/tr_grpo_weight.png), [gone](docs/gone.png)
    configs/demo.yaml, configs/strategy/ and configs/weighting/*.yaml exist. configs/none_{demo,zz}.yaml
    `scripts/missing.py`. logs/demo/version_0/checkpoints/last.ckpt .cache/trgrpo/warmstart x/tests/nothing.py
    https://github.com/owner/repo/blob/main/docs/nothing.md [anchor](#metrics) [site](https://x.org/a.md)
    ends with docs/scaling.md. and trgrpo/ then config.yaml metrics.csv
    """
    assert missing_references(text, ROOT) == [
        "PAPER.md",
        "configs/none_demo.yaml",
        "configs/none_zz.yaml",
        "docs/gone.png",
        "scripts/missing.py",
    ]


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_dangling_reference(path):
    missing = missing_references(path.read_text(), path.parent)
    assert not missing, f"{path.relative_to(ROOT)} cites files that do not exist: {', '.join(missing)}"


def layout_block(readme: str) -> dict[str, set[str]]:
    """The README's layout block as folder -> the file names it lists ("" is ``trgrpo/`` itself)."""
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        if line.startswith("trgrpo/"):
            folder = ""
        elif re.match(r"\S", line):  # configs/, scripts/, ...: the package's part is over
            folder = None
        elif (sub := re.match(r"  (\w+)/", line)) and folder is not None:
            folder = sub.group(1)
        if folder is not None:
            listed.setdefault(folder, set()).update(re.findall(r"[\w]+\.py", line))
    return listed


def test_the_readme_layout_names_every_module_where_it_lives():
    listed = layout_block((ROOT / "README.md").read_text())
    package = ROOT / "trgrpo"
    actual: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        folder = path.parent.relative_to(package).as_posix()
        actual.setdefault("" if folder == "." else folder, set()).add(path.name)
    assert listed == actual, (
        f"README layout block and trgrpo/ differ: only in the README {_diff(listed, actual)}; "
        f"only in the tree {_diff(actual, listed)}"
    )


def _diff(a: dict[str, set[str]], b: dict[str, set[str]]) -> list[str]:
    return sorted(f"{k}/{name}".lstrip("/") for k in a for name in a[k] - b.get(k, set()))
