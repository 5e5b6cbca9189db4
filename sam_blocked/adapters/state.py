"""The switch's live state: the settings in force and what ran, below the adapters and the switch.

sam_blocked.switch turns the switch on and off and writes `config` here; the adapters read
it (an encoder block asks `runs_blocked` whether its attention does) without importing the
switch, so imports run one way: adapters.base <- state <- the adapters <- switch.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from sam_blocked.adapters.base import STOCK_FLAG, WRAPPED_FORWARD, ClassPatch
from sam_blocked.encoder.layer import BlockConfig


@dataclass
class SwitchReport:
    """What ran blocked since enable(): distinct layers and calls per library, and the settings.

    A call is counted once it returned, as what it ran: blocked, or stock (a layer the adapter
    does not cover, or a call it must leave stock, such as attention weights asked for).
    """

    config: Optional[BlockConfig]
    layers: Counter = field(default_factory=Counter)  # library -> distinct modules that ran blocked
    calls: Counter = field(default_factory=Counter)  # library -> blocked calls
    stock_layers: Counter = field(default_factory=Counter)  # library -> distinct modules run stock (not covered)
    # (library, blocked) -> the modules seen so; weak, so a module freed and another built at its address count apart
    _seen: dict = field(default_factory=dict, repr=False)

    def count(self, library: str, module: torch.nn.Module, blocked: bool) -> None:
        seen = self._seen.setdefault((library, blocked), weakref.WeakSet())
        if module not in seen:
            seen.add(module)
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
            line += "; left stock (see the warning): " + ", ".join(f"{n} {lib}" for lib, n in self.stock_layers.items())
        return line


config: Optional[BlockConfig] = None  # the switch's settings; None while it is off
report = SwitchReport(None)  # since the switch was last turned on


def runs_blocked(module: torch.nn.Module, patch: ClassPatch) -> bool:
    """True when the switch runs `module` (an instance of patch.stock) blocked right now."""
    forward = type(module).__dict__.get("forward")
    return (
        config is not None
        and type(module) is patch.stock
        and getattr(forward, WRAPPED_FORWARD, None) is not None
        and not module.__dict__.get(STOCK_FLAG)
        and not patch.reasons(module)
    )
