"""The UPSR node pack: LoadUPSRModel → EstimateUncertainty → WeightNoise → UPSRSample (or UPSRUpscale),
optionally → UPSRColorFix.

The nodes import ComfyUI's versioned node API, ``comfy_api.v0_0_2`` (present in 0.3.64, the oldest
ComfyUI this pack supports): ComfyUI means its vX_Y_Z modules to stay backward compatible for node
packs, while ``comfy_api.latest`` follows its development.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import ComfyExtension, io

from .colorfix import UPSRColorFix
from .load_model import LoadUPSRModel
from .sample import UPSRSample, UPSRUpscale
from .uncertainty import EstimateUncertainty, WeightNoise

log = logging.getLogger(__name__)

NODES: list[type[io.ComfyNode]] = [LoadUPSRModel, EstimateUncertainty, WeightNoise, UPSRSample, UPSRUpscale,
                                   UPSRColorFix]
EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
EXAMPLE_INPUT_GLOB = "upsr_example_*"


def install_example_inputs() -> list[Path]:
    """Copy the example workflows' LR images into ComfyUI's input folder (never overwriting),
    so the templates run as shipped. Returns the files copied."""
    dest = Path(folder_paths.get_input_directory())
    copied = []
    for src in sorted(EXAMPLES.glob(EXAMPLE_INPUT_GLOB)):
        target = dest / src.name  # a link there (even a dangling one) is left alone: never written through
        if src.suffix.lower() in (".png", ".jpg") and not target.exists() and not target.is_symlink():
            try:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                copied.append(target)
            except OSError as e:
                log.warning("UPSR: could not copy the example image %s into %s: %s", src.name, dest, e)
    return copied


class UPSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        install_example_inputs()
        return NODES
