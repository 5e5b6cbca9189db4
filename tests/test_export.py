"""Compiled, not run: a patched model scripts, traces and exports as stock does, and computes stock there.

Every case runs with the switch on (enable) and on an instance patched by patch_sam, and
compares the compiled model's output with the stock model's eager output. The compilers
record the library's own forward, the same aten ops in the same order as stock's eager
run on the CPU, so the outputs are equal to the bit: a compiled blocked forward would
differ by its own rounding (~1e-6 relative, tests/test_switch.py), so exact equality is
also the proof that stock's forward was recorded. Stepping aside is silent: no
sam_blocked warning (the autograd one included, though these compile in grad mode).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from sam_libraries import _vit_kwargs, flat, peaked, pixels, timm_vit

import sam_blocked

SETUPS = ("enable", "patch_sam")
SIZE = 128  # px: an 8 x 8 token grid, padded to 7 x 7 windows; small enough for the compilers on 2 cores


@pytest.fixture(autouse=True)
def _switch_off():
    yield
    sam_blocked.disable()


def sa_attention(use_rel_pos: bool = True) -> torch.nn.Module:
    """One segment_anything Attention on a 6 x 6 grid: stock's Block does not script (pad_hw is
    bound in one branch only) and stock's get_rel_pos does not FX-trace (int() of a size)."""
    from segment_anything.modeling.image_encoder import Attention

    return peaked(Attention(32, num_heads=2, use_rel_pos=use_rel_pos, input_size=(6, 6)))


def sa_encoder() -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    return peaked(ImageEncoderViT(**{**_vit_kwargs(), "img_size": SIZE}))


def small_timm() -> torch.nn.Module:
    return timm_vit(img_size=SIZE)[0]


def timm_fx(model: torch.nn.Module) -> torch.nn.Module:
    """timm's own FX path, as timm's tests trace samvit: its feature extractor, last node."""
    from timm.models import create_feature_extractor, get_graph_node_names

    return create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])


def compile_with(mode: str, model: torch.nn.Module, x: torch.Tensor):
    """The model compiled by `mode`, as a callable of x."""
    if mode == "script":
        return torch.jit.script(model)
    if mode == "trace":
        return torch.jit.trace(model, (x,))
    if mode == "fx":
        return torch.fx.symbolic_trace(model)
    if mode == "timm-fx":
        return timm_fx(model)
    if mode == "timm-fx-script":
        return torch.jit.script(timm_fx(model))
    if mode == "export":
        return torch.export.export(model, (x,)).module()
    raise ValueError(mode)


# (library, mode) -> (model, input): the smallest model each compiler takes stock.
def case(library: str, mode: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if library == "segment_anything":
        if mode == "script":
            return sa_attention(), torch.randn(1, 6, 6, 32, generator=torch.Generator().manual_seed(0))
        if mode == "fx":  # a 16 x 16 grid, on which blocked rounds differently from stock
            return sa_attention(use_rel_pos=False), torch.randn(1, 16, 16, 32, generator=torch.Generator().manual_seed(0))
        return sa_encoder(), pixels(size=SIZE)
    return small_timm(), pixels(size=SIZE)


SLOW = pytest.mark.slow  # over a second on 2 cores: the compilers' own time
CASES = [
    pytest.param("segment_anything", "script", marks=SLOW),
    pytest.param("segment_anything", "trace", marks=SLOW),
    ("segment_anything", "fx"),
    pytest.param("segment_anything", "export", marks=SLOW),
    pytest.param("timm", "script", marks=SLOW),
    pytest.param("timm", "trace", marks=SLOW),
    pytest.param("timm", "timm-fx", marks=SLOW),
    pytest.param("timm", "timm-fx-script", marks=SLOW),
    pytest.param("timm", "export", marks=SLOW),
]


def switch_on(setup: str, model: torch.nn.Module) -> None:
    # The pure-PyTorch kernel: it rounds differently from stock everywhere ("auto" may pick SDPA,
    # equal to stock's math on a small layer), so a blocked eager call shows in the output.
    if setup == "enable":
        sam_blocked.enable(chunks=4, backend="blocked")
    else:
        sam_blocked.patch_sam(model, chunks=4, backend="blocked")
    assert sam_blocked.is_patched(model)


def outputs(result) -> torch.Tensor:
    return flat(list(result.values()) if isinstance(result, dict) else result)


def sam_blocked_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "sam_blocked" in str(w.message)]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("library, mode", CASES)
def test_compiled_model_runs_stock(library, mode, setup):
    model, x = case(library, mode)
    with torch.no_grad():
        ref = outputs(compile_with(mode, model, x)(x))  # stock, compiled
        eager = outputs(model(x))
    assert torch.equal(ref, eager)  # the compilers replay stock's eager ops (see the module docstring)
    switch_on(setup, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile_with(mode, model, x)
        with torch.no_grad():
            got = outputs(compiled(x))
    assert not sam_blocked_warnings(caught)
    # Exact: the compiler recorded stock's forward (see the module docstring).
    assert torch.equal(got, ref), f"{library} {mode} {setup}: max |diff| {(got - ref).abs().max().item():.3g}"
    assert sam_blocked.is_patched(model)  # compiling left the model as it was: eager calls still run blocked
    with torch.no_grad():
        assert not torch.equal(outputs(model(x)), eager)


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_onnx_export_records_stock(setup):
    """torch.onnx.export (dynamo, the default; it needs onnx and onnxscript, the test extra): the
    ONNX graph is stock's, node for node, and the exported program it was built from computes
    stock's output exactly (onnxruntime is not a dependency, so the ONNX model itself is not run).
    segment_anything's encoder: timm's samvit fails ONNX's decomposition stock (a view of a
    transposed tensor in its Attention, torch 2.14)."""
    pytest.importorskip("onnxscript")
    model, x = sa_encoder(), pixels(size=SIZE)
    with torch.no_grad():
        ref = outputs(model(x))
    stock_program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    switch_on(setup, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert not sam_blocked_warnings(caught)
    assert [n.op_type for n in program.model.graph] == [n.op_type for n in stock_program.model.graph]
    assert len(program.model_proto.SerializeToString()) > 0
    with torch.no_grad():
        assert torch.equal(outputs(program.exported_program.module()(x)), ref)  # exact: see the module docstring
    assert sam_blocked.is_patched(model)
