"""EstimateUncertainty and WeightNoise: layout conversion around upsr_core.stages."""
from __future__ import annotations

from comfy_api.latest import io, ui

from upsr_core.stages import estimate_maps, heatmap, uncertainty_mask, weight_map
from upsr_core.uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX

from ._layout import image_in, image_out, mask_in, mask_out
from .load_model import UPSRModelType


class EstimateUncertainty(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EstimateUncertainty",
            display_name="UPSR Estimate Uncertainty",
            category="image/upscaling/UPSR",
            description="g(y): a first ×4 estimate, and the uncertainty ψ = ½|g(y) − bicubic(y)| per pixel and "
                        "channel. The MASK is ψ averaged over channels, for the mask nodes.",
            inputs=[
                UPSRModelType.Input("upsr_model"),
                io.Image.Input("image", tooltip="low-resolution image"),
                io.UpscaleModel.Input("upscale_model", optional=True,
                                      tooltip="use another ×4 model (Load Upscale Model) as g instead of ATD"),
            ],
            outputs=[
                io.Image.Output(display_name="sr_estimate"),
                io.Image.Output(display_name="uncertainty"),
                io.Mask.Output(display_name="uncertainty_mask"),
            ],
        )

    @classmethod
    def execute(cls, upsr_model, image, upscale_model=None) -> io.NodeOutput:
        model = upsr_model.load()
        g = None
        if upscale_model is not None:
            if getattr(upscale_model, "scale", None) != 4:
                raise ValueError(f"upscale_model must be a ×4 model, got ×{getattr(upscale_model, 'scale', '?')}")
            upscale_model.to(model.device)
            g = lambda x: upscale_model(x.to(model.device))  # noqa: E731
        sr, psi = estimate_maps(model, image_in(image, "image"), estimator=g)
        return io.NodeOutput(image_out(sr), image_out(psi), mask_out(uncertainty_mask(psi)))


class WeightNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WeightNoise",
            display_name="UPSR Weight Noise",
            category="image/upscaling/UPSR",
            description="Noise weight w = b_u + (1 − b_u)·min(ψ/ψ_max, 1): 1 = full noise (edges, textures), "
                        "b_u = keep the low-resolution information (flat areas). Give the uncertainty IMAGE or "
                        "an edited MASK (white = full noise).",
            inputs=[
                io.Float.Input("b_u", default=DEFAULT_B_U, min=0.0, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider, tooltip="noise floor in flat regions"),
                io.Float.Input("psi_max", default=DEFAULT_PSI_MAX, min=0.001, max=1.0, step=0.001,
                               display_mode=io.NumberDisplay.slider, tooltip="ψ at and above which noise is full"),
                io.Image.Input("uncertainty", optional=True),
                io.Mask.Input("uncertainty_mask", optional=True),
            ],
            outputs=[io.Image.Output(display_name="noise_weight"), io.Image.Output(display_name="heatmap")],
        )

    @classmethod
    def execute(cls, b_u, psi_max, uncertainty=None, uncertainty_mask=None) -> io.NodeOutput:
        if (uncertainty is None) == (uncertainty_mask is None):
            raise ValueError("connect exactly one of 'uncertainty' (IMAGE) or 'uncertainty_mask' (MASK)")
        psi = image_in(uncertainty, "uncertainty") if uncertainty is not None else mask_in(uncertainty_mask, "uncertainty_mask")
        w = weight_map(psi, b_u, psi_max)
        heat = image_out(heatmap(w))
        return io.NodeOutput(image_out(w), heat, ui=ui.PreviewImage(heat, cls=cls))
