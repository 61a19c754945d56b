"""The UPSR sampler: DDIM (η = 0) on the ResShift residual process (SPEC §4).

A sampler is a function of a denoiser callable and a schedule (k-diffusion style).
Everything happens in the PixelUnshuffled layout (B, 48, h, w) of the padded LR grid.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .schedule import ResShiftSchedule

__all__ = ["sample", "prior_sample", "scale_input", "ddim_step", "Denoise", "StepCallback"]


class Denoise(Protocol):
    def __call__(self, x_in: torch.Tensor, t: int) -> torch.Tensor:
        """x_in (B, 48, h, w) scaled state, step t -> x̂0 (B, 48, h, w), unshuffled."""


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _check_states(**tensors: torch.Tensor) -> None:
    """ValueError unless every tensor is 4-D with the first one's shape (no silent broadcast)."""
    (first, ref), *rest = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, 48, h, w) tensor (unshuffled), got {got}")
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have the shape of {first} {tuple(ref.shape)} "
                             "(all unshuffled: PixelUnshuffle(·, 4) of the HR maps)")


def prior_sample(y: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor,
                 schedule: ResShiftSchedule) -> torch.Tensor:
    """x_T = y + κ·√η_T·w ⊙ ε (UPSR eq. 8); all (B, 48, h, w), unshuffled, [-1, 1] space."""
    _check_states(y=y, weight=weight, noise=noise)
    coef = schedule.f32()["prior"].to(y.device)
    return y + coef * weight * noise


def scale_input(x_t: torch.Tensor, t: int, co: dict[str, torch.Tensor]) -> torch.Tensor:
    """ResShift eq. 7: the network sees x_t / √(η_t κ² var_un + 1/4) (SPEC §8.5); co = schedule.f32()."""
    return x_t / co["std"][t]


def ddim_step(
    x_t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, t: int, co: dict[str, torch.Tensor]
) -> torch.Tensor:
    """DDIM with η = 0 (ResShift appendix): x_{t−1} = k_t x̂0 + m_t x_t + c_t y; co = schedule.f32()."""
    return x0 * co["k"][t] + x_t * co["m"][t] + y * co["c"][t]


def sample(
    denoise: Denoise,
    y: torch.Tensor,
    x_T: torch.Tensor,
    schedule: ResShiftSchedule,
    *,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run the T-step DDIM (η = 0) sampler from x_T, return the final x̂0.

    y: PixelUnshuffle(bicubic(y)) (B, 48, h, w) in [-1, 1] space; x_T from :func:`prior_sample`.
    ``callback(i, x, x0_hat)`` is called after each of the T steps (i = 0..T-1), with x the
    state after the step (x_{t−1}; after the last step the result) and x̂0 the step's prediction.
    """
    _check_states(y=y, x_T=x_T)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    co = {k: v.to(y.device) for k, v in schedule.f32().items()}
    x = x_T
    for i, t in enumerate(reversed(range(schedule.num_steps))):
        x0 = denoise(scale_input(x, t, co), t)  # ResShift eq. 7 input scaling
        if x0.shape != x.shape:
            raise ValueError(f"denoise returned {tuple(x0.shape)} at step t={t}, expected x̂0 of the state's shape "
                             f"{tuple(x.shape)}")
        x = ddim_step(x, x0, y, t, co)  # DDIM η = 0: x_{t−1} = k_t x̂0 + m_t x_t + c_t y
        if callback is not None:
            callback(i, x, x0)
    return x
