"""The only layout code of the pack: ComfyUI IMAGE [B,H,W,C] / MASK [B,H,W] <-> (B,C,H,W).

Padded originals that upsr_core attaches to visible maps are carried across the views.
Tensors handed to upsr_core are contiguous: a channels-last view (what ``movedim`` of an
IMAGE gives) selects other CPU kernels, whose rounding differs from the CLI's in the last bit.
"""
from __future__ import annotations

import torch

from upsr_core.stages import carry_padding


def image_in(image: torch.Tensor, name: str) -> torch.Tensor:
    """IMAGE [B,H,W,3] -> (B,3,H,W) float32, contiguous."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE [B,H,W,3], got {shape}")
    if image.shape[0] == 0:
        raise ValueError(f"{name}: the image batch is empty")
    return carry_padding(image, image.movedim(-1, 1).float().contiguous())


def image_out(x: torch.Tensor) -> torch.Tensor:
    """(B,1|3,H,W) -> IMAGE [B,H,W,3] on the CPU, contiguous: other nodes may ``.view()`` it or
    write into it (a movedim view, or an expand of one channel, would break them)."""
    y = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return carry_padding(x, y.movedim(1, -1).cpu().contiguous())


def mask_in(mask: torch.Tensor, name: str) -> torch.Tensor:
    """MASK [B,H,W] (or [H,W]) -> (B,1,H,W) float32, contiguous."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a MASK [B,H,W], got {shape}")
    m = mask if mask.ndim == 3 else mask.unsqueeze(0)
    if m.shape[0] == 0:
        raise ValueError(f"{name}: the mask batch is empty")
    return m.unsqueeze(1).float().contiguous()


def mask_out(x: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) -> MASK [B,H,W] on the CPU, contiguous."""
    return x[:, 0].cpu().contiguous()
