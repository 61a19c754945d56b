"""Overlapping tiles with feathered (raised-cosine) blending.

Tiles are laid on the LR grid; every tile has the same size (the last one in a row or
column is moved back to end at the border), so tiles batch without padding. ``tile`` is the
largest size allowed: a side that needs n tiles gets the smallest size (a multiple of the
net's) with which n tiles still overlap by ``overlap`` — 1024 LR px with tile 512 and
overlap 64 run as 3 tiles of 384, not 3 of 512, the last two of which would share 448 px
(0.56× the denoiser work in 2D, and less memory). A tile
ramps its weight only on sides shared with a neighbour, over the actual overlap, so an
image that fits in one tile is returned exactly and the blend weights never vanish.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import is_int
from .pipeline import padded_size

__all__ = ["Tile", "tile_starts", "plan_tiles", "partition", "tile_weight", "official_chop_starts", "check_tiling",
           "check_tile_batch", "tile_size", "smaller_tiles", "smaller_block", "MIN_RETRY_TILE"]

MIN_RETRY_TILE = 64
"""LR pixels: a retry after running out of memory shrinks tiles and blocks down to this size."""


@dataclass(frozen=True)
class Tile:
    """A tile in LR coordinates: rows [y, y+h), columns [x, x+w)."""

    y: int
    x: int
    h: int
    w: int

    def scaled(self, s: int) -> "Tile":
        return Tile(self.y * s, self.x * s, self.h * s, self.w * s)

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)

    def visible(self, s: int, h: int, w: int) -> tuple[int, int]:
        """(rows, columns) of this tile at scale ``s`` that lie inside an image of h×w px at that
        scale (a tile of the padded image reaches past the visible one at its right and bottom)."""
        r = self.scaled(s)
        return min(r.h, h - r.y), min(r.w, w - r.x)


def check_tiling(tile: int, overlap: int, multiple: int) -> None:
    """Raise ValueError unless tile is a positive multiple of ``multiple`` and 0 <= overlap < tile."""
    if not is_int(tile) or tile <= 0 or tile % multiple:
        raise ValueError(f"tile size must be a positive multiple of {multiple}, got {tile!r}")
    if not is_int(overlap) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile size {tile}), got {overlap!r}")


def check_tile_batch(tile_batch: int) -> None:
    """Raise ValueError unless tile_batch is an integer >= 1."""
    if not is_int(tile_batch) or tile_batch < 1:
        raise ValueError(f"tile_batch must be an integer >= 1, got {tile_batch!r}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` and at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:  # stride <= 0 (or a gap): tiles would not cover [0, length)
        raise ValueError(f"overlap must be in [0, tile size {tile}), got {overlap!r}")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_size(length: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The tile side used along an axis of ``length``: ``length`` itself if it fits in ``tile``;
    else, with n = the fewest tiles of at most ``tile`` that overlap by ``overlap``, the
    smallest multiple of ``multiple`` (<= tile) with which n tiles still cover the axis."""
    check_tiling(tile, overlap, multiple)
    if length <= tile:
        return length
    n = -(-(length - overlap) // (tile - overlap))
    size = -(-(length + (n - 1) * overlap) // n)
    return min(tile, -(-size // multiple) * multiple)


def plan_tiles(h: int, w: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Row-major tiles over an (h, w) grid, all of one size (:func:`tile_size` per axis);
    ``tile`` and ``overlap`` must pass :func:`check_tiling` with ``multiple``."""
    th, tw = tile_size(h, tile, overlap, multiple), tile_size(w, tile, overlap, multiple)
    return [Tile(y, x, th, tw) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]


def fits_one(h: int, w: int, size: int) -> bool:
    """An (h, w) image is one piece of ``size``: one tile of :func:`plan_tiles` (whatever the
    overlap) and one block of :func:`partition` exactly when both sides are <= size."""
    return h <= size and w <= size


def partition(h: int, w: int, block: int) -> list[Tile]:
    """Disjoint row-major blocks of at most ``block`` covering an (h, w) grid."""
    if block <= 0:
        raise ValueError(f"block must be > 0, got {block}")
    return [Tile(y, x, min(block, h - y), min(block, w - x)) for y in range(0, h, block) for x in range(0, w, block)]


def _ramp(length: int, before: int, after: int) -> torch.Tensor:
    """1D weights of a tile of ``length`` with ``before``/``after`` samples shared with neighbours."""
    wgt = torch.ones(length, dtype=torch.float64)
    for ov, sl in ((before, slice(0, before)), (after, slice(length - after, length))):
        if ov > 0:
            r = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ov, dtype=torch.float64) + 0.5) / ov)
            wgt[sl] *= r if sl.start == 0 else r.flip(0)
    return wgt


def tile_weight(t: Tile, tiles: list[Tile], scale: int = 1) -> torch.Tensor:
    """Blend weight (h·scale, w·scale), float32: raised-cosine ramps over overlaps with neighbours."""
    up = max((o.y + o.h - t.y for o in tiles if o.y < t.y and o.x == t.x), default=0)
    down = max((t.y + t.h - o.y for o in tiles if o.y > t.y and o.x == t.x), default=0)
    left = max((o.x + o.w - t.x for o in tiles if o.x < t.x and o.y == t.y), default=0)
    right = max((t.x + t.w - o.x for o in tiles if o.x > t.x and o.y == t.y), default=0)
    wy = _ramp(t.h * scale, max(up, 0) * scale, max(down, 0) * scale)
    wx = _ramp(t.w * scale, max(left, 0) * scale, max(right, 0) * scale)
    return (wy[:, None] * wx[None, :]).float()


def smaller_tiles(tile: int, overlap: int, lr_size: tuple[int, int], multiple: int,
                  minimum: int = MIN_RETRY_TILE) -> tuple[int, int] | None:
    """The next (tile, overlap) to try after running out of memory, or None below ``minimum``.

    Halves the tile actually used (a tile larger than the padded image is the image), keeps it a
    multiple of ``multiple`` (the model's padding) and the overlap at most half of it. Sizes in
    LR pixels; ``lr_size`` is (h, w).
    """
    padded = max(padded_size(*lr_size, multiple))
    new = min(tile, padded) // 2 // multiple * multiple
    if new < max(minimum, multiple):
        return None
    return new, min(overlap, new // 2)


def smaller_block(block: int, minimum: int = MIN_RETRY_TILE) -> int | None:
    """The next estimator block (LR pixels) after running out of memory: half, or None below ``minimum``."""
    return block // 2 if block // 2 >= minimum else None


def batches(items: list, size: int) -> Iterator[list]:
    """Consecutive chunks of at most ``size`` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def official_chop_starts(length: int, chop: int = 512, stride: int = 448) -> list[int]:
    """The official ``ImageSpliterTh`` starts (SPEC §6): used to replay its uniform average."""
    if length <= chop:
        return [0]
    starts = [s if s + chop <= length else length - chop for s in range(0, length, stride)]
    return list(dict.fromkeys(starts))
