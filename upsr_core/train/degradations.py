"""Real-ESRGAN second-order degradation (x4) in pure torch: batched, any device, seeded.

``degrade(hr, generator)`` turns HR crops ``(B, 3, H, W)`` in [0, 1] into LR images
``(B, 3, H/scale, W/scale)`` on 8-bit levels in [0, 1], following the Real-ESRGAN / ResShift /
UPSR training recipe:

    first order : blur k1 → random resize → Gaussian|Poisson noise → JPEG
    second order: blur k2 (p = second_blur_prob) → resize to (H/scale)·s → noise
    final       : [resize to H/scale → sinc → JPEG] or [JPEG → resize → sinc] (p = ½ each)
    clamp, round to 8-bit levels

Randomness (each image sees Real-ESRGAN's probabilities; where the official loop draws once
per batch and this draws per image, noted below):

* per image: blur kernels k1, k2, whether k2 is applied and Gaussian-vs-Poisson noise (both
  drawn once per batch by the official ``feed_data``), the final sinc filter (applied with
  ``final_sinc_prob``), noise strength / gray-vs-colour, JPEG qualities; a gray Gaussian noise
  map (the official ``generate_gaussian_noise_pt`` draws one map for the batch, which every
  gray-noise image then gets, scaled by its own sigma);
* per batch (they change the tensor size, so one value serves the whole batch): the resize
  kind, factor and interpolation mode of each order, the final order and resize mode. The
  first order resizes to an explicit size, ⌊H·s⌋ × ⌊W·s⌋, the size the official call gets from
  ``scale_factor=s`` too; but that call's sampling grid uses 1/s instead of the in/out ratio (up
  to ~2 HR px apart at the far edge of a 256-px crop), so its LR is slightly stretched against its HR.

All draws come from ``generator`` in a fixed order, so the same generator state and input
give the same output. Scalars are drawn first on the generator's device and moved to the CPU
once; noise is drawn on the generator's device and moved to ``hr.device`` (pass a generator
on the same device as ``hr`` to avoid a copy). Results from CPU and CUDA generators differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .blur_kernels import KERNEL_TYPES, MAX_KERNEL_SIZE, sample_blur_kernels, sinc_kernels
from .jpeg import JPEG_MODELS, diffjpeg_compress, jpeg_compress

__all__ = ["DegradationStage", "RealESRGANDegradation", "KERNEL_SIZES", "bicubic_degrade", "degrade"]

RESIZE_MODES = ("area", "bilinear", "bicubic")
_N_BATCH_DRAWS = 8  # resize kind/factor/mode for two orders, final order and mode
_N_IMAGE_DRAWS = 32  # k1 (9), k2 (9) + applied, final sinc (3), 2 × noise (4), 2 JPEG qualities


def _check_range(name: str, r: tuple[float, float], lo: float, hi: float) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {r}")


def _check_probs(name: str, p: tuple[float, ...], n: int) -> None:
    if len(p) != n or any(v < 0 for v in p) or abs(sum(p) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1, got {p}")


@dataclass(frozen=True, kw_only=True)
class DegradationStage:
    """Ranges of one degradation order (names follow the Real-ESRGAN option file).

    ``kernel_sizes``: odd blur sizes drawn uniformly (UPSR/ResShift: ``range(3,
    blur_kernel_size, 2)``, 3..19 for the first order and 3..13 for the second, whose sizes
    the final sinc also draws from; Real-ESRGAN itself uses 7..21 for all three).
    ``resize_probs`` are (up, down, keep); ``resize_range`` bounds the factor (down draws from
    [lo, 1], up from [1, hi]). Noise sigma is in 8-bit units (/255 applied internally).
    """

    kernel_sizes: tuple[int, ...]
    sinc_prob: float
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float]
    resize_range: tuple[float, float]
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        bad = [k for k in self.kernel_sizes if not isinstance(k, int) or k % 2 == 0 or not 1 <= k <= MAX_KERNEL_SIZE]
        if not self.kernel_sizes or bad:
            raise ValueError(f"kernel_sizes must be odd ints in [1, {MAX_KERNEL_SIZE}], got {self.kernel_sizes}")
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check_range("blur_sigma", self.blur_sigma, 1e-3, 100.0)
        _check_range("betag_range", self.betag_range, 1e-3, 1.0e3)
        _check_range("betap_range", self.betap_range, 1e-3, 1.0e3)
        _check_probs("resize_probs", self.resize_probs, 3)
        _check_range("resize_range", self.resize_range, 1e-3, 1.0e3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1, got {self.resize_range}")
        _check_range("noise_range", self.noise_range, 0.0, 255.0)
        _check_range("poisson_scale_range", self.poisson_scale_range, 0.0, 100.0)
        _check_range("jpeg_range", self.jpeg_range, 1.0, 100.0)


# blur kernel sizes (first order; second order and final sinc) of the two recipes:
# UPSR/ResShift read blur_kernel_size 21 / blur_kernel_size2 15 as range(3, size, 2);
# Real-ESRGAN (x4plus, and shared/data/make_pairs.py, which made the A_val pairs) uses 7..21.
KERNEL_SIZES = {
    "upsr": (tuple(range(3, 21, 2)), tuple(range(3, 15, 2))),
    "realesrgan": (tuple(range(7, 23, 2)), tuple(range(7, 23, 2))),
}


def _first_stage() -> DegradationStage:
    return DegradationStage(
        kernel_sizes=KERNEL_SIZES["upsr"][0], sinc_prob=0.1, blur_sigma=(0.2, 3.0),
        resize_probs=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
        noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0),
    )


def _second_stage() -> DegradationStage:
    return DegradationStage(
        kernel_sizes=KERNEL_SIZES["upsr"][1], sinc_prob=0.1, blur_sigma=(0.2, 1.5),
        resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5),
    )


@dataclass(frozen=True, kw_only=True)
class RealESRGANDegradation:
    """Real-ESRGAN x4 degradation settings (defaults = UPSR's ``000_UPSR_RealSR_x4.yml``,
    which ResShift shares).

    ``first``/``second``: the two orders (YAML keys without / with the ``2`` suffix); the final
    sinc draws its size from ``second.kernel_sizes``. ``kernel_probs``: probabilities of
    ``KERNEL_TYPES``; ``final_sinc_omega``: cut-off range (radians) of the final sinc.
    ``jpeg``: ``"libjpeg"`` (the artefacts of real JPEG files; default) or ``"diffjpeg"`` (the
    official training's DiffJPEG model, see :func:`.jpeg.diffjpeg_compress`; ``train --jpeg
    diffjpeg`` for parity with the official training, which the default is not).
    """

    first: DegradationStage = field(default_factory=_first_stage)
    second: DegradationStage = field(default_factory=_second_stage)
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_sinc_omega: tuple[float, float] = (math.pi / 3, math.pi)
    jpeg: str = "libjpeg"

    def __post_init__(self) -> None:
        _check_probs("kernel_probs", self.kernel_probs, len(KERNEL_TYPES))
        for name in ("second_blur_prob", "final_sinc_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _check_range("final_sinc_omega", self.final_sinc_omega, 1e-6, math.pi)
        if self.jpeg not in JPEG_MODELS:
            raise ValueError(f"jpeg must be one of {JPEG_MODELS}, got {self.jpeg!r}")

    @classmethod
    def recipe(cls, kernels: str = "upsr", jpeg: str = "libjpeg") -> "RealESRGANDegradation":
        """The official ranges with the blur kernel sizes of ``kernels`` (a key of
        ``KERNEL_SIZES``: 'upsr', the official training's, or 'realesrgan', Real-ESRGAN x4plus's,
        the same as the A_val pairs) and the JPEG model ``jpeg``."""
        if kernels not in KERNEL_SIZES:
            raise ValueError(f"kernels must be one of {sorted(KERNEL_SIZES)}, got {kernels!r}")
        k1, k2 = KERNEL_SIZES[kernels]
        return cls(first=replace(_first_stage(), kernel_sizes=k1), second=replace(_second_stage(), kernel_sizes=k2),
                   jpeg=jpeg)


# ----------------------------------------------------------------------------- elementary ops
def _filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-image 2-D filtering: x (B, C, H, W), kernels (B, k, k) → (B, C, H, W).

    Reflect padding as Real-ESRGAN, by the largest kernel's own radius (kernels come zero-padded
    to one size: CPU kernels are trimmed to the rings that hold a weight, so a small image is
    reflected as the official code reflects it); images not larger than that radius use
    replicate padding (the official code would fail on them).
    """
    b, c, h, w = x.shape
    if kernels.device.type == "cpu":  # (on a GPU, finding the rings would be a host sync)
        k = kernels.shape[-1]
        used = kernels.abs().amax(0) > 0
        rows, cols = used.any(1).nonzero().flatten(), used.any(0).nonzero().flatten()
        if rows.numel():
            r = int(max((rows - k // 2).abs().max(), (cols - k // 2).abs().max()))
            kernels = kernels[:, k // 2 - r:k // 2 + r + 1, k // 2 - r:k // 2 + r + 1]
    p = kernels.shape[-1] // 2
    mode = "reflect" if min(h, w) > p else "replicate"
    xp = F.pad(x.reshape(1, b * c, h, w), (p, p, p, p), mode=mode)
    weight = kernels.to(device=x.device, dtype=x.dtype).repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(xp, weight, groups=b * c).reshape(b, c, h, w)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _resize_factor(u_kind: float, u_factor: float, stage: DegradationStage) -> float:
    up, down, _ = stage.resize_probs
    lo, hi = stage.resize_range
    if u_kind < up:
        return 1.0 + (hi - 1.0) * u_factor
    if u_kind < up + down:
        return lo + (1.0 - lo) * u_factor
    return 1.0


def _pick(u: float, options: tuple[str, ...]) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def poisson_luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) gray of (B, 3, H, W) RGB for gray Poisson noise, as the official code takes it
    (torchvision's ``rgb_to_grayscale``: 0.2989 R + 0.587 G + 0.114 B)."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _add_noise(
    x: torch.Tensor, u: torch.Tensor, stage: DegradationStage, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian or Poisson noise per image, colour or gray, then clip to [0, 1].

    ``u``: (B, 4) uniforms (type, gray, sigma, poisson scale). Both noise kinds are
    drawn for the whole batch (fixed draw order) and selected per image.
    """
    b = x.shape[0]
    gd = generator.device
    u = u.to(x.device, x.dtype)
    use_gauss = (u[:, 0] < stage.gaussian_noise_prob)[:, None, None, None]
    gray = (u[:, 1] < stage.gray_noise_prob)[:, None, None, None]
    sigma = (stage.noise_range[0] + (stage.noise_range[1] - stage.noise_range[0]) * u[:, 2]) / 255.0
    scale = stage.poisson_scale_range[0] + (stage.poisson_scale_range[1] - stage.poisson_scale_range[0]) * u[:, 3]

    gauss = torch.randn(x.shape, generator=generator, device=gd, dtype=torch.float32).to(x)
    gauss = torch.where(gray, gauss[:, :1].expand_as(gauss), gauss) * sigma[:, None, None, None]

    # Poisson noise on the 8-bit image; photon count = 2^ceil(log2(#distinct levels)) per image
    luma = poisson_luma(x).expand_as(x)
    src = torch.where(gray, luma, x)
    levels = torch.round(src.clamp(0, 1) * 255.0)
    seen = torch.zeros(b, 256, dtype=torch.bool, device=x.device)
    seen.scatter_(1, levels.reshape(b, -1).long(), True)
    vals = torch.exp2(torch.ceil(torch.log2(seen.sum(1).to(x.dtype))))[:, None, None, None]
    img8 = levels / 255.0
    counts = torch.poisson((img8 * vals).to(device=gd, dtype=torch.float32), generator=generator).to(x)
    pois = (counts / vals - img8) * scale[:, None, None, None]
    pois = torch.where(gray, pois[:, :1].expand_as(pois), pois)

    return (x + torch.where(use_gauss, gauss, pois)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- pipeline
def _check_input(hr: torch.Tensor, scale: int) -> None:
    if not isinstance(hr, torch.Tensor) or not hr.is_floating_point():
        raise TypeError(f"expected a floating-point torch.Tensor, got {type(hr).__name__} {getattr(hr, 'dtype', '')}")
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(hr.shape)}")
    if scale < 1 or hr.shape[2] % scale or hr.shape[3] % scale:
        raise ValueError(f"H and W must be multiples of scale={scale}, got {tuple(hr.shape[2:])}")


@dataclass(frozen=True)
class _Plan:
    """Everything drawn up front for one batch (kernels float64 (B, 21, 21) on the CPU)."""

    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor
    noise1: torch.Tensor  # (B, 4) uniforms for _add_noise
    noise2: torch.Tensor
    q1: torch.Tensor  # (B,) JPEG qualities
    q2: torch.Tensor
    resize1: tuple[float, str]  # factor relative to the current size, mode
    resize2: tuple[float, str]  # factor relative to H/scale, mode
    resize_then_jpeg: bool
    final_mode: str


def _draw_plan(b: int, generator: torch.Generator, cfg: RealESRGANDegradation) -> _Plan:
    """Draw all scalar parameters of a batch of ``b`` images (one host transfer)."""
    gd = generator.device
    ub = torch.rand(_N_BATCH_DRAWS, generator=generator, device=gd, dtype=torch.float64).tolist()
    ui = torch.rand(b, _N_IMAGE_DRAWS, generator=generator, device=gd, dtype=torch.float64).cpu()
    s1, s2 = cfg.first, cfg.second

    def kernels(cols: torch.Tensor, stage: DegradationStage) -> torch.Tensor:
        return sample_blur_kernels(
            cols, sizes=stage.kernel_sizes, type_probs=cfg.kernel_probs, sigma_range=stage.blur_sigma,
            betag_range=stage.betag_range, betap_range=stage.betap_range, sinc_prob=stage.sinc_prob,
        )[0]

    def applied(u: torch.Tensor, p: float, k: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(k[:1])
        delta[0, MAX_KERNEL_SIZE // 2, MAX_KERNEL_SIZE // 2] = 1.0
        return torch.where((u < p)[:, None, None], k, delta)

    n = len(s2.kernel_sizes)
    size3 = torch.tensor(s2.kernel_sizes)[(ui[:, 19] * n).long().clamp(max=n - 1)]
    lo, hi = cfg.final_sinc_omega
    return _Plan(
        k1=kernels(ui[:, 0:9], s1),
        k2=applied(ui[:, 18], cfg.second_blur_prob, kernels(ui[:, 9:18], s2)),
        k3=applied(ui[:, 20], cfg.final_sinc_prob, sinc_kernels(size3, lo + (hi - lo) * ui[:, 21])),
        noise1=ui[:, 22:26],
        noise2=ui[:, 26:30],
        q1=s1.jpeg_range[0] + (s1.jpeg_range[1] - s1.jpeg_range[0]) * ui[:, 30],
        q2=s2.jpeg_range[0] + (s2.jpeg_range[1] - s2.jpeg_range[0]) * ui[:, 31],
        resize1=(_resize_factor(ub[0], ub[1], s1), _pick(ub[2], RESIZE_MODES)),
        resize2=(_resize_factor(ub[3], ub[4], s2), _pick(ub[5], RESIZE_MODES)),
        resize_then_jpeg=ub[6] < 0.5,
        final_mode=_pick(ub[7], RESIZE_MODES),
    )


def degrade(
    hr: torch.Tensor,
    generator: torch.Generator,
    scale: int = 4,
    config: RealESRGANDegradation | None = None,
) -> torch.Tensor:
    """Real-ESRGAN second-order degradation of a batch of HR images.

    ``hr``: float ``(B, 3, H, W)`` in [0, 1], H and W multiples of ``scale``.
    ``generator``: the only source of randomness (any device).
    ``config``: ranges; ``None`` means ``RealESRGANDegradation()`` (the x4 training defaults).
    Returns float ``(B, 3, H/scale, W/scale)`` in [0, 1] on 8-bit levels (k/255), same dtype and
    device as ``hr``. Runs in float32 with autocast off even inside an autocast region (bf16
    convolutions and DCTs moved the LR by 11 levels on average).
    """
    cfg = RealESRGANDegradation() if config is None else config
    _check_input(hr, scale)
    with torch.autocast(hr.device.type, enabled=False):
        return _degrade(hr, generator, scale, cfg)


def _degrade(hr: torch.Tensor, generator: torch.Generator, scale: int, cfg: RealESRGANDegradation) -> torch.Tensor:
    _, _, h, w = hr.shape
    jpeg = diffjpeg_compress if cfg.jpeg == "diffjpeg" else jpeg_compress
    plan = _draw_plan(hr.shape[0], generator, cfg)
    # first order (computed in float32 whatever the input dtype: 8-bit levels must stay exact)
    x = _filter(hr.float(), plan.k1)
    f, mode = plan.resize1
    x = _resize(x, (int(h * f), int(w * f)), mode)
    x = _add_noise(x, plan.noise1, cfg.first, generator)
    x = jpeg(x, plan.q1.to(x.device))
    # second order (size relative to the LR size, as Real-ESRGAN)
    x = _filter(x, plan.k2)
    f, mode = plan.resize2
    x = _resize(x, (int(h / scale * f), int(w / scale * f)), mode)
    x = _add_noise(x, plan.noise2, cfg.second, generator)
    # final: [resize back + sinc] and JPEG, in random order
    lr_size = (h // scale, w // scale)
    if plan.resize_then_jpeg:
        x = _filter(_resize(x, lr_size, plan.final_mode), plan.k3)
        x = jpeg(x, plan.q2.to(x.device))
    else:
        x = jpeg(x, plan.q2.to(x.device))
        x = _filter(_resize(x, lr_size, plan.final_mode), plan.k3)
    return (torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0).to(hr.dtype)


def bicubic_degrade(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Plain bicubic downscale (antialiased, Keys a = -0.5 like Pillow/MATLAB), clamped.

    ``hr``: float ``(B, 3, H, W)`` in [0, 1], H and W multiples of ``scale``.
    Returns ``(B, 3, H/scale, W/scale)`` in [0, 1] (not quantised).
    """
    _check_input(hr, scale)
    size = (hr.shape[2] // scale, hr.shape[3] // scale)
    return F.interpolate(hr, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
