"""Stage 2: train the UPSR denoiser with uncertainty-weighted noise (official objective).

Per micro-batch: HR crops → LR = degrade(HR) on the device → frozen estimator ŷ = g(LR)
(no gradients, its inference fast path) → w from ψ = ½|ŷ − y↑| → t ~ U{0..T−1}, ε ~ N(0, I) →
x_t = x0 + η_t(y − x0) + κ√η_t w ε (unshuffled) → net(x_t/std_t, t, lq) → MSE to the HR
(+ 0.5·LPIPS when available). See :mod:`upsr_core.train.losses` for the formulas.

``b_u = 1`` trains without uncertainty weighting (w ≡ 1: the paper's ablation baseline).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import DenoiserConfig
from ..fast import placement
from ..nets import UPSRDenoiser
from ..schedule import ResShiftSchedule, make_schedule
from ..uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX
from .degradations import RealESRGANDegradation
from .feed import DegradedPairs, PairPool
from .losses import LPIPSHook, denoiser_loss, make_inputs

__all__ = ["DenoiserTask", "build_denoiser_net", "init_denoiser_"]

log = logging.getLogger(__name__)


def init_denoiser_(net: UPSRDenoiser) -> UPSRDenoiser:
    """The official initialisation on top of PyTorch's defaults: the last conv of every ResBlock
    zero (``zero_module(out_layers[3])``, so each block starts as its skip path) and the Swin
    relative-position bias tables truncated-normal (std 0.02). In place; returns ``net``."""
    with torch.no_grad():
        for name, mod in net.named_modules():
            if name.endswith("out_layers.3") and isinstance(mod, nn.Conv2d):
                nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)
        for name, p in net.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)
    return net


def build_denoiser_net(cfg: DenoiserConfig) -> UPSRDenoiser:
    """A freshly initialised denoiser (training mode)."""
    return init_denoiser_(UPSRDenoiser(cfg))


@dataclass
class DenoiserTask(DegradedPairs):
    model: nn.Module
    estimator: nn.Module
    feed: object
    batch: int
    degradation: str = "realesrgan"
    b_u: float = DEFAULT_B_U
    psi_max: float = DEFAULT_PSI_MAX
    lpips: LPIPSHook = field(default_factory=LPIPSHook)
    lpips_weight: float = 0.5
    schedule: ResShiftSchedule = field(default_factory=make_schedule)
    deg_generator: torch.Generator | None = None  # degradation RNG if not the step's (e.g. a CPU one)
    pool: PairPool | None = None  # the official pair pool (mixes degraded pairs across batches)
    deg_config: RealESRGANDegradation | None = None  # ranges and JPEG model (None: the official ranges)

    def __post_init__(self) -> None:
        self.estimator.eval().requires_grad_(False)
        self._estimator_placed = None

    def _prepare_estimator(self) -> None:
        """The frozen estimator runs its inference fast path (precomputed window masks and logit
        gains, SDPA, row gathers: same math, fewer kernels), in float32 (``make_inputs`` turns
        autocast off around it). Prepared on the first step and again if its weights move, so the masks are
        built where its parameters are."""
        placed = placement(self.estimator)
        if placed != self._estimator_placed and hasattr(self.estimator, "prepare_fast"):
            self.estimator.prepare_fast()
            self._estimator_placed = placed

    def loss(self, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        self._prepare_estimator()
        hr, lr = self.degraded_pair(generator)
        inp = make_inputs(hr, lr, self.estimator, self.schedule, generator, b_u=self.b_u, psi_max=self.psi_max)
        pred = model(inp.x_in, inp.t, inp.lq)
        return denoiser_loss(pred, inp.target, self.lpips, self.lpips_weight)
