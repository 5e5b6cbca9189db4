"""What a SAM run needs in memory, before any weights are downloaded: a count, not a measurement.

plan_memory(model_type, img_size, ...) adds up, from the architecture (models.ENCODER_CONFIGS)
and the blocking rules the patched code itself uses (attention.dispatch.plan_backend, tokenwise's chunks)
and what each attention kernel says it holds (its workspace_bytes), for the backend the patch runs:

- weights: every parameter and buffer, the image encoder in `dtype`, the rest float32;
- input: the (batch, 3, S, S) float32 image tensor the encoder reads;
- encoder extra peak, stock and patched: the largest of its phases (patch embedding, a
  global attention block, a windowed one, the MLP, the neck), each a sum of the tensors
  alive at once in units of one token activation a = batch x tokens x dim x itemsize,
  plus the attention kernel's workspace from its BlockPlan;
- mask decoder: one batch of `points_per_batch` point prompts, three masks each, upsampled
  to the input size, as sam_blocked.automatic decodes and post-processes it (a chunk of
  prompts and a few masks at a time within max_block_mb: automatic_tensor_bytes, which that
  code owns), plus the kept image embedding; stock's batch (SamAutomaticMaskGenerator:
  7.1-7.8 x prompts x 256 x tokens x 4 bytes, measured on the CPU) for the stock total;
- total: weights + the larger of (input + encoder) and (embedding + decoder).

The counts are what the tensors hold (the allocator's view, as CUDA's max_memory_allocated
reports it: MemoryPlan.encoder_tensor_bytes; torch's profiler counts the same on the CPU,
sam_blocked.memory.measure.tensor_peak_bytes): a prediction, within 15% wherever it was measured.
On the CPU the process's resident high-water mark also holds what a process keeps beside
its tensors (glibc's free lists and holes between freed step buffers, kernels' code, thread
stacks). That share depends on what the process did before as much as on the encode: it
cannot be predicted, only bounded. CPU figures are resident_bound_bytes(tensors, device), a bound
over every run of this project's benchmark (README, "Memory planner"). On CUDA the driver's
context (a few hundred MiB) comes on top and is not counted.

largest_input_size(...) is the largest input side (a multiple of 16) whose total fits a budget:
the tile size `--tile auto` uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.automatic.batch import automatic_tensor_bytes
from sam_blocked.automatic.decoder import budget_bytes
from sam_blocked.encoder.layer import BlockConfig, check_config
from sam_blocked.memory.encoder import EncoderShape, encoder_phases
from sam_blocked.attention.common import FP32_BYTES
from sam_blocked.models.registry import DTYPES, ENCODER_CONFIGS, MLP_RATIO, PATCH_SIZE, PROMPT_EMBED_DIM, check_dtype, check_model_type

MIB = 2**20
CHECKPOINT_SIZE = 1024  # the official checkpoints' input size: global rel-pos tables have 2 * 64 - 1 rows
PROMPT_DECODER_PARAMS = 6476 + 4058340 + 6  # prompt encoder, mask decoder, pixel mean/std (same for every model type)
DECODER_ACTIVATIONS = 7.5  # stock's decoder batch peaks at about this many (prompts, 256, tokens) float32 tensors
# On the CPU, resident extra peak <= resident_bound_bytes(the tensors counted, device). A
# first run's process kept 9-107 MiB beside the tensors the planner counts (bench_resolution:
# vit_b, vit_l and vit_h, 1024-4096 px, float32 and bfloat16, whole encoder or first blocks;
# stock vit_b at 1024 px 114 MiB beside 2400), and the same run repeated varies by tens of
# MiB (vit_b 1536 px float32: 153-218 MiB over five runs). Where it comes from: glibc's
# dynamic thresholds (freed buffers up to 32 MiB go back to its heap, which keeps up to
# 64 MiB free at its top, and holes between), the kernels' code (~16 MiB, once per process)
# and ~10 MiB of caches, measured with smaps_rollup and mallinfo2 on vit_b at 1024 px.
# With a small encode before it, the same vit_b 1024 px bfloat16 run kept less than its own
# tensors (freed memory reused): it depends on the process's history. 128 MiB + 5% of the
# tensors is above every measured run; 80 MiB + 5%, fitted to the first sweep, was exceeded
# by two runs of the second.
CPU_PROCESS_BYTES = 128 * MIB
CPU_PROCESS_FRACTION = 0.05
MAX_INPUT_SIZE = 16384


def resident_bound_bytes(tensor_bytes: int, device: str = "cpu") -> int:
    """The planner's extra peak for an encoder whose tensors peak at `tensor_bytes` on
    `device`: on the CPU a bound on the resident set (the tensors and what a process keeps
    beside them, above), on CUDA the tensors (the allocator's view)."""
    if torch.device(device).type != "cpu":
        return tensor_bytes
    return tensor_bytes + CPU_PROCESS_BYTES + int(CPU_PROCESS_FRACTION * tensor_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one SAM run, in bytes (the *_mib properties in MiB)."""

    model_type: str
    img_size: int
    dtype: str
    device: str
    batch: int
    chunks: int
    max_block_mb: Optional[float]
    points_per_batch: int
    tokens: int  # per image: (img_size / 16) ** 2
    weights_bytes: int
    input_bytes: int
    encoder_stock_bytes: int  # extra peak of stock segment_anything's encoder, over weights and input (CPU: a bound)
    encoder_patched_bytes: int  # the same, patched
    encoder_peak_phase: str  # where the patched peak is
    encoder_tensor_bytes: int  # the patched extra peak in tensors alone (the allocator's view; on CUDA = encoder_patched_bytes)
    encoder_stock_tensor_bytes: int  # the same, stock
    embedding_bytes: int  # the image embedding a predictor keeps
    decoder_bytes: int  # extra peak of one decoder batch of points_per_batch prompts (sam_blocked.automatic)
    backend: str = "auto"  # the patch's attention backend the patched figures are for
    decoder_stock_bytes: int = 0  # the same batch through stock's decoder and SamAutomaticMaskGenerator

    @property
    def blocking(self) -> BlockConfig:
        """The patch's settings these figures are for."""
        return BlockConfig(self.chunks, self.max_block_mb, self.backend)

    @property
    def total_bytes(self) -> int:
        """Weights plus the larger of (input + patched encoder) and (embedding + decoder)."""
        return self.weights_bytes + max(self.input_bytes + self.encoder_patched_bytes, self.embedding_bytes + self.decoder_bytes)

    @property
    def stock_total_bytes(self) -> int:
        """total_bytes with stock segment_anything's encoder."""
        return self.weights_bytes + max(self.input_bytes + self.encoder_stock_bytes, self.embedding_bytes + self.decoder_stock_bytes)

    def as_dict(self) -> dict:
        """Settings, bytes and the same figures in MiB (weights_mib, encoder_extra_mib, ...)."""
        out = asdict(self)
        out.update(total_bytes=self.total_bytes, stock_total_bytes=self.stock_total_bytes)
        for key in ("weights", "input", "encoder_stock", "encoder_patched", "encoder_tensor", "encoder_stock_tensor", "embedding", "decoder", "decoder_stock", "total", "stock_total"):
            out[f"{key}_mib"] = round(out[f"{key}_bytes"] / MIB, 1)
        out["encoder_extra_mib"] = out["encoder_patched_mib"]
        out["encoder_stock_extra_mib"] = out["encoder_stock_mib"]
        return out


def plan_memory(
    model_type: str,
    img_size: int,
    dtype: str = "float32",
    device: str = "cpu",
    batch: int = 1,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    points_per_batch: int = 64,
    backend: str = "auto",
    threads: Optional[int] = None,
) -> MemoryPlan:
    """Predict the memory of encoding `batch` images at img_size px and decoding a prompt batch.

    Args:
        model_type: "vit_b", "vit_l", "vit_h" (or "tiny").
        img_size: square input side in pixels, a positive multiple of 16.
        dtype: the image encoder's dtype: "float32", "bfloat16" or "float16".
        device: "cpu" or "cuda[:N]": the CPU figures add a bound on what a process keeps (module doc).
        batch: images per encoder call.
        chunks, max_block_mb: the patch's blocking, as patch_sam takes it.
        points_per_batch: prompts per mask-decoder batch (amg.py's flag; 1 for one prompt
            set at a time).
        backend: the patch's attention backend ("auto", or one it names: BACKEND_CHOICES); each
            kernel states its own workspace, so the patched figures follow it.
        threads: CPU threads the patched steps run on at once (each sized to its share of
            the budget); None: torch's thread count now.

    Raises:
        ValueError: a bad setting, or a named backend that cannot run one of the encoder's layers.
    """
    _check(model_type, img_size, dtype, device, batch, chunks, max_block_mb, points_per_batch, backend)
    tokens = (img_size // PATCH_SIZE) ** 2
    tensors, stock_tensors, phase = encoder_tensor_bytes(EncoderShape.of(model_type), img_size, dtype, device, batch, chunks, max_block_mb, backend, threads)
    embedding = batch * PROMPT_EMBED_DIM * tokens * FP32_BYTES
    decoder_stock = DECODER_ACTIVATIONS * points_per_batch * PROMPT_EMBED_DIM * tokens * FP32_BYTES
    decoder = automatic_tensor_bytes(tokens, img_size * img_size, budget_bytes(max_block_mb), PROMPT_EMBED_DIM, prompts=points_per_batch)
    return MemoryPlan(
        model_type=model_type,
        img_size=img_size,
        dtype=dtype,
        device=str(device),
        batch=batch,
        chunks=chunks,
        max_block_mb=max_block_mb,
        points_per_batch=points_per_batch,
        tokens=tokens,
        weights_bytes=weight_bytes(model_type, img_size, dtype),
        input_bytes=batch * 3 * img_size * img_size * FP32_BYTES,
        encoder_stock_bytes=resident_bound_bytes(stock_tensors, device),
        encoder_patched_bytes=resident_bound_bytes(tensors, device),
        encoder_peak_phase=phase,
        encoder_tensor_bytes=tensors,
        encoder_stock_tensor_bytes=stock_tensors,
        embedding_bytes=embedding,
        decoder_bytes=int(decoder),
        backend=backend,
        decoder_stock_bytes=int(decoder_stock),
    )


def encoder_tensor_bytes(
    shape: EncoderShape,
    img_size: int,
    dtype: str = "float32",
    device: str = "cpu",
    batch: int = 1,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    backend: str = "auto",
    threads: Optional[int] = None,
) -> tuple[int, int, str]:
    """The encoder's extra peak in tensors, (patched, stock, the phase of the patched peak):
    the largest of the counted phases (encoder_memory).

    Args:
        shape: the encoder (EncoderShape.of(model_type), or .from_encoder(a built encoder)).
        img_size, dtype, device, batch, chunks, max_block_mb, backend, threads: as plan_memory.
    """
    torch_dtype = getattr(torch, dtype)
    patched = encoder_phases(shape, img_size, torch_dtype, device, batch, chunks, max_block_mb, patched=True, backend=backend, threads=threads)
    stock = encoder_phases(shape, img_size, torch_dtype, device, batch, patched=False)
    phase = max(patched, key=patched.get)
    return patched[phase], max(stock.values()), phase


def planned_encoder_bytes(
    encoder: torch.nn.Module, chunks: int = DEFAULT_CHUNKS, max_block_mb: Optional[float] = None, backend: str = "auto"
) -> tuple[int, int]:
    """The planner's (stock, patched) extra peak of a built segment_anything image encoder at
    its input size, dtype and device (what the demo's memory panel shows).

    Args:
        encoder: an ImageEncoderViT, patched or not.
        chunks, max_block_mb, backend: the patch's settings (BlockConfig's fields).
    """
    weight = next(encoder.parameters())
    dtype = str(weight.dtype).removeprefix("torch.")
    device = str(weight.device)
    patched, stock, _ = encoder_tensor_bytes(EncoderShape.from_encoder(encoder), encoder.img_size, dtype, device, 1, chunks, max_block_mb, backend)
    return resident_bound_bytes(stock, device), resident_bound_bytes(patched, device)


def largest_input_size(
    model_type: str,
    max_memory_mb: float,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    points_per_batch: int = 64,
    multiple: int = 16,
    backend: str = "auto",
) -> Optional[int]:
    """The largest square input side (a multiple of `multiple`) whose patched total fits max_memory_mb.

    Args:
        model_type, dtype, device, chunks, max_block_mb, points_per_batch, backend: as plan_memory
            (one image per encoder call).
        max_memory_mb: the memory to fit in, MiB (everything: weights, encoder, decoder).
        multiple: sizes tried are multiples of this (a multiple of 16), up to MAX_INPUT_SIZE.

    Returns:
        The size in pixels, or None when even `multiple` px does not fit.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < PATCH_SIZE or multiple % PATCH_SIZE:
        raise ValueError(f"multiple must be a positive multiple of {PATCH_SIZE}, got {multiple!r}")
    if not max_memory_mb > 0:
        raise ValueError(f"max_memory_mb must be > 0, got {max_memory_mb!r}")
    budget = max_memory_mb * MIB

    def fits(size: int) -> bool:
        plan = plan_memory(model_type, size, dtype, device, 1, chunks, max_block_mb, points_per_batch, backend)
        return plan.total_bytes <= budget

    # Totals grow with the size: bisect over the multiples, keeping one that fits.
    low, high = 0, MAX_INPUT_SIZE // multiple
    if not fits(multiple):
        return None
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid * multiple):
            low = mid
        else:
            high = mid - 1
    return low * multiple


def weight_bytes(model_type: str, img_size: int, dtype: str = "float32") -> int:
    """Bytes of a SAM's parameters and buffers: the image encoder in `dtype` (its position
    embedding resized to img_size), the prompt encoder and mask decoder in float32."""
    dim, depth, heads, global_idx, window = ENCODER_CONFIGS[model_type]
    head_dim = dim // heads
    grid, grid0 = img_size // PATCH_SIZE, CHECKPOINT_SIZE // PATCH_SIZE
    mlp = dim * MLP_RATIO
    block = 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + 2 * dim + dim * mlp + mlp + mlp * dim + dim
    rel_pos = sum(2 * (2 * (grid0 if i in global_idx else window) - 1) * head_dim for i in range(depth))
    neck = PROMPT_EMBED_DIM * dim + 2 * PROMPT_EMBED_DIM + PROMPT_EMBED_DIM * PROMPT_EMBED_DIM * 9 + 2 * PROMPT_EMBED_DIM
    embed = 3 * PATCH_SIZE * PATCH_SIZE * dim + dim + grid * grid * dim
    encoder = embed + depth * block + rel_pos + neck
    return encoder * DTYPES[dtype].itemsize + PROMPT_DECODER_PARAMS * FP32_BYTES


def _check(model_type, img_size, dtype, device, batch, chunks, max_block_mb, points_per_batch, backend) -> None:
    check_model_type(model_type)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size={img_size!r} must be a positive multiple of the patch size {PATCH_SIZE}")
    check_dtype(dtype)
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the planner knows cpu and cuda")
    for name, value in (("batch", batch), ("points_per_batch", points_per_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    check_config(chunks, max_block_mb, backend)
