"""Buffers the automatic-mask path reuses from step to step (see Workspace)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

Tensor = torch.Tensor


class Workspace:
    """Buffers reused from step to step, so that a step does not take fresh memory from the system.

    glibc hands blocks of tens of MiB back to the system when they are freed (or maps them
    afresh), and the CPU then takes a page fault for every 4 KiB written into the next one:
    a chunk of the decoder and a step of the post-processing allocate ~100 MiB each (a batch
    of 64 points at 1024 px with the filters at 0 took ~290,000 faults; ~75,000 with the
    workspace, most of them now in layer norms and the RLE's lists). A buffer taken again is
    already mapped.
    The results are the same: the same aten ops write into the buffers (their .out forms).
    It also keeps what the decoder computes once per image (Workspace.image_side).

    Buffers are bytes, named by slot. A phase (a transformer layer, an upscaling step, a
    post-processing step) takes its tensors from slots its inputs are not in, and what it
    returns is freshly allocated unless it says which slot holds it. The phases run one after
    another and share the slots, so the workspace holds about one phase's peak:

    | slot | transformer   | upscaling   | post-processing                          |
    |------|---------------|-------------|------------------------------------------|
    | a    | keys + pe     | 2nd conv    | logits at the image's size               |
    | b    | x + attention | 1st conv    | one mask at the model's (when resized)   |
    | c    |               |             | comparisons                              |
    | d    | scores        |             | masks                                    |
    | e    | softmax       | mask logits |                                          |

    (Layer norms write fresh tensors: aten's layer norm has no form that writes into a buffer.)

    A slot grows to its largest request and is freed with the workspace.
    """

    def __init__(self) -> None:
        self.slots: dict[str, Tensor] = {}
        self._image: Optional[tuple[Tensor, Tensor, tuple, Tensor, Any]] = None  # image, pe, their versions, dense, what make() made

    def image_side(self, image: Tensor, pe: Tensor, dense: Tensor, make: Callable[[], Any]) -> Any:
        """make(): what the decoder computes once per image (the first layer's image side),
        kept while it is asked for the same image and positional encoding (the same tensors,
        unchanged since) and an equal dense prompt embedding. decode_steps keeps a workspace
        for one batch of points on the image (or crop) set."""
        versions = (_version(image), _version(pe))
        kept = self._image
        same = kept is not None and kept[0] is image and kept[1] is pe and kept[2] == versions and kept[3].shape == dense.shape and torch.equal(kept[3], dense)
        if not same:
            self._image = None  # the old one freed before the new one is made
            self._image = (image, pe, versions, dense.clone(), make())
        return self._image[4]

    def take(self, slot: str, shape: tuple[int, ...], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A contiguous `shape` tensor in `slot` (like's dtype unless given, on like's
        device), over whatever the slot held before."""
        dtype = dtype or like.dtype
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        buf = self.slots.get(slot)
        if buf is None or buf.numel() < size or buf.device != like.device:
            self.slots.pop(slot, None)
            buf = self.slots[slot] = torch.empty(size, dtype=torch.uint8, device=like.device)
        return buf[:size].view(dtype).view(shape)


def _version(t: Tensor) -> Optional[int]:
    """t's in-place version counter (None for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


__all__ = ["Workspace"]
