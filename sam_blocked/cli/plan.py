"""`sam-blocked plan`: the memory a model, input size and dtype need, before downloading weights."""

from __future__ import annotations

import argparse
import json

from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.attention.dispatch import BACKEND_CHOICES
from sam_blocked.memory.measure import format_bytes
from sam_blocked.models.registry import DTYPES, ENCODER_CONFIGS, MODEL_TYPES
from sam_blocked.memory.planner import MemoryPlan, largest_input_size, plan_memory

EPILOG = """\
figures are counted from the architecture and the patched code's blocking rules (not run);
on the CPU they include the allocator's measured slack, on CUDA the driver's context
(a few hundred MiB) comes on top. README "Memory planner" compares them with measurements.

examples:
  sam-blocked plan --model-type vit_h --img-size 4096 --max-block-mb 32
  sam-blocked plan --model-type vit_b --device cuda --max-memory-mb 6144 --points-per-batch 16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan",
        help="predict the memory SAM needs (weights, encoder stock and patched, decoder) and what fits a budget",
        description="Predicts weights, the image encoder's extra peak (stock and patched), the mask decoder "
        "at a prompt batch and the total; with --max-memory-mb, the largest input size (the tile size for "
        "larger images) that fits, for every model type.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-type", default="vit_b", choices=list(ENCODER_CONFIGS), help="SAM architecture (default %(default)s)")
    parser.add_argument("--img-size", type=int, default=1024, help="square input size in pixels, a multiple of 16 (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="image encoder dtype (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the device the run will use (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="images per encoder call (default %(default)s)")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="blocks per attention matrix (default %(default)s)")
    parser.add_argument("--max-block-mb", type=float, default=None, help="memory budget in MiB for the largest attention block; overrides --chunks")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=list(BACKEND_CHOICES),
        help="attention kernel the run will use (default %(default)s); each kernel's workspace differs",
    )
    parser.add_argument(
        "--points-per-batch",
        type=int,
        default=64,
        help="prompts decoded together (amg.py's flag; 1 for interactive prompts; default %(default)s)",
    )
    parser.add_argument("--max-memory-mb", type=float, default=None, help="memory to fit in, MiB: prints the largest input size that fits")
    parser.add_argument("--json", action="store_true", help="print one JSON object (sizes in bytes and MiB)")
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    plan = plan_memory(
        args.model_type, args.img_size, args.dtype, args.device, args.batch, args.chunks, args.max_block_mb, args.points_per_batch, args.backend
    )
    fits = None
    if args.max_memory_mb is not None:
        if not args.max_memory_mb > 0:
            raise ValueError(f"--max-memory-mb must be > 0, got {args.max_memory_mb:g}")
        fits = {
            model: largest_input_size(
                model,
                args.max_memory_mb,
                dtype=args.dtype,
                device=args.device,
                chunks=args.chunks,
                max_block_mb=args.max_block_mb,
                points_per_batch=args.points_per_batch,
                backend=args.backend,
            )
            for model in dict.fromkeys([args.model_type, *MODEL_TYPES])
        }
    if args.json:
        out = plan.as_dict()
        if fits is not None:
            out.update(max_memory_mb=args.max_memory_mb, largest_input_size=fits[args.model_type], largest_input_sizes=fits)
        print(json.dumps(out, indent=2))
    else:
        print(report(plan, args.max_memory_mb, fits))
    return 0


def report(plan: MemoryPlan, max_memory_mb: float | None = None, fits: dict[str, int | None] | None = None) -> str:
    """The plan as a short table, and what fits max_memory_mb."""
    blocking = f"attention blocks <= {plan.max_block_mb:g} MiB" if plan.max_block_mb else f"chunks {plan.chunks}"
    blocking += f", backend {plan.backend}"
    lines = [
        f"{plan.model_type} at {plan.img_size} px ({plan.tokens} tokens{f', batch {plan.batch}' if plan.batch > 1 else ''}), "
        f"{plan.dtype} on {plan.device}, {blocking}",
        f"{'':32s}{'patched':>14s}{'stock':>14s}",
        _row("weights", plan.weights_bytes, plan.weights_bytes),
        _row("input image tensor", plan.input_bytes, plan.input_bytes),
        _row("image encoder, extra peak", plan.encoder_patched_bytes, plan.encoder_stock_bytes),
        _row(f"mask decoder, {plan.points_per_batch} prompts", plan.decoder_bytes + plan.embedding_bytes, plan.decoder_stock_bytes + plan.embedding_bytes),
        _row("total", plan.total_bytes, plan.stock_total_bytes),
        f"patched encoder peaks in: {plan.encoder_peak_phase}",
    ]
    if plan.encoder_tensor_bytes != plan.encoder_patched_bytes:  # the CPU: a process keeps more than its tensors
        lines.append(
            f"  CPU: the encoder rows are bounds on the resident set. Tensors (predicted): {format_bytes(plan.encoder_tensor_bytes)} "
            f"patched, {format_bytes(plan.encoder_stock_tensor_bytes)} stock; the rest allows for what a process keeps "
            "(freed memory glibc holds, kernels' code, threads)"
        )
    decoder = plan.decoder_bytes + plan.embedding_bytes
    if decoder > plan.input_bytes + plan.encoder_patched_bytes:
        lines.append("the decoder sets the patched total: a lower --max-block-mb decodes fewer prompts and masks at a time")
    if fits:
        lines.append(f"within {max_memory_mb:g} MiB ({plan.dtype}, {plan.device}, {plan.points_per_batch} prompts per decoder batch), patched:")
        for model, size in fits.items():
            lines.append(f"  {model:6s} " + (f"up to {size} px inputs; larger images in tiles of {size} px" if size else "does not fit at any size"))
    return "\n".join(lines)


def _row(name: str, patched: int, stock: int) -> str:
    return f"  {name:30s}{format_bytes(patched):>14s}{format_bytes(stock):>14s}"
