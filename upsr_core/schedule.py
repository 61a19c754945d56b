"""The ResShift noise schedule used by UPSR (SPEC §4).

Notation (code name -> paper symbol):

=====================  ==========================================================
``sqrt_etas[t]``       √η_t, geometric in ((t/(T-1))^p) from √0.001 to ``etas_end``
``etas[t]``            η_t, the residual-shift weight: x_t ≈ x0 + η_t (y − x0)
``etas_prev[t]``       η_{t−1} (0 for t = 0)
``alpha[t]``           α_t = η_t − η_{t−1}
``kappa``              κ, noise scale: x_T = y + κ √η_T · w ⊙ ε
``std[t]``             input scale of the denoiser, √(η_t κ² var_un + 1/4), var_un = 0.3
``m/k/c[t]``           DDIM (η=0) update x_{t−1} = k_t x̂0 + m_t x_t + c_t y (keys of ``f32()``)
``prior``              κ √η_T, the scale of the starting noise (key of ``f32()``)
=====================  ==========================================================

All constants are float64 (as the official NumPy code); :meth:`ResShiftSchedule.f32`
gives the float32 values the official sampler actually multiplies with.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import is_int

__all__ = ["ResShiftSchedule", "make_schedule", "VAR_UN"]

VAR_UN = 0.3  # SPEC §8.5: the official _scale_input uses this constant, not the actual w


@dataclass(frozen=True)
class ResShiftSchedule:
    """Float64 schedule tensors, each of shape (T,), indexed by the raw step t."""

    sqrt_etas: torch.Tensor
    etas: torch.Tensor
    etas_prev: torch.Tensor
    alpha: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    kappa: float

    @property
    def num_steps(self) -> int:
        return int(self.etas.shape[0])

    def f32(self) -> dict[str, torch.Tensor]:
        """Float32 sampler coefficients, computed in float32 from float32 η as the official code does."""
        eta = self.etas.float()
        eta_prev = self.etas_prev.float()
        m = torch.sqrt(eta_prev / eta)
        return {
            "std": torch.sqrt(eta * self.kappa**2 * VAR_UN + 0.25),
            "m": m,
            "k": 1 - eta_prev + m * (eta - 1),
            "c": eta_prev - torch.sqrt(eta * eta_prev),
            "prior": (self.sqrt_etas[-1:] * self.kappa).float(),
        }


def make_schedule(
    *,
    num_steps: int = 5,
    kappa: float = 2.5,
    etas_end: float = 0.99,
    power: float = 0.2,
    min_noise_level: float = 0.2,
) -> ResShiftSchedule:
    """Exponential ResShift schedule (Yue et al. 2023, eq. 10) as run by UPSR.

    SPEC §8.6: the start is min(min_noise_level/kappa, min_noise_level, √0.001), which is
    √0.001 for the official constants; ``etas_end`` is the final √η.

    Ranges: ``num_steps`` an integer >= 2; ``kappa``, ``power``, ``min_noise_level`` finite and
    > 0; ``etas_end`` in (start, 1). Anything else raises ValueError.
    """
    if not is_int(num_steps) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    for name, v in (("kappa", kappa), ("etas_end", etas_end), ("power", power), ("min_noise_level", min_noise_level)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not etas_end < 1:
        raise ValueError(f"etas_end must be in (0, 1), got {etas_end}")
    start = min(min_noise_level / kappa, min_noise_level, math.sqrt(0.001))
    if not etas_end > start:
        raise ValueError(f"etas_end must exceed the start √η_1 = {start:.4g} (the noise must grow with t), "
                         f"got {etas_end}")
    t = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    sqrt_etas = start * (etas_end / start) ** (t**power)
    etas = sqrt_etas**2
    etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), etas[:-1]])
    alpha = etas - etas_prev
    return ResShiftSchedule(
        sqrt_etas=sqrt_etas,
        etas=etas,
        etas_prev=etas_prev,
        alpha=alpha,
        posterior_variance=kappa**2 * etas_prev / etas * alpha,
        posterior_mean_coef1=etas_prev / etas,
        posterior_mean_coef2=alpha / etas,
        kappa=kappa,
    )
