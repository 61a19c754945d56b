"""LoadUPSRModel: pick the denoiser (and estimator) from models/upsr, load through upsr_core."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
from upsr_core import UPSRModel, load_upsr
from upsr_core.cli import WEIGHTS_DIR

log = logging.getLogger(__name__)

FOLDER = "upsr"
IN_MODEL_FILE = "(from the model file)"
EXTENSIONS = {".safetensors", ".pth", ".pt", ".ckpt", ".bin"}
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

UPSRModelType = io.Custom("UPSR_MODEL")


def register_model_folder() -> None:
    """models/upsr (plus any `upsr:` entry of extra_model_paths.yaml) and the bundled demo model."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    folder_paths.add_model_folder_path(FOLDER, str(WEIGHTS_DIR))
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


def _model_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


register_model_folder()  # at import: ComfyExtension.on_load is not called by ComfyUI 0.3.64


@dataclass
class UPSRHandle:
    """What flows along UPSR_MODEL wires: the core model and its ComfyUI memory manager."""

    model: UPSRModel
    patcher: comfy.model_patcher.ModelPatcher

    def load(self) -> UPSRModel:
        """Put the nets on ComfyUI's device, offloading other models the ComfyUI way."""
        mm.load_models_gpu([self.patcher], force_full_load=True)
        return self.model


class LoadUPSRModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = _model_files()
        return io.Schema(
            node_id="LoadUPSRModel",
            display_name="Load UPSR Model",
            category="image/upscaling/UPSR",
            description="Loads the UPSR denoiser (upsr.pth or a converted .safetensors holding both nets) "
                        "and the ATD estimator (atd_real.pth) from models/upsr.",
            inputs=[
                io.Combo.Input("model_name", options=files, tooltip="denoiser, or a file holding both nets"),
                io.Combo.Input("estimator_name", options=[IN_MODEL_FILE] + files, default=IN_MODEL_FILE,
                               tooltip="ATD estimator (atd_real.pth); not needed for a converted file"),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="denoiser precision; the estimator never runs in fp16"),
            ],
            outputs=[UPSRModelType.Output(display_name="upsr_model")],
        )

    @classmethod
    def execute(cls, model_name: str, estimator_name: str, precision: str) -> io.NodeOutput:
        if not _model_files():
            raise ValueError(f"no UPSR model found: put upsr.pth and atd_real.pth (or a converted "
                             f".safetensors) into {folder_paths.get_folder_paths(FOLDER)[0]}")
        path = folder_paths.get_full_path_or_raise(FOLDER, model_name)
        est = None if estimator_name == IN_MODEL_FILE else folder_paths.get_full_path_or_raise(FOLDER, estimator_name)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        device = mm.get_torch_device()
        dtype = PRECISIONS[precision] or (torch.bfloat16 if mm.should_use_bf16(device) else torch.float32)
        model = load_upsr(path, est, device="cpu", dtype=dtype)
        if model.estimator is None:
            raise ValueError(f"{model_name} holds only the denoiser: choose atd_real.pth as estimator_name")
        nets = torch.nn.ModuleDict({"denoiser": model.denoiser, "estimator": model.estimator})
        patcher = comfy.model_patcher.ModelPatcher(nets, load_device=device, offload_device=mm.unet_offload_device())
        return io.NodeOutput(UPSRHandle(model, patcher))
