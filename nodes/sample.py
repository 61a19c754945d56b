"""UPSRSample (and the one-node UPSRUpscale): ComfyUI memory, progress, cancel and OOM retry."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import comfy.model_management as mm
import comfy.utils
import torch
from comfy.cli_args import LatentPreviewMethod, args
from comfy_api.v0_0_2 import io

from upsr_core import DEFAULT_OVERLAP, DEFAULT_TILE
from upsr_core.errors import is_out_of_memory, is_size_limit
from upsr_core.imageio import to_pil
from upsr_core.model import ESTIMATOR_BLOCK, Preview, Progress
from upsr_core.pipeline import SCALE, generator_seed
from upsr_core.stages import sample_maps
from upsr_core.tiling import MIN_RETRY_TILE, smaller_tiles
from upsr_core.uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, PSI_MAX_LIMIT

from ._layout import check_role, image_in, image_out, lr_in
from .load_model import UPSRModelType

log = logging.getLogger(__name__)
MIN_TILE = MIN_RETRY_TILE  # LR pixels: the smallest tile widget value; the OOM retry gives up below it
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # as KSampler's; upsr_core.pipeline.generator_seed maps it onto the generator

Run = Callable[[int, int, int, Progress, Preview | None], torch.Tensor]
"""run(tile, overlap, estimator_block, progress, preview) -> sr (B,3,4h,4w)."""
S = TypeVar("S")
R = TypeVar("R")


def progress_bar() -> Progress:
    """A ComfyUI progress bar as a ``progress(done, total)`` callback that also checks for Cancel."""
    return progress_with_preview()[0]


def previews_on() -> bool:
    """ComfyUI shows sampling previews: started with ``--preview-method`` other than none (any
    method: UPSR's steps are pixels, no latent decoder is needed)."""
    return args.preview_method != LatentPreviewMethod.NoPreviews


def progress_with_preview() -> tuple[Progress, Preview | None]:
    """:func:`progress_bar` and, when :func:`previews_on`, a ``preview(x0)`` that shows a step's
    x̂0 on the node while it samples, else None (nothing is computed for it). upsr_core calls
    ``preview`` just before the step's progress report: the picture (shrunk on the device to
    ``--preview-size`` px, JPEG) goes out with that report, one update per step as KSampler's."""
    pbar = comfy.utils.ProgressBar(1)
    pending: list = []  # the picture of the step about to be reported

    def progress(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total, pending.pop() if pending else None)

    def preview(x0: torch.Tensor) -> None:
        pending[:] = [("JPEG", to_pil(x0, max_side=args.preview_size), args.preview_size)]

    return progress, (preview if previews_on() else None)


def retry_on_oom(attempt: Callable[[S], R], setting: S, shrink: Callable[[S], S | None],
                 describe: Callable[[S], str], free_others: Callable[[], int] | None = None) -> R:
    """``attempt(setting)``; when the device runs out of memory, first the same setting again
    after unloading the other models (``free_others``: how many it unloaded; the result stays
    the one asked for), then ``shrink(setting)`` until it gives None (then the error stands).
    Out of memory is what :func:`upsr_core.errors.is_out_of_memory` says it is: CUDA's
    OutOfMemoryError, and the plain RuntimeErrors of the CPU and MPS allocators; one over a
    per-buffer limit (:func:`upsr_core.errors.is_size_limit`) shrinks at once, as unloading
    other models cannot cure it."""
    freed = free_others is None  # True once the other models have been unloaded (or cannot be)
    while True:
        try:
            return attempt(setting)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            unloaded = 0
            if not freed and not is_size_limit(e):
                freed = True
                unloaded = free_others()
            smaller = None if unloaded else shrink(setting)
            if not unloaded and smaller is None:
                raise
        # outside the except block, so the failed attempt's tensors (held by its traceback) are freed
        mm.soft_empty_cache(True)
        if unloaded:
            log.warning("UPSR: out of memory with %s: unloaded %d other model(s), retrying the same",
                        describe(setting), unloaded)
            continue
        log.warning("UPSR: out of memory with %s, retrying with %s", describe(setting), describe(smaller))
        setting = smaller


def run_tiled(run: Run, tile: int, overlap: int, lr_size: tuple[int, int], multiple: int,
              free_others: Callable[[], int] | None = None, *, estimator: bool = False) -> torch.Tensor:
    """``run`` with a ComfyUI progress bar over steps × tiles (and, in UPSR Upscale, the
    estimator's blocks), a cancel check after every denoiser step (and before each block), a
    preview of each step's x̂0 when ComfyUI shows previews (:func:`progress_with_preview`), and
    :func:`retry_on_oom`: the same tiles after unloading the other models, then smaller tiles
    (the result is then that of the smaller tile). ``estimator``: ``run`` also runs the
    estimator, whose blocks then shrink with the tile where they are larger."""
    def shrink(s: tuple[int, int, int]) -> tuple[int, int, int] | None:
        smaller = smaller_tiles(s[0], s[1], lr_size, multiple)
        return None if smaller is None else (*smaller, min(s[2], smaller[0]) if estimator else s[2])

    def describe(s: tuple[int, int, int]) -> str:
        return f"tile {s[0]}, overlap {s[1]}" + (f", estimator block {s[2]}" if s[2] < ESTIMATOR_BLOCK else "")

    progress, preview = progress_with_preview()
    return retry_on_oom(lambda s: run(*s, progress, preview), (tile, overlap, ESTIMATOR_BLOCK), shrink, describe,
                        free_others)


TILE_MAX, OVERLAP_MAX = 4096, 1024
TILE_STEP = 64  # the official nets pad the LR to multiples of 64: every tile must be one


def tiling_problem(tile: int | None, overlap: int | None) -> str | None:
    """What is wrong with a tile/overlap pair, or None. Either is None when it comes over a link
    (unknown before the run). Also checks the widgets' ranges: ComfyUI skips its own min/max
    check for inputs that a node's validate_inputs takes."""
    if tile is not None and not MIN_TILE <= tile <= TILE_MAX:
        return f"tile must be in [{MIN_TILE}, {TILE_MAX}] LR pixels, got {tile}"
    if tile is not None and tile % TILE_STEP:
        down = max(MIN_TILE, tile // TILE_STEP * TILE_STEP)
        return f"tile must be a multiple of {TILE_STEP} LR pixels (64, 128, …, 512, …), got {tile}: try {down}"
    if overlap is not None and not 0 <= overlap <= OVERLAP_MAX:
        return f"overlap must be in [0, {OVERLAP_MAX}] LR pixels, got {overlap}"
    if tile is not None and overlap is not None and overlap >= tile:
        return f"overlap ({overlap}) must be less than the tile ({tile}): lower the overlap or raise the tile"
    return None


def check_tiling_inputs(tile: int, overlap: int) -> None:
    """:func:`tiling_problem` as a ValueError, for values that came over a link."""
    problem = tiling_problem(tile, overlap)
    if problem:
        raise ValueError(problem)


def _tiling_inputs() -> list:
    return [
        io.Int.Input("tile", default=DEFAULT_TILE, min=MIN_TILE, max=TILE_MAX, step=TILE_STEP,
                     tooltip="largest tile in LR pixels (a multiple of 64); images up to this size run in one piece, "
                             "larger ones as the fewest tiles of at most this size"),
        io.Int.Input("overlap", default=DEFAULT_OVERLAP, min=0, max=OVERLAP_MAX, step=8,
                     tooltip="overlap of neighbouring tiles, in LR pixels (less than the tile size)"),
        io.Int.Input("tile_batch", default=1, min=1, max=64, tooltip="tiles per denoiser batch"),
    ]


def _seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                        tooltip="the starting noise; image i of a batch uses seed + i (unless same_noise)")


def _same_noise_input() -> io.Boolean.Input:
    return io.Boolean.Input("same_noise", default=False, label_on="same for every image", label_off="seed + i",
                            optional=True,
                            tooltip="a batch of video frames: every frame gets the noise of the seed, so what does "
                                    "not change between frames comes out the same (far less flicker); off: image i "
                                    "of a batch uses seed + i")


def check_maps(image: torch.Tensor, **maps: torch.Tensor) -> None:
    """Each IMAGE map (sr_estimate, noise_weight) must be 1 or B images at ×4 of the LR IMAGE
    [B,H,W,C]: a ValueError in the sizes an artist sees (width×height), naming the input, else
    nothing. (upsr_core checks the same in its own (B,C,H,W) terms.)"""
    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in (image, *maps.values())):
        return  # image_in names what is not an IMAGE
    b, h, w = image.shape[:3]
    # every map at the image's own size: the image is the one that is off (an upscaled image wired in)
    upscaled_image = all(tuple(t.shape[1:3]) == (h, w) for t in maps.values())
    for name, t in maps.items():
        mb, mh, mw = t.shape[:3]
        if not _fits(t, h, w):
            if upscaled_image:
                hint = (": the 'image' input has the maps' size, so it looks already upscaled; connect the LR "
                        "image that went into UPSR Estimate Uncertainty")
            elif (mh, mw) == (h, w) and name == "noise_weight":
                hint = f": it has the LR image's size; a map painted on the LR image must be scaled ×{SCALE} first"
            elif (mh, mw) == (h, w):
                hint = (": it has the LR image's size; connect UPSR Estimate Uncertainty's sr_estimate output "
                        "(made from this same LR image)")
            elif name == "noise_weight" and _fits(maps.get("sr_estimate"), h, w):
                # the estimate fits this LR image, so the weight is what is off: a mask of another size
                hint = (": sr_estimate fits the LR image, so the map or mask going into UPSR Weight Noise is "
                        f"the one to fix: make it {SCALE * w}×{SCALE * h} px")
            elif name == "sr_estimate" and _fits(maps.get("noise_weight"), h, w):
                hint = ": connect the sr_estimate that UPSR Estimate Uncertainty made from this same LR image"
            else:
                hint = ": give UPSR Sample the same LR image that went into UPSR Estimate Uncertainty"
            raise ValueError(f"{name} is {mw}×{mh} px; expected ×{SCALE} of the LR image ({w}×{h} px), "
                             f"i.e. {SCALE * w}×{SCALE * h} px{hint}")
        if mb not in (1, b):
            want = "1, as the LR image is one" if b == 1 else f"1 (for every image) or {b} (one per LR image)"
            raise ValueError(f"{name} is a batch of {mb}; expected {want}")


def _fits(t: torch.Tensor | None, h: int, w: int) -> bool:
    """``t`` is an IMAGE at ×SCALE of an LR image of h×w."""
    return t is not None and tuple(t.shape[1:3]) == (SCALE * h, SCALE * w)


class UPSRSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UPSRSample",
            display_name="UPSR Sample",
            category="image/upscaling/UPSR",
            description="5-step residual diffusion from the uncertainty-weighted noise: the ×4 result.",
            inputs=[
                UPSRModelType.Input("upsr_model", tooltip="from Load UPSR Model"),
                io.Image.Input("image", tooltip="the low-resolution image"),
                io.Image.Input("sr_estimate", tooltip="from UPSR Estimate Uncertainty"),
                io.Image.Input("noise_weight", tooltip="from UPSR Weight Noise"),
                _seed_input(),
                *_tiling_inputs(),
                _same_noise_input(),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="the ×4 result")],
        )

    @classmethod
    def validate_inputs(cls, tile: int | None = None, overlap: int | None = None) -> bool | str:
        # before the prompt runs: in the chain, an overlap >= tile used to fail only here, after
        # EstimateUncertainty had spent its time
        return tiling_problem(tile, overlap) or True

    @classmethod
    def execute(cls, upsr_model, image, sr_estimate, noise_weight, seed, tile, overlap, tile_batch,
                same_noise=False) -> io.NodeOutput:
        check_tiling_inputs(tile, overlap)  # linked values: unknown to validate_inputs
        for value, name, role in ((image, "image", None), (sr_estimate, "sr_estimate", "sr_estimate"),
                                  (noise_weight, "noise_weight", "noise_weight")):
            check_role(value, name, role)  # e.g. the heatmap into noise_weight: an image of the wrong values
        check_maps(image, sr_estimate=sr_estimate, noise_weight=noise_weight)
        lr = lr_in(image)  # a bad image is refused before the model is loaded (which may offload others)
        est, w = image_in(sr_estimate, "sr_estimate"), image_in(noise_weight, "noise_weight")
        model = upsr_model.load_for(image, tile, tile_batch)

        def run(t: int, o: int, _block: int, progress: Progress, preview: Preview | None) -> torch.Tensor:
            return sample_maps(model, lr, est, w, seed=generator_seed(seed), tile=t, overlap=o, tile_batch=tile_batch,
                               progress=progress, same_noise=same_noise, preview=preview)

        return io.NodeOutput(image_out(run_tiled(run, tile, overlap, lr.shape[-2:], model.multiple_of,
                                                      upsr_model.free_others)))


class UPSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UPSRUpscale",
            display_name="UPSR Upscale ×4",
            category="image/upscaling/UPSR",
            description="The four UPSR nodes in one, streamed tile by tile (the least memory for large images); "
                        "the same result as the chain with the same values (a batch of images on implementation "
                        "fast: up to float rounding, ≤ 1 level in 8 bits).",
            inputs=[
                UPSRModelType.Input("upsr_model", tooltip="from Load UPSR Model"),
                io.Image.Input("image", tooltip="the low-resolution image"),
                _seed_input(),
                io.Float.Input("b_u", default=DEFAULT_B_U, min=0.0, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider, tooltip="noise floor where ψ = 0"),
                io.Float.Input("psi_max", default=DEFAULT_PSI_MAX, min=0.001, max=PSI_MAX_LIMIT, step=0.001,
                               display_mode=io.NumberDisplay.slider, tooltip="ψ at and above which noise is full"),
                *_tiling_inputs(),
                _same_noise_input(),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="the ×4 result")],
        )

    @classmethod
    def validate_inputs(cls, tile: int | None = None, overlap: int | None = None) -> bool | str:
        # before the prompt runs: in the chain, an overlap >= tile used to fail only here, after
        # EstimateUncertainty had spent its time
        return tiling_problem(tile, overlap) or True

    @classmethod
    def execute(cls, upsr_model, image, seed, b_u, psi_max, tile, overlap, tile_batch,
                same_noise=False) -> io.NodeOutput:
        check_tiling_inputs(tile, overlap)  # linked values: unknown to validate_inputs
        check_role(image, "image", None)
        lr = lr_in(image)  # a bad image is refused before the model is loaded (which may offload others)
        model = upsr_model.load_for(image, tile, tile_batch, estimator_block=ESTIMATOR_BLOCK)

        def run(t: int, o: int, block: int, progress: Progress, preview: Preview | None) -> torch.Tensor:
            return model.upscale(lr, seed=generator_seed(seed), b_u=b_u, psi_max=psi_max, tile=t, overlap=o,
                                 tile_batch=tile_batch, progress=progress, same_noise=same_noise,
                                 estimator_block=block, preview=preview)

        return io.NodeOutput(image_out(run_tiled(run, tile, overlap, lr.shape[-2:], model.multiple_of,
                                                      upsr_model.free_others, estimator=True)))
