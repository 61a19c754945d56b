"""LoadUPSRModel: pick the denoiser (and estimator) from the `upsr` model folder, load through upsr_core."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from upsr_core import UPSRModel, load_upsr
from upsr_core.cli import DEMO_MODEL, WEIGHTS_DIR
from upsr_core.cpu_memory import host_hint
from upsr_core.fast import enable_fast

log = logging.getLogger(__name__)
_HINTED = False  # the CPU start-up hint (upsr_core.cpu_memory.host_hint) is logged once per process

FOLDER = "upsr"
IN_MODEL_FILE = "(from the model file)"
EXTENSIONS = {".safetensors", ".pth", ".pt", ".ckpt", ".bin"}
# auto first: the default (fp16 where ComfyUI deems it safe on the GPU, fp32 on the CPU); the CLI's default is fp32
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLEMENTATIONS = ("fast", "reference")

UPSRModelType = io.Custom("UPSR_MODEL")


def auto_precision(device: torch.device) -> torch.dtype:
    """precision "auto": fp16 where ComfyUI deems it safe on ``device``, else bf16, else fp32."""
    if mm.should_use_fp16(device):
        return torch.float16
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def run_device() -> torch.device:
    """Where ComfyUI will run the nets: its device, except under ``--novram``, where it moves
    only comfy.ops layers to the GPU and leaves all of ours on the CPU (so precision auto,
    chosen for the GPU, would pick fp16 for a CPU run, about 130× slower than fp32)."""
    device = mm.get_torch_device()
    if device.type != "cpu" and mm.vram_state == mm.VRAMState.NO_VRAM:
        log.warning("UPSR: ComfyUI runs with --novram, which keeps these nets on the CPU: running on the CPU")
        return torch.device("cpu")
    return device


def make_fast(model: UPSRModel, device: torch.device) -> UPSRModel:
    """The fast path for ComfyUI's ``device``, without the two switches that fight its memory
    management: CUDA graphs (their memory pool would stay allocated outside ComfyUI's
    accounting, and ComfyUI moves the weights the graphs point at) and torch.compile
    (minutes of compiling for every new image size), and cuDNN's process-wide benchmark mode
    (ComfyUI sets it itself, under ``--fast autotune``). The nets are still on the CPU here, so
    the device-dependent switches ("auto": on CUDA the Triton GroupNorm on a channels-last
    denoiser where Triton can run, else NCHW; on the CPU sub-pixel convs, and NNPACK's
    Winograd convs on AVX2 CPUs, else a channels-last denoiser) are decided for ``device``."""
    return enable_fast(model, device=device, compile=False, cuda_graphs=False, cudnn_benchmark=False)


def register_model_folder() -> None:
    """Folder key ``upsr``: any ``upsr:`` paths of extra_model_paths.yaml first (ComfyUI reads that
    file before packs load), then ``models/upsr``, then the bundled ``upsr_core/weights``."""
    for path in (os.path.join(folder_paths.models_dir, FOLDER), str(WEIGHTS_DIR)):
        folder_paths.add_model_folder_path(FOLDER, path)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


register_model_folder()  # at import: ComfyExtension.on_load is not called by ComfyUI 0.3.64


def model_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def _where() -> str:
    return ", ".join(folder_paths.get_folder_paths(FOLDER))


def check_choice(what: str, name: str, files: list[str]) -> str | None:
    """The problem with a chosen file name, or None."""
    if not files:
        return (f"no UPSR model found: put {DEMO_MODEL} (or upsr.pth and atd_real.pth) into one of: {_where()}, "
                "then press R in the graph to refresh the lists")
    if name not in files:
        return f"{what} {name!r} is not in the upsr model folders ({_where()}); available: {', '.join(files)}"
    return None


@dataclass(repr=False, eq=False)
class UPSRHandle:
    """What flows along UPSR_MODEL wires: the core model and its ComfyUI memory manager."""

    model: UPSRModel
    patcher: comfy.model_patcher.ModelPatcher

    def __repr__(self) -> str:
        # ComfyUI puts str() of every input into a failed node's error and the history: the
        # default dataclass repr was the whole module tree (30 KB with the demo model)
        den = self.model.denoiser.config
        return (f"UPSRHandle(denoiser {den.model_channels} ch, {self.model.device}, "
                f"{str(self.model.dtype).removeprefix('torch.')})")

    def load(self, memory_required: int = 0) -> UPSRModel:
        """Put both nets on ComfyUI's device, offloading other models the ComfyUI way, so that
        ``memory_required`` bytes are free beside them for the run.

        Fully, never partially: partial (lowvram) loading can only stream comfy.ops layers.
        """
        mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        return self.model

    def load_for(self, image: torch.Tensor, tile: int, tile_batch: int, estimator_block: int | None = None
                 ) -> UPSRModel:
        """:meth:`load` with room for denoising the IMAGE [B,H,W,C] with these tile settings
        (``UPSRModel.working_memory``: measured per-pixel activations, scaled) and, with
        ``estimator_block``, for the estimator's blocks too. On the CPU, the first time, a log
        line on starting ComfyUI with glibc's settings for large tensors."""
        model = self.load(self.model.working_memory(tuple(image.shape[1:3]), batch=image.shape[0], tile=tile,
                                                    tile_batch=tile_batch, estimator_block=estimator_block))
        global _HINTED
        if model.device.type == "cpu" and not _HINTED:
            _HINTED = True
            hint = host_hint()
            if hint:
                log.info("UPSR: %s", hint)
        return model

    def free_others(self) -> int:
        """Unload every other model from this model's device (after an out-of-memory: the
        diffusion model of an earlier stage may still sit there); how many were unloaded. Nothing
        (0) where no other model there is offloaded elsewhere (``--cpu``; ``--gpu-only``):
        unloading would free nothing, and the retry of the same tiles would fail again. Under
        ``--highvram`` diffusion models stay on the GPU but text encoders and VAEs go to the CPU."""
        dev = self.patcher.load_device
        movable = [m for m in mm.current_loaded_models
                   if m.device == dev and m.model is not self.patcher and m.model.offload_device != dev]
        if not movable:
            return 0
        keep = [mm.LoadedModel(self.patcher)]  # LoadedModel compares by the patcher it wraps
        return len(mm.free_memory(1e30, self.patcher.load_device, keep_loaded=keep))


class LoadUPSRModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = model_files()
        return io.Schema(
            node_id="LoadUPSRModel",
            display_name="Load UPSR Model",
            category="image/upscaling/UPSR",
            description="Loads the UPSR denoiser and its ATD estimator from models/upsr: one converted "
                        ".safetensors holding both nets, or upsr.pth plus atd_real.pth.",
            inputs=[
                io.Combo.Input("model_name", options=files, default=DEMO_MODEL if DEMO_MODEL in files else None,
                               tooltip="the denoiser, or a converted file holding both nets"),
                io.Combo.Input("estimator_name", options=[IN_MODEL_FILE] + files, default=IN_MODEL_FILE,
                               tooltip="the ATD estimator (atd_real.pth); not needed for a converted file"),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="denoiser precision. auto = fp16 where ComfyUI deems it safe for this GPU "
                                       "(the official nets were trained in fp16; half the memory of fp32), "
                                       "else bf16, else fp32 (the CPU). fp32 gives what the upsr_core CLI gives "
                                       "by default. A NaN result (an fp16 overflow) stops with an error: pick "
                                       "fp32 or bf16 then. The estimator never runs in fp16. On the CPU, fp16 is "
                                       "~130× slower than fp32 (no fast kernels), and bf16 too without AVX-512: "
                                       "keep auto there."),
                io.Combo.Input("implementation", options=list(IMPLEMENTATIONS), default="fast", optional=True,
                               tooltip="fast: fused attention with precomputed masks and the sampling loop on the "
                                       "device; equal to reference up to float rounding (what `python -m upsr_core "
                                       "upscale --fast` gives). reference: the faithful port of the official code, "
                                       "bit for bit what `python -m upsr_core upscale` gives; slower, more memory."),
            ],
            outputs=[UPSRModelType.Output(display_name="upsr_model",
                                          tooltip="the denoiser and its estimator, for the other UPSR nodes")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None) -> bool | str:
        # model_name only: ComfyUI shows a message on every input validate_inputs takes, and skips
        # its own combo check for them; the other combos get ComfyUI's check, on the input at fault.
        # An input that comes over a link is None here (known only when the prompt runs);
        # execute() checks all four then.
        return (None if model_name is None else check_choice("model_name", model_name, model_files())) or True

    @classmethod
    def check_all(cls, model_name: str, estimator_name: str, precision: str, implementation: str) -> str | None:
        """What is wrong with the four values (a linked one is known only now), or None."""
        files = model_files()
        problem = check_choice("model_name", model_name, files)
        if problem is None and estimator_name != IN_MODEL_FILE:
            problem = check_choice("estimator_name", estimator_name, files)
        if problem is None and precision not in PRECISIONS:
            problem = f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        if problem is None and implementation not in IMPLEMENTATIONS:
            problem = f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}"
        return problem

    @classmethod
    def execute(cls, model_name: str, estimator_name: str, precision: str,
                implementation: str = "fast") -> io.NodeOutput:
        values = {"model_name": model_name, "estimator_name": estimator_name, "precision": precision,
                  "implementation": implementation}
        unset = [k for k, v in values.items() if v is None]
        problem = (f"{', '.join(unset)} has no value: connect or set it" if unset
                   else cls.check_all(model_name, estimator_name, precision, implementation))
        if problem:
            raise ValueError(problem)
        path = folder_paths.get_full_path_or_raise(FOLDER, model_name)
        est = None if estimator_name == IN_MODEL_FILE else folder_paths.get_full_path_or_raise(FOLDER, estimator_name)
        device = run_device()
        dtype = PRECISIONS[precision] or auto_precision(device)
        model = load_upsr(path, est, device="cpu", dtype=dtype)
        if model.estimator is None:
            raise ValueError(f"{model_name} holds only the denoiser: choose the ATD estimator (atd_real.pth) "
                             "as estimator_name")
        if implementation == "fast":
            make_fast(model, device)
        nets = torch.nn.ModuleDict({"denoiser": model.denoiser, "estimator": model.estimator})
        patcher = comfy.model_patcher.ModelPatcher(nets, load_device=device, offload_device=mm.unet_offload_device())
        log.info("UPSR: loaded %s (%s, %s) for %s", model_name, str(model.dtype).removeprefix("torch."),
                 implementation, device)
        return io.NodeOutput(UPSRHandle(model, patcher))
