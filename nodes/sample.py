"""UPSRSample (and the one-node UPSRUpscale): ComfyUI memory, progress, cancel and OOM retry."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
from upsr_core import DEFAULT_OVERLAP, DEFAULT_TILE
from upsr_core.stages import estimate_maps, sample_maps, weight_map
from upsr_core.uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX

from ._layout import image_in, image_out
from .load_model import UPSRModelType

log = logging.getLogger(__name__)
MIN_TILE = 64


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, oom) or (mm.OOM_EXCEPTION is not Exception and isinstance(e, mm.OOM_EXCEPTION))


def run_sampling(model, lr, sr_estimate, weight, seed: int, tile: int, overlap: int, tile_batch: int):
    """sample_maps with a ComfyUI progress bar, cancel checks after every denoiser step, and
    an out-of-memory retry that halves the tile (down to 64 LR px)."""
    pbar = comfy.utils.ProgressBar(1)

    def progress(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)

    while True:
        try:
            return sample_maps(model, lr, sr_estimate, weight, seed=seed, tile=tile,
                               overlap=overlap, tile_batch=tile_batch, progress=progress)
        except Exception as e:  # only out-of-memory is retried; everything else propagates
            if not _is_oom(e) or tile <= MIN_TILE:
                raise
            mm.soft_empty_cache(True)
            tile = max(MIN_TILE, tile // 2 // MIN_TILE * MIN_TILE)
            overlap = min(overlap, tile // 2)
            log.warning("UPSR: out of memory, retrying with tile %d, overlap %d", tile, overlap)


def _tiling_inputs() -> list:
    return [
        io.Int.Input("tile", default=DEFAULT_TILE, min=64, max=4096, step=64,
                     tooltip="tile size in LR pixels; images up to this size run in one piece"),
        io.Int.Input("overlap", default=DEFAULT_OVERLAP, min=0, max=1024, step=8, tooltip="tile overlap, LR pixels"),
        io.Int.Input("tile_batch", default=1, min=1, max=64, tooltip="tiles per denoiser batch"),
    ]


class UPSRSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UPSRSample",
            display_name="UPSR Sample",
            category="image/upscaling/UPSR",
            description="5-step residual diffusion from the weighted noise: the ×4 result.",
            inputs=[
                UPSRModelType.Input("upsr_model"),
                io.Image.Input("image", tooltip="the low-resolution image"),
                io.Image.Input("sr_estimate"),
                io.Image.Input("noise_weight"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFF, control_after_generate=True),
                *_tiling_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, upsr_model, image, sr_estimate, noise_weight, seed, tile, overlap, tile_batch) -> io.NodeOutput:
        sr = run_sampling(upsr_model.load(), image_in(image, "image"), image_in(sr_estimate, "sr_estimate"),
                          image_in(noise_weight, "noise_weight"), seed, tile, overlap, tile_batch)
        return io.NodeOutput(image_out(sr))


class UPSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UPSRUpscale",
            display_name="UPSR Upscale ×4",
            category="image/upscaling/UPSR",
            description="The four UPSR stages in one node (same result as the chain with the same values).",
            inputs=[
                UPSRModelType.Input("upsr_model"),
                io.Image.Input("image"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Float.Input("b_u", default=DEFAULT_B_U, min=0.0, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider),
                io.Float.Input("psi_max", default=DEFAULT_PSI_MAX, min=0.001, max=1.0, step=0.001,
                               display_mode=io.NumberDisplay.slider),
                *_tiling_inputs(),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, upsr_model, image, seed, b_u, psi_max, tile, overlap, tile_batch) -> io.NodeOutput:
        model = upsr_model.load()
        lr = image_in(image, "image")
        sr_est, psi = estimate_maps(model, lr)
        sr = run_sampling(model, lr, sr_est, weight_map(psi, b_u, psi_max), seed, tile, overlap, tile_batch)
        return io.NodeOutput(image_out(sr))
