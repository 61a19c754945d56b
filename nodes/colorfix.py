"""UPSRColorFix: layout conversion around upsr_core.colorfix (the wavelet colour fix)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from upsr_core.colorfix import DEFAULT_LEVELS, MAX_LEVELS, wavelet_color_fix

from ._layout import check_role, image_out, lr_in
from .sample import progress_bar


class UPSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UPSRColorFix",
            display_name="UPSR Color Fix",
            category="image/upscaling/UPSR",
            description="Wavelet colour fix (optional; not part of the official UPSR): keeps the upscaled image's "
                        "fine detail and takes its colours and soft shading from the reference — the low-resolution "
                        "image, upscaled bicubically, or any image of the result's size. Works after any ×4 "
                        "upscaler.",
            inputs=[
                io.Image.Input("image", tooltip="the upscaled result, e.g. from UPSR Sample or UPSR Upscale ×4"),
                io.Image.Input("reference", tooltip="the low-resolution image (¼ of the result's size) or an image "
                                                    "of the result's size whose colours to keep; one image or one "
                                                    "per image of the batch"),
                io.Int.Input("levels", default=DEFAULT_LEVELS, min=1, max=MAX_LEVELS,
                             display_mode=io.NumberDisplay.slider,
                             tooltip="how coarse the colours taken from the reference are: detail finer than about "
                                     "2^levels pixels of the result stays the upscaler's; fewer levels take more "
                                     "from the (blurry) reference"),
            ],
            outputs=[io.Image.Output(tooltip="the result with the reference's colours")],
        )

    @classmethod
    def execute(cls, image, reference, levels=DEFAULT_LEVELS) -> io.NodeOutput:
        # g(y) is a ×4 picture like any upscaler's: allowed in both; ψ, w and the heatmap are not pictures
        check_role(image, "image", "sr_estimate", "the ×4 result to fix (UPSR's image, or any ×4 upscaler's)")
        check_role(reference, "reference", "sr_estimate",
                   "the low-resolution image (or a picture of the result's size) whose colours to keep")
        x, ref = lr_in(image), lr_in(reference, "reference")  # a resize's overshoot clamped, [0, 255] refused
        # a progress bar that also checks Cancel after each strip (a large video batch took minutes)
        return io.NodeOutput(image_out(wavelet_color_fix(x, ref, levels=levels, progress=progress_bar())))
