"""The UPSR node pack: LoadUPSRModel → EstimateUncertainty → WeightNoise → UPSRSample."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .load_model import LoadUPSRModel, register_model_folder
from .sample import UPSRSample, UPSRUpscale
from .uncertainty import EstimateUncertainty, WeightNoise

NODES: list[type[io.ComfyNode]] = [LoadUPSRModel, EstimateUncertainty, WeightNoise, UPSRSample, UPSRUpscale]


class UPSRExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
