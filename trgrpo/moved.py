"""Old module paths that still import: modules that moved into the package's rooms keep their old names.

Checkpoints pickle option dataclasses by module path (``hyper_parameters``), and users' YAML files name
classes by path (``class_path: trgrpo.retrieval.SearchEnvironment``).  Importing an old path (``MOVED``'s
keys) returns the module at its new home, so both keep working; a ``FutureWarning`` names the new path.
Installed once, by ``trgrpo/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "trgrpo.vllm_engine": "trgrpo.rollout.vllm",
    "trgrpo.multiturn": "trgrpo.agent.episodes",
    "trgrpo.tools": "trgrpo.agent.tools",
    "trgrpo.callformats": "trgrpo.agent.formats",
    "trgrpo.retrieval": "trgrpo.agent.retrieval",
    "trgrpo.comparereport": "trgrpo.compare.report",
    "trgrpo.comparestats": "trgrpo.compare.stats",
    "trgrpo.sources": "trgrpo.policy.sources",
    "trgrpo.tokenizer": "trgrpo.policy.chartokenizer",
}
"""old dotted module path -> where that module lives now"""


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new home (the same module object, not a copy)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there", FutureWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        self.own_spec = module.__spec__  # the import system writes the alias's spec over it next
        return module

    def exec_module(self, module) -> None:
        """Nothing to run (the module at its new home is already executed): give it back its own spec."""
        module.__spec__ = self.own_spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of ``MOVED`` (and only those)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _Alias(new)) if new else None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (re-imports of the package add no second copy)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
