"""Full-reference image metrics: PSNR and SSIM on RGB or on the Y channel (BT.601).

All functions take float tensors (B, C, H, W) or (C, H, W) with finite values in [0, 1]
(± 0.05: raw network outputs overshoot a little; anything else is refused) and
compute on the 0-255 scale in float64, as BasicSR/MATLAB do (on the images' device; MPS has no
float64, so MPS images are measured on the CPU and the result is a CPU tensor). Quantise first (``to_uint8_levels``)
to measure what a saved 8-bit PNG would give. ``crop_border`` pixels are dropped on each side.

* PSNR = 10·log10(255² / MSE) per image; ``inf`` for identical images.
* SSIM: Wang et al. 2004, Gaussian window 11×11 σ = 1.5, C1 = (0.01·255)², C2 = (0.03·255)²,
  'valid' filtering; per-channel maps averaged over pixels then channels.
* Y = 16 + (65.481 R + 128.553 G + 24.966 B) on [0,1] RGB → [16, 235]: MATLAB rgb2ycbcr's
  formula, unrounded as BasicSR computes it (MATLAB rounds Y to 8 bits: 0.001–0.03 dB lower PSNR-Y).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .pipeline import check_unit_range

__all__ = ["SSIM_WINDOW", "psnr", "ssim", "rgb_to_y", "to_uint8_levels"]


def _batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
        raise ValueError(f"{name}: expected a (B, C, H, W) or (C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_unit_range(x, name)
    return (x if x.ndim == 4 else x.unsqueeze(0)).to(float64_device(x.device), torch.float64)


def float64_device(device: torch.device) -> torch.device:
    """Where a float64 measurement of tensors on ``device`` runs: there, or the CPU for MPS (which
    has no float64: ``.double()`` on an MPS tensor raises)."""
    return torch.device("cpu") if device.type == "mps" else device


def _pair(a: torch.Tensor, b: torch.Tensor, crop_border: int, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _batch(a, "img"), _batch(b, "ref")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if crop_border < 0 or 2 * crop_border >= min(a.shape[-2:]):
        raise ValueError(f"crop_border {crop_border} does not fit images of size {tuple(a.shape[-2:])}")
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        return rgb_to_y(a) * 255.0, rgb_to_y(b) * 255.0
    return a * 255.0, b * 255.0


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0,1] and round to the 256 levels of an 8-bit image (still float in [0,1])."""
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> (B,1,H,W) luma Y in [16/255, 235/255] (BT.601, MATLAB)."""
    if x.shape[-3] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels, got shape {tuple(x.shape)}")
    w = torch.tensor([65.481, 128.553, 24.966], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return ((x * w).sum(dim=-3, keepdim=True) + 16.0) / 255.0


def psnr(img: torch.Tensor, ref: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """PSNR in dB per image, shape (B,); inf where the images are identical."""
    a, b = _pair(img, ref, crop_border, y_channel)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 10.0 * torch.log10(255.0**2 / mse))


def _gauss_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


SSIM_WINDOW = 11
"""SSIM's Gaussian window (σ 1.5), in pixels: images need sides of at least this after cropping."""


def ssim(img: torch.Tensor, ref: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """SSIM per image, shape (B,); 1 for identical images. Images need sides >= 11 after cropping."""
    a, b = _pair(img, ref, crop_border, y_channel)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    win = _gauss_window(SSIM_WINDOW, device=a.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)
    filt = lambda z: F.conv2d(z, win, groups=c)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a**2
    s_bb = filt(b * b) - mu_b**2
    s_ab = filt(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return m.flatten(2).mean(2).mean(1)
