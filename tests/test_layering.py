"""Imports run one way, pure math <- components <- module <- CLI, and pure math never imports Lightning.

Every file of ``trgrpo/`` is parsed with ``ast`` (nothing is imported) and each import of a ``trgrpo``
module is checked against ``LAYERS``.  Imports under ``if TYPE_CHECKING:`` load nothing at run time and
are not checked.  A new module fails ``test_every_module_has_a_layer`` until it is given a layer here.

    python -m pytest tests/test_layering.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trgrpo"

PURE_MATH, COMPONENTS, MODULE, CLI = 0, 1, 2, 3
LAYER_NAMES = ["pure math", "components", "module", "cli"]

# module (dotted, relative to trgrpo; a package name covers everything in it) -> layer
LAYERS: dict[str, int] = {
    "__init__": PURE_MATH,  # trgrpo/__init__.py: every import of trgrpo.x runs it first
    "moved": PURE_MATH,  # the old paths of modules that moved into sub-packages (installed by __init__)
    "advantages": PURE_MATH,
    "losses": PURE_MATH,
    "logprobs": PURE_MATH,
    "weighting": PURE_MATH,
    "stats": PURE_MATH,
    "update": PURE_MATH,
    "scoring": PURE_MATH,
    "fastpath": PURE_MATH,  # the fast sampler and shared-prompt forwards
    "config": PURE_MATH,  # option dataclasses of the loss and the optimiser (no Lightning)
    "diagnostics": PURE_MATH,  # gradient share by token-probability bucket
    "threads": PURE_MATH,  # CPU thread defaults, applied on import of the package
    "world": PURE_MATH,  # how many processes train together (the guard of every collective)
    "heads": PURE_MATH,  # the LM head in float32 (policy option, understood by the fast sampler)
    "rollout": COMPONENTS,  # rollout data types (base), the fast/hf engines and the chooser, the vllm engine
    "agent": COMPONENTS,  # multi-turn tool use: tools, call formats, the episode loop, the search environment
    "policy": COMPONENTS,  # loading the policy; sources (package:, GGUF); the character tokenizer
    "dynamic_sampling": COMPONENTS,  # DAPO's filter of groups without reward spread (data and module use it)
    "sandbox": COMPONENTS,  # killable worker processes for verifiers and untrusted rewards
    "rewards": COMPONENTS,
    "graders": COMPONENTS,  # model-graded rewards: a reward model, an LLM judge
    "tasks": COMPONENTS,
    "evaluation": COMPONENTS,
    "checkpointing": COMPONENTS,
    "random_streams": COMPONENTS,  # the random streams a resumed run continues (the module owns them)
    "resume": COMPONENTS,  # what a resumed run takes from its config (layout check, optimiser settings)
    "log_folder": COMPONENTS,  # one run per log folder (a lock file with the owner's pid)
    "data": COMPONENTS,
    "callbacks": COMPONENTS,
    "progress": COMPONENTS,
    "export": COMPONENTS,  # also ``python -m trgrpo.export``, but the HFExport callback calls it
    "strategies": COMPONENTS,  # CPUDeepSpeedStrategy: ZeRO on CPU processes, for debugging and CI
    "model_shape": COMPONENTS,  # a causal LM's shape and parameter count from its config, no weights
    "plan": COMPONENTS,  # the run's batch and memory estimate from the parsed config (the CLI prints it)
    "module": MODULE,
    "backend": MODULE,  # the DeepSpeed glue the module delegates to (imports Lightning's strategies)
    "cli": CLI,
    "compare": CLI,  # python -m trgrpo compare: runs fit per strategy and seed as subprocesses; its report
    "compare.stats": PURE_MATH,  # its statistics (t intervals, paired differences, curves from metrics.csv)
    "__main__": CLI,
}

LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}


def module_name(path: Path) -> str:
    """trgrpo/tasks/base.py -> "tasks.base"; trgrpo/tasks/__init__.py -> "tasks";
    trgrpo/__init__.py -> "__init__"."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    """The layer of a module, from its own entry or that of the nearest package above it."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    return None


def _is_module(dotted: str) -> bool:
    """Whether ``trgrpo.a.b`` is a module or package of the tree (rather than a name defined in one)."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or isinstance(test, ast.Attribute)
        and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, type_only: bool = False):
    """Import statements anywhere in the file (functions too); those under ``if TYPE_CHECKING:`` only with
    ``type_only`` (they load nothing at run time, but a reader still follows them)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif _type_checking(child) and not type_only:
            for other in child.orelse:
                yield from _import_nodes(other)
        else:
            yield from _import_nodes(child, type_only)


def imports(path: Path, type_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted module) of every import in a file; ``from pkg import mod`` names ``pkg.mod``."""
    package = ["trgrpo", *path.relative_to(PACKAGE).parent.parts]
    out = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), type_only):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:  # relative: from the file's package, one level up per extra dot
            base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [node.module])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.append((node.lineno, full if full.startswith("trgrpo") and _is_module(full) else base))
    return list(dict.fromkeys(out))


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    missing = [
        f"{path.relative_to(PACKAGE.parent)} ({module_name(path)!r})"
        for path in _files()
        if layer_of(module_name(path)) is None
    ]
    assert not missing, (
        "modules without a layer; add each to LAYERS in tests/test_layering.py "
        f"({', '.join(LAYER_NAMES)}): " + "; ".join(missing)
    )


def test_pure_math_does_not_import_lightning():
    bad = [
        f"{_where(path, line)} imports {target}"
        for path in _files()
        if layer_of(module_name(path)) == PURE_MATH
        for line, target in imports(path)
        if target.split(".")[0] in LIGHTNING
    ]
    assert not bad, "pure-math modules must not import Lightning: " + "; ".join(bad)


def test_imports_point_down_the_layers():
    bad = []
    for path in _files():
        layer = layer_of(module_name(path))
        for line, target in imports(path):
            if target != "trgrpo" and not target.startswith("trgrpo."):
                continue
            other = layer_of(target.removeprefix("trgrpo").removeprefix(".") or "__init__")
            if layer is not None and other is not None and other > layer:
                bad.append(
                    f"{_where(path, line)} ({LAYER_NAMES[layer]}) imports {target} ({LAYER_NAMES[other]})"
                )
    assert not bad, (
        "a lower layer imports a higher one (order: " + " < ".join(LAYER_NAMES) + "): " + "; ".join(bad)
    )


def test_the_import_reader():
    assert module_name(PACKAGE / "tasks" / "base.py") == "tasks.base" and layer_of("tasks.base") == COMPONENTS
    assert module_name(PACKAGE / "__init__.py") == "__init__" and layer_of("fastpath.sampler") == PURE_MATH
    assert any(t == "trgrpo.fastpath.shared_prefix" for _, t in imports(PACKAGE / "fastpath" / "sampler.py"))
    assert layer_of("compare.stats") == PURE_MATH and layer_of("compare.report") == CLI
    assert any(target == "trgrpo.tasks.base" for _, target in imports(PACKAGE / "tasks" / "arithmetic.py"))


MAX_LINES = 500  # any file of the package (450 in the packed layout ruff format replaced)


def test_files_stay_short():
    long = [
        f"{path.relative_to(PACKAGE.parent)}: {n} lines"
        for path in _files()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"files over {MAX_LINES} lines (split them by concern): " + "; ".join(long)


# inside a wing, what may not be imported ("x.*": anything of package x; else that one module): the data
# types of a wing never import what builds on them
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "rollout": ("rollout.engines", "rollout.vllm", "agent.*"),  # the package face: data types only
    "rollout.base": ("rollout.engines", "rollout.vllm", "agent.episodes"),
    "rollout.vllm": ("rollout.engines", "agent.*"),
    "agent.episodes": ("rollout.engines", "rollout.vllm"),  # the loop drives whichever engine it is handed
    "agent.tools": ("rollout.*",),
    "compare.runs": ("compare", "compare.report"),  # shared by the sweep and the report
    "compare.report": ("compare",),
    "compare.grid": ("compare", "compare.report"),  # parsing only: the sweep uses it, never the reverse
    "policy.sources": ("policy",),
    "policy.chartokenizer": ("policy",),
}


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden(name: str, rule: str) -> bool:
    return _inside(name, rule[:-2]) if rule.endswith(".*") else name == rule


def import_graph() -> dict[str, set[str]]:
    """module -> the modules it imports, lazy and type-only ones included.

    Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b`` first, unless the importer lives
    inside them (they are already running)."""
    graph: dict[str, set[str]] = {}
    for path in _files():
        me = module_name(path)
        edges = graph.setdefault(me, set())
        for _, target in imports(path, type_only=True):
            if not target.startswith("trgrpo."):
                continue
            parts = target.removeprefix("trgrpo.").split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name != me and (i == len(parts) or not _inside(me, name)):
                    edges.add(name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere():
    cycles = import_cycles(import_graph())
    assert not cycles, (
        "import cycles (lazy and type-only imports count; move what both sides need into a third module): "
        + "; ".join(" <-> ".join(c) for c in cycles)
    )


def test_the_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "rollout" in graph["agent.episodes"]  # importing rollout.base runs the package face first
    assert "rollout" not in graph["rollout.engines"]  # ... but not for a module inside the package


def test_wings_point_one_way():
    bad = [
        f"{me} imports {other}"
        for me, edges in import_graph().items()
        for other in edges
        if me in FORBIDDEN and any(_forbidden(other, f) for f in FORBIDDEN[me])
    ]
    assert not bad, "imports against the direction of a wing: " + "; ".join(bad)
