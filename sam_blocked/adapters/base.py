"""What every adapter is made of: a ClassPatch per library class it changes.

A ClassPatch names one of a library's classes (the stock class), the subclass patch_sam
swaps instances to (the patched class: same parameters, only `forward` differs), the
blocked forward both of them run, and the checks an instance must pass first. The switch
(sam_blocked.switch) uses the same ClassPatch to change the stock class itself, for every
model at once. An adapter may list several ClassPatches (transformers has an eager and an
SDPA attention class; an encoder block with a chunked MLP is another kind).

Compiled, not run: where a model is scripted, traced or exported (torch.jit.script,
torch.jit.trace, torch.fx, torch.compile, torch.export, torch.onnx.export), a patched
forward steps aside, silently, and stock's forward is what gets compiled: the compiler
records the library's own graph, as it does for an unpatched model. TorchScript compiles a
forward from its source: every forward sam_blocked installs (stands_in_for) reads, to the
compiler, as stock's own source with stock's module globals; the tracers (jit.trace, FX,
dynamo) call it, and it runs stock's forward while `compiling` says so. A scripted or
exported model thus computes stock attention, with stock's memory.
"""

from __future__ import annotations

import functools
import sys
import types
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
# SAM's mask decoder (sam_blocked.automatic.decoder): its forward without a copy of the image per prompt.
DECODER = "decoder"

BlockedForward = Callable[..., Any]  # (module, config: BlockConfig, *args, **kwargs) -> the stock forward's output
Reasons = Callable[[torch.nn.Module], "list[str]"]
# (module, *args, **kwargs) of one call -> None when it can run blocked, else why it runs stock's
# forward: a warning, or "" when another layer speaks for it (a block whose attention runs stock).
StockCall = Callable[..., Optional[str]]


def _no_stock_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Optional[str]:
    return None


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
        stock_call: why one call, with these arguments, runs stock's forward (attention
            weights asked for), or None; decided before the call, so the switch reports
            what ran.
    """

    library: str
    kind: str
    stock: type
    patched: type
    stock_forward: Callable[..., Any]
    blocked_forward: BlockedForward
    reasons: Reasons
    stock_call: StockCall = _no_stock_call

    @property
    def name(self) -> str:
        return f"{self.library} {self.stock.__qualname__}"


@dataclass(frozen=True, eq=False)
class MethodPatch:
    """A method of a library class (not a module's forward) that the switch replaces.

    Attributes:
        library: the library's import name, for messages.
        cls: the library's class.
        name: the attribute replaced (a function or a staticmethod in cls.__dict__).
        make: (stock's attribute, as found in cls.__dict__) -> the attribute to install;
            what it installs runs stock's while the switch is off (sam_blocked.adapters.state).
    """

    library: str
    cls: type
    name: str
    make: Callable[[Any], Any]


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
    stock_call: StockCall = _no_stock_call,
) -> ClassPatch:
    """A ClassPatch for `stock`, with its patched subclass defined in the module `home` (for pickle).

    The subclass is named Blocked<stock's name> and published as an attribute of `home`, so
    a patched model pickles and unpickles by name. Its forward refuses (ValueError, with the
    reasons) an instance that `reasons` does not clear, runs stock's forward for a call that
    `stock_call` names (warning once) and while compiled (silently, see the module's docstring).
    """
    stock_forward = stock_forward_of(stock)
    label = f"{library} {stock.__qualname__}"

    def forward(self, *args, **kwargs):
        if compiling(args, kwargs):
            return stock_forward(self, *args, **kwargs)
        why = reasons(self)
        if why:
            raise ValueError(f"{label}: blocked attention cannot run this call: {'; '.join(why)}")
        if records_autograd(self, args, kwargs, label):
            return stock_forward(self, *args, **kwargs)
        stock_why = stock_call(self, *args, **kwargs)
        if stock_why is not None:
            warn_stock_call(label, stock_why)
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
            "forward": stands_in_for(stock_forward, forward),
            # stock's own annotations (TorchScript reads Final constants there), and the settings,
            # which TorchScript leaves out of a scripted module: it runs stock's forward.
            "__annotations__": {**stock.__dict__.get("__annotations__", {}), "blocked_config": BlockConfig},
            "__jit_ignored_attributes__": [*getattr(stock, "__jit_ignored_attributes__", []), "blocked_config"],
        },
    )
    setattr(sys.modules[home], name, patched)
    return ClassPatch(library, kind, stock, patched, stock_forward, blocked_forward, reasons, stock_call)


def compiling(args: tuple, kwargs: dict) -> bool:
    """True when this call is compiled or traced rather than run: TorchScript, torch.jit.trace,
    dynamo (torch.compile, torch.export, torch.onnx.export), or an FX proxy among the arguments."""
    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values()))
    )


def stands_in_for(stock_forward: Callable[..., Any], forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward`, as a function that TorchScript compiles as `stock_forward`.

    The scripter reads a method's source through `__wrapped__` (inspect.unwrap) and resolves
    its names in the function's own globals and closure: the function returned has stock's
    name, signature and `__wrapped__`, stock's module globals, and one closure cell, named so
    that no library source uses it, holding `forward`. Calling it calls `forward`.
    """

    def build(_sam_blocked_forward):
        def stand_in(self, *args, **kwargs):
            return _sam_blocked_forward(self, *args, **kwargs)

        return stand_in

    template = build(forward)
    stand_in = types.FunctionType(template.__code__, stock_forward.__globals__, stock_forward.__name__, None, template.__closure__)
    stand_in.__kwdefaults__ = None
    return functools.update_wrapper(stand_in, stock_forward)


def warn_stock_call(label: str, why: str) -> None:
    """Warn once per reason that a call of `label` runs stock's forward; "" is silent."""
    if why:
        warn_once(f"stock-call-{label}-{why}", why)


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
