"""SAM's mask decoder for many prompts on one image, without a copy of the image per prompt.

Stock `MaskDecoder.predict_masks` repeats the (1, C, h, w) image embedding once per prompt
and runs its two-way transformer on every copy: each cross attention projects all h*w image
tokens (C -> D) for every prompt. Here, with T prompt-side tokens (5 output tokens and the
prompt's), H heads and D = H * d:

- while the image side is the same for every prompt (the first layer, when no mask prompt
  makes the dense embedding differ), it is projected once and shared;
- afterwards each image-side projection is reassociated onto the prompt side, per head:
  token -> image: q_h k_h^T = (q_h Wk_h) x^T (the key bias adds the same to every score of a
  row: softmax ignores it) and softmax(.) v_h = (softmax(.) x) Wv_h^T + bv_h (its rows sum to
  one); image -> token: q_h k_h^T = x (Wq_h^T k_h^T) + bq_h k_h^T and, through the output
  projection, sum_h a_h (v_h Wo_h^T). Every product then has H*T rows against the C image
  channels (56 x 256 for SAM's point prompts) instead of h*w against D;
- the output upscaling (two 2x2 stride-2 transposed convolutions) is a per-pixel linear map:
  it runs as GEMMs on the channel-last tokens, a few prompts at a time.

The same arithmetic as stock's, reordered: results agree to float rounding (the tests
compare with stock's decoder itself). Memory: a chunk of prompts at a time, sized so that
its image-side tensors fit `budget_bytes`; never a copy of the image per prompt of a batch.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sam_blocked.attention.common import FP32_BYTES
from sam_blocked.automatic.workspace import Workspace

Tensor = torch.Tensor

# image-side (prompts, h*w, C) tensors alive at once in a transformer layer: the keys, keys +
# positional encoding, an attention output (and the softmax input of the same order)
LAYER_TENSORS = 4
# the upscaling holds, per prompt, 2 x (4 h*w, C/4) then 2 x (16 h*w, C/8) activations and the masks
UPSCALE_TENSORS = 2 * 4 / 4 + 2 * 16 / 8 + 1
DEFAULT_DECODER_BYTES = 64 * 2**20


def _out(work: Optional[Workspace], name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A `shape` tensor to write into: slot `name` of the workspace, or a new one without it."""
    return like.new_empty(shape) if work is None else work.take(name, tuple(shape), like)


def _softmax(x: Tensor, dim: int, work: Optional[Workspace], name: str) -> Tensor:
    """torch.softmax(x, dim), into slot `name` when there is a workspace (aten._softmax, as torch.softmax calls)."""
    if work is None:
        return torch.softmax(x, dim=dim)
    return torch.ops.aten._softmax.out(x, dim, False, out=work.take(name, tuple(x.shape), x))


def _gelu(act: nn.Module, x: Tensor) -> Tensor:
    """act(x) on a tensor nothing else reads: an nn.GELU in place (the same values, no new tensor)."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def decoder_reasons(decoder: nn.Module) -> list[str]:
    """Why this mask decoder cannot run the shared-image path; [] when it can (segment_anything's layout)."""
    need = ("transformer", "iou_token", "mask_tokens", "num_mask_tokens", "output_upscaling", "output_hypernetworks_mlps", "iou_prediction_head")
    missing = [n for n in need if not hasattr(decoder, n)]
    if missing:
        return [f"its mask decoder lacks {', '.join(missing)}"]
    why = []
    transformer = decoder.transformer
    for name in ("layers", "final_attn_token_to_image", "norm_final_attn"):
        if not hasattr(transformer, name):
            why.append(f"its two-way transformer lacks {name}")
    if why:
        return why
    attentions = [transformer.final_attn_token_to_image]
    for layer in transformer.layers:
        for name in ("self_attn", "norm1", "cross_attn_token_to_image", "norm2", "mlp", "norm3", "norm4", "cross_attn_image_to_token", "skip_first_layer_pe"):
            if not hasattr(layer, name):
                return [f"a two-way attention block lacks {name}"]
        attentions += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    for attn in attentions:
        if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj")) or not hasattr(attn, "num_heads"):
            return ["a cross attention is not q/k/v/out_proj Linear layers with num_heads"]
    up = decoder.output_upscaling
    parts = list(up) if isinstance(up, nn.Sequential) else []
    kinds = [type(p).__name__ for p in parts]
    if kinds != ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", "GELU"]:
        return [f"its output upscaling is {kinds or type(up).__name__}, not SAM's ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, GELU"]
    for conv in (parts[0], parts[3]):
        if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0) or conv.output_padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            return ["its upscaling convolutions are not 2x2 with stride 2"]
    return []


def budget_bytes(max_block_mb: Optional[float]) -> int:
    """Bytes for one step of the decoder and of the automatic-mask path: max_block_mb MiB, else 64 MiB."""
    return DEFAULT_DECODER_BYTES if max_block_mb is None else int(max_block_mb * 2**20)


def prompts_per_chunk(tokens: int, channels: int, budget_bytes: Optional[int]) -> int:
    """Prompts decoded together: their image-side tensors (tokens x channels, float32) within the budget."""
    per_prompt = LAYER_TENSORS * tokens * channels * FP32_BYTES
    return max(1, (budget_bytes or DEFAULT_DECODER_BYTES) // per_prompt)


def upscale_per_chunk(tokens: int, channels: int, budget_bytes: Optional[int]) -> int:
    """Prompts upscaled together within the budget."""
    per_prompt = UPSCALE_TENSORS * tokens * channels * FP32_BYTES
    return max(1, int((budget_bytes or DEFAULT_DECODER_BYTES) // per_prompt))


@torch.no_grad()
def predict_masks(
    decoder: nn.Module,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor,
    mask_tokens: Optional[slice] = None,
    budget_bytes: Optional[int] = None,
    work: Optional[Workspace] = None,
) -> tuple[Tensor, Tensor]:
    """MaskDecoder.predict_masks for B prompts on one image, to float rounding.

    Args:
        decoder: segment_anything's MaskDecoder (decoder_reasons says it is one).
        image_embeddings: (1, C, h, w).
        image_pe: (1, C, h, w).
        sparse_prompt_embeddings: (B, P, C).
        dense_prompt_embeddings: (B, C, h, w) or (1, C, h, w); an expanded tensor (stride 0
            along B, as the prompt encoder returns without mask prompts) counts as one.
        mask_tokens: which masks to compute (forward's slice); None: all of them.
        budget_bytes: bytes for one chunk of prompts' image-side tensors.
        work: slots to reuse from chunk to chunk and from call to call (a caller decoding
            many chunks keeps one); None: each chunk allocates its own tensors.

    Returns:
        masks (B, M, 4h, 4w) logits and iou_pred (B, M), M the masks of `mask_tokens`.
    """
    if image_embeddings.shape[0] != 1:
        raise ValueError(f"predict_masks takes one image's embedding, got a batch of {image_embeddings.shape[0]}")
    b = sparse_prompt_embeddings.shape[0]
    _, c, h, w = image_embeddings.shape
    dense = dense_prompt_embeddings
    if dense.shape[0] == 1 or dense.stride(0) == 0:
        dense = dense[:1]
    pe = image_pe.flatten(2).transpose(1, 2)  # (1, hw, C)
    first = None
    if dense.shape[0] == 1 and work is not None:  # one image side for every prompt: its first-layer projections once per image
        x, first = work.image_side(image_embeddings, image_pe, dense, lambda: _shared_first_layer(decoder.transformer, (image_embeddings + dense).flatten(2).transpose(1, 2), pe))
    else:
        x = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (1 or B, hw, C)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1 + M, C)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1)  # (B, T, C)
    selected = range(decoder.num_mask_tokens)[mask_tokens or slice(None)]
    chunk = prompts_per_chunk(h * w, c, budget_bytes)
    masks, ious = [], []
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        xs = x if x.shape[0] == 1 else x[start:stop]
        hs, keys = two_way_transformer(decoder.transformer, xs, pe, tokens[start:stop], work, first)  # (b', T, C), (b', hw, C)
        hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in selected], dim=1)  # (b', M, C/8)
        masks.append(upscale_masks(decoder.output_upscaling, keys, hyper, h, w, budget_bytes, work))
        ious.append(decoder.iou_prediction_head(hs[:, 0])[:, list(selected)])
        del keys
    return torch.cat(masks), torch.cat(ious)


def _shared_first_layer(transformer: nn.Module, x: Tensor, pe: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """x and the first layer's projections of it when x (1, N, C) is every prompt's image side:
    the token-to-image keys and values and the image-to-token queries (two_way_transformer's `first`)."""
    layer = transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    x_pe = x + pe
    k, v = _shared_kv(t2i, x, x_pe)
    return x, {"kv": (k, v), "q": _shared_q(i2t, x_pe)}


def _shared_kv(attn: nn.Module, x: Tensor, x_pe: Tensor) -> tuple[Tensor, Tensor]:
    heads, d = _heads(attn)
    k = attn.k_proj(x_pe).view(1, -1, heads, d).transpose(1, 2)  # (1, H, N, d)
    v = attn.v_proj(x).view(1, -1, heads, d).transpose(1, 2)  # (1, H, N, d)
    return k, v


def _shared_q(attn: nn.Module, x_pe: Tensor) -> Tensor:
    heads, d = _heads(attn)
    return attn.q_proj(x_pe).view(1, -1, heads, d).permute(0, 2, 3, 1)  # (1, H, d, N)


def two_way_transformer(
    transformer: nn.Module, x: Tensor, pe: Tensor, tokens: Tensor, work: Optional[Workspace] = None, first: Optional[dict[str, Any]] = None
) -> tuple[Tensor, Tensor]:
    """TwoWayTransformer.forward on channel-last image tokens.

    Args:
        x: (1 or B, hw, C) image tokens (1: the same image side for every prompt).
        pe: (1, hw, C) their positional encoding.
        tokens: (B, T, C) output and prompt tokens (also their positional encoding, as in stock).
        work: slots for the image-side tensors (a, b, d, e).
        first: the first layer's projections of a shared x (_shared_first_layer), made once per image.

    Returns:
        queries (B, T, C) and keys (B, hw, C), as stock returns them.
    """
    queries, keys = tokens, x
    for i, layer in enumerate(transformer.layers):
        made = first if i == 0 else None
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        # (1 or B, N, C): the keys both cross attentions of this layer read (made: projected already)
        keys_pe = None if made else torch.add(keys, pe, out=_out(work, "a", keys.shape, keys))
        t2i = token_to_image(layer.cross_attn_token_to_image, queries + tokens, keys, keys_pe, work, made and made["kv"])
        queries = layer.norm2(queries + t2i)
        queries = layer.norm3(queries + layer.mlp(queries))
        i2t = image_to_token(layer.cross_attn_image_to_token, keys, keys_pe, queries + tokens, queries, work, made and made["q"])
        keys = layer.norm4(i2t)  # a fresh tensor: aten's layer norm has no form that writes into a buffer
        del i2t
        del keys_pe
    keys_pe = torch.add(keys, pe, out=_out(work, "a", keys.shape, keys))
    queries = transformer.norm_final_attn(queries + token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys, keys_pe, work))
    return queries, keys


def _heads(attn: nn.Module) -> tuple[int, int]:
    return attn.num_heads, attn.q_proj.out_features // attn.num_heads


def token_to_image(attn: nn.Module, q_in: Tensor, x: Tensor, x_pe: Optional[Tensor], work: Optional[Workspace] = None, kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Attention(q=q_in, k=x_pe, v=x) of segment_anything's transformer (x_pe = x + pe).

    Args:
        q_in: (B, T, C) prompt-side queries.
        x: (1 or B, N, C) image tokens; x_pe: the same plus their positional encoding.
        work: slots for the scores (d, e).
        kv: for a shared x (1, N, C), its keys and values projected already (_shared_kv); x_pe unused then.

    Returns:
        (B, T, C), after out_proj.
    """
    heads, d = _heads(attn)
    b, t, _ = q_in.shape
    q = attn.q_proj(q_in).view(b, t, heads, d).transpose(1, 2)  # (B, H, T, d)
    if x.shape[0] == 1:  # one image side for all: stock's arithmetic, projected once
        k, v = kv or _shared_kv(attn, x, x_pe)  # (1, H, N, d) each
        # prompt by prompt: a broadcast (B, H, T, d) @ (1, H, d, N) would copy k (and v) per prompt
        scores = _out(work, "d", (b, heads, t, x.shape[1]), x)
        for i in range(b):
            torch.matmul(q[i], k[0].transpose(-1, -2), out=scores[i])  # (H, T, N)
        scores = _softmax(scores.div_(math.sqrt(d)), -1, work, "e")  # (B, H, T, N)
        out = torch.stack([scores[i] @ v[0] for i in range(b)])  # (B, H, T, d)
    else:
        c = x.shape[-1]
        wk = attn.k_proj.weight.view(heads, d, c)
        wv = attn.v_proj.weight.view(heads, d, c)
        qk = (q @ wk).reshape(b, heads * t, c)  # (B, H*T, C); q.bk is the same for every key: softmax drops it
        scores = torch.bmm(qk, x_pe.transpose(1, 2), out=_out(work, "d", (b, heads * t, x.shape[1]), x))  # (B, H*T, N)
        scores = _softmax(scores.div_(math.sqrt(d)), -1, work, "e")
        ax = torch.bmm(scores, x).view(b, heads, t, c)  # (B, H, T, C)
        del scores
        out = ax @ wv.transpose(1, 2) + attn.v_proj.bias.view(heads, 1, d)  # (B, H, T, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, heads * d))


def image_to_token(
    attn: nn.Module, x: Tensor, x_pe: Optional[Tensor], k_in: Tensor, v_in: Tensor, work: Optional[Workspace] = None, q: Optional[Tensor] = None
) -> Tensor:
    """x + Attention(q=x_pe, k=k_in, v=v_in) of segment_anything's transformer: the residual
    sum the two-way block normalises next (x_pe = x + pe).

    Args:
        x: (1 or B, N, C) image tokens; x_pe: the same plus their positional encoding.
        k_in, v_in: (B, T, C) prompt-side keys and values.
        work: slots; the result is then in slot "b".
        q: for a shared x (1, N, C), its queries projected already (_shared_q); x_pe unused then.

    Returns:
        (B, N, C).
    """
    heads, d = _heads(attn)
    b, t, c = k_in.shape
    k = attn.k_proj(k_in).view(b, t, heads, d).transpose(1, 2)  # (B, H, T, d)
    v = attn.v_proj(v_in).view(b, t, heads, d).transpose(1, 2)  # (B, H, T, d)
    wo = attn.out_proj.weight.view(c, heads, d).permute(1, 2, 0)  # (H, d, C)
    # each head's values through its share of out_proj, and a 1/H share of its bias: a head's
    # attention rows sum to one, so the heads together add the bias once
    vo = (v @ wo + attn.out_proj.bias / heads).reshape(b, heads * t, c)  # (B, H*T, C)
    # The scores are built transposed, (B, H, T, N): the softmax over a prompt's T (~7) tokens
    # then runs along dim 2 with the N image tokens contiguous, several times faster on the
    # CPU than over a last dimension of 7.
    n = x.shape[1]
    if x.shape[0] == 1:
        q = _shared_q(attn, x_pe) if q is None else q  # (1, H, d, N), once for all prompts
        scores = _out(work, "d", (b, heads, t, n), x)
        for i in range(b):  # prompt by prompt, not a broadcast that copies q per prompt
            torch.matmul(k[i], q[0], out=scores[i])  # (H, T, N)
    else:
        wq = attn.q_proj.weight.view(heads, d, c)
        m = (k @ wq).reshape(b, heads * t, c)  # (B, H*T, C): k_h Wq_h
        bias = (k @ attn.q_proj.bias.view(heads, d, 1)).reshape(b, heads * t, 1)  # (B, H*T, 1): k_h bq_h
        scores = torch.baddbmm(bias, m, x_pe.transpose(1, 2), out=_out(work, "d", (b, heads * t, n), x)).view(b, heads, t, n)  # (B, H, T, N)
    scores = _softmax(scores.div_(math.sqrt(d)), 2, work, "e").view(b, heads * t, n)  # (B, H*T, N), over each head's T
    return torch.baddbmm(x.expand(b, -1, -1), scores.transpose(1, 2), vo, out=_out(work, "b", (b, n, c), x))  # (B, N, C): x + attention


def upscale_masks(upscaling: nn.Sequential, keys: Tensor, hyper: Tensor, h: int, w: int, budget_bytes: Optional[int], work: Optional[Workspace] = None) -> Tensor:
    """hyper @ output_upscaling(keys as (B, C, h, w)), a few prompts at a time.

    Args:
        keys: (B, hw, C) the transformer's image side.
        hyper: (B, M, C/8) the hypernetworks' outputs.
        work: slots for the activations (a, b, e).

    Returns:
        (B, M, 4h, 4w) mask logits, freshly allocated.
    """
    conv1, norm, act1, conv2, act2 = upscaling
    b, n, c = keys.shape
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # (C, (a, b', C1)): a 2x2 kernel per pixel
    b1 = conv1.bias.repeat(4)
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)  # (C1, (c', e, C2))
    b2 = conv2.bias.repeat(4)
    m = hyper.shape[1]
    out = keys.new_empty(b, m, 4 * h, 4 * w)
    step = upscale_per_chunk(n, c, budget_bytes)
    for s in range(0, b, step):
        e = min(b, s + step)
        rows = (e - s) * n
        y = torch.addmm(b1, keys[s:e].reshape(-1, c), w1, out=_out(work, "b", (rows, 4 * c1), keys)).view(-1, c1)  # ((b'', h, w, a, b'), C1)
        y = _gelu(act1, F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
        y = _gelu(act2, torch.addmm(b2, y, w2, out=_out(work, "a", (rows * 4, 4 * c2), keys)))  # ((b'', h, w, a, b'), (c', e, C2))
        y = y.view(e - s, n * 16, c2)
        logits = torch.bmm(y, hyper[s:e].transpose(1, 2), out=_out(work, "e", (e - s, n * 16, m), keys))  # (b'', (h, w, a, b', c', e), M)
        del y
        logits = logits.view(e - s, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (b'', M, h, a, c', w, b', e)
        out[s:e].view(e - s, m, h, 2, 2, w, 2, 2).copy_(logits)  # row 4i + 2a + c', column 4j + 2b' + e
    return out
