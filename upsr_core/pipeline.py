"""UPSR inference as stages (SPEC §2), each runnable, inspectable and replaceable alone.

    lr (B,3,h,w) [0,1]
      │ pad_lr            reflect-pad right/bottom to a multiple of 64, [-1,1] space
      │ bicubic_x4        y↑ = bicubic ×4 of the padded LR (no antialias, no clamp)
      │ run_estimator     ŷ = g(y) (ATD), [-1,1] space, not clamped
      ├─> Estimate        the three padded tensors + the crop size
      │ estimate.uncertainty     ψ = ½|ŷ − y↑| in [0,1] units   (uncertainty.py)
      │ weight_noise             w = b_u + (1−b_u)·min(ψ/ψ_max, 1)
      │ starting_noise    ε, one generator per image: seed + i (or seed for all: same_noise)
      │ denoise_estimate  x_T = y↑ + κ√η_T·w⊙ε, 5 DDIM steps, crop, clamp → sr [0,1]
      └─> sr (B,3,4h,4w) [0,1]

Tensors between stages keep the padded size (4·Hp, 4·Wp); ``crop_hr`` gives the visible
part. The official code crashes for LR sides <= 32 that need padding (SPEC §8.1); here
the reflection is repeated until the size is reached, which equals the official
padding wherever that one works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import check_device, is_int
from .sampler import StepCallback, prior_sample, sample
from .schedule import ResShiftSchedule, make_schedule
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, estimate_uncertainty, weight_noise

__all__ = [
    "Estimate",
    "pad_lr",
    "padded_size",
    "reflect_pad",
    "bicubic_x4",
    "run_estimator",
    "estimate",
    "starting_noise",
    "generator_seed",
    "NoiseField",
    "denoise_estimate",
    "crop_hr",
    "check_lr",
    "check_estimate",
    "check_estimator_output",
    "check_noise_choice",
    "clamp_overshoot",
    "SCALE",
]

SCALE = 4


LR_RANGE_SLACK = 0.05
"""How far outside [0, 1] an LR value may lie: resizing upstream (bicubic, Lanczos) overshoots
a little and the nets take that as it is; [0, 255] or [-1, 1] images are far outside."""


def check_unit_range(x: torch.Tensor, what: str) -> None:
    """Raise TypeError unless ``x`` is a float tensor, ValueError unless its values are finite and
    in [0, 1] (± LR_RANGE_SLACK); ``what`` names it in the message. One pass over the data."""
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a float image in [0, 1], got dtype {x.dtype} (divide 8-bit values by 255)")
    if not x.numel():
        return
    lo, hi = (v.item() for v in torch.aminmax(x.detach()))  # NaN and ±Inf reach lo or hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} contains NaN or Inf values")
    if lo < -LR_RANGE_SLACK or hi > 1 + LR_RANGE_SLACK:
        hint = ("a bicubic or Lanczos resize overshoots: clamp to [0, 1]" if _overshoot(lo, hi)
                else "divide 8-bit values by 255; map [-1, 1] with x * 0.5 + 0.5")
        raise ValueError(f"{what} must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}] ({hint})")


RESIZE_OVERSHOOT = 0.5
"""How far outside [0, 1] :func:`clamp_overshoot` takes values for a resize's overshoot (bicubic
or Lanczos ringing at sharp edges reaches ~0.2 on line art); [0, 255] and [-1, 1] images lie
further out."""


def _overshoot(lo: float, hi: float) -> bool:
    return -RESIZE_OVERSHOOT <= lo and hi <= 1 + RESIZE_OVERSHOOT


def clamp_overshoot(x: torch.Tensor, what: str) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """A float image whose values should lie in [0, 1] -> (the image in [0, 1], the (min, max) it
    had if it was clamped, else None). Values up to RESIZE_OVERSHOOT outside [0, 1] are a
    resize's overshoot, which image tools clamp (ComfyUI's own upscale nodes do): clamped here,
    and the caller says so. Anything further out, NaN or Inf, raises as :func:`check_unit_range`;
    ``what`` names the image. One pass over the data when nothing needs clamping."""
    if not x.is_floating_point() or not x.numel():
        check_unit_range(x, what)
        return x, None
    lo, hi = (v.item() for v in torch.aminmax(x.detach()))
    if 0.0 <= lo and hi <= 1.0:
        return x, None
    if not (math.isfinite(lo) and math.isfinite(hi) and _overshoot(lo, hi)):
        check_unit_range(x, what)  # raises: NaN/Inf, or too far out for an overshoot
    return x.clamp(0.0, 1.0), (lo, hi)


def check_lr(lr: torch.Tensor) -> None:
    """Raise ValueError unless lr is a finite float (B, 3, h, w) tensor with B, h, w >= 1 and
    values in [0, 1] (± LR_RANGE_SLACK)."""
    if not isinstance(lr, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(lr).__name__}")
    if lr.ndim != 4 or lr.shape[1] != 3:
        raise ValueError(f"expected an LR image (B, 3, h, w), got {tuple(lr.shape)}"
                         + (" (RGB only: drop an alpha channel, repeat a gray one)" if lr.ndim == 4 else ""))
    if lr.shape[0] == 0 or lr.shape[2] == 0 or lr.shape[3] == 0:
        raise ValueError(f"expected a non-empty LR image (B, 3, h, w), got {tuple(lr.shape)}")
    check_unit_range(lr, "the LR image")


def check_weight_and_noise(weight: torch.Tensor | None, noise: torch.Tensor | None, batch: int,
                           padded_lr: tuple[int, int], *, values: bool = True) -> None:
    """Raise ValueError/TypeError unless ``weight`` is a float (1|B, 1|3, 4Hp, 4Wp) tensor and
    ``noise`` a float (B, 48, Hp, Wp) one (either None: not checked) for ``batch`` images of padded LR size
    ``padded_lr`` = (Hp, Wp). ``values``: also check that w is finite in [0, 1] and ε finite
    (reads the values: a host sync on a GPU)."""
    hp, wp = padded_lr
    for name, x in (("weight", weight), ("noise", noise)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x is not None and not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    if weight is not None and (weight.ndim != 4 or weight.shape[0] not in (1, batch) or weight.shape[1] not in (1, 3)
                               or tuple(weight.shape[-2:]) != (SCALE * hp, SCALE * wp)):
        first = "1" if batch == 1 else f"1 or {batch}"
        raise ValueError(f"noise weight has shape {tuple(weight.shape)}; expected ({first}, 1 or 3, "
                         f"{SCALE * hp}, {SCALE * wp}): the padded HR size of the estimate")
    if noise is not None and tuple(noise.shape) != (batch, 3 * SCALE * SCALE, hp, wp):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected ({batch}, {3 * SCALE * SCALE}, {hp}, {wp}) "
                         "(starting_noise of the padded LR size)")
    if values and weight is not None:
        lo, hi = torch.aminmax(weight.detach().float())
        if not (0.0 <= lo.item() and hi.item() <= 1.0):  # also refuses NaN
            raise ValueError(f"noise weight must be in [0, 1], got [{lo.item():.4g}, {hi.item():.4g}]")
    if values and noise is not None and not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf values")


def reflect_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad (excluding the edge pixel) right and bottom; repeats the reflection
    when the pad exceeds the size − 1 (sizes of 1 are replicated)."""
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        ph, pw = min(pad_h, max(h - 1, 0)), min(pad_w, max(w - 1, 0))
        if (h == 1 and pad_h) or (w == 1 and pad_w):
            x = F.pad(x, (0, pad_w if w == 1 else 0, 0, pad_h if h == 1 else 0), mode="replicate")
            pad_h, pad_w = (0 if h == 1 else pad_h), (0 if w == 1 else pad_w)
            continue
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        pad_h, pad_w = pad_h - ph, pad_w - pw
    return x


def padded_size(h: int, w: int, multiple: int = 64) -> tuple[int, int]:
    """(Hp, Wp): the LR size (h, w) rounded up to multiples of ``multiple``, as :func:`pad_lr` pads it."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def check_noise_choice(noise: torch.Tensor | None, same_noise: bool) -> None:
    """ValueError for ``same_noise`` with a given ``noise``: it chooses how ε is made from the seed,
    and a given ε is used as it is (the option would be dropped without a word)."""
    if noise is not None and same_noise:
        raise ValueError("same_noise=True chooses how the noise is made from the seed; with a given noise "
                         "it has no effect: leave it out, or pass noise=None")


def pad_lr(lr: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """lr (B,3,h,w) in [0,1] -> padded LR (B,3,Hp,Wp) in [-1,1], Hp, Wp multiples of ``multiple``.
    Shape and dtype are checked, the values are not (reading them would sync a GPU): the
    entry points (:func:`estimate`, :meth:`UPSRModel.upscale`) check the range first."""
    if not is_int(multiple) or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
    _check_image_tensor(lr, "lr", "(B, 3, h, w) in [0, 1]")
    if lr.shape[1] != 3:
        raise ValueError(f"lr must be (B, 3, h, w) in [0, 1], got shape {tuple(lr.shape)} (RGB only: drop an alpha "
                         "channel, repeat a gray one)")
    if not lr.numel():
        raise ValueError(f"lr must be a non-empty (B, 3, h, w) image, got shape {tuple(lr.shape)}")
    y0 = (lr.contiguous() - 0.5) / 0.5  # a channels-last input would pick other conv kernels downstream
    h, w = y0.shape[-2:]
    return reflect_pad(y0, (-h) % multiple, (-w) % multiple)


def _check_image_tensor(x: object, name: str, want: str) -> None:
    """TypeError unless ``x`` is a float tensor, ValueError unless 4-D (shapes and dtype only:
    no values read, so no device sync)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {want}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor {want}, got dtype {x.dtype} (divide 8-bit values by 255)")
    if x.ndim != 4:
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")


def bicubic_x4(lr_pm: torch.Tensor) -> torch.Tensor:
    """Bicubic ×4 (A = −0.75, align_corners=False, no antialias, no clamp) of a float
    (B, C, h, w) tensor in any range -> (B, C, 4h, 4w)."""
    _check_image_tensor(lr_pm, "lr_pm", "(B, C, h, w)")
    return F.interpolate(lr_pm, scale_factor=SCALE, mode="bicubic", align_corners=False)


def run_estimator(
    estimator: Callable[[torch.Tensor], torch.Tensor], lr_pm: torch.Tensor
) -> torch.Tensor:
    """ŷ = g(y) in [-1,1] space: the estimator takes [0,1] input (SPEC §2 round trips kept).
    lr_pm (B,3,Hp,Wp) in [-1,1] -> (B,3,4Hp,4Wp) in [-1,1] units (unclamped)."""
    return (estimator(lr_pm * 0.5 + 0.5) - 0.5) / 0.5


def check_estimator_output(y: object, want: tuple[int, ...], name: str = "the estimator") -> torch.Tensor:
    """``y``, what another ×4 model g (not this package's ATD) returned for a [0,1] input, if it is a
    float tensor of shape ``want`` (B, 3, 4h, 4w) with finite values in [0, 1] (± RESIZE_OVERSHOOT:
    a network's ringing at sharp edges); else TypeError/ValueError naming ``name``. A model that
    returns [0, 255] or [-1, 1] would otherwise pass as an estimate with ψ up to 127 (every w 1).
    Reads the values (a host sync on a GPU; once per image, outside the sampling loop)."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        got = f"a {y.dtype} tensor" if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"{name} must return a float tensor {want} in [0, 1], got {got}")
    if tuple(y.shape) != tuple(want):
        raise ValueError(f"{name} must upscale ×{SCALE} to {tuple(want)}, got {tuple(y.shape)}")
    lo, hi = (v.item() for v in torch.aminmax(y.detach()))  # NaN and ±Inf reach lo or hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} returned NaN or Inf values")
    if not _overshoot(lo, hi):
        raise ValueError(f"{name} must return values in [0, 1] (± {RESIZE_OVERSHOOT} of overshoot), got "
                         f"[{lo:.4g}, {hi:.4g}] (a model returning 0..255 or [-1, 1] needs rescaling)")
    return y


@dataclass
class Estimate:
    """Output of the estimation stage; all HR tensors at the padded size (B,3,4Hp,4Wp).

    ``lr_pm``: padded LR in [-1,1]; ``bicubic_pm``/``sr_estimate_pm``: y↑ and ŷ in [-1,1];
    ``size``: the LR (h, w) before padding.
    """

    lr_pm: torch.Tensor
    bicubic_pm: torch.Tensor
    sr_estimate_pm: torch.Tensor
    size: tuple[int, int]

    @property
    def sr_estimate(self) -> torch.Tensor:
        """ŷ in [0,1] units (unclamped), padded size."""
        return self.sr_estimate_pm * 0.5 + 0.5

    def uncertainty(self) -> torch.Tensor:
        """ψ = ½|ŷ − y↑| in [0,1] units, padded size (B,3,4Hp,4Wp).

        Computed as ``estimate_uncertainty(ŷ_pm/2, y↑_pm/2)``: halving is exact, so the
        noise weight matches the official pm-space expression bit for bit.
        """
        return estimate_uncertainty(self.sr_estimate_pm * 0.5, self.bicubic_pm * 0.5)

    def to(self, device: torch.device | str) -> "Estimate":
        """The same estimate with its three maps on ``device`` (``size`` kept)."""
        return Estimate(self.lr_pm.to(device), self.bicubic_pm.to(device), self.sr_estimate_pm.to(device), self.size)


def check_estimate(est: object) -> None:
    """TypeError unless ``est`` is an :class:`Estimate` (what the diffusion stage starts from);
    ValueError unless its maps fit together: ``lr_pm`` (B,3,Hp,Wp), ``bicubic_pm`` and
    ``sr_estimate_pm`` (B,3,4Hp,4Wp), ``size`` (h, w) with 1 <= h <= Hp, 1 <= w <= Wp. Shapes only
    (no values: reading them would sync a GPU)."""
    if not isinstance(est, Estimate):
        raise TypeError(f"est must be an Estimate (from estimate() or UPSRModel.estimate), got {type(est).__name__}")
    maps = {"lr_pm": est.lr_pm, "bicubic_pm": est.bicubic_pm, "sr_estimate_pm": est.sr_estimate_pm}
    for name, t in maps.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"Estimate.{name} must be a (B, 3, H, W) tensor, got {got}")
    b, _, hp, wp = est.lr_pm.shape
    want = (b, 3, SCALE * hp, SCALE * wp)
    for name in ("bicubic_pm", "sr_estimate_pm"):
        if tuple(maps[name].shape) != want:
            raise ValueError(f"Estimate.{name} must be {want}: ×{SCALE} of lr_pm {tuple(est.lr_pm.shape)}, "
                             f"got {tuple(maps[name].shape)}")
    size = est.size
    if not (isinstance(size, (tuple, list, torch.Size)) and len(size) == 2 and all(map(is_int, size))
            and 1 <= size[0] <= hp and 1 <= size[1] <= wp):
        raise ValueError(f"Estimate.size must be the LR (h, w) before padding, within lr_pm's {hp}x{wp}, got {size!r}")


def estimate(
    estimator: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor, multiple: int = 64
) -> Estimate:
    """Pad, bicubic and g(y) for lr (B,3,h,w) in [0,1]. Returns an :class:`Estimate`.

    ``estimator`` takes the padded LR (B,3,Hp,Wp) in [0,1] and returns its ×4 (B,3,4Hp,4Wp) in
    [0,1]: checked by :func:`check_estimator_output`."""
    check_lr(lr)
    lr_pm = pad_lr(lr, multiple)
    want = (lr_pm.shape[0], 3, SCALE * lr_pm.shape[-2], SCALE * lr_pm.shape[-1])
    y_hat = run_estimator(lambda x: check_estimator_output(estimator(x), want), lr_pm)
    return Estimate(lr_pm, bicubic_x4(lr_pm), y_hat, tuple(lr.shape[-2:]))


def _check_seed(seed: object, batch: int) -> int:
    """The seed as an int: TypeError unless an integer (not bool), ValueError unless in
    [0, 2**63 - batch]."""
    if not is_int(seed):
        raise TypeError(f"seed must be an integer in [0, 2**63 - batch], got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= 2**63 - batch:
        raise ValueError(f"seed must be an integer in [0, 2**63 - batch], got {seed!r}")
    return int(seed)


def check_seed(seed: object, batch: int, *, same_noise: bool = False) -> int:
    """The seed of ``batch`` images (one with ``same_noise``) as an int, checked as
    :func:`starting_noise` checks it: for a caller that draws the batch's noise in parts."""
    return _check_seed(seed, 1 if same_noise else batch)


def generator_seed(seed: int) -> int:
    """A seed in [0, 2**64) as the seed in [0, 2**32) that draws the same noise: the CPU generator
    (Mersenne Twister) keeps only the low 32 bits of a seed, so ``seed % 2**32`` gives the same ε,
    also for image i of a batch (``seed + i``). For callers whose seeds span 64 bits (ComfyUI's
    seed widgets and seed nodes); :func:`starting_noise` takes up to 2**63 − batch.
    TypeError unless an integer (not bool), ValueError outside [0, 2**64)."""
    if not is_int(seed):
        raise TypeError(f"seed must be an integer in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed) % 2**32


def _check_batch_hw(batch: int, lr_hw: tuple[int, int]) -> None:
    if not is_int(batch) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if (not isinstance(lr_hw, (tuple, list, torch.Size)) or len(lr_hw) != 2
            or not all(is_int(v) and v >= 1 for v in lr_hw)):
        raise ValueError(f"lr_hw must be two integers >= 1 (the padded LR height and width), got {lr_hw!r}")


def starting_noise(
    seed: int, batch: int, lr_hw: tuple[int, int], device: torch.device | str = "cpu", *, same_noise: bool = False
) -> torch.Tensor:
    """ε (B, 48, Hp, Wp) float32: image i from ``torch.Generator('cpu').manual_seed(seed + i)``.

    ``same_noise``: every image gets the noise of ``seed`` (image 0's) instead — for video
    frames, whose static regions then come out the same in every frame (the CLI's per-file
    contract applied to a batch).

    Drawn on the CPU so results do not depend on the device or the batch size. The CPU
    generator (Mersenne Twister) keeps only the low 32 bits of a seed, so seeds equal
    modulo 2**32 give the same noise. Any integer type is accepted (NumPy's too), not bool.
    """
    _check_batch_hw(batch, lr_hw)
    seed = _check_seed(seed, 1 if same_noise else batch)
    device = check_device(device)  # torch's error for a missing CUDA is a bare AssertionError, after the draw
    hp, wp = lr_hw
    shape = (1, 3 * SCALE * SCALE, hp, wp)
    if same_noise:
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
                           ).repeat(batch, 1, 1, 1).to(device)
    # float32 whatever torch's default dtype: the generator's numbers depend on the dtype drawn
    eps = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i), dtype=torch.float32)
           for i in range(batch)]
    return torch.cat(eps).to(device)


class NoiseField:
    """ε of the seed contract, made one band of rows at a time (memory: one channel plane).

    Indexing ``field[i, :, ys, xs]`` returns exactly
    ``starting_noise(seed, B, (Hp, Wp), same_noise=same_noise)[i, :, ys, xs]``:
    the CPU generator draws a (1, 48, Hp, Wp) tensor as uniform numbers turned into normal
    ones 16 at a time, so drawing it in consecutive parts whose sizes are multiples of 16
    gives the same numbers (always true here: Wp is a multiple of the network's 64, and rows
    are drawn whole). A band is made when the requested rows change, i.e. once per tile row.
    The first band of an image draws that image's whole stream once, keeping the generator's
    state where each block of :attr:`rows_per_state` rows of each plane starts (at most 64
    per plane, 5 KB each); later bands restart from the block their first row is in, so a
    tall image costs about two draws of its field, not one per tile row (an LR of 4096² at
    tile 512: 9 full draws of 805 M numbers before, ~3 s each on one core).
    """

    def __init__(self, seed: int, batch: int, lr_hw: tuple[int, int], *, same_noise: bool = False):
        _check_batch_hw(batch, lr_hw)
        seed = _check_seed(seed, 1 if same_noise else batch)
        hp, wp = lr_hw
        if (hp * wp) % 16:
            raise ValueError(f"NoiseField needs Hp·Wp divisible by 16, got {hp}x{wp}")
        self.seed, self.shape, self.same_noise = seed, (batch, 3 * SCALE * SCALE, hp, wp), same_noise
        # rows per kept state: parts of whole rows are multiples of 16 values only if Wp is
        self.rows_per_state = max(16, -(-hp // 64)) if wp % 16 == 0 else hp
        self._key: tuple | None = None
        self._band: torch.Tensor | None = None
        self._states: list[torch.Tensor] = []  # image _states_of's, plane by plane, block by block
        self._states_of: int | None = None

    def __getitem__(self, idx: tuple) -> torch.Tensor:
        i, ch, ys, xs = idx
        if not (isinstance(i, int) and ch == slice(None) and isinstance(ys, slice) and isinstance(xs, slice)):
            raise TypeError(f"NoiseField supports field[i, :, rows, cols] only, got {idx!r}")
        _, c, hp, wp = self.shape
        y0, y1, _ = ys.indices(hp)
        j = 0 if self.same_noise else i  # whose noise image i gets
        if self._key != (j, y0, y1):
            self._band = self._draw(j, y0, max(y0, y1))
            self._key = (j, y0, y1)
        return self._band[:, :, xs]

    def _draw(self, j: int, y0: int, y1: int) -> torch.Tensor:
        """Rows [y0, y1) of image j's 48 planes, (48, y1 - y0, Wp) float32."""
        _, c, hp, wp = self.shape
        rows = self.rows_per_state
        band = torch.empty(c, y1 - y0, wp, dtype=torch.float32)  # as starting_noise: whatever the default dtype
        if self._states_of != j:  # the whole stream once, keeping each block's starting state
            g = torch.Generator("cpu").manual_seed(self.seed + j)
            block = torch.empty(rows, wp, dtype=torch.float32)
            states = []
            for k in range(c):
                for r in range(0, hp, rows):
                    states.append(g.get_state())
                    n = min(rows, hp - r)
                    torch.randn(n, wp, generator=g, out=block[:n])
                    a, e = max(r, y0), min(r + n, y1)
                    if a < e:
                        band[k, a - y0 : e - y0] = block[a - r : e - r]
            self._states, self._states_of = states, j
            return band
        per_plane = -(-hp // rows)
        r0 = y0 // rows * rows
        end = y1 if wp % 16 == 0 else hp  # a draw of whole planes where rows are no multiple of 16 values
        g = torch.Generator("cpu")
        part = torch.empty(end - r0, wp, dtype=torch.float32)
        for k in range(c):
            g.set_state(self._states[k * per_plane + r0 // rows])
            torch.randn(end - r0, wp, generator=g, out=part)
            band[k] = part[y0 - r0 : y1 - r0]
        return band


def denoise_estimate(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    est: Estimate,
    weight: torch.Tensor,
    noise: torch.Tensor,
    *,
    schedule: ResShiftSchedule | None = None,
    callback: StepCallback | None = None,
    crop: bool = True,
    check_values: bool = True,
) -> torch.Tensor:
    """Diffusion stage: returns sr (B,3,4h,4w) in [0,1] (or the padded [-1,1] sample if crop=False).

    weight: noise weight w (B,3 or 1,4Hp,4Wp) in [0,1]; noise: ε (B,48,Hp,Wp), finite.
    ``denoiser(x, t, lq)`` is the network (x (B,48,Hp,Wp), t int64 (B,), lq (B,96,Hp,Wp)).
    ``check_values=False`` checks shapes and dtypes only, for callers that checked the values
    already (reading them syncs a GPU): :meth:`UPSRModel.denoise`'s tile loop.
    """
    check_estimate(est)
    if schedule is None:
        schedule = make_schedule()
    elif not isinstance(schedule, ResShiftSchedule):
        raise TypeError(f"schedule must be a ResShiftSchedule (make_schedule()), got {type(schedule).__name__}")
    b = est.lr_pm.shape[0]
    hr = est.bicubic_pm.shape[-2:]
    for name, x, want in (("weight", weight, "(B, 1 or 3, 4Hp, 4Wp) in [0, 1] (weight_noise)"),
                          ("noise", noise, "(B, 48, Hp, Wp) (starting_noise(seed, B, (Hp, Wp)))")):
        if x is None:  # check_weight_and_noise skips a None: here both are needed
            raise TypeError(f"{name} must be a {want} tensor, got None")
    check_weight_and_noise(weight, noise, b, tuple(est.lr_pm.shape[-2:]), values=check_values)
    y = F.pixel_unshuffle(est.bicubic_pm, SCALE)
    weight = weight.to(y.device, y.dtype).expand(b, 3, *hr)  # a float64 w must not make x_T float64
    lq = F.pixel_unshuffle(torch.cat([est.sr_estimate_pm, est.bicubic_pm], dim=1), SCALE)
    x_T = prior_sample(y, F.pixel_unshuffle(weight, SCALE), noise.to(y.device, y.dtype), schedule)

    def denoise(x_in: torch.Tensor, t: int) -> torch.Tensor:
        ts = torch.full((b,), t, dtype=torch.long, device=x_in.device)
        return F.pixel_unshuffle(denoiser(x_in, ts, lq), SCALE)

    x = F.pixel_shuffle(sample(denoise, y, x_T, schedule, callback=callback), SCALE)
    if not crop:
        return x
    return crop_hr(x, est.size).clamp(-1, 1) * 0.5 + 0.5


def crop_hr(x: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
    """Crop an HR tensor (..., 4Hp, 4Wp) at the padded size, any range, to the visible
    (..., 4h, 4w) (a view); ``lr_size`` = (h, w), the LR size before padding."""
    if not (isinstance(lr_size, (tuple, list, torch.Size)) and len(lr_size) == 2 and all(map(is_int, lr_size))):
        raise ValueError(f"lr_size must be two integers (h, w), the LR size before padding, got {lr_size!r}")
    h, w = lr_size
    if not (0 < SCALE * h <= x.shape[-2] and 0 < SCALE * w <= x.shape[-1]):
        raise ValueError(f"lr_size {tuple(lr_size)} ×{SCALE} = {SCALE * h}x{SCALE * w} must be >= 1 and fit the "
                         f"tensor's {x.shape[-2]}x{x.shape[-1]}")
    return x[..., : SCALE * h, : SCALE * w]


def preview_image(x0_pm: torch.Tensor, hr_size: tuple[int, int]) -> torch.Tensor:
    """A denoiser step's x̂0 of one image (48, Hp, Wp), PixelUnshuffled in [-1, 1] space, as a
    picture: (3, H, W) float32 in [0, 1] on x0_pm's device, cut to ``hr_size`` = (H, W) <= (4Hp,
    4Wp) (the image's or its tile's visible part), clamped as the final output is."""
    if x0_pm.ndim != 3 or x0_pm.shape[0] != 3 * SCALE * SCALE:
        raise ValueError(f"x0_pm must be one image's unshuffled x̂0 ({3 * SCALE * SCALE}, Hp, Wp), "
                         f"got {tuple(x0_pm.shape)}")
    h, w = hr_size
    if not (0 < h <= SCALE * x0_pm.shape[-2] and 0 < w <= SCALE * x0_pm.shape[-1]):
        raise ValueError(f"hr_size {tuple(hr_size)} must be >= 1 and fit the step's "
                         f"{SCALE * x0_pm.shape[-2]}x{SCALE * x0_pm.shape[-1]}")
    x = F.pixel_shuffle(x0_pm[None, :, : -(-h // SCALE), : -(-w // SCALE)], SCALE)[0, :, :h, :w]
    return x.float().clamp(-1, 1).mul(0.5).add(0.5)


def default_weight(est: Estimate, b_u: float = DEFAULT_B_U, psi_max: float = DEFAULT_PSI_MAX) -> torch.Tensor:
    """w from the estimate's own ψ (the official behaviour with the defaults)."""
    return weight_noise(est.uncertainty(), b_u, psi_max)
