"""Uncertainty-guided noise weighting (UPSR paper §3.2, SPEC §7).

In [0, 1] image units, per pixel and per colour channel:

    ψ = ½ · |g(y) − y↑|                     (uncertainty; g = estimator, y↑ = bicubic)
    w = b_u + (1 − b_u) · min(ψ / ψ_max, 1)  (noise weight, in [b_u, 1])

With b_u = 0.4, ψ_max = 0.05 this is exactly the official
``0.4 + 0.6·clamp(|y_hat − y_bic|/2, 0, 0.1)/0.1`` on [-1, 1] tensors.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["estimate_uncertainty", "weight_noise", "check_psi", "DEFAULT_B_U", "DEFAULT_PSI_MAX", "PSI_MAX_LIMIT"]

DEFAULT_B_U = 0.4
DEFAULT_PSI_MAX = 0.05
PSI_MAX_LIMIT = 0.5  # ψ = ½|g − bicubic| never exceeds ½ on [0, 1] images: a larger ψ_max never gives w = 1


def _check_map_tensor(name: str, x: object, layout: str, channels: tuple[int, ...] | None) -> None:
    """TypeError unless ``x`` is a floating-point tensor; ValueError unless it is 4-D with ``channels``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a float {layout} tensor, got {what}")
    if x.ndim != 4 or (channels is not None and x.shape[1] not in channels):
        raise ValueError(f"{name} must be a float {layout} tensor, got shape {tuple(x.shape)}")


def estimate_uncertainty(sr_estimate: torch.Tensor, bicubic: torch.Tensor) -> torch.Tensor:
    """ψ = ½|g(y) − bicubic(y)|, both (B, C, H, W) in [0, 1] units -> (B, C, H, W) >= 0.

    The inputs are not clamped (SPEC §8.13: the official code does not clamp either).
    """
    for name, x in (("sr_estimate", sr_estimate), ("bicubic", bicubic)):
        _check_map_tensor(name, x, "(B, C, H, W)", None)  # uint8 would wrap around
    if sr_estimate.shape != bicubic.shape:
        raise ValueError(
            f"sr_estimate {tuple(sr_estimate.shape)} and bicubic {tuple(bicubic.shape)} must have the same shape"
        )
    return (sr_estimate - bicubic).abs() * 0.5


def check_weight_params(b_u: float, psi_max: float) -> None:
    """Raise ValueError unless 0 <= b_u <= 1 and 0 < psi_max < inf (TypeError for non-numbers)."""
    for name, v in (("b_u", b_u), ("psi_max", psi_max)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {v!r}")
    if not (math.isfinite(b_u) and 0.0 <= b_u <= 1.0):
        raise ValueError(f"b_u must be in [0, 1], got {b_u}")
    if not math.isfinite(psi_max):
        raise ValueError(f"psi_max must be finite and > 0, got {psi_max}")
    if not psi_max > 0.0:
        raise ValueError(f"psi_max must be > 0, got {psi_max}")
    f32 = torch.finfo(torch.float32)
    if not f32.tiny <= 2.0 * psi_max <= f32.max:  # the float32 maps hold 2·ψ_max: 0 or inf would give NaN w
        raise ValueError(f"psi_max must be in [{f32.tiny / 2:.3g}, {f32.max / 2:.3g}] (2·psi_max a normal float32), "
                         f"got {psi_max}")


def check_psi(psi: object, channels: tuple[int, ...] = (1, 3)) -> None:
    """TypeError unless ``psi`` is a float tensor, ValueError unless it is (B, C, H, W) with C in
    ``channels`` and its values are finite and >= 0 (an empty map passes): what ψ must be."""
    _check_map_tensor("uncertainty ψ", psi, f"(B, {'|'.join(map(str, channels))}, H, W)", channels)
    lo, hi = torch.aminmax(psi.detach()) if psi.numel() else (psi.new_zeros(()), psi.new_zeros(()))
    if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < 0:  # NaN and ±Inf reach lo or hi
        raise ValueError(f"uncertainty ψ must be finite and >= 0, got values in [{lo.item():.4g}, {hi.item():.4g}]")


def weight_noise(psi: torch.Tensor, b_u: float = DEFAULT_B_U, psi_max: float = DEFAULT_PSI_MAX) -> torch.Tensor:
    """Noise weight w = b_u + (1 − b_u)·min(ψ/ψ_max, 1), shape of ψ, values in [b_u, 1].

    ψ may have 1 channel (an edited mask) or 3; it must be finite and >= 0. ``b_u`` in [0, 1];
    ``psi_max`` > 0 (and 2·psi_max a normal float32); beyond ψ_max w is 1, so a ψ_max above
    :data:`PSI_MAX_LIMIT` never reaches 1. Computed in float32 for half-precision ψ.
    """
    check_weight_params(b_u, psi_max)
    check_psi(psi)
    # half precision cannot hold a small 2ψ_max: computed in float32, returned in ψ's dtype
    p = psi if psi.dtype in (torch.float32, torch.float64) else psi.float()
    # |g − y| = 2ψ, clamped at 2ψ_max, scaled to [0, 1]: the official operation order.
    u = torch.clamp(p * 2.0, 0.0, 2.0 * psi_max) / (2.0 * psi_max)
    return (b_u + (1.0 - b_u) * u).to(psi.dtype)
