"""Image files <-> tensors for the CLI: PNG/JPEG/WebP/BMP/TIFF, grayscale, RGBA, 16-bit, CMYK.

``read_image(path)`` -> :class:`LoadedImage` with ``rgb`` (3, h, w) float32 in [0, 1],
``alpha`` (1, h, w) or None, ``bits`` (8 or 16) and ``gray`` (True for L/LA/I;16 sources).
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["LoadedImage", "read_image", "write_png", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = 40_000 * 40_000  # bound decompression bombs, allow large photos


@dataclass
class LoadedImage:
    rgb: torch.Tensor
    alpha: torch.Tensor | None
    bits: int
    gray: bool


def _to_float(a: np.ndarray, maxval: float) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32) / maxval)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read one still image; raises ValueError with the reason for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {str(path)!r}")
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ValueError(f"{path.name}: has {im.n_frames} frames; extract the frames first (one image per file)")
            im.load()
            im = ImageOps.exif_transpose(im)
            return _decode(im, path.name)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path.name}: not a readable image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path.name}: image too large ({e})") from None


def _decode(im: Image.Image, name: str) -> LoadedImage:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        maxv = 65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        g = _to_float(np.clip(a, 0, maxv), maxv)
        return LoadedImage(g.expand(3, -1, -1).clone(), None, 16 if maxv > 255 else 8, True)
    if mode == "F":
        g = torch.from_numpy(np.asarray(im, dtype=np.float32)).unsqueeze(0)
        return LoadedImage(g.clamp(0, 1).expand(3, -1, -1).clone(), None, 16, True)
    if mode in ("L", "1"):
        g = _to_float(np.asarray(im.convert("L")), 255.0)
        return LoadedImage(g.expand(3, -1, -1).clone(), None, 8, True)
    if mode == "LA":
        a = _to_float(np.asarray(im), 255.0)
        return LoadedImage(a[:1].expand(3, -1, -1).clone(), a[1:], 8, True)
    if mode in ("RGB;16", "RGBA;16") or (mode == "RGB" and im.format == "PNG" and im.info.get("bits") == 16):
        raise ValueError(f"{name}: unsupported 16-bit colour layout {mode}")
    if mode == "P" and "transparency" in im.info or mode in ("RGBA", "PA", "La", "RGBa"):
        a = _to_float(np.asarray(im.convert("RGBA")), 255.0)
        return LoadedImage(a[:3].contiguous(), a[3:].contiguous(), 8, False)
    if mode not in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(f"{name}: unsupported image mode {mode!r}")
    a = _to_float(np.asarray(im.convert("RGB")), 255.0)
    return LoadedImage(a, None, 8, False)


def write_png(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None,
              *, bits: int = 8, gray: bool = False) -> None:
    """Write rgb (3, H, W) in [0, 1] (+ alpha (1, H, W)) as PNG, 8- or 16-bit; values are
    clamped to [0, 1] and rounded (as the official ``tensor2img``)."""
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"expected rgb (3, H, W), got {tuple(rgb.shape)}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    maxv = 255.0 if bits == 8 else 65535.0
    x = rgb.detach().float().cpu().clamp(0, 1)
    if gray:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    if alpha is not None:
        x = torch.cat([x, alpha.detach().float().cpu().clamp(0, 1)])
    a = (x * maxv).round().permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        _write_png16(path, a.astype(np.uint16))
        return
    a = a.astype(np.uint8)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path, format="PNG")


def _write_png16(path: Path, a: np.ndarray) -> None:
    """Minimal 16-bit PNG writer (Pillow cannot write 16-bit colour): a (H, W, C) uint16, C in 1..4."""
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = a.astype(">u2").reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
