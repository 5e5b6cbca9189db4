"""Post-import hooks: call a function on a module right after it is imported or reloaded.

A finder at the front of sys.meta_path answers only for the watched names: it asks the
finders behind it for the module's spec, exactly as the import would have, and wraps the
spec's loader so that the callback runs once the module's code has executed. The module
itself sees its real loader (__loader__, __spec__.loader), and importlib.reload goes
through the same finders, so a reloaded module is handed to the callback again. A
callback that fails warns and never breaks the import.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from types import ModuleType
from typing import Callable, Container, Optional

Callback = Callable[[ModuleType], None]


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` after each of `names` is imported. install() / uninstall() it.

    `names` is asked at every import, so a dict or set that grows later is followed.
    """

    def __init__(self, names: Container[str], callback: Callback):
        self.names = names
        self.callback = callback

    def find_spec(self, fullname: str, path=None, target: Optional[ModuleType] = None):
        if fullname not in self.names:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, PostImportFinder) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)


class _CallbackLoader(importlib.abc.Loader):
    """The real loader, and the callback after its exec_module."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callback):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module's own code sees the real loader (importlib.resources, pkgutil read it).
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.callback(module)
        except Exception as error:  # the import itself succeeded: never undo it
            warnings.warn(f"sam_blocked could not patch {module.__name__} after its import: {error!r}", stacklevel=2)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
