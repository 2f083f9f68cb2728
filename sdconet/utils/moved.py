"""Modules that moved when the package was put into layers (docs/architecture.md): old import paths keep working for
one release.

``import sdconet.deploy.triton_repo`` (say) returns the very module object now at ``sdconet.serve.triton_repo``, so
attributes, ``isinstance`` checks and monkeypatching behave as before, and a ``DeprecationWarning`` names the new
path. This is a table, not an import: the layers stay acyclic for every static scan, and nothing in the package
itself uses an old path (a test checks both).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3"
# old path -> new path
MOVED_MODULES: dict[str, str] = {
    "sdconet.deploy.triton_repo": "sdconet.serve.triton_repo",
    "sdconet.deploy.inference_graph": "sdconet.engine.inference_graph",
    "sdconet.engine.predict": "sdconet.scene.folder",
    "sdconet.scene.raster": "sdconet.data.raster",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a throwaway placeholder; exec_module swaps the real module in

    def exec_module(self, module: ModuleType) -> None:
        old_name = module.__name__
        warnings.warn(f"{old_name} moved to {self.new_name}; the old path goes away in sdconet {REMOVED_IN}",
                      DeprecationWarning, stacklevel=2)
        # the import system returns (and binds on the parent package) whatever sys.modules holds for the name
        # once the loader is done, so the old name becomes the new module itself
        sys.modules[old_name] = importlib.import_module(self.new_name)


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old names of :data:`MOVED_MODULES` to their new modules."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        new_name = MOVED_MODULES.get(fullname)
        if new_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent: importing ``sdconet`` calls it)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


__all__ = ["MOVED_MODULES", "MovedModuleFinder", "install"]
