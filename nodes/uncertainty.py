"""EstimateUncertainty and WeightNoise: layout conversion around upsr_core.stages."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from upsr_core.model import ESTIMATOR_BLOCK
from upsr_core.stages import estimate_maps, heatmap, uncertainty_mask, weight_map
from upsr_core.tiling import smaller_block
from upsr_core.uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, PSI_MAX_LIMIT, check_weight_params

from ._layout import check_role, image_in, image_out, lr_in, mask_in, mask_out
from .load_model import UPSRModelType
from .sample import progress_bar, retry_on_oom

MASK_PSI_MAX = 1.0  # the slider's top: a painted MASK holds values up to 1 (computed ψ: PSI_MAX_LIMIT)


EXTERNAL_TILE, EXTERNAL_OVERLAP = 512, 32  # core's ImageUpscaleWithModel's tiling (on the padded LR: close to its g(y))


class TileProgress:
    """``comfy.utils.tiled_scale``'s ``pbar`` for a batch of ``images``: one step per tile of every
    image on one ComfyUI progress bar (:func:`progress_bar`, which checks Cancel at each count;
    core's tiling counts after every tile, so Cancel stops after the current tile, not after the
    whole image)."""

    def __init__(self, images: int):
        self.images, self.done, self.total = images, 0, images
        self.progress = progress_bar()

    def tiles_per_image(self, tiles: int) -> None:
        self.total = self.images * tiles

    def update(self, n: int) -> None:
        self.done += n
        self.progress(self.done, self.total)


@contextmanager
def external_estimator(upscale_model, device: torch.device
                       ) -> Iterator[Callable[[torch.Tensor, int, TileProgress], torch.Tensor] | None]:
    """A ComfyUI UPSCALE_MODEL (spandrel descriptor) as the estimator g(x, tile, progress): run
    through ComfyUI's own tiling (``comfy.utils.tiled_scale``, tile × tile with 32 px of overlap,
    as core's ImageUpscaleWithModel), on ``device`` while in use and back on the CPU afterwards."""
    if upscale_model is None:
        yield None
        return
    scale, cin = getattr(upscale_model, "scale", None), getattr(upscale_model, "input_channels", 3)
    if scale != 4 or cin != 3:
        raise ValueError(f"upscale_model must be a ×4 RGB model to replace the estimator, got ×{scale} "
                         f"with {cin} input channels")
    def checked(x: torch.Tensor) -> torch.Tensor:  # one tile; tiled_scale writes it into a ×4 buffer
        y = upscale_model(x)
        if tuple(y.shape[-2:]) != (4 * x.shape[-2], 4 * x.shape[-1]):
            raise ValueError(f"upscale_model says ×{scale} but turned a {x.shape[-1]}×{x.shape[-2]} tile into "
                             f"{y.shape[-1]}×{y.shape[-2]}: it must upscale ×4 to replace the estimator")
        return y

    upscale_model.to(device)
    try:
        yield lambda x, tile, progress: comfy.utils.tiled_scale(x.to(device), checked, tile_x=tile, tile_y=tile,
                                                                overlap=EXTERNAL_OVERLAP, upscale_amount=4,
                                                                pbar=progress)
    finally:
        upscale_model.to("cpu")


class EstimateUncertainty(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EstimateUncertainty",
            display_name="UPSR Estimate Uncertainty",
            category="image/upscaling/UPSR",
            description="g(y): a first ×4 estimate, and the uncertainty ψ = ½|g(y) − bicubic(y)| per pixel and "
                        "channel (the preview shows ψ from 0 to the default ψ_max). The MASK is ψ averaged "
                        "over the channels, to edit with the mask nodes and give to UPSR Weight Noise.",
            inputs=[
                UPSRModelType.Input("upsr_model", tooltip="from Load UPSR Model"),
                io.Image.Input("image", tooltip="the low-resolution image"),
                io.UpscaleModel.Input("upscale_model", optional=True,
                                      tooltip="another ×4 model (Load Upscale Model) as g instead of the ATD "
                                              "estimator"),
            ],
            outputs=[
                io.Image.Output(display_name="sr_estimate",
                                tooltip="g(y), the first ×4 estimate (unclamped: may overshoot [0, 1] slightly)"),
                io.Image.Output(display_name="uncertainty",
                                tooltip="ψ per pixel and channel at ×4; values mostly 0…0.1, so a plain preview "
                                        "looks almost black"),
                io.Mask.Output(display_name="uncertainty_mask",
                               tooltip="ψ averaged over the channels, at ×4: edit it and give it to UPSR Weight "
                                       "Noise (white = full noise once ≥ ψ_max)"),
            ],
        )

    @classmethod
    def execute(cls, upsr_model, image, upscale_model=None) -> io.NodeOutput:
        check_role(image, "image", None)
        lr = lr_in(image)  # a bad image is refused before the model is loaded (which may offload others)
        # another g needs none of the UPSR nets here: they are not loaded (which could evict other models)
        # room for one estimator block beside the nets (the OOM retry below halves the block)
        model = (upsr_model.load(upsr_model.model.estimator_memory(tuple(lr.shape[-2:])))
                 if upscale_model is None else upsr_model.model)
        progress = progress_bar()  # after each image (× estimator block); Cancel is checked there
        with external_estimator(upscale_model, upsr_model.patcher.load_device) as g:
            # out of memory: unload other models, then halve ATD's blocks (or the upscale model's tile)
            def run(setting: int) -> tuple[torch.Tensor, torch.Tensor]:
                if g is None:
                    return estimate_maps(model, lr, progress=progress, block=setting)
                tiles = TileProgress(lr.shape[0])  # counted per tile (core's tiling), not per image

                def one_image(x: torch.Tensor) -> torch.Tensor:
                    tiles.tiles_per_image(comfy.utils.get_tiled_scale_steps(x.shape[-1], x.shape[-2], setting,
                                                                            setting, EXTERNAL_OVERLAP))
                    return g(x, setting, tiles)

                return estimate_maps(model, lr, estimator=one_image, estimator_name="upscale_model")

            start, what = (ESTIMATOR_BLOCK, "estimator block") if g is None else (EXTERNAL_TILE, "upscale_model tile")
            sr, psi = retry_on_oom(run, start, smaller_block, lambda v: f"{what} {v}", upsr_model.free_others)
        preview = image_out(heatmap(psi, hi=DEFAULT_PSI_MAX))
        return io.NodeOutput(image_out(sr, "sr_estimate"), image_out(psi, "uncertainty"),
                             mask_out(uncertainty_mask(psi)), ui=ui.PreviewImage(preview, cls=cls))


class WeightNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WeightNoise",
            display_name="UPSR Weight Noise",
            category="image/upscaling/UPSR",
            description="Noise weight w = b_u + (1 − b_u)·min(ψ/ψ_max, 1): 1 = full noise (edges, textures), "
                        "b_u = keep the low-resolution information (flat areas). Connect the uncertainty "
                        "IMAGE or an edited uncertainty MASK (white = full noise, black = b_u), not both.",
            inputs=[
                io.Float.Input("b_u", default=DEFAULT_B_U, min=0.0, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider, tooltip="noise floor where ψ = 0"),
                io.Float.Input("psi_max", default=DEFAULT_PSI_MAX, min=0.001, max=MASK_PSI_MAX, step=0.001,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="ψ at and above which noise is full. A computed ψ never exceeds "
                                       f"{PSI_MAX_LIMIT}; with a painted mask, 1 makes grey a linear strength "
                                       "(50 % grey = halfway between b_u and full noise)"),
                io.Image.Input("uncertainty", optional=True, tooltip="ψ from UPSR Estimate Uncertainty"),
                io.Mask.Input("uncertainty_mask", optional=True, tooltip="ψ as an (edited) MASK"),
            ],
            outputs=[io.Image.Output(display_name="noise_weight", tooltip="w in [b_u, 1] at ×4, for UPSR Sample"),
                     io.Image.Output(display_name="heatmap", tooltip="w on a fixed 0…1 colour scale")],
        )

    @classmethod
    def execute(cls, b_u, psi_max, uncertainty=None, uncertainty_mask=None) -> io.NodeOutput:
        if (uncertainty is None) == (uncertainty_mask is None):
            raise ValueError("UPSR Weight Noise: connect exactly one of 'uncertainty' (IMAGE) or 'uncertainty_mask' "
                             f"(MASK), got {'both' if uncertainty is not None else 'neither'}")
        name = "uncertainty" if uncertainty is not None else "uncertainty_mask"
        if uncertainty is not None:
            check_role(uncertainty, "UPSR Weight Noise, input 'uncertainty'", "uncertainty")
        psi = image_in(uncertainty, name) if uncertainty is not None else mask_in(uncertainty_mask, name)
        check_weight_params(b_u, psi_max)  # (the sliders: not an error of the input named below)
        try:
            w = weight_map(psi, b_u, psi_max)
        except ValueError as e:  # say which input: a mask edited upstream may have gone negative
            raise ValueError(f"UPSR Weight Noise, input '{name}': {e}") from e
        heat = image_out(heatmap(w), "heatmap")
        return io.NodeOutput(image_out(w, "noise_weight"), heat, ui=ui.PreviewImage(heat, cls=cls))
