# (signatures, defaults and errors as ComfyUI 0.3.64 has them)
"""Stand-in for comfy.utils: ProgressBar and its global hook (the server sets it in ComfyUI), and
tiled_scale (here: the function on the whole image when it fits one tile, else an error; the
real feathered tiling runs in the end-to-end tests). ``stub_tiled_calls`` records its calls."""
from __future__ import annotations

import math

stub_tiled_calls: list[dict] = []


def get_tiled_scale_steps(width, height, tile_x, tile_y, overlap):
    rows = 1 if height <= tile_y else math.ceil((height - overlap) / (tile_y - overlap))
    cols = 1 if width <= tile_x else math.ceil((width - overlap) / (tile_x - overlap))
    return rows * cols


def tiled_scale(samples, function, tile_x=64, tile_y=64, overlap = 8, upscale_amount = 4, out_channels = 3,  # noqa: E251
                output_device="cpu", pbar = None):  # noqa: E251 (ComfyUI's spelling, compared by signatures.py)
    stub_tiled_calls.append(dict(shape=tuple(samples.shape), tile=(tile_y, tile_x), overlap=overlap,
                                 upscale_amount=upscale_amount))
    if samples.shape[-2] > tile_y or samples.shape[-1] > tile_x:
        raise NotImplementedError("the stub tiled_scale runs single-tile images only")
    out = function(samples)
    if pbar is not None:  # as the real one: after each tile
        pbar.update(1)
    # as the real one: the result is written into a buffer of upscale_amount × the input
    buf = samples.new_empty((samples.shape[0], out_channels, round(samples.shape[-2] * upscale_amount),
                             round(samples.shape[-1] * upscale_amount)), device=output_device)
    buf[:] = out.to(output_device)
    return buf

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_enabled(enabled):
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        value = min(value, self.total)
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
