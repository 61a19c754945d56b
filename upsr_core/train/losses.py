"""Training objectives of UPSR: the residual forward process and the two losses.

Forward process (official ``GaussianDiffusion.q_sample``, ResShift eq. 4 with UPSR's
noise weight), everything in the PixelUnshuffled layout (B, 48, h, w), [-1, 1] space:

    x_t = x0 + η_t·(y − x0) + κ·√η_t · w ⊙ ε

x0 = PU(HR), y = PU(bicubic ×4 of the LR), w = PU(noise weight), t uniform in 0..T−1.
(η_T ≈ 0.98, so x_{T−1} ≈ y + κ√η_T w ε — the sampler's prior — up to (1 − η_T)(x0 − y).)
Note the direction: the mean moves *from x0 to y* as t grows; ``y + η_t (x0 − y)`` would
be the reverse and does not match the DDIM update of :mod:`upsr_core.sampler`.

The denoiser sees x_t / std_t (std_t = √(η_t κ² 0.3 + ¼), SPEC §8.5), lq = PU(cat[ŷ, y↑])
and t; it predicts the HR x0 (B, 3, 4h, 4w). Loss: mean squared error to the HR in [-1, 1]
(the official ``terms['mse']``; the config's L1 ``pixel_opt`` is never used), plus
``lpips_weight`` × LPIPS when an LPIPS network is available (see :class:`LPIPSHook`).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from ..pipeline import SCALE, bicubic_x4
from ..schedule import ResShiftSchedule
from ..uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, estimate_uncertainty, weight_noise

__all__ = [
    "q_sample",
    "scale_input",
    "DiffusionInputs",
    "make_inputs",
    "denoiser_loss",
    "estimator_loss",
    "LPIPSHook",
]

log = logging.getLogger(__name__)


def _coef(values: torch.Tensor, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """values[t] as float32 on ref's device, shaped (B, 1, 1, 1)."""
    return values.to(ref.device)[t].float().view(-1, *([1] * (ref.ndim - 1)))


def q_sample(
    x0: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: ResShiftSchedule
) -> torch.Tensor:
    """x_t = x0 + η_t (y − x0) + κ √η_t w ε; all (B, C, h, w) in the same layout, t int64 (B,)."""
    if not (x0.shape == y.shape == eps.shape):
        raise ValueError(f"x0 {tuple(x0.shape)}, y {tuple(y.shape)} and eps {tuple(eps.shape)} must match")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) >= schedule.num_steps:
        raise ValueError(f"t must be in 0..{schedule.num_steps - 1}, got {t.tolist()}")
    eta = _coef(schedule.etas, t, x0)
    noise_scale = _coef(schedule.sqrt_etas * schedule.kappa, t, x0)
    return x0 + eta * (y - x0) + noise_scale * w * eps


def scale_input(x_t: torch.Tensor, t: torch.Tensor, schedule: ResShiftSchedule) -> torch.Tensor:
    """x_t / std_t with std_t = √(η_t κ² 0.3 + ¼) in float32, as the sampler does."""
    return x_t / _coef(schedule.f32()["std"], t, x_t)


class DiffusionInputs:
    """One training batch in the denoiser's layout.

    ``x_in`` (B,48,h,w) scaled noisy state, ``t`` int64 (B,), ``lq`` (B,96,h,w),
    ``target`` HR (B,3,4h,4w) in [-1,1], ``weight`` w (B,3,4h,4w) in [b_u, 1].
    """

    def __init__(self, x_in, t, lq, target, weight):
        self.x_in, self.t, self.lq, self.target, self.weight = x_in, t, lq, target, weight


def make_inputs(
    hr: torch.Tensor,
    lr: torch.Tensor,
    estimator: Callable[[torch.Tensor], torch.Tensor],
    schedule: ResShiftSchedule,
    generator: torch.Generator | None = None,
    *,
    b_u: float = DEFAULT_B_U,
    psi_max: float = DEFAULT_PSI_MAX,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
) -> DiffusionInputs:
    """Build the denoiser inputs from an HR batch (B,3,H,W) and its LR (B,3,H/4,W/4), both [0,1].

    ``estimator`` maps LR [0,1] -> SR estimate [0,1]; it runs without gradients and in float32
    with autocast off, as at inference and in the official training (under the step's bf16
    autocast the demo estimator's output moved by up to 0.029 and w by up to 0.18). t and ε
    are drawn from ``generator`` unless given.
    """
    if hr.shape[-2:] != (lr.shape[-2] * SCALE, lr.shape[-1] * SCALE) or hr.shape[:2] != lr.shape[:2]:
        raise ValueError(f"hr {tuple(hr.shape)} must be ×{SCALE} of lr {tuple(lr.shape)}")
    b = hr.shape[0]
    lr_pm = (lr - 0.5) / 0.5
    y_bic = bicubic_x4(lr_pm)
    with torch.no_grad(), torch.autocast(lr.device.type, enabled=False):
        y_hat = (estimator(lr_pm.float() * 0.5 + 0.5).float() - 0.5) / 0.5  # SPEC §2 round trip
    w = weight_noise(estimate_uncertainty(y_hat * 0.5, y_bic * 0.5), b_u, psi_max)
    x0_pm = (hr - 0.5) / 0.5
    if t is None:
        t = torch.randint(0, schedule.num_steps, (b,), generator=generator, device=_gdev(generator, hr))
        t = t.to(hr.device)
    if eps is None:
        eps = torch.randn((b, 3 * SCALE * SCALE, *lr.shape[-2:]), generator=generator,
                          device=_gdev(generator, hr)).to(hr.device)
    pu = lambda z: F.pixel_unshuffle(z, SCALE)  # noqa: E731
    x_t = q_sample(pu(x0_pm), pu(y_bic), pu(w), eps, t, schedule)
    lq = pu(torch.cat([y_hat, y_bic], dim=1))
    return DiffusionInputs(scale_input(x_t, t, schedule), t, lq, x0_pm, w)


def _gdev(generator: torch.Generator | None, ref: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else ref.device


def denoiser_loss(
    pred: torch.Tensor, target: torch.Tensor, lpips: "LPIPSHook | None" = None, lpips_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE(pred, target) (+ lpips_weight · LPIPS); both (B,3,H,W) in [-1,1]. Returns (loss, logs)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    mse = F.mse_loss(pred.float(), target.float())
    logs = {"mse": float(mse.detach())}
    loss = mse
    if lpips is not None and lpips.available:
        # the official step: LPIPS of the clamped prediction, a NaN value counted as 0 (pyiqa's loss
        # is already the batch mean, so there a NaN anywhere zeroes the batch's term, as officially);
        # ±inf stays, for the loop's non-finite check
        lp = lpips(pred.float().clamp(-1.0, 1.0), target.float())
        lp = torch.where(torch.isnan(lp), torch.zeros_like(lp), lp)
        logs["lpips"] = float(lp.detach().mean())
        loss = loss + lpips_weight * lp.mean()
    return loss, logs


def estimator_loss(pred: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 between the estimate and the HR, both (B,3,H,W) in [0,1] units."""
    if pred.shape != hr.shape:
        raise ValueError(f"estimate {tuple(pred.shape)} and HR {tuple(hr.shape)} differ in shape")
    l1 = F.l1_loss(pred.float(), hr.float())
    return l1, {"l1": float(l1.detach())}


class LPIPSHook:
    """Optional LPIPS term (official weight 0.5). Off unless a network is supplied.

    LPIPS needs ImageNet-pretrained backbone weights (VGG) that cannot be fetched offline, so
    by default this hook is *off* and logs once why. To enable it, pass ``net``: any callable
    (pred, target) in [-1, 1], (B,3,H,W) -> per-image or scalar distance (the prediction comes
    clamped to [-1, 1]). :meth:`from_name` builds the two known ones.
    """

    def __init__(self, net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.net = net

    @property
    def available(self) -> bool:
        return self.net is not None

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image distances (B,) or a scalar; the caller takes the mean."""
        if self.net is None:
            raise RuntimeError("LPIPS is not available (no network given)")
        return self.net(pred, target).reshape(-1)

    @classmethod
    def from_name(cls, name: str | None, device: torch.device | str = "cpu") -> "LPIPSHook":
        """'off'/None: disabled.

        'pyiqa': the official loss exactly as UPSR's training step calls it:
        ``pyiqa.create_metric('lpips-vgg', as_loss=True)`` given the [-1, 1] tensors directly
        (that metric expects [0, 1] and maps them to [-1, 1] itself, so its VGG sees [-3, 1];
        kept, since the official weights were trained with it). 'lpips': the ``lpips``
        package's VGG LPIPS on [-1, 1], its own convention (the textbook distance).
        Missing packages or weights raise ValueError naming what is missing."""
        if name in (None, "off", "none"):
            return cls(None)
        try:
            if name == "lpips":
                import lpips  # type: ignore[import-not-found]

                net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)
                return cls(lambda a, b: net(a, b))
            if name == "pyiqa":
                import pyiqa  # type: ignore[import-not-found]

                m = pyiqa.create_metric("lpips-vgg", as_loss=True, device=device)
                return cls(lambda a, b: m(a, b))
        except (ImportError, OSError, RuntimeError) as e:
            raise ValueError(f"--lpips {name}: could not load the LPIPS network ({e}); "
                             "install the package and its weights, or use --lpips off") from None
        raise ValueError(f"--lpips must be off, lpips or pyiqa, got {name!r}")
