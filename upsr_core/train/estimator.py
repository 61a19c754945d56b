"""Stage 1: train the SR estimator g (ATD) with an L1 loss on Real-ESRGAN-degraded pairs.

Per micro-batch: HR crops (B,3,H,W) [0,1] from the feed → LR = degrade(HR) on the device →
g(LR) (B,3,H,W) → L1 to HR. The estimator output is not clamped (as at inference).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ATDConfig
from ..nets import ATD
from .degradations import RealESRGANDegradation
from .feed import DegradedPairs, PairPool
from .losses import estimator_loss

__all__ = ["EstimatorTask", "build_estimator_net", "init_estimator_"]

log = logging.getLogger(__name__)


def init_estimator_(net: ATD) -> ATD:
    """The official ATD initialisation: every Linear weight truncated-normal (std 0.02) with zero
    bias, LayerNorms weight 1 / bias 0, the relative-position bias tables truncated-normal
    (std 0.02); convolutions keep PyTorch's default. In place; returns ``net``."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)
        for mod in net.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
    return net


def build_estimator_net(cfg: ATDConfig) -> ATD:
    """A freshly initialised ATD (training mode), initialised as the official one."""
    return init_estimator_(ATD(cfg))


@dataclass
class EstimatorTask(DegradedPairs):
    """``feed.next(batch, generator)`` gives HR crops; ``degradation``: realesrgan|bicubic."""

    model: nn.Module
    feed: object
    batch: int
    degradation: str = "realesrgan"
    deg_generator: torch.Generator | None = None  # degradation RNG if not the step's (e.g. a CPU one)
    pool: PairPool | None = None  # the official pair pool (mixes degraded pairs across batches)
    deg_config: RealESRGANDegradation | None = None  # ranges and JPEG model (None: the official ranges)

    def loss(self, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        hr, lr = self.degraded_pair(generator)
        return estimator_loss(model(lr), hr)
