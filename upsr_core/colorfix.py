"""Wavelet colour fix: the result's fine detail on the reference's colours and low frequencies.

An optional post-processing step, not part of the official pipeline (which has none): the
result is split by an à-trous wavelet decomposition into its detail and its low-pass residue;
the residue is replaced by the reference's (the bicubic ×4 of the LR image)::

    fixed = clamp(x − L(x) + L(ref), 0, 1),   L = B_{2^(n−1)} ∘ … ∘ B_2 ∘ B_1

where B_r is the 3×3 binomial blur ([1, 2, 1] ⊗ [1, 2, 1] / 16) with dilation r and edge
replication, and n the number of levels. Five levels (the default, as in StableSR's colour fix)
keep structures up to ~2⁵ px of the result; the low-pass L reaches 2ⁿ − 1 px each way.

The blur is written as gathers and element-wise sums, so each output value is computed by the
same operations whatever the tensor's size: a strip of rows with 2ⁿ − 1 rows of context each
side gives bit for bit the rows of the whole image (:class:`StreamedColorFix`, for results
streamed to disk row by row).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import is_int
from .pipeline import SCALE, check_unit_range

__all__ = ["DEFAULT_LEVELS", "MAX_LEVELS", "wavelet_color_fix", "wavelet_lowpass", "halo", "strip_rows",
           "bicubic_rows", "StreamedColorFix"]

DEFAULT_LEVELS = 5
MAX_LEVELS = 8  # L reaches 255 px each way: beyond that the "low frequencies" are the image's mean colour
STRIP_ROWS = 256  # rows fixed at a time (at least; :func:`strip_rows`)


def _check_levels(levels: object) -> int:
    if not is_int(levels) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be an integer in [1, {MAX_LEVELS}], got {levels!r}")
    return int(levels)


def halo(levels: int) -> int:
    """How far (in pixels, each way) the low-pass of ``levels`` levels reaches: 2^levels − 1."""
    return 2 ** _check_levels(levels) - 1


def _blur(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """[1, 2, 1] / 4 along ``dim`` with dilation r, edges replicated (any r, even r ≥ the size):
    (x[i − r] + x[i + r] + 2·x[i]) · ¼ on views of one padded copy (2·x is exact, so the
    fused ``add_(…, alpha=2)`` rounds as the plain sum does)."""
    n = x.shape[dim]
    edge = [x.narrow(dim, i, 1).expand(*x.shape[:dim % x.ndim], r, *x.shape[dim % x.ndim + 1:]) for i in (0, n - 1)]
    p = torch.cat([edge[0], x, edge[1]], dim=dim)
    out = p.narrow(dim, 0, n) + p.narrow(dim, 2 * r, n)
    return out.add_(p.narrow(dim, r, n), alpha=2).mul_(0.25)


def _what(x: object) -> str:
    """How an error message names a wrong argument: a tensor's shape and dtype, else its type."""
    return f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def wavelet_lowpass(x: torch.Tensor, levels: int = DEFAULT_LEVELS) -> torch.Tensor:
    """L(x): ``levels`` binomial blurs of dilation 1, 2, 4, … over the last two dimensions of a
    float (…, H, W) tensor (H, W ≥ 1; any range) -> same shape."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point() or 0 in x.shape[-2:]:
        raise ValueError(f"x must be a float (…, H, W) tensor with H, W >= 1, got {_what(x)}")
    levels = _check_levels(levels)
    for k in range(levels):
        x = _blur(_blur(x, 2**k, -2), 2**k, -1)
    return x


def _check(x: object, name: str, shape: str = "(B, 3, H, W)") -> torch.Tensor:
    """A float image in [0, 1] (± a resize's slight overshoot) of ``shape`` (3 channels), non-empty."""
    ndim = shape.count(",") + 1
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.shape[-3] != 3 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float {shape} tensor, got {_what(x)}")
    if 0 in x.shape:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    check_unit_range(x, name)  # not [0, 255], not [-1, 1], no NaN or Inf
    return x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, *, levels: int = DEFAULT_LEVELS,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The result ``image`` with its low frequencies (colour, shading) taken from ``reference``.

    image: (B, 3, H, W) float in [0, 1], e.g. UPSR's ×4 result. reference: (B or 1, 3, H, W) in
    [0, 1] of the same size, or the LR image itself at (H/4, W/4), which is then upscaled
    bicubically (as UPSR's bicubic(y), clamped to [0, 1]). levels: 1 … 8 (default 5).
    Returns (B, 3, H, W) float32 in [0, 1] on ``image``'s device.

    Works in strips of :func:`strip_rows` rows with 2^levels − 1 rows of context each side, so
    the memory it needs beside the result is a few strips, not a few images (the same values as
    one pass over the whole image, bit for bit). ``progress(done, total)``: after each strip (of
    the whole batch); it may raise to cancel.
    """
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total) or None, got {type(progress).__name__}")
    image, reference = _check(image, "image"), _check(reference, "reference")
    levels = _check_levels(levels)
    b, _, h, w = image.shape
    if reference.shape[0] not in (1, b):
        raise ValueError(f"reference has {reference.shape[0]} images, image {b}: give one reference or one per image")
    rh, rw = reference.shape[-2:]
    if (rh * SCALE, rw * SCALE) != (h, w) and (rh, rw) != (h, w):
        lr_size = f", {w // SCALE}×{h // SCALE}" if h % SCALE == 0 and w % SCALE == 0 else ""
        raise ValueError(f"reference is {rw}×{rh} and image {w}×{h}: the reference must be the same size "
                         f"or the LR image (×{SCALE} smaller{lr_size})")
    lr_reference = (rh, rw) != (h, w)
    x, reference = image.float(), reference.float()
    out = torch.empty_like(x)
    reach, strip = halo(levels), strip_rows(levels)
    starts = range(0, h, strip)
    for k, y0 in enumerate(starts):  # rows [y0, y1) from the window [w0, w1) around them
        y1 = min(y0 + strip, h)
        w0, w1 = max(y0 - reach, 0), min(y1 + reach, h)
        win = x[:, :, w0:w1]
        ref = bicubic_rows(reference, w0, w1 - w0) if lr_reference else reference[:, :, w0:w1]
        out[:, :, y0:y1] = _fixed_rows(win, ref.to(x.device), levels, y0 - w0, y1 - w0)
        if progress is not None:
            progress(k + 1, len(starts))
    return out


def _fixed_rows(win: torch.Tensor, ref: torch.Tensor, levels: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of a window's fix, clamp(win − L(win) + L(ref), 0, 1), for (…, rows, W) windows
    of the result and the reference; exact where the rows lie 2^levels − 1 rows inside a cut edge."""
    return (win - wavelet_lowpass(win, levels) + wavelet_lowpass(ref, levels))[..., a:b, :].clamp_(0, 1)


def strip_rows(levels: int) -> int:
    """The rows :func:`wavelet_color_fix` fixes at a time: 256, or 4 × the low-pass's reach where
    that is more (the context then costs at most half again the work)."""
    return max(STRIP_ROWS, 4 * halo(levels))


def bicubic_rows(lr: torch.Tensor, y0: int, n: int, margin: int = 2) -> torch.Tensor:
    """Rows [y0, y0 + n) of the bicubic ×4 of ``lr`` (…, C, h, w) in [0, 1], clamped to [0, 1],
    computed from the LR rows they need plus ``margin`` (the bicubic support): equal to the same
    rows of the whole-image ``F.interpolate``. -> (…, C, n, 4w)."""
    if not isinstance(lr, torch.Tensor) or lr.ndim < 3 or not lr.is_floating_point():
        raise ValueError(f"lr must be a float (…, C, h, w) tensor, got {_what(lr)}")
    h = lr.shape[-2]
    if n < 1:
        raise ValueError(f"n must be >= 1 row, got {n}")
    if not (0 <= y0 and y0 + n <= SCALE * h):
        raise ValueError(f"rows [{y0}, {y0 + n}) are not inside the ×{SCALE} image's {SCALE * h} rows")
    ly0, ly1 = max(y0 // SCALE - margin, 0), min(-(-(y0 + n) // SCALE) + margin, h)
    lead = lr.shape[:-3]
    x = lr[..., ly0:ly1, :].reshape(-1, *lr.shape[-3:-2], ly1 - ly0, lr.shape[-1])
    up = F.interpolate(x, scale_factor=SCALE, mode="bicubic", align_corners=False)
    off = y0 - SCALE * ly0
    return up[:, :, off : off + n].clamp(0, 1).reshape(*lead, *up.shape[1:2], n, up.shape[-1])


class StreamedColorFix:
    """:func:`wavelet_color_fix` for a result that arrives as strips of rows, top to bottom.

    ``lr``: the LR image (3, h, w) in [0, 1] (the reference's source); ``emit(y0, rows)``
    receives the fixed rows (3, n, 4w) in order, each strip once 2^levels − 1 rows below it
    have arrived (or the image has ended). Holds at most one strip and 2 × (2^levels − 1) rows
    of context (above the rows not yet emitted, and those waiting for the rows below them); the
    rows equal, bit for bit, those of the whole-image function. Each strip is checked as the
    image is (float, in [0, 1], finite). Call it as a row sink ``(y0, rows)``; :meth:`close`
    checks that every row arrived.
    """

    def __init__(self, lr: torch.Tensor, emit: Callable[[int, torch.Tensor], None], *,
                 levels: int = DEFAULT_LEVELS):
        _check(lr, "lr", "(3, h, w)")
        if not callable(emit):
            raise TypeError(f"emit must be a callable emit(y0, rows), got {type(emit).__name__}")
        self.levels, self.halo = _check_levels(levels), halo(levels)
        self.lr, self.emit = lr.float(), emit
        self.height = SCALE * lr.shape[-2]
        self.buf: torch.Tensor | None = None  # rows [start, end) of the result
        self.start = self.end = self.done = 0

    def __call__(self, y0: int, rows: torch.Tensor) -> None:
        if y0 != self.end:
            raise ValueError(f"rows must arrive in order: expected row {self.end} next, got {y0}")
        if not isinstance(rows, torch.Tensor) or rows.ndim != 3 or rows.shape[0] != 3 \
                or rows.shape[-1] != SCALE * self.lr.shape[-1]:
            what = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"rows must be (3, n, {SCALE * self.lr.shape[-1]}), got {what}")
        if rows.shape[1] == 0:
            return
        _check(rows, f"rows [{y0}, {y0 + rows.shape[1]})", "(3, n, W)")
        if self.end + rows.shape[1] > self.height:
            raise ValueError(f"rows [{y0}, {y0 + rows.shape[1]}) run past the image's {self.height} rows")
        rows = rows.float()
        self.buf = rows if self.buf is None else torch.cat([self.buf, rows.to(self.buf.device)], dim=1)
        self.end += rows.shape[1]
        ready = self.height if self.end == self.height else self.end - self.halo
        if ready <= self.done:
            return
        w0 = max(self.done - self.halo, 0)  # the context the low-pass needs above; below, the buffer's end
        win = self.buf[None, :, w0 - self.start :]
        ref = bicubic_rows(self.lr, w0, self.end - w0).to(win.device)[None]
        self.emit(self.done, _fixed_rows(win, ref, self.levels, self.done - w0, ready - w0)[0])
        self.done = ready
        keep = max(ready - self.halo, 0)  # the next strip's context above
        self.buf, self.start = self.buf[:, keep - self.start :].clone(), keep

    def close(self) -> None:
        if self.done != self.height:
            raise RuntimeError(f"the colour fix got {self.end} of {self.height} rows")
