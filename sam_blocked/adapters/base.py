"""What every adapter is made of: a ClassPatch per library class it changes.

A ClassPatch names one of a library's classes (the stock class), the subclass patch_sam
swaps instances to (the patched class: same parameters, only `forward` differs), the
blocked forward both of them run, and the checks an instance must pass first. The switch
(sam_blocked.switch) uses the same ClassPatch to change the stock class itself, for every
model at once. An adapter may list several ClassPatches (transformers has an eager and an
SDPA attention class; an encoder block with a chunked MLP is another kind).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from sam_blocked.encoder.layer import BlockConfig

# Instance attribute set by patch.stock(): the module runs its stock forward even while the switch is on.
STOCK_FLAG = "_sam_blocked_stock"

# Attribute of a forward installed by the switch: the stock forward it stands in for.
WRAPPED_FORWARD = "_sam_blocked_stock_forward"

# Kinds of ClassPatch. "attention" layers are what patch_sam must find in a model; the others
# ride along: a "block" computes its own attention (the switch reports it as its attention
# layer), an "mlp" block only runs its token-wise half in chunks and calls its attention, an
# "embed" (the patch embedding) runs its convolution a band of rows at a time.
ATTENTION = "attention"
BLOCK = "block"
MLP = "mlp"
EMBED = "embed"

BlockedForward = Callable[..., Any]  # (module, config: BlockConfig, *args, **kwargs) -> the stock forward's output
Reasons = Callable[[torch.nn.Module], "list[str]"]


@dataclass(frozen=True, eq=False)
class ClassPatch:
    """One library class that sam_blocked changes, and how.

    Attributes:
        library: the library's import name, for messages ("segment_anything", "timm", ...).
        kind: ATTENTION, or a module patched alongside: an encoder block, BLOCK (attention
            included) or MLP (its token-wise half only), or the patch embedding, EMBED.
        stock: the library's class, exactly as the library defines it.
        patched: its subclass with the blocked forward (patch_sam swaps an instance's class to it).
        stock_forward: stock's own `forward` function, as found before anything was changed.
        blocked_forward: (module, config, *args, **kwargs) -> what stock_forward returns.
        reasons: why an instance cannot run blocked now (an attribute missing, a rope, dropout
            while training); [] when it can. Checked at patch time and on every call.
    """

    library: str
    kind: str
    stock: type
    patched: type
    stock_forward: Callable[..., Any]
    blocked_forward: BlockedForward
    reasons: Reasons

    @property
    def name(self) -> str:
        return f"{self.library} {self.stock.__qualname__}"


@dataclass(frozen=True)
class EncoderCall:
    """How a library runs a model's image encoder: what verify_equivalence compares.

    Attributes:
        size: square input side in pixels the encoder takes.
        run: (B, 3, size, size) normalised pixels -> the encoder's output as the library
            returns it (a tensor, or a tuple / list of them).
        predictor: the library's SamPredictor class when the model has a prompt path that
            it drives (masks are then compared too), else None.
    """

    size: int
    run: Callable[[torch.Tensor], Any]
    predictor: Optional[type] = None


def class_patch(
    library: str,
    stock: type,
    blocked_forward: BlockedForward,
    reasons: Reasons,
    *,
    home: str,
    kind: str = ATTENTION,
) -> ClassPatch:
    """A ClassPatch for `stock`, with its patched subclass defined in the module `home` (for pickle).

    The subclass is named Blocked<stock's name> and published as an attribute of `home`, so
    a patched model pickles and unpickles by name. Its forward refuses (ValueError, with the
    reasons) an instance that `reasons` does not clear.
    """
    stock_forward = stock_forward_of(stock)
    label = f"{library} {stock.__qualname__}"

    def forward(self, *args, **kwargs):
        why = reasons(self)
        if why:
            raise ValueError(f"{label}: blocked attention cannot run this call: {'; '.join(why)}")
        if records_autograd(self, args, kwargs, label):
            return stock_forward(self, *args, **kwargs)
        return blocked_forward(self, self.blocked_config, *args, **kwargs)

    name = f"Blocked{stock.__name__}"
    patched = type(
        name,
        (stock,),
        {
            "__module__": home,
            "__qualname__": name,
            "__doc__": f"{label} with the same parameters and a blocked forward (sam_blocked).",
            "forward": forward,
            "__annotations__": {"blocked_config": BlockConfig},
        },
    )
    setattr(sys.modules[home], name, patched)
    return ClassPatch(library, kind, stock, patched, stock_forward, blocked_forward, reasons)


def patched_class_named(home: str, modules: tuple[str, ...], name: str) -> type:
    """An adapter module's `__getattr__`: its patched classes exist once its library modules are
    read, so a patched model unpickled in a fresh process reads them (importing the library,
    whose classes the pickle names anyway)."""
    if name.startswith("Blocked"):
        from sam_blocked import adapters

        for module_name in modules:
            try:
                adapters.patches_of(importlib.import_module(module_name))
            except ImportError:
                continue
            if name in sys.modules[home].__dict__:
                return sys.modules[home].__dict__[name]
    raise AttributeError(f"module {home!r} has no attribute {name!r}")


def stock_forward_of(stock: type) -> Callable[..., Any]:
    """The forward `stock` itself defines, as the library wrote it (also while the switch is on)."""
    forward = stock.__dict__.get("forward")
    if forward is None:
        raise TypeError(f"{stock.__qualname__} defines no forward of its own: an adapter patches the class that does")
    return getattr(forward, WRAPPED_FORWARD, forward)


def missing_attributes(module: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """The reason listing the attributes of `names` that `module` lacks, or []."""
    missing = [n for n in names if not hasattr(module, n)]
    if not missing:
        return []
    return [
        f"it lacks {', '.join(missing)}: this version of {type(module).__module__} is not the one "
        "sam_blocked was written against"
    ]


def qkv_reasons(module: torch.nn.Module, heads_attr: str) -> list[str]:
    """A reason unless module.qkv is a Linear with 3 x heads x head_dim outputs and proj a Linear."""
    qkv, proj, heads = module.qkv, module.proj, getattr(module, heads_attr)
    if not (isinstance(qkv, torch.nn.Linear) and isinstance(proj, torch.nn.Linear)):
        return [f"qkv and proj are {type(qkv).__name__} and {type(proj).__name__}, not Linear layers"]
    if qkv.out_features % (3 * heads):
        return [f"qkv has {qkv.out_features} outputs, not 3 x heads x head_dim"]
    return []


def dropout_reasons(module: torch.nn.Module, p: float) -> list[str]:
    """A reason when attention dropout p > 0 would apply (training mode): blocked attention has none."""
    if module.training and p > 0:
        return [
            f"attention dropout p={p:g} in training mode: blocked attention computes no dropout on the "
            "attention weights; call model.eval(), set the dropout to 0, or leave this model stock"
        ]
    return []


def records_autograd(module: torch.nn.Module, args: tuple, kwargs: dict, label: str) -> bool:
    """True when autograd records this call (grad mode on, and the module's parameters or a
    tensor argument require grad): it then runs stock's forward, warning once. Blocked
    forwards write their steps into buffers in place, which autograd cannot differentiate;
    and a graph keeps every block's scores for backward, so blocking would save nothing."""
    if not torch.is_grad_enabled():
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not any(t.requires_grad for t in tensors) and not any(p.requires_grad for p in module.parameters()):
        return False
    warn_once(
        "autograd",
        f"sam_blocked: autograd is recording ({label} first), so patched layers run stock's forward (exact "
        "gradients, stock's memory); run inference under torch.no_grad() or torch.inference_mode() for the blocked path",
    )
    return True


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """warnings.warn(message) the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
