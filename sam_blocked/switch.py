"""The process-wide switch: every supported SAM attention computes in blocks, no model object needed.

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
- a layer the adapter does not cover (timm with a rope, dropout while training) runs stock
  and warns once with the reason: nothing is refused mid-run, nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import torch

from sam_blocked import adapters
from sam_blocked.adapters.base import ATTENTION, BLOCK, STOCK_FLAG, WRAPPED_FORWARD, ClassPatch, records_autograd, warn_once
from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.adapters.import_hooks import PostImportFinder
from sam_blocked.encoder.layer import BlockConfig, check_config

_config: Optional[BlockConfig] = None
_replaced: list[tuple[type, Optional[Callable[..., Any]]]] = []  # (class, its own forward before), in order
_finder = PostImportFinder(adapters.ADAPTERS, lambda module: _on_import(module))


@dataclass
class SwitchReport:
    """What ran blocked since enable(): distinct layers and calls per library, and the settings."""

    config: Optional[BlockConfig]
    layers: Counter = field(default_factory=Counter)  # library -> distinct modules that ran blocked
    calls: Counter = field(default_factory=Counter)  # library -> blocked calls
    stock_layers: Counter = field(default_factory=Counter)  # library -> distinct modules run stock (not covered)
    _seen: set = field(default_factory=set, repr=False)

    def count(self, library: str, module: torch.nn.Module, blocked: bool) -> None:
        key = (library, id(module), blocked)
        if key not in self._seen:
            self._seen.add(key)
            (self.layers if blocked else self.stock_layers)[library] += 1
        if blocked:
            self.calls[library] += 1

    def __str__(self) -> str:
        if self.config is None:
            return "blocked attention is off"
        c = self.config
        blocking = f"max_block_mb={c.max_block_mb:g}" if c.max_block_mb is not None else f"chunks={c.chunks}"
        settings = f"backend {c.backend}, {blocking}"
        if not self.layers and not self.stock_layers:
            return f"blocked attention on ({settings}), but no SAM image-encoder attention ran"
        ran = ", ".join(f"{n} {lib} attention layer{'s' * (n != 1)} ({self.calls[lib]} calls)" for lib, n in self.layers.items())
        line = f"blocked attention ({settings}): {ran or 'no layer'} ran blocked"
        if self.stock_layers:
            line += "; left stock (not covered, see the warning): " + ", ".join(f"{n} {lib}" for lib, n in self.stock_layers.items())
        return line


_report = SwitchReport(None)


def enable(chunks: int = DEFAULT_CHUNKS, max_block_mb: Optional[float] = None, backend: str = "auto") -> BlockConfig:
    """Make every SAM image-encoder attention of every supported library compute in blocks.

    For models built before and after this call, in this process, until disable(). Libraries
    not imported yet are patched when they are; calling again only changes the settings.

    Args:
        chunks: blocks per (batch*head) score matrix: q_bands x k_bands (16 -> 4 x 4).
        max_block_mb: instead of chunks, a budget in MiB for the largest float32 score block.
        backend: "auto", "blocked", "sdpa", "flashbias" or "flex" (sam_blocked.attention.dispatch).

    Returns:
        The settings now in force.
    """
    global _config, _report
    config = check_config(chunks, max_block_mb, backend)
    if _config is None:
        _report = SwitchReport(config)
    _config = _report.config = config
    _finder.install()
    for patch in adapters.imported_patches():
        _switch_on(patch)
    return config


def disable() -> None:
    """Put back every forward enable() replaced, exactly; layers patched by patch_sam stay patched."""
    global _config
    _finder.uninstall()
    while _replaced:
        cls, forward = _replaced.pop()
        if forward is None:
            delattr(cls, "forward")
        else:
            setattr(cls, "forward", forward)
    _config = None


@contextlib.contextmanager
def enabled(chunks: int = DEFAULT_CHUNKS, max_block_mb: Optional[float] = None, backend: str = "auto") -> Iterator[BlockConfig]:
    """enable(...) for the `with` body, then the switch as it was before (off, or its settings), also on an exception."""
    before = _config
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
    return _config is not None


def report() -> SwitchReport:
    """What ran blocked through the switch since it was last turned on."""
    return _report


def runs_blocked(module: torch.nn.Module, patch: ClassPatch) -> bool:
    """True when the switch runs `module` (an instance of patch.stock) blocked right now."""
    forward = type(module).__dict__.get("forward")
    return (
        _config is not None
        and type(module) is patch.stock
        and getattr(forward, WRAPPED_FORWARD, None) is not None
        and not module.__dict__.get(STOCK_FLAG)
        and not patch.reasons(module)
    )


def _switch_on(patch: ClassPatch) -> None:
    cls = patch.stock
    own = cls.__dict__.get("forward")
    if getattr(own, WRAPPED_FORWARD, None) is not None:
        return  # already switched
    _replaced.append((cls, own))
    cls.forward = _switched_forward(patch)


def _switched_forward(patch: ClassPatch) -> Callable[..., Any]:
    stock_forward = patch.stock_forward

    @functools.wraps(stock_forward)
    def forward(self, *args, **kwargs):
        config = _config
        if config is None or type(self) is not patch.stock or self.__dict__.get(STOCK_FLAG):
            return stock_forward(self, *args, **kwargs)
        if records_autograd(self, args, kwargs, patch.name):
            return stock_forward(self, *args, **kwargs)
        why = patch.reasons(self)
        if why:
            warn_once(
                f"switch-{patch.name}-{why[0]}",
                f"sam_blocked left a {patch.name} stock: {'; '.join(why)}",
            )
            if patch.kind == ATTENTION:  # a block left stock calls its attention, which reports itself
                _report.count(patch.library, self, blocked=False)
            return stock_forward(self, *args, **kwargs)
        if patch.kind in (ATTENTION, BLOCK):  # a BLOCK computes its attention itself; an MLP block calls it
            _report.count(patch.library, self, blocked=True)
        return patch.blocked_forward(self, config, *args, **kwargs)

    setattr(forward, WRAPPED_FORWARD, stock_forward)
    return forward


def _on_import(module: ModuleType) -> None:
    if _config is not None:
        for patch in adapters.patches_of(module):
            _switch_on(patch)
