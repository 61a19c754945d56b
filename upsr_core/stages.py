"""Stage runners on visible-size maps, for callers that pass images between stages
(the ComfyUI nodes): estimate -> ψ -> w -> sample, each on (B, C, 4h, 4w) tensors.

The networks work on the LR padded to a multiple of 64, and the official result depends
on the estimator's output in that padded border (most of the canvas for a small image: 86 %
for an LR of 20×28) and on ψ per colour channel. Each visible map therefore carries its
padded original as an attribute, and the originals of the maps made here are remembered
(weakly: while a map, or a copy of its attribute, is alive — ComfyUI keeps node outputs).
:func:`recover_full` finds a map's original by its values, not by the tensor object: a map
that comes back unchanged — itself, a node's copy, an identity resize — gives the original
exactly; one edited in part (painted) gives the original with the edited pixels replaced,
so an edit changes only what was edited (the border follows the pixels it mirrors); the
channel mean :func:`uncertainty_mask` makes of ψ, unchanged or painted in part, gives ψ per
channel where it was not painted. Only maps of the same kind (g(y), ψ, w) made from the same
LR image (by value) are candidates. A map with no original (made elsewhere, or with less than
a quarter of its values left) is padded by the HR mirror of the LR reflection. So the default chain gives exactly
:meth:`UPSRModel.upscale`, with a MASK in it too, and edited maps still work.
"""
from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .model import DEFAULT_OVERLAP, DEFAULT_TILE, Preview, Progress, UPSRModel
from .pipeline import (
    RESIZE_OVERSHOOT,
    SCALE,
    Estimate,
    _overshoot,
    bicubic_x4,
    check_estimator_output,
    check_lr,
    crop_hr,
    pad_lr,
    reflect_pad,
    run_estimator,
)
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, check_psi, weight_noise

__all__ = [
    "make_visible",
    "recover_full",
    "mirror_pad_hr",
    "estimate_maps",
    "weight_map",
    "uncertainty_mask",
    "sample_maps",
    "heatmap",
]

_ATTR = "_upsr_full"
MATCH_MIN = 0.25
"""The share of a map's values that must still equal its original's for the map to count as that
original edited in part (:func:`recover_full`); a map changed further (a blur, a grown mask, a
scaled w: scattered values left) is a map of its own, padded by mirroring."""


@dataclass(eq=False)
class _Original:
    """A visible map's padded original: ``full`` (its [-1, 1] values where ``pm``), ``role``
    (``"sr_estimate"``, ``"uncertainty"``, ``"noise_weight"`` or None) and ``lr_key``, the
    :func:`lr_digest` of the LR images it was made from, one per image (None: unknown)."""
    full: torch.Tensor
    pm: bool
    role: str | None = None
    lr_key: tuple[str, ...] | None = None


_LIVE: list[weakref.ref] = []
"""The :class:`_Original` of every visible map made here, held weakly: alive while a map (or a
view carrying its attribute) is (see the module docstring)."""


def lr_digest(lr: torch.Tensor) -> tuple[str, ...]:
    """A digest of each image of an LR batch (B, C, h, w) (its values as float32): which image a
    remembered map belongs to."""
    a = lr.detach().float().cpu().contiguous()
    out = []
    for im in a:
        h = hashlib.blake2b(str(tuple(im.shape)).encode(), digest_size=16)
        h.update(memoryview(im.numpy()).cast("B"))
        out.append(h.hexdigest())
    return tuple(out)


def _same_images(made_from: tuple[str, ...] | None, lr: tuple[str, ...] | None) -> bool:
    """A map made from the LR images ``made_from`` belongs to the LR batch ``lr``: the same images,
    or one image of it (a map of one image given for the whole batch)."""
    if lr is None:
        return True
    return made_from == lr or (made_from is not None and len(made_from) == 1 and made_from[0] in lr)


def make_visible(full: torch.Tensor, size: tuple[int, int], *, pm: bool = False, role: str | None = None,
                 lr_key: tuple[str, ...] | None = None) -> torch.Tensor:
    """Visible part (B, C, 4h, 4w) of a padded HR map; ``pm`` maps [-1,1] to [0,1] first.

    The padded original rides along as an attribute and is remembered with its ``role`` and the
    :func:`lr_digest` of its LR image (see :func:`recover_full`).
    """
    vis = _visible(full, size, pm).contiguous()
    entry = _Original(full, pm, role, lr_key)
    setattr(vis, _ATTR, entry)
    _LIVE[:] = [r for r in _LIVE if r() is not None]
    _LIVE.append(weakref.ref(entry))
    return vis


def _visible(full: torch.Tensor, size: tuple[int, int], pm: bool) -> torch.Tensor:
    vis = crop_hr(full, size)  # cropped first: the same values, without a scaled copy of the border
    return vis * 0.5 + 0.5 if pm else vis


def _full_units(vis: torch.Tensor, pm: bool) -> torch.Tensor:
    """A visible map's values in its original's units ([-1, 1] where ``pm``): :func:`_visible` undone."""
    return (vis - 0.5) / 0.5 if pm else vis


def carry_padding(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy the padded original from ``src`` to ``dst`` (a re-laid-out view of it: same values,
    any layout, e.g. ComfyUI's (B, H, W, C) of a (B, C, H, W) map); returns ``dst``."""
    info = getattr(src, _ATTR, None)
    if info is not None:
        setattr(dst, _ATTR, info)
    return dst


def mirror_pad_hr(x: torch.Tensor, lr_size: tuple[int, int], padded_lr: tuple[int, int]) -> torch.Tensor:
    """Pad an HR map (…, 4h, 4w) to (…, 4Hp, 4Wp) mirroring what reflect-padding the LR does."""
    def index(n: int, target: int) -> torch.Tensor:
        lr_map = reflect_pad(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1), target - n, 0).view(-1).long()
        idx = list(range(SCALE * n))
        for r in range(n, target):
            down = lr_map[r] < lr_map[r - 1]
            for o in range(SCALE):
                idx.append(SCALE * int(lr_map[r]) + (SCALE - 1 - o if down else o))
        return torch.tensor(idx)

    (h, w), (hp, wp) = lr_size, padded_lr
    if x.shape[-2:] != (SCALE * h, SCALE * w):
        raise ValueError(f"expected an HR map of {SCALE * h}x{SCALE * w}, got {tuple(x.shape[-2:])}")
    return x.index_select(-2, index(h, hp)).index_select(-1, index(w, wp))


def recover_full(vis: torch.Tensor, lr_size: tuple[int, int], padded_lr: tuple[int, int], *,
                 pm: bool = False, role: str | None = None,
                 lr_key: tuple[str, ...] | None = None) -> torch.Tensor:
    """The padded map behind ``vis``: its original where ``vis`` is one of the maps made here
    (of that ``role`` and made from the LR of that :func:`lr_digest`, where given), unchanged or
    edited in part (the edited pixels replaced), else ``vis`` mirror-padded.

    Returns [-1,1] values when ``pm`` (``vis`` itself is always in [0,1] units).
    """
    found = _original(vis, lr_size, pm, (SCALE * padded_lr[0], SCALE * padded_lr[1]), role=role, lr_key=lr_key)
    if found is not None:
        return found[0]
    return mirror_pad_hr(_full_units(vis, pm), lr_size, padded_lr)


def _channel_mean(psi: torch.Tensor) -> torch.Tensor:
    return psi.mean(dim=1, keepdim=True).clamp(0, 1)


def _original(vis: torch.Tensor, lr_size: tuple[int, int], pm: bool, hr_size: tuple[int, int] | None = None, *,
              role: str | None = None,
              lr_key: tuple[str, ...] | None = None) -> tuple[torch.Tensor, _Original] | None:
    """The padded original of ``vis`` and its record, found by value among the maps made here (the
    one ``vis`` carries first) of that ``role`` and LR (where given), the right size and channels
    (or, for a 1-channel ``vis``, a 3-channel ψ whose :func:`uncertainty_mask` it is): the one
    sharing most of its values, at least :data:`MATCH_MIN` of them; else None. Where ``vis``
    differs from it (an edit), ``vis`` is taken — in the border too, wherever the border mirrors an
    edited pixel (as :func:`mirror_pad_hr` pads) — so that an unchanged map gives the original
    exactly and an edit changes only what was edited."""
    carried = getattr(vis, _ATTR, None)
    entries = [carried] if carried is not None else []
    entries += [e for e in (r() for r in _LIVE) if e is not None and e is not carried]
    best, best_eq, best_share = None, None, 0.0
    for e in entries:
        full, c = e.full, e.full.shape[1]
        if (e.pm != pm or (role is not None and e.role != role) or not _same_images(e.lr_key, lr_key)
                or full.shape[0] != vis.shape[0] or not (c == vis.shape[1] or (c, vis.shape[1]) == (3, 1))
                or (hr_size is not None and full.shape[-2:] != hr_size)
                or full.shape[-2] < SCALE * lr_size[0] or full.shape[-1] < SCALE * lr_size[1]):
            continue
        again = _visible(full, lr_size, pm)
        if again.shape[-2:] != vis.shape[-2:]:
            continue
        again = again.to(vis.device)
        seen = again if c == vis.shape[1] else _channel_mean(again.contiguous())  # a mask of this ψ
        eq = seen == vis
        share = eq.count_nonzero().item() / eq.numel()
        if share == 1.0 and c == vis.shape[1]:
            return full, e
        if share >= MATCH_MIN and share > best_share:  # a tie keeps the earlier: the map's own first
            best, best_eq, best_share = e, eq, share
            if share == 1.0:
                break
    if best is None:
        return None
    full = best.full
    padded_lr = (full.shape[-2] // SCALE, full.shape[-1] // SCALE)
    kept = mirror_pad_hr(best_eq, lr_size, padded_lr).to(full.device)
    edits = mirror_pad_hr(_full_units(vis, pm), lr_size, padded_lr).to(full.device, full.dtype)
    return torch.where(kept, full, edits), best  # a painted mask value stands for every channel


def _check_map(name: str, x: torch.Tensor, lr: torch.Tensor, channels: tuple[int, ...], shared: bool = True,
               unit_range: bool = False) -> None:
    """``x`` is a finite float (B, C, 4h, 4w) for the LR batch (B, 3, h, w), C in ``channels``;
    ``shared``: a batch of 1 stands for every image too (one noise weight for all frames);
    ``unit_range``: its values lie in [0, 1] ± RESIZE_OVERSHOOT (an image, as g(y) is)."""
    b, _, h, w = lr.shape
    want = (SCALE * h, SCALE * w)
    batches = (1, b) if shared else (b,)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a float tensor in [0, 1] units, got {got}")
    if x.ndim != 4 or x.shape[1] not in channels or tuple(x.shape[-2:]) != want or x.shape[0] not in batches:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected ({' or '.join(map(str, sorted(set(batches))))}, "
            f"{'|'.join(map(str, channels))}, {want[0]}, {want[1]}) to match the LR image {tuple(lr.shape)} at "
            f"×{SCALE}" + ("" if shared or x.ndim != 4 or x.shape[0] == b else
                           ": one g(y) per image (the estimate of one image is not another's)")
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if unit_range:
        lo, hi = (v.item() for v in torch.aminmax(x))
        if not _overshoot(lo, hi):
            raise ValueError(f"{name} must hold values in [0, 1] (± {RESIZE_OVERSHOOT}: g(y) overshoots a little), "
                             f"got [{lo:.4g}, {hi:.4g}] (divide 8-bit values by 255; map [-1, 1] with x * 0.5 + 0.5)")


@torch.no_grad()
def estimate_maps(
    model: UPSRModel,
    lr: torch.Tensor,
    *,
    estimator: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Progress | None = None,
    block: int | None = None,
    estimator_name: str = "the estimator",
) -> tuple[torch.Tensor, torch.Tensor]:
    """lr (B,3,h,w) [0,1] -> (sr_estimate, ψ), both (B,3,4h,4w) in [0,1] units.

    ``estimator``: another ×4 model g (takes a (1,3,h,w) [0,1] image, returns its (1,3,4h,4w) [0,1]
    ×4: checked by :func:`~upsr_core.pipeline.check_estimator_output`, the errors naming it
    ``estimator_name``) instead of ATD, called once per image. ``progress(done, total)``: after
    each image (each estimator block of each image for ATD; may raise to cancel). ``block``: ATD's block size in LR px
    (see :meth:`UPSRModel.estimate`).
    """
    if estimator is None:
        est = model.estimate(lr, block=block, progress=progress)
    else:
        if block is not None:  # it would be dropped without a word
            raise ValueError(f"block={block!r} sets ATD's block size; another estimator runs on whole images")
        check_lr(lr)
        lr_pm = pad_lr(lr.float().cpu(), model.multiple_of)
        want = (1, 3, SCALE * lr_pm.shape[-2], SCALE * lr_pm.shape[-1])
        parts = []
        for i in range(lr_pm.shape[0]):
            parts.append(run_estimator(lambda x: check_estimator_output(estimator(x), want, estimator_name)
                                       .float().cpu(), lr_pm[i : i + 1]))
            if progress is not None:
                progress(i + 1, lr_pm.shape[0])
        y_hat = torch.cat(parts)
        est = Estimate(lr_pm, bicubic_x4(lr_pm), y_hat, tuple(lr.shape[-2:]))
    key = lr_digest(lr)
    return (make_visible(est.sr_estimate_pm, est.size, pm=True, role="sr_estimate", lr_key=key),
            make_visible(est.uncertainty(), est.size, role="uncertainty", lr_key=key))


def weight_map(psi: torch.Tensor, b_u: float = DEFAULT_B_U, psi_max: float = DEFAULT_PSI_MAX) -> torch.Tensor:
    """ψ (B, 1|3, H, W) in [0,1] units -> w (same shape) in [b_u, 1].

    When ψ is one of the maps made here (or the :func:`uncertainty_mask` of one), unchanged or
    edited in part, w is computed on its padded original too, and is 3-channel (see
    :func:`recover_full`).
    """
    if psi.ndim != 4 or psi.shape[1] not in (1, 3):
        raise ValueError(f"uncertainty must be (B, 1|3, H, W), got {tuple(psi.shape)}")
    size = (psi.shape[-2] // SCALE, psi.shape[-1] // SCALE)
    found = _original(psi, size, pm=False, role="uncertainty")
    if found is not None:
        full, of = found
        return make_visible(weight_noise(full, b_u, psi_max), size, role="noise_weight", lr_key=of.lr_key)
    return weight_noise(psi, b_u, psi_max)


def uncertainty_mask(psi: torch.Tensor) -> torch.Tensor:
    """ψ (B, 3, H, W), finite and >= 0 in [0,1] units -> an editable one-channel map (B, 1, H, W):
    the channel mean, clamped to [0, 1] (a mask's range; w is the same for every ψ >= ψ_max <= ½).
    Given back to :func:`weight_map`, its pixels left as they are stand for ψ per channel again."""
    check_psi(psi, (3,))
    return _channel_mean(psi.contiguous())


def sample_maps(
    model: UPSRModel,
    lr: torch.Tensor,
    sr_estimate: torch.Tensor,
    weight: torch.Tensor,
    *,
    seed: int = 0,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    tile_batch: int = 1,
    progress: Progress | None = None,
    same_noise: bool = False,
    preview: Preview | None = None,
) -> torch.Tensor:
    """Diffusion stage from visible maps -> sr (B,3,4h,4w) in [0,1].

    lr (B,3,h,w) [0,1]; sr_estimate (B,3,4h,4w) [0,1] (each image's own); weight (B|1,1|3,4h,4w)
    in [0,1] (a batch of 1: the same weight for every image).
    Image i's noise comes from seed + i, or from seed for every image with ``same_noise``.
    ``preview(x0)``: each step's x̂0, see :data:`~upsr_core.model.Preview`.
    """
    check_lr(lr)
    _check_map("sr_estimate", sr_estimate, lr, (3,), shared=False, unit_range=True)
    _check_map("noise weight", weight, lr, (1, 3))  # its range: model.denoise checks it
    lr = lr.float().cpu()
    lr_pm = pad_lr(lr, model.multiple_of)
    size, padded = tuple(lr.shape[-2:]), tuple(lr_pm.shape[-2:])
    b = lr.shape[0]
    key = lr_digest(lr)  # only this image's own maps are its originals
    y_hat = recover_full(sr_estimate.float().cpu(), size, padded, pm=True, role="sr_estimate", lr_key=key)
    w = recover_full(weight.float().cpu(), size, padded, role="noise_weight", lr_key=key).expand(b, -1, -1, -1)
    est = Estimate(lr_pm, bicubic_x4(lr_pm), y_hat, size)
    return model.denoise(est, w, seed=seed, tile=tile, overlap=overlap, tile_batch=tile_batch, progress=progress,
                         same_noise=same_noise, preview=preview)


def heatmap(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Colour preview of a map (B, C, H, W) (channel mean) -> (B, 3, H, W) in [0,1], 'inferno'-like."""
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"heatmap range must be finite with hi > lo, got [{lo}, {hi}]")
    if x.ndim != 4 or not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError(f"heatmap needs a finite float (B, C, H, W) map, got {x.dtype} {tuple(x.shape)}"
                         + ("" if x.ndim != 4 or not x.is_floating_point() else " holding NaN/Inf"))
    t = ((x.float().mean(dim=1, keepdim=True) - lo) / (hi - lo)).clamp(0, 1)
    # piecewise-linear black -> purple -> orange -> pale yellow
    stops = torch.tensor([[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.87, 0.32, 0.23], [0.99, 0.64, 0.04],
                          [0.99, 1.0, 0.64]], dtype=torch.float32, device=x.device)
    pos = t * (len(stops) - 1)
    i0 = pos.floor().clamp(max=len(stops) - 2).long()
    f = pos - i0
    c0 = stops[i0.squeeze(1)].permute(0, 3, 1, 2)
    c1 = stops[(i0 + 1).squeeze(1)].permute(0, 3, 1, 2)
    return c0 + (c1 - c0) * f
