"""The only layout code of the pack: ComfyUI IMAGE [B,H,W,C] / MASK [B,H,W] <-> (B,C,H,W).

Padded originals that upsr_core attaches to visible maps are carried across the views.
Tensors handed to upsr_core are contiguous: a channels-last view (what ``movedim`` of an
IMAGE gives) selects other CPU kernels, whose rounding differs from the CLI's in the last bit.
"""
from __future__ import annotations

import logging

import torch

from upsr_core.pipeline import clamp_overshoot
from upsr_core.stages import carry_padding

log = logging.getLogger(__name__)

ROLES = {  # the pack's IMAGE maps, tagged so that a map wired into the wrong input is named
    "sr_estimate": "UPSR Estimate Uncertainty's sr_estimate (g(y))",
    "uncertainty": "UPSR Estimate Uncertainty's uncertainty (ψ)",
    "noise_weight": "UPSR Weight Noise's noise_weight (w)",
    "heatmap": "UPSR Weight Noise's heatmap (a colour picture of w)",
}
_ROLE = "_upsr_role"


def check_role(image: object, name: str, expected: str | None, want: str | None = None) -> None:
    """A ValueError when ``image`` is one of the pack's maps other than ``expected`` (None: the
    LR image, which is none of them); ``want`` says what the input takes where that is not
    ``expected``'s name. Untagged IMAGEs (any other node's, or a map edited on the way) pass:
    only the pack's own outputs, wired as they are, carry a role."""
    role = getattr(image, _ROLE, None)
    if role is not None and role != expected:
        want = want or (ROLES[expected] if expected else "the low-resolution image")
        raise ValueError(f"{name}: got {ROLES[role]}; connect {want} here")


def image_in(image: torch.Tensor, name: str) -> torch.Tensor:
    """IMAGE [B,H,W,3] -> (B,3,H,W) float32, contiguous."""
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[-1] == 4:
        raise ValueError(f"{name}: the image has an alpha channel (4 channels); UPSR upscales RGB: split the alpha "
                         "off first (Split Image with Alpha) and upscale it on its own if it is needed")
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE [B,H,W,3] (batch, height, width, RGB), got {shape}")
    if image.shape[0] == 0:
        raise ValueError(f"{name}: the image batch is empty")
    return carry_padding(image, image.movedim(-1, 1).float().contiguous())


def lr_in(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """The LR IMAGE [B,H,W,3] (or another picture, the input ``name``) -> (B,3,H,W) float32 in
    [0, 1]. ComfyUI's bicubic resize does not clamp (its Lanczos goes through 8 bits), so an image
    scaled down before UPSR overshoots [0, 1] at sharp edges: that is clamped (as ComfyUI's own
    upscale nodes clamp their output) and logged; values further out, NaN or Inf are an error."""
    what = "the image" if name == "image" else name
    lr, found = clamp_overshoot(image_in(image, name), what)
    if found is not None:
        log.info("UPSR: %s holds values in [%.4g, %.4g] (a resize's overshoot): clamped to [0, 1]", what, *found)
    return lr


def image_out(x: torch.Tensor, role: str | None = None) -> torch.Tensor:
    """(B,1|3,H,W) -> IMAGE [B,H,W,3] on the CPU, contiguous: other nodes may ``.view()`` it or
    write into it (a movedim view, or an expand of one channel, would break them). ``role``: one
    of :data:`ROLES`, checked by :func:`check_role` where the IMAGE arrives."""
    y = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    out = carry_padding(x, y.movedim(1, -1).cpu().contiguous())
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        setattr(out, _ROLE, role)
    return out


def mask_in(mask: torch.Tensor, name: str) -> torch.Tensor:
    """MASK [B,H,W] (or [H,W], or [B,1,H,W] as some nodes pass it) -> (B,1,H,W) float32, contiguous."""
    if not isinstance(mask, torch.Tensor) or not (mask.ndim in (2, 3) or mask.ndim == 4 and mask.shape[1] == 1):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a MASK [B,H,W], got {shape}")
    m = {2: mask.unsqueeze(0), 3: mask, 4: mask[:, 0]}[mask.ndim]
    if m.shape[0] == 0:
        raise ValueError(f"{name}: the mask batch is empty")
    return m.unsqueeze(1).float().contiguous()


def mask_out(x: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) -> MASK [B,H,W] on the CPU, contiguous."""
    return x[:, 0].cpu().contiguous()
