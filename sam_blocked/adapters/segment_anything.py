"""segment_anything (Meta's SAM): the image encoder's `Attention`, global and windowed blocks.

Stock forward: qkv -> (q * scale) k^T + decomposed rel-pos (get_rel_pos interpolates a table
only when its length differs from 2*size-1) -> softmax in the input dtype -> v -> proj,
on x of shape (B, H, W, dim). The blocked forward is sam_blocked.encoder.layer.attention_layer on
the module's own weights.

The encoder's `Block` (norm1, attention in windows or global, residual, norm2, MLP,
residual) is patched alongside (kind BLOCK): sam_blocked.encoder.block.encoder_block computes it
with the same arithmetic a chunk of tokens at a time, its attention included, under the
settings of its patched attention (or of the switch). It runs stock's Block forward when its
attention runs stock. So is the
`PatchEmbed` (kind EMBED): its convolution runs a band of patch rows at a time
(sam_blocked.encoder.tokenwise.patch_embedding), the same kernel on fewer rows. Also used by the
segment_anything_hq adapter: its encoder is a copy of this one. While autograd records,
all three run stock's forward (adapters.base.records_autograd).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import BLOCK, DECODER, EMBED, ClassPatch, EncoderCall, MethodPatch, class_patch, missing_attributes, qkv_reasons
from sam_blocked.adapters import state
from sam_blocked.adapters.registry import patched_class_named
from sam_blocked.automatic.batch import postprocess_small_regions, process_batch
from sam_blocked.automatic.decoder import budget_bytes, decoder_reasons, predict_masks
from sam_blocked.encoder.block import AttentionParts, MLPParts, encoder_block
from sam_blocked.encoder.layer import BlockConfig, attention_layer
from sam_blocked.encoder.tokenwise import embed_chunk, patch_embedding

LIBRARY = "segment_anything"
MODULES = ("segment_anything.modeling.image_encoder", "segment_anything.modeling.mask_decoder")

_ATTRIBUTES = ("qkv", "proj", "num_heads", "scale", "use_rel_pos")
_BLOCK_ATTRIBUTES = ("norm1", "attn", "norm2", "mlp", "window_size")


def attention_reasons(module: torch.nn.Module) -> list[str]:
    """Why this segment_anything-style Attention cannot run blocked; [] when it can."""
    why = missing_attributes(module, _ATTRIBUTES)
    if not why and module.use_rel_pos:
        why = missing_attributes(module, ("rel_pos_h", "rel_pos_w"))
    return why or qkv_reasons(module, "num_heads")


def blocked_attention_forward(module: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward, blocked. x: (B, H, W, dim) -> (B, H, W, dim)."""
    rel_h, rel_w = (module.rel_pos_h, module.rel_pos_w) if module.use_rel_pos else (None, None)
    return attention_layer(x, module.qkv, module.proj, module.num_heads, module.scale, rel_h, rel_w, config)


def banded_embed_runs(embed: torch.nn.Module) -> bool:
    """True when a PatchEmbed can run in bands: its proj a plain Conv2d without padding or dilation."""
    proj = getattr(embed, "proj", None)
    return type(proj) is torch.nn.Conv2d and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1


def class_patches(module: ModuleType, library: str = LIBRARY, home: str = __name__) -> list[ClassPatch]:
    """The ClassPatches for a loaded image_encoder module of segment_anything (or a copy of it):
    its Attention, and its Block and PatchEmbed alongside; for its mask_decoder module, the
    MaskDecoder; none for its automatic_mask_generator (method_patches)."""
    if hasattr(module, "MaskDecoder") and not hasattr(module, "Attention"):
        return [decoder_patch(module, library, home)]
    if not hasattr(module, "Attention"):
        return []
    attention = class_patch(library, module.Attention, blocked_attention_forward, attention_reasons, home=home)

    def block_reasons(block: torch.nn.Module) -> list[str]:
        why = missing_attributes(block, _BLOCK_ATTRIBUTES) or missing_attributes(block.mlp, ("lin1", "act", "lin2"))
        if not why and type(block.attn) not in (attention.stock, attention.patched):
            why = [f"its attn is {type(block.attn).__qualname__}, not {attention.name}: the block leaves it its own forward"]
        return why or attention.reasons(block.attn)

    def block_stock_call(block: torch.nn.Module, x: torch.Tensor) -> Optional[str]:
        """"" (silently stock: its attention, called by stock's Block forward, speaks for itself)
        when the block's attention does not run blocked, else None."""
        if type(block.attn) is attention.patched or state.runs_blocked(block.attn, attention):
            return None
        return ""

    def block_forward(block: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
        """Block.forward, a chunk of tokens at a time, its attention's settings when patch_sam set them.
        x: (B, H, W, dim) -> (B, H, W, dim)."""
        attn = block.attn
        if type(attn) is attention.patched:
            config = attn.blocked_config
        rel_h, rel_w = (attn.rel_pos_h, attn.rel_pos_w) if attn.use_rel_pos else (None, None)
        parts = AttentionParts(attn.qkv, attn.proj, attn.num_heads, attn.scale, rel_h, rel_w)
        mlp = MLPParts(block.mlp.lin1, block.mlp.act, block.mlp.lin2)
        return encoder_block(x, block.norm1, parts, block.norm2, mlp, block.window_size, config)

    block_patch = class_patch(library, module.Block, block_forward, block_reasons, home=home, kind=BLOCK, stock_call=block_stock_call)

    def embed_forward(embed: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
        """PatchEmbed.forward, a band of patch rows at a time. x: (B, 3, H, W) -> (B, H/16, W/16, dim)."""
        if not banded_embed_runs(embed):
            return embed_patch.stock_forward(embed, x)  # another convolution
        proj = embed.proj
        chunk = embed_chunk(proj.out_channels, proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1], config.max_block_mb, x.device)
        return patch_embedding(x, proj, chunk)

    # No reasons: a PatchEmbed that cannot run in bands runs stock's forward, never refusing the model.
    embed_patch = class_patch(library, module.PatchEmbed, embed_forward, lambda embed: [], home=home, kind=EMBED)
    return [attention, block_patch, embed_patch]


def _image_embeddings(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    return args[0] if args else kwargs.get("image_embeddings")


def decoder_patch(module: ModuleType, library: str = LIBRARY, home: str = __name__) -> ClassPatch:
    """MaskDecoder's forward on one image's embedding for many prompts (sam_blocked.automatic.decoder):
    the image side shared while it is the same for every prompt, then reassociated onto the
    prompt side; budget from max_block_mb. A decoder of another layout, or a batch of image
    embeddings, runs stock's forward (warned once for the layout): it never refuses a model."""

    def forward(decoder, config: BlockConfig, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output):
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return predict_masks(decoder, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, mask_slice, budget_bytes(config.max_block_mb))

    def stock_call(decoder, *args, **kwargs) -> Optional[str]:
        why = decoder_reasons(decoder)
        if why:
            return f"sam_blocked runs this {library} MaskDecoder stock: {'; '.join(why)}"
        embeddings = _image_embeddings(args, kwargs)
        if embeddings is None or embeddings.dim() != 4 or embeddings.shape[0] != 1:
            return ""  # not one image's embedding: stock's forward, as asked
        return None

    return class_patch(library, module.MaskDecoder, forward, lambda decoder: [], home=home, kind=DECODER, stock_call=stock_call)


def method_patches(module: ModuleType) -> list[MethodPatch]:
    """For segment_anything.automatic_mask_generator: SamAutomaticMaskGenerator's _process_batch and
    postprocess_small_regions (sam_blocked.automatic.batch), installed by the switch."""
    generator = getattr(module, "SamAutomaticMaskGenerator", None)
    if generator is None or not module.__name__.endswith("automatic_mask_generator"):
        return []

    def make_batch(stock):
        def _process_batch(self, points, im_size, crop_box, orig_size):
            config = state.config
            if config is None:
                return stock(self, points, im_size, crop_box, orig_size)
            return process_batch(self, points, im_size, crop_box, orig_size, budget_bytes(config.max_block_mb))

        return _process_batch

    return [MethodPatch(LIBRARY, generator, "_process_batch", make_batch), small_regions_patch(LIBRARY, generator)]


def small_regions_patch(library: str, generator: type) -> MethodPatch:
    """The generator's postprocess_small_regions (a staticmethod), one full-size mask at a time while the switch is on."""

    def make(stock):
        stock_function = stock.__func__ if isinstance(stock, staticmethod) else stock

        def postprocess(mask_data, min_area, nms_thresh):
            if state.config is None:
                return stock_function(mask_data, min_area, nms_thresh)
            return postprocess_small_regions(mask_data, min_area, nms_thresh)

        return staticmethod(postprocess)

    return MethodPatch(library, generator, "postprocess_small_regions", make)


def encoder_call(model: torch.nn.Module, package: str = LIBRARY) -> Optional[EncoderCall]:
    """How `package` (segment_anything or a copy) runs the encoder of a Sam or an ImageEncoderViT; None for other models."""
    modeling = sys.modules.get(f"{package}.modeling")
    if modeling is None:
        return None
    if isinstance(model, modeling.Sam) and isinstance(model.image_encoder, modeling.ImageEncoderViT):
        predictor = importlib.import_module(package).SamPredictor
        return EncoderCall(model.image_encoder.img_size, model.image_encoder, predictor)
    if isinstance(model, modeling.ImageEncoderViT):
        return EncoderCall(model.img_size, model)
    return None


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (registry.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
