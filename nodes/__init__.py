"""The UPSR node pack: LoadUPSRModel → EstimateUncertainty → WeightNoise → UPSRSample."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .load_model import LoadUPSRModel
from .sample import UPSRSample, UPSRUpscale
from .uncertainty import EstimateUncertainty, WeightNoise

NODES: list[type[io.ComfyNode]] = [LoadUPSRModel, EstimateUncertainty, WeightNoise, UPSRSample, UPSRUpscale]


class UPSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
