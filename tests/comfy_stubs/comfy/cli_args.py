# (names, values and defaults as ComfyUI 0.3.64 has them)
"""Stand-in for comfy.cli_args: the parsed ``args`` (the preview settings the nodes read, at their
defaults) and the ``LatentPreviewMethod`` enum."""
from __future__ import annotations

import argparse
import enum


class LatentPreviewMethod(enum.Enum):
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


args = argparse.Namespace(preview_method=LatentPreviewMethod.NoPreviews, preview_size=512)
