"""The process-wide switch: every supported SAM attention computes in blocks, no model object needed.

The mask decoder and the automatic mask generator follow: segment_anything's MaskDecoder
runs without a copy of the image per prompt, and SamAutomaticMaskGenerator's (and
SAM-HQ's) per-batch work and small-region step run in bounded memory
(sam_blocked.automatic), the same records as stock's to float rounding.

`enable()` replaces the `forward` of each supported library class (sam_blocked.adapters)
with one that runs the blocked forward, as liger-kernel's apply_liger_kernel_to_* does:
models built before and after the call are covered alike. Library modules imported later
are patched as they are imported (sam_blocked.adapters.import_hooks), reloaded ones again; none is
imported here. `disable()` puts back every forward it replaced, exactly.

While the switch is on:
- a layer patched by patch_sam keeps its own settings (its class is the patched
  subclass, whose forward is its own), and disable() leaves it patched;
- `patch.stock(model)` (and verify_equivalence) run the model's layers stock: they are
  marked with STOCK_FLAG for the `with` body;
- only the library's own classes switch: a subclass runs its own forward;
- a layer the adapter does not cover (timm with a rope, dropout while training), or a call
  it must leave stock (transformers' eager attention asked for its weights), runs stock
  and warns once with the reason: nothing is refused mid-run, nothing falls back silently;
- a model that is compiled rather than run (torch.jit.script, torch.jit.trace, torch.fx,
  torch.compile, torch.export, torch.onnx.export) sees stock's forward and records stock's
  graph, silently: that is what compiling asks for (sam_blocked.adapters.base).

report() counts each call once it returned, as what it ran: blocked, or stock. The live
state (the settings in force, the report) lives in sam_blocked.adapters.state, which the
adapters read without importing this module.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from sam_blocked import adapters
from sam_blocked.adapters import state
from sam_blocked.adapters.base import ATTENTION, BLOCK, STOCK_FLAG, WRAPPED_FORWARD, ClassPatch, MethodPatch, compiling, records_autograd, stands_in_for, warn_once, warn_stock_call
from sam_blocked.adapters.import_hooks import PostImportFinder
from sam_blocked.adapters.state import SwitchReport
from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.encoder.layer import BlockConfig, check_config

__all__ = ["SwitchReport", "disable", "enable", "enabled", "is_enabled", "report", "runs_blocked"]

_replaced: list[tuple[type, str, Optional[Any]]] = []  # (class, attribute, its own attribute before), in order
_finder = PostImportFinder(adapters.ADAPTERS, lambda module: _on_import(module))


def __getattr__(name: str) -> Any:
    if name == "_config":  # the settings in force live in sam_blocked.adapters.state
        return state.config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enable(chunks: int = DEFAULT_CHUNKS, max_block_mb: Optional[float] = None, backend: str = "auto") -> BlockConfig:
    """Make every SAM image-encoder attention of every supported library compute in blocks.

    For models built before and after this call, in this process, until disable(). Libraries
    not imported yet are patched when they are; calling again only changes the settings.

    Args:
        chunks: blocks per (batch*head) score matrix: q_bands x k_bands (16 -> 4 x 4).
        max_block_mb: instead of chunks, a budget in MiB for the largest float32 score block.
        backend: "auto", or one of sam_blocked.attention.dispatch.BACKENDS (the module's
            docstring says what each computes).

    Returns:
        The settings now in force.
    """
    config = check_config(chunks, max_block_mb, backend)
    if state.config is None:
        state.report = SwitchReport(config)
    state.config = state.report.config = config
    _finder.install()
    for patch in adapters.imported_patches():
        _switch_on(patch)
    for method in adapters.imported_method_patches():
        _switch_method(method)
    return config


def disable() -> None:
    """Put back every forward and method enable() replaced, exactly; layers patched by patch_sam stay patched."""
    _finder.uninstall()
    while _replaced:
        cls, name, own = _replaced.pop()
        if own is None:
            delattr(cls, name)
        else:
            setattr(cls, name, own)
    state.config = None


@contextlib.contextmanager
def enabled(chunks: int = DEFAULT_CHUNKS, max_block_mb: Optional[float] = None, backend: str = "auto") -> Iterator[BlockConfig]:
    """enable(...) for the `with` body, then the switch as it was before (off, or its settings), also on an exception."""
    before = state.config
    config = enable(chunks, max_block_mb, backend)
    try:
        yield config
    finally:
        if before is None:
            disable()
        else:
            enable(before.chunks, before.max_block_mb, before.backend)


def is_enabled() -> bool:
    """True between enable() and disable()."""
    return state.config is not None


def report() -> SwitchReport:
    """What ran blocked through the switch since it was last turned on: each call counted
    once it returned, as what it ran (blocked, or stock with the reason warned)."""
    return state.report


runs_blocked = state.runs_blocked


def _switch_on(patch: ClassPatch) -> None:
    cls = patch.stock
    own = cls.__dict__.get("forward")
    if getattr(own, WRAPPED_FORWARD, None) is not None:
        return  # already switched
    _replaced.append((cls, "forward", own))
    cls.forward = _switched_forward(patch)


def _switch_method(method: MethodPatch) -> None:
    cls = method.cls
    own = cls.__dict__.get(method.name)
    if any(c is cls and n == method.name for c, n, _ in _replaced):
        return  # already switched
    if own is None:
        raise TypeError(f"{cls.__qualname__} defines no {method.name} of its own: sam_blocked was written against another version of {method.library}")
    _replaced.append((cls, method.name, own))
    setattr(cls, method.name, method.make(own))


def _switched_forward(patch: ClassPatch) -> Callable[..., Any]:
    stock_forward = patch.stock_forward

    def forward(self, *args, **kwargs):
        config = state.config
        if config is None or type(self) is not patch.stock or self.__dict__.get(STOCK_FLAG) or compiling(args, kwargs):
            return stock_forward(self, *args, **kwargs)
        if records_autograd(self, args, kwargs, patch.name):
            return stock_forward(self, *args, **kwargs)
        why = patch.reasons(self)
        if why:
            warn_once(
                f"switch-{patch.name}-{why[0]}",
                f"sam_blocked left a {patch.name} stock: {'; '.join(why)}",
            )
        else:
            why_call = patch.stock_call(self, *args, **kwargs)
            if why_call is None:
                out = patch.blocked_forward(self, config, *args, **kwargs)
                if patch.kind in (ATTENTION, BLOCK):  # a BLOCK computes its attention itself; an MLP block calls it
                    state.report.count(patch.library, self, blocked=True)
                return out
            warn_stock_call(patch.name, why_call)
        out = stock_forward(self, *args, **kwargs)
        if patch.kind == ATTENTION:  # a block left stock calls its attention, which reports itself
            state.report.count(patch.library, self, blocked=False)
        return out

    forward = stands_in_for(stock_forward, forward)
    setattr(forward, WRAPPED_FORWARD, stock_forward)
    return forward


def _on_import(module: ModuleType) -> None:
    if state.config is not None:
        for patch in adapters.patches_of(module):
            _switch_on(patch)
        for method in adapters.method_patches_of(module):
            _switch_method(method)
