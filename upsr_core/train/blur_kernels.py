"""Random blur kernels of the Real-ESRGAN degradation model, built batched in torch.

Every kernel is returned zero-padded to ``MAX_KERNEL_SIZE`` (21) so that a batch of
kernels of different sizes is one ``(B, 21, 21)`` tensor; each kernel sums to 1.

Kernel families (``q = [x y] Σ⁻¹ [x y]ᵀ`` with ``Σ = R(θ) diag(σx², σy²) R(θ)ᵀ``):

| name                 | formula (before normalisation) | parameters              |
|----------------------|--------------------------------|-------------------------|
| iso / aniso          | exp(-q / 2)                    | σx (=σy, θ=0 for iso)   |
| generalized_*        | exp(-(q)^β / 2)                | β ∈ betag_range         |
| plateau_*            | 1 / (q^β + 1)                  | β ∈ betap_range         |
| sinc (circular low-pass) | ωc·J1(ωc·r) / (2π r), centre ωc²/(4π) | ωc (cut-off, rad) |

For ``*_aniso`` kernels σy is drawn independently of σx and θ is uniform in [-π, π].
β is drawn from [lo, 1] or [1, hi] with probability 1/2 each (so that β < 1 and β > 1 are
equally likely). Parameter ranges follow the Real-ESRGAN x4 training configuration.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["KERNEL_TYPES", "MAX_KERNEL_SIZE", "mixed_kernels", "sample_blur_kernels", "sinc_kernels"]

MAX_KERNEL_SIZE = 21
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _grid(pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer pixel offsets from the centre of a ``pad_to × pad_to`` grid, float64."""
    ax = torch.arange(pad_to, dtype=torch.float64) - (pad_to - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _support_mask(sizes: torch.Tensor, pad_to: int) -> torch.Tensor:
    """``(B, pad_to, pad_to)`` bool mask of the centred ``size × size`` square of each kernel."""
    xx, yy = _grid(pad_to)
    half = (sizes.to(torch.float64) // 2)[:, None, None]
    return (xx.abs()[None] <= half) & (yy.abs()[None] <= half)


def _check_sizes(sizes: torch.Tensor, pad_to: int) -> None:
    if sizes.ndim != 1:
        raise ValueError(f"expected kernel sizes of shape (B,), got {tuple(sizes.shape)}")
    bad = sizes[(sizes % 2 == 0) | (sizes < 1) | (sizes > pad_to)]
    if bad.numel():
        raise ValueError(f"kernel sizes must be odd and in [1, {pad_to}], got {bad.tolist()}")


def _normalise(k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    k = torch.where(mask, k, torch.zeros_like(k))
    return k / k.sum(dim=(-2, -1), keepdim=True)


def mixed_kernels(
    type_idx: torch.Tensor,
    sizes: torch.Tensor,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: torch.Tensor,
    pad_to: int = MAX_KERNEL_SIZE,
) -> torch.Tensor:
    """Gaussian-family kernels, one per row of the (B,) parameter tensors.

    ``type_idx`` indexes ``KERNEL_TYPES`` (int64, 0..5); ``sizes`` odd ints in [1, pad_to];
    ``sigma_x``/``sigma_y`` > 0 in pixels; ``theta`` in radians; ``beta`` > 0 (ignored by
    iso/aniso). For the ``*_iso`` types ``sigma_y`` and ``theta`` are ignored (σy = σx, θ = 0).
    Returns float64 ``(B, pad_to, pad_to)``, non-negative, each summing to 1.
    """
    _check_sizes(sizes, pad_to)
    t = type_idx.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(KERNEL_TYPES)):
        raise ValueError(f"type_idx must be in [0, {len(KERNEL_TYPES) - 1}], got {t.tolist()}")
    iso = (t % 2) == 0  # iso, generalized_iso, plateau_iso sit at even positions
    sx = sigma_x.to(torch.float64)
    sy = torch.where(iso, sx, sigma_y.to(torch.float64))
    th = torch.where(iso, torch.zeros_like(sx), theta.to(torch.float64))
    if bool((sx <= 0).any()) or bool((sy <= 0).any()):
        raise ValueError(f"sigmas must be > 0, got sigma_x={sx.tolist()}, sigma_y={sy.tolist()}")
    # Σ⁻¹ = R diag(1/σx², 1/σy²) Rᵀ, written out per entry
    c, s = torch.cos(th), torch.sin(th)
    ix, iy = 1.0 / sx**2, 1.0 / sy**2
    a = (c * c * ix + s * s * iy)[:, None, None]
    b = (c * s * (ix - iy))[:, None, None]
    d = (s * s * ix + c * c * iy)[:, None, None]
    xx, yy = _grid(pad_to)
    q = a * xx**2 + 2 * b * xx * yy + d * yy**2
    bt = beta.to(torch.float64)[:, None, None]
    family = (t // 2)[:, None, None]  # 0 Gaussian, 1 generalized, 2 plateau
    gauss = torch.exp(-0.5 * q)
    gener = torch.exp(-0.5 * q.pow(bt))
    plate = 1.0 / (q.pow(bt) + 1.0)
    k = torch.where(family == 0, gauss, torch.where(family == 1, gener, plate))
    return _normalise(k, _support_mask(sizes, pad_to))


def sinc_kernels(sizes: torch.Tensor, omega_c: torch.Tensor, pad_to: int = MAX_KERNEL_SIZE) -> torch.Tensor:
    """Circular low-pass (2-D "sinc", i.e. jinc) kernels with cut-off ``omega_c`` (radians, (0, π]).

    ``sizes``: (B,) odd ints in [1, pad_to]; ``omega_c``: (B,). Returns float64
    ``(B, pad_to, pad_to)`` summing to 1 (values may be negative: ringing lobes).
    """
    _check_sizes(sizes, pad_to)
    w = omega_c.to(torch.float64)[:, None, None]
    if bool((w <= 0).any()) or bool((w > math.pi + 1e-9).any()):
        raise ValueError(f"omega_c must be in (0, pi], got {omega_c.tolist()}")
    xx, yy = _grid(pad_to)
    r = torch.sqrt(xx**2 + yy**2)[None]
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    k = w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r > 0, k, w**2 / (4 * math.pi))  # limit of the expression at r = 0
    return _normalise(k, _support_mask(sizes, pad_to))


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _choice(u: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Index i with probability probs[i], from uniforms u in [0, 1)."""
    cum = torch.tensor(list(probs), dtype=torch.float64).cumsum(0)
    cum = cum / cum[-1]
    return torch.searchsorted(cum, u.contiguous(), right=True).clamp(max=len(probs) - 1)


def sample_blur_kernels(
    u: torch.Tensor,
    *,
    sizes: Sequence[int],
    type_probs: Sequence[float],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_prob: float,
    pad_to: int = MAX_KERNEL_SIZE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw one random blur kernel per row of ``u``.

    ``u``: float64 ``(B, 9)`` uniforms in [0, 1) (the caller draws them from its generator,
    so the kernels are a pure function of ``u``). With probability ``sinc_prob`` a sinc
    kernel is used (ωc ~ U[π/3, π] for size < 13, U[π/5, π] otherwise, as in Real-ESRGAN),
    else a ``KERNEL_TYPES`` kernel drawn with ``type_probs``. Returns the kernels, float64
    ``(B, pad_to, pad_to)`` each summing to 1, and a dict of the drawn parameters ((B,)
    tensors: ``sinc``, ``size``, ``type``, ``sigma_x``, ``sigma_y``, ``theta``, ``beta``,
    ``omega_c``) for logging.
    """
    if u.ndim != 2 or u.shape[1] != 9:
        raise ValueError(f"expected uniforms of shape (B, 9), got {tuple(u.shape)}")
    if len(type_probs) != len(KERNEL_TYPES):
        raise ValueError(f"expected {len(KERNEL_TYPES)} kernel type probabilities, got {list(type_probs)}")
    u = u.to(device="cpu", dtype=torch.float64)
    size_t = torch.tensor(list(sizes), dtype=torch.int64)
    size = size_t[(u[:, 1] * len(sizes)).long().clamp(max=len(sizes) - 1)]
    kind = _choice(u[:, 2], type_probs)
    sx = _uniform(u[:, 3], *sigma_range)
    sy = _uniform(u[:, 4], *sigma_range)
    theta = _uniform(u[:, 5], -math.pi, math.pi)
    low = u[:, 6] < 0.5
    family = kind // 2
    lo = torch.where(family == 2, torch.full_like(sx, betap_range[0]), torch.full_like(sx, betag_range[0]))
    hi = torch.where(family == 2, torch.full_like(sx, betap_range[1]), torch.full_like(sx, betag_range[1]))
    beta = torch.where(low, lo + (1 - lo) * u[:, 7], 1 + (hi - 1) * u[:, 7])
    is_sinc = u[:, 0] < sinc_prob
    omega = torch.where(size < 13, _uniform(u[:, 8], math.pi / 3, math.pi), _uniform(u[:, 8], math.pi / 5, math.pi))
    k = torch.where(
        is_sinc[:, None, None],
        sinc_kernels(size, omega, pad_to),
        mixed_kernels(kind, size, sx, sy, theta, beta, pad_to),
    )
    params = {"sinc": is_sinc, "size": size, "type": kind, "sigma_x": sx, "sigma_y": sy, "theta": theta,
              "beta": beta, "omega_c": omega}
    return k, params
