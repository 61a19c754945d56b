"""UPSR for ComfyUI: uncertainty-guided diffusion ×4 super-resolution (CVPR 2025).

ComfyUI loads this folder as a package and calls :func:`comfy_entrypoint`.
"""
from __future__ import annotations

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # make the bundled upsr_core importable as a top-level package
    sys.path.insert(0, _here)


async def comfy_entrypoint():
    from .nodes import UPSRExtension

    return UPSRExtension()
