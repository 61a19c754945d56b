"""upsr_core: UPSR ×4 super-resolution (Zhang, You, Shi, Gu — CVPR 2025) in pure PyTorch.

Loads the authors' checkpoints, reproduces the official pipeline stage by stage, tiles
any image size, and trains and evaluates new models. Never imports ComfyUI.

Quick use::

    from upsr_core import load_upsr
    model = load_upsr("upsr_x4.safetensors", device="cuda")
    sr = model.upscale(lr, seed=0)          # lr (B,3,h,w) in [0,1] -> (B,3,4h,4w) in [0,1]
"""
from . import _launch  # noqa: F401  (first: the parent pid before torch loads)
from .checkpoint import read_checkpoint, save_converted
from .config import ATDConfig, DenoiserConfig
from .errors import UnsupportedCheckpointError
from .model import DEFAULT_OVERLAP, DEFAULT_TILE, UPSRModel, load_upsr
from .nets import ATD, UPSRDenoiser
from .pipeline import Estimate, bicubic_x4, crop_hr, denoise_estimate, estimate, pad_lr, run_estimator, starting_noise
from .schedule import ResShiftSchedule, make_schedule
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, estimate_uncertainty, weight_noise

__version__ = "0.1.0"

__all__ = [
    "ATD",
    "ATDConfig",
    "DEFAULT_B_U",
    "DEFAULT_OVERLAP",
    "DEFAULT_PSI_MAX",
    "DEFAULT_TILE",
    "DenoiserConfig",
    "Estimate",
    "ResShiftSchedule",
    "UPSRDenoiser",
    "UPSRModel",
    "UnsupportedCheckpointError",
    "bicubic_x4",
    "crop_hr",
    "denoise_estimate",
    "estimate",
    "estimate_uncertainty",
    "load_upsr",
    "make_schedule",
    "pad_lr",
    "read_checkpoint",
    "run_estimator",
    "save_converted",
    "starting_noise",
    "weight_noise",
]
