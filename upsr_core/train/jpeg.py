"""Baseline JPEG compress + decompress in torch (runs on any device, batched, per-image quality).

Two models of it: :func:`jpeg_compress` (what libjpeg does, described below: the artefacts of
real JPEG files) and :func:`diffjpeg_compress` (what the official UPSR/Real-ESRGAN training
applies: BasicSR's ``DiffJPEG(differentiable=False)``, whose simplifications are listed there).

What a baseline libjpeg encoder/decoder pair does, in the same order:

1. RGB [0,1] → 8-bit levels; pad right/bottom to a multiple of 16 by edge replication.
2. RGB → YCbCr (JFIF/BT.601 full range), rounded to 8-bit (all roundings: halves up, like
   libjpeg's fixed-point descaling).
3. 4:2:0 chroma subsampling: sum of each 2×2 block + bias, // 4 (bias 1, 2, 1, 2, … along
   a row, as libjpeg's ``h2v2_downsample``).
4. Per 8×8 block, level shift −128, orthonormal DCT-II (this *is* the JPEG DCT:
   ``F(u,v) = ¼ C(u) C(v) ΣΣ f cos cos``), quantise ``round(F / Q)`` (halves away from zero,
   as libjpeg), dequantise ``·Q``, inverse DCT, +128, round and clamp to [0, 255].
5. Chroma upsampling with libjpeg's triangle ("fancy", ``h2v2_fancy_upsample``) filter:
   weights ¾/¼ in each direction with edge replication (= bilinear, ``align_corners=False``),
   in integers: column sums ``3·near + far``, then ``(3·this + other + 8 or 7) >> 4``.
6. YCbCr → RGB, round, clamp, crop, /255.

Quantisation tables are the ITU-T T.81 Annex K luminance/chrominance tables scaled by
quality like libjpeg (``S = ⌊5000/q⌋`` for q < 50 else ``⌊200 − 2q⌋``; ``Q = clamp(⌊(T·S + 50)/100⌋,
1, 255)``). Quality may be fractional. Not modelled: libjpeg's integer DCT approximations
and its exact rounding biases: against Pillow/libjpeg the decoded pixels differ by < 1 level
on average (a few pixels by more, where a coefficient lands on the other side of a step);
entropy coding is lossless and not needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CHROMA_TABLE", "LUMA_TABLE", "JPEG_MODELS", "diffjpeg_compress", "jpeg_compress", "quant_tables"]

JPEG_MODELS = ("libjpeg", "diffjpeg")

# ITU-T T.81 Annex K, Table K.1 (luminance) and K.2 (chrominance), row-major.
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4


def quant_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg-scaled quantisation tables for qualities in [1, 100].

    ``quality``: (B,) float. Returns (luma, chroma), each float32 ``(B, 8, 8)`` with integer
    values in [1, 255], on ``quality.device``.
    """
    q = quality.to(torch.float32)
    if q.ndim != 1:
        raise ValueError(f"expected quality of shape (B,), got {tuple(q.shape)}")
    if bool(((q < 1) | (q > 100)).any()):
        raise ValueError(f"JPEG quality must be in [1, 100], got {q.tolist()}")
    # libjpeg computes the scale in integer arithmetic (5000 / q truncates)
    scale = torch.floor(torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q))[:, None, None]
    out = []
    for table in (LUMA_TABLE, CHROMA_TABLE):
        t = torch.tensor(table, dtype=torch.float32, device=q.device)[None]
        out.append(torch.floor((t * scale + 50.0) / 100.0).clamp(1.0, 255.0))
    return out[0], out[1]


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round halves up, like libjpeg's fixed-point ``(x + ½) >> n`` descaling."""
    return torch.floor(x + 0.5)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D, so that ``D @ X @ D.T`` is the 2-D DCT of X."""
    k = torch.arange(8, dtype=torch.float64)[:, None]
    n = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.to(device=device, dtype=torch.float32)


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """(B, H, W) level-shifted by −128 → 8×8 blocks (B, H/8, W/8, 8, 8); H, W multiples of 8."""
    b, h, w = plane.shape
    return (plane - 128.0).reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _merge(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_blocks` (with the +128 level shift)."""
    b, nh, nw = blocks.shape[:3]
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, nh * 8, nw * 8) + 128.0


def _ycc(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JFIF (BT.601 full-range) Y, Cb, Cr of 0-255 planes, unrounded (Cb, Cr offset by 128)."""
    return (0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0,
            0.5 * r - 0.418688 * g - 0.081312 * b + 128.0)


def _rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_ycc` for Cb, Cr already centred (−128): (B, 3, H, W), unrounded."""
    return torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)


def _code_plane(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise one 8-bit plane through the block DCT: (B, H, W) in [0,255] → same, rounded.

    ``table``: (B, 8, 8). H and W must be multiples of 8.
    """
    blocks = _blocks(plane)
    coef = dct @ blocks @ dct.T
    # the DC term is sum/8: computed exactly so that ties round like libjpeg (half away from 0)
    coef[..., 0, 0] = blocks.sum(dim=(-2, -1)) / 8.0
    t = table[:, None, None]
    scaled = coef / t
    coef = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) * t
    return _round(_merge(dct.T @ coef @ dct)).clamp(0.0, 255.0)


def _downsample_h2v2(c: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) integer-valued → (B, C, H/2, W/2): 2×2 sums with libjpeg's alternating bias."""
    sums = F.avg_pool2d(c, 2) * 4.0
    bias = 1.0 + (torch.arange(sums.shape[-1], device=c.device) % 2).to(c.dtype)
    return torch.floor((sums + bias) / 4.0)


def _upsample_h2v2_fancy(c: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) integer-valued → (B, C, 2h, 2w), libjpeg's triangle filter in integers."""
    b, ch, h, w = c.shape
    rows = F.pad(c, (0, 0, 1, 1), mode="replicate")
    above, below = 3.0 * c + rows[:, :, :-2], 3.0 * c + rows[:, :, 2:]
    col = torch.stack([above, below], dim=3).reshape(b, ch, 2 * h, w)
    cols = F.pad(col, (1, 1, 0, 0), mode="replicate")
    left = torch.floor((3.0 * col + cols[..., :-2] + 8.0) / 16.0)
    right = torch.floor((3.0 * col + cols[..., 2:] + 7.0) / 16.0)
    return torch.stack([left, right], dim=-1).reshape(b, ch, 2 * h, 2 * w)


def jpeg_compress(x: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
    """JPEG round trip (encode + decode, 4:2:0) of each image at its own quality.

    ``x``: float ``(B, 3, H, W)`` in [0, 1] (values outside are clamped; any H, W ≥ 1).
    ``quality``: a float or a (B,) tensor, values in [1, 100] (libjpeg scale; 100 means all
    quantisation steps are 1). Returns float ``(B, 3, H, W)`` on 8-bit levels in [0, 1], same
    dtype and device as ``x``.
    """
    q = _check_jpeg_args(x, quality)
    b, _, h, w = x.shape
    luma_t, chroma_t = quant_tables(q)
    dct = _dct_matrix(x.device)

    v = _round(x.float().clamp(0.0, 1.0) * 255.0)
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        v = F.pad(v, (0, pw, 0, ph), mode="replicate")
    y, cb, cr = _ycc(v[:, 0], v[:, 1], v[:, 2])
    y, cb, cr = _round(y), _round(cb).clamp(0.0, 255.0), _round(cr).clamp(0.0, 255.0)
    chroma = _downsample_h2v2(torch.stack([cb, cr], 1))  # 4:2:0

    y = _code_plane(y, luma_t, dct)
    cb = _code_plane(chroma[:, 0], chroma_t, dct)
    cr = _code_plane(chroma[:, 1], chroma_t, dct)
    chroma = _upsample_h2v2_fancy(torch.stack([cb, cr], 1))
    cb, cr = chroma[:, 0] - 128.0, chroma[:, 1] - 128.0

    rgb = _round(_rgb(y, cb, cr)).clamp(0.0, 255.0)[:, :, :h, :w] / 255.0
    return rgb.to(x.dtype)


def _check_jpeg_args(x: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
    b = x.shape[0]
    q = torch.as_tensor(quality, dtype=torch.float32, device=x.device)
    q = q.expand(b) if q.ndim == 0 else q.to(x.device)
    if q.shape != (b,):
        raise ValueError(f"expected one quality per image ({b}), got shape {tuple(q.shape)}")
    if bool(((q < 1) | (q > 100)).any()):
        raise ValueError(f"JPEG quality must be in [1, 100], got {q.tolist()}")
    return q


def diffjpeg_compress(x: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
    """JPEG round trip as the official training's ``DiffJPEG(differentiable=False)`` computes it.

    It differs from libjpeg (:func:`jpeg_compress`) in: no rounding to 8-bit levels anywhere
    (input, YCbCr, chroma, decoded planes: only the DCT coefficients are quantised), zero (black)
    padding to a multiple of 16, plain 2×2 means for 4:2:0, nearest-neighbour chroma upsampling,
    float quantiser steps ``T·f`` with ``f = (5000/q if q < 50 else 200 − 2q) / 100`` (no floor,
    no [1, 255] clamp) and each Annex K table applied **transposed** (step ``T[v][u]`` for
    frequency (u, v)), coefficient rounding half to even. ``x``: float (B, 3, H, W) in [0, 1]
    (clamped); ``quality``: a float or (B,) in [1, 100) (at 100 its steps are 0). Returns float
    (B, 3, H, W) in [0, 1] (not on 8-bit levels), same dtype and device as ``x``.
    """
    q = _check_jpeg_args(x, quality)
    if bool((q >= 100).any()):
        raise ValueError(f"diffjpeg quality must be below 100 (its quantiser steps are 0 there), got {q.tolist()}")
    _, _, h, w = x.shape
    factor = (torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0)[:, None, None]
    dct = _dct_matrix(x.device)
    v = x.float().clamp(0.0, 1.0) * 255.0
    v = F.pad(v, (0, (-w) % 16, 0, (-h) % 16))  # zeros
    y, cb, cr = _ycc(v[:, 0], v[:, 1], v[:, 2])
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)

    def code(plane: torch.Tensor, table: tuple) -> torch.Tensor:
        step = (torch.tensor(table, dtype=torch.float32, device=x.device).T[None] * factor)[:, None, None]
        coef = torch.round((dct @ _blocks(plane) @ dct.T) / step) * step
        return _merge(dct.T @ coef @ dct)

    y = code(y, LUMA_TABLE)
    cb = code(chroma[:, 0], CHROMA_TABLE).repeat_interleave(2, 1).repeat_interleave(2, 2) - 128.0
    cr = code(chroma[:, 1], CHROMA_TABLE).repeat_interleave(2, 1).repeat_interleave(2, 2) - 128.0
    rgb = _rgb(y, cb, cr)
    return (rgb.clamp(0.0, 255.0)[:, :, :h, :w] / 255.0).to(x.dtype)
