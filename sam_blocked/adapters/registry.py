"""The adapters' registry: which adapter patches which library module, and the ClassPatches read so far.

An adapter is imported only once its library module is (importlib, by the name in
ADAPTERS), so sam_blocked never imports transformers, timm or segment_anything_hq itself.
The adapters import this module, never the package: their patched classes are found here
when a pickle names them (patched_class_named).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import ClassPatch, MethodPatch

# library module that defines the classes -> the adapter module that patches them
ADAPTERS: dict[str, str] = {
    "segment_anything.modeling.image_encoder": "sam_blocked.adapters.segment_anything",
    "segment_anything.modeling.mask_decoder": "sam_blocked.adapters.segment_anything",
    "segment_anything.automatic_mask_generator": "sam_blocked.adapters.segment_anything",
    "segment_anything_hq.automatic_mask_generator": "sam_blocked.adapters.sam_hq",
    "segment_anything_hq.modeling.image_encoder": "sam_blocked.adapters.sam_hq",
    "transformers.models.sam.modeling_sam": "sam_blocked.adapters.transformers",
    "transformers.models.sam_hq.modeling_sam_hq": "sam_blocked.adapters.transformers",
    "timm.models.vision_transformer_sam": "sam_blocked.adapters.timm",
}

_loaded: dict[str, tuple[ModuleType, list[ClassPatch]]] = {}  # library module name -> (module, its patches)
_by_class: dict[type, ClassPatch] = {}  # stock and patched classes of every module read so far -> their patch


def patches_of(module: ModuleType) -> list[ClassPatch]:
    """The ClassPatches for a loaded library module (one of ADAPTERS), read once per version of its classes.

    A reloaded module (importlib.reload) defines new classes: they get new patches, and the
    old classes keep theirs, so models built before the reload stay recognised.
    """
    name = module.__name__
    cached = _loaded.get(name)
    if cached is not None and cached[0] is module and all(module.__dict__.get(p.stock.__name__) is p.stock for p in cached[1]):
        return cached[1]
    adapter = importlib.import_module(ADAPTERS[name])
    patches = adapter.class_patches(module)
    _loaded[name] = (module, patches)
    for patch in patches:
        _by_class[patch.stock] = _by_class[patch.patched] = patch
    return patches


def _imported_modules() -> list[ModuleType]:
    """The supported library modules (ADAPTERS) imported so far and done initialising; none is imported here."""
    modules = (sys.modules.get(name) for name in ADAPTERS)
    return [m for m in modules if m is not None and not getattr(getattr(m, "__spec__", None), "_initializing", False)]


def imported_patches() -> list[ClassPatch]:
    """The ClassPatches of every supported library module imported so far (none is imported here)."""
    return [patch for module in _imported_modules() for patch in patches_of(module)]


def method_patches_of(module: ModuleType) -> list[MethodPatch]:
    """The MethodPatches for a loaded library module (one of ADAPTERS): the switch's only."""
    adapter = importlib.import_module(ADAPTERS[module.__name__])
    return getattr(adapter, "method_patches", lambda module: [])(module)


def imported_method_patches() -> list[MethodPatch]:
    """The MethodPatches of every supported library module imported so far."""
    return [patch for module in _imported_modules() for patch in method_patches_of(module)]


def patch_of(module: torch.nn.Module) -> Optional[ClassPatch]:
    """The ClassPatch whose stock or patched class `module` is an instance of exactly, or None."""
    return _by_class.get(type(module))


def patched_class_named(home: str, modules: tuple[str, ...], name: str) -> type:
    """An adapter module's `__getattr__`: its patched classes exist once its library modules are
    read, so a patched model unpickled in a fresh process reads them (importing the library,
    whose classes the pickle names anyway)."""
    if name.startswith("Blocked"):
        for module_name in modules:
            try:
                patches_of(importlib.import_module(module_name))
            except ImportError:
                continue
            if name in sys.modules[home].__dict__:
                return sys.modules[home].__dict__[name]
    raise AttributeError(f"module {home!r} has no attribute {name!r}")
