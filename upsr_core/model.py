"""UPSRModel: the two networks, where they live, and tiled stage runners.

``load_upsr(model, estimator=None)`` returns an :class:`UPSRModel`; its methods run the
stages of :mod:`upsr_core.pipeline` over tiles so that peak memory is bounded by the
tile size and tile batch, not by the image size:

* :meth:`UPSRModel.estimate`  lr (B,3,h,w) [0,1] -> :class:`Estimate` (ATD in disjoint blocks, each with a
  margin of context that is cut off: no blend)
* :meth:`UPSRModel.denoise`   Estimate + w + seed -> sr (B,3,4h,4w) [0,1] (one noise field
  for the whole image, sliced per tile, feathered blend)
* :meth:`UPSRModel.upscale`   both, with w from ψ, b_u and ψ_max
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checkpoint import build_denoiser, build_estimator, read_checkpoint, split_nets
from .config import METADATA_CONFIG_ERRORS, ATDConfig, DenoiserConfig, atd_config_from_state_dict
from .errors import NonFiniteOutputError, UnsupportedCheckpointError, check_device, cpu_has_fast_bf16, is_int
from .nets import ATD, UPSRDenoiser
from .pipeline import (
    SCALE,
    Estimate,
    NoiseField,
    bicubic_x4,
    check_estimate,
    check_lr,
    check_noise_choice,
    check_weight_and_noise,
    denoise_estimate,
    pad_lr,
    padded_size,
    preview_image,
    run_estimator,
    starting_noise,
)
from .schedule import make_schedule
from .tiling import Tile, batches, check_tile_batch, check_tiling, fits_one, partition, plan_tiles, tile_weight
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, check_weight_params, weight_noise

log = logging.getLogger("upsr_core")

__all__ = ["UPSRModel", "load_upsr", "Progress", "DEFAULT_TILE", "DEFAULT_OVERLAP"]

DEFAULT_TILE = 512  # LR pixels: the official chop size, so images up to 512 px run untiled
DEFAULT_OVERLAP = 64  # LR pixels: the official chop overlap (512 − 448)
ESTIMATOR_BLOCK = 512  # LR pixels: the estimator runs whole up to this size (as the official code)
ESTIMATOR_MARGIN = 32  # LR pixels of context around each estimator block (two ATD windows)

def check_progress(progress: object) -> None:
    """TypeError unless ``progress`` is None or callable (it is called only after work is done)."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total) or None, got {type(progress).__name__}")


def check_block(block: object, name: str) -> None:
    """ValueError unless ``block`` (the estimator's block size, LR px) is an integer >= 1."""
    if not is_int(block) or block < 1:
        raise ValueError(f"{name} must be an integer >= 1 (LR pixels), got {block!r}")


Progress = Callable[[int, int], None]
"""progress(done, total): called after each denoiser step over all tiles and, in ``upscale``, after
each estimator block of each image, one unit each (in ``estimate``: after each estimator block
of each image); may raise to cancel."""


Preview = Callable[[torch.Tensor], None]
"""preview(x0): called after each denoiser step run step by step (not inside a CUDA graph: the
fast path's graph replays, and a first call whose capture failed, call none), just before that
step's ``progress`` report, with the step's estimate x̂0 of the first image of the batch being
denoised — of its first tile when tiled, before the blend — as (3, H, W) float32 in [0, 1] on the
model's device, cut to the image; may raise to cancel. (The host can merge the two calls into one
update, as ComfyUI's step previews are.)"""


def check_preview(preview: object) -> None:
    """TypeError unless ``preview`` is None or callable."""
    if preview is not None and not callable(preview):
        raise TypeError(f"preview must be a callable preview(x0) or None, got {type(preview).__name__}")


class StepCounter:
    """Counts finished denoiser steps × images (or tiles), and estimator blocks, and reports
    ``progress(done, total)`` after each: ``counter(n)`` adds n. The reference and fast tile loops
    share it; :meth:`step` also hands a step's x̂0 to ``preview``."""

    def __init__(self, progress: Progress | None, total: int, preview: Preview | None = None):
        self.progress, self.total, self.done, self.preview = progress, total, 0, preview

    def step(self, n: int, x0_pm: torch.Tensor, hr_size: tuple[int, int]) -> None:
        """A denoiser step over n images (tiles) is done: ``preview`` of the first one's x̂0
        (x0_pm (n, 48, Hp, Wp) unshuffled), cut to ``hr_size`` (H, W), then ``counter(n)``."""
        if self.preview is not None:
            self.preview(preview_image(x0_pm[0], hr_size))
        self(n)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def check(self) -> None:
        """Report the count again without advancing it: before work that reports nothing (an
        estimator block), so a cancelling ``progress`` can stop it before it starts."""
        self(0)


RowSink = Callable[[int, int, torch.Tensor], None]  # sink(image index, first HR row, rows (3, n, 4w))


@dataclass
class UPSRModel:
    """The two UPSR networks and the tiled stage runners (what :func:`load_upsr` returns).

    ``denoiser``: the Swin-UNet (:class:`~upsr_core.nets.UPSRDenoiser`) in ``dtype``
    (float32, bfloat16 or float16); ``estimator``: the ATD g (:class:`~upsr_core.nets.ATD`,
    float32 or bfloat16) or None (then :meth:`upscale` and :meth:`estimate` need one; the
    diffusion stage alone runs from an :class:`Estimate`); ``metadata``: the file's safetensors
    metadata. ``scale`` is ×4, fixed by the networks (not a setting).

    :meth:`upscale`: lr (B,3,h,w) in [0,1] -> sr (B,3,4h,4w) in [0,1], any h, w >= 1.
    """

    denoiser: UPSRDenoiser
    estimator: ATD | None
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    scale: int = field(default=SCALE, init=False)
    _warned_slow: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # duck-typed (stand-in nets: tools/large_image_rss.py --stub), but the two swapped failed only inside upscale
        if (not isinstance(self.denoiser, torch.nn.Module) or not hasattr(self.denoiser, "multiple_of")
                or isinstance(self.denoiser, ATD)):
            raise TypeError(f"denoiser must be an UPSRDenoiser, got {type(self.denoiser).__name__}")
        if self.estimator is not None and (not isinstance(self.estimator, torch.nn.Module)
                                           or isinstance(self.estimator, UPSRDenoiser)):
            raise TypeError(f"estimator must be an ATD module or None, got {type(self.estimator).__name__}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        have = next(self.denoiser.parameters()).dtype
        if have != self.dtype:
            raise ValueError(f"dtype {self.dtype} does not match the denoiser's weights ({have}): convert the "
                             f"denoiser first, or build the model in {have} and call .to({self.dtype})")

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def multiple_of(self) -> int:
        """LR sides given to the denoiser are padded to a multiple of this (64 for the official net)."""
        return self.denoiser.multiple_of

    @property
    def supports_half(self) -> bool:
        """fp16 is offered for the denoiser only; the estimator stays fp32/bf16 (overflow risk)."""
        return True

    # Device memory a denoiser call needs beyond the weights, per LR pixel of a tile batch and
    # per byte of the denoiser's dtype, for the full-size net (model_channels 160), from the H100
    # bench of 2026-11-26 (README *Speed*, LR 256 batch 1): the reference path in fp32 peaked at
    # 2.19 GiB with 0.48 GiB of weights -> 6.8 KB (the fast path: FastUPSRModel). Rounded up by a
    # quarter.
    _act_bytes_per_px = 8500
    # The same for the estimator, per LR pixel of a block with its margin and per 4 bytes of its
    # dtype: a term per channel and one per attention head (its attention maps), fitted to the
    # peak of the live tensors of one call counted on the CPU (tools/activation_memory.py,
    # 2026-11-29, LR 64 and 128): 16.1 KB per LR px for the full-size ATD (96 channels, 4 heads),
    # 10.6 KB for the demo's (48, 3). The same count gives the denoiser 22.8 KB per LR px in fp32
    # where the H100 measured 27 KB (its allocator's rounding, workspaces): scaled by that ratio
    # and, as above, rounded up by a quarter (x 1.48 in all): 24.0 and 15.9 KB.
    _est_bytes_per_channel, _est_bytes_per_head = 90, 3850

    def working_memory(self, lr_size: tuple[int, int], *, batch: int = 1, tile: int = DEFAULT_TILE,
                       tile_batch: int = 1, estimator_block: int | None = None) -> int:
        """A rough estimate in bytes of the device memory ``upscale``/``denoise`` needs on top of
        the weights for ``batch`` LR images of ``lr_size`` (h, w): activations of one tile batch
        (≤ tile_batch tiles of ≤ tile² LR px, scaled by the net's width), and the fast path's
        output canvas while it stays on the device. ``estimator_block``: the run includes the
        estimator (``upscale``) with blocks of this size, which runs between the denoiser's
        calls: the larger of the two then (:meth:`estimator_memory`). For a host (ComfyUI) that
        frees memory for a run up front; an under-estimate only means an out-of-memory to retry."""
        counts = dict(batch=batch, tile=tile, tile_batch=tile_batch)
        hp, wp = self._check_sizes(lr_size, **counts, **({} if estimator_block is None
                                                         else {"estimator_block": estimator_block}))
        per_px = self._act_bytes_per_px * self.dtype.itemsize * self.denoiser.config.model_channels / 160
        images = self._images_at_once(hp, wp, **counts, estimator_block=estimator_block)
        need = int(per_px * self._denoiser_px(hp, wp, images, tile=tile, tile_batch=tile_batch))
        if estimator_block is not None:
            need = max(need, self.estimator_memory(lr_size, block=estimator_block, images=images))
        return need

    def _denoiser_px(self, hp: int, wp: int, images: int, *, tile: int, tile_batch: int) -> int:
        """LR pixels in one denoiser call: a tile batch, or the ``images`` (:meth:`_images_at_once`)
        that one call runs whole."""
        if images > 1:  # (only images of one tile: the whole image is the tile)
            return images * hp * wp
        if fits_one(hp, wp, tile):  # one tile per image, and images run one by one
            return hp * wp
        return tile_batch * min(tile, hp) * min(tile, wp)

    def _images_at_once(self, hp: int, wp: int, *, batch: int, tile: int, tile_batch: int,
                        estimator_block: int | None) -> int:
        """How many images ``upscale`` (``estimator_block`` given) runs through a net at once: one
        here (the fast path's one-call batches: :class:`~upsr_core.fast.FastUPSRModel`)."""
        return 1

    def estimator_memory(self, lr_size: tuple[int, int], *, block: int = ESTIMATOR_BLOCK, images: int = 1) -> int:
        """A rough estimate in bytes of the device memory the estimator needs on top of its
        weights for LR images of ``lr_size`` (h, w) in blocks of ``block`` LR px (with their
        ESTIMATOR_MARGIN of context; an image that fits one block runs whole), ``images`` at once
        (``estimate`` runs one at a time), scaled by ATD's width and dtype. 0 without an estimator."""
        hp, wp = self._check_sizes(lr_size, images=images, block=block)
        if self.estimator is None:
            return 0
        px = max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in
                 (_context_window(blk, ESTIMATOR_MARGIN, hp, wp) for blk in partition(hp, wp, block)))
        cfg = self.estimator.config
        itemsize = next(self.estimator.parameters()).dtype.itemsize
        per_px = (self._est_bytes_per_channel * cfg.embed_dim + self._est_bytes_per_head * max(cfg.num_heads)) \
            * itemsize / 4
        return int(per_px * px * images)

    def _check_sizes(self, lr_size, **counts: int) -> tuple[int, int]:
        for name, v in counts.items():
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(lr_size, (tuple, list, torch.Size)) and len(lr_size) == 2
                and all(is_int(v) and v >= 1 for v in lr_size)):
            raise ValueError(f"lr_size must be the LR (h, w), two integers >= 1, got {lr_size!r}")
        return padded_size(*lr_size, self.multiple_of)

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> "UPSRModel":
        """Move both nets; ``dtype`` applies to the denoiser, the estimator never goes to fp16.
        ``to(torch.bfloat16)`` is ``to(dtype=torch.bfloat16)``, as for an ``nn.Module``."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"to() got two dtypes, {device} and dtype={dtype}")
            device, dtype = None, device
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if device is not None:
            device = check_device(device)
        dtype = dtype or self.dtype
        self.denoiser.to(device=device, dtype=dtype)
        if self.estimator is not None:
            self.estimator.to(device=device, dtype=torch.float32 if dtype == torch.float16 else dtype)
        self.dtype = dtype
        return self

    def _warn_if_slow(self) -> None:
        """Once per model: fp16 on the CPU, or bf16 on a CPU without fast bf16 kernels
        (:func:`errors.cpu_has_fast_bf16`), runs, but far slower than fp32: say so, never silently."""
        if self.device.type != "cpu" or self._warned_slow:
            return
        if self.dtype == torch.float16:
            self._warned_slow = True
            log.warning("the denoiser runs in fp16 on the CPU, which has no fast fp16 kernels: about 190x slower than "
                        "fp32 (demo model, LR 64, 2-core x86, 2026-11-26); use fp32 on the CPU (or bf16 where it "
                        "has AVX-512 or AMX)")
        elif self.dtype == torch.bfloat16 and not cpu_has_fast_bf16():
            self._warned_slow = True
            log.warning("the nets run in bf16 on a CPU without fast bf16 kernels (oneDNN finds no AVX-512, AMX "
                        "or Arm BF16 here): its convolutions run about 250x slower than in fp32 (2-core AVX2 x86, "
                        "2026-11-28); use fp32 on this CPU")

    def _checked(self, sr: torch.Tensor) -> torch.Tensor:
        """``sr`` if it holds no NaN, else NonFiniteOutputError (one sum over the output: no
        copy, one host sync at the end of a call)."""
        if torch.isnan(sr.sum()):
            hint = ("fp16 overflowed with these weights: load the model in fp32 or bf16" if self.dtype == torch.float16
                    else "the weights (or their conversion) are broken")
            raise NonFiniteOutputError(f"the denoiser ({str(self.dtype).removeprefix('torch.')}) produced NaN in its "
                                       f"{tuple(sr.shape)} output; {hint}")
        return sr

    # ------------------------------------------------------------------ network calls
    def _denoiser_call(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x.to(self.dtype), t, lq.to(self.dtype)).float()

    def _estimator_call(self, x01: torch.Tensor) -> torch.Tensor:
        if self.estimator is None:
            raise ValueError("this UPSRModel has no estimator (g): load one with load_upsr(model, estimator=FILE), "
                             "or run the diffusion stage alone from an Estimate (UPSRModel.denoise, "
                             "upsr_core.stages.sample_maps)")
        edt = next(self.estimator.parameters()).dtype
        return self.estimator(x01.to(edt)).float()

    # ------------------------------------------------------------------ stages
    def _estimator_block(self, lr_pm: torch.Tensor, blk: Tile, margin: int,
                         counter: StepCounter | None = None) -> torch.Tensor:
        """ŷ (B,3,4·blk.h,4·blk.w) in [-1,1] for one block, computed with ``margin`` LR px of context,
        one image at a time (``counter(1)`` after each)."""
        y0, y1, x0, x1 = _context_window(blk, margin, *lr_pm.shape[-2:])
        parts = []
        for i in range(lr_pm.shape[0]):
            parts.append(run_estimator(self._estimator_call, lr_pm[i : i + 1, :, y0:y1, x0:x1].to(self.device)).cpu())
            if counter is not None:
                counter(1)
        out = torch.cat(parts)
        oy, ox = (blk.y - y0) * SCALE, (blk.x - x0) * SCALE
        return out[:, :, oy : oy + blk.h * SCALE, ox : ox + blk.w * SCALE]

    @torch.no_grad()
    def estimate(self, lr: torch.Tensor, *, block: int | None = None, progress: Progress | None = None) -> Estimate:
        """lr (B,3,h,w) in [0,1] -> Estimate at the padded size.

        The estimator runs on disjoint ``block``-px blocks, each with ESTIMATOR_MARGIN px of
        context; a padded LR that fits one block runs whole, exactly as the official code.
        ``progress(done, total)`` is called after each block of each image (may raise to cancel).
        """
        check_lr(lr)
        check_progress(progress)
        if block is not None:
            check_block(block, "block")
        self._warn_if_slow()
        lr_pm = pad_lr(lr.float().cpu(), self.multiple_of)
        bic = torch.cat([bicubic_x4(lr_pm[i : i + 1]) for i in range(lr_pm.shape[0])])
        y_hat = torch.empty_like(bic)
        blocks = partition(*lr_pm.shape[-2:], ESTIMATOR_BLOCK if block is None else block)
        counter = StepCounter(progress, len(blocks) * lr_pm.shape[0])
        for blk in blocks:
            hs, ws_ = blk.scaled(SCALE).slices()
            y_hat[:, :, hs, ws_] = self._estimator_block(lr_pm, blk, ESTIMATOR_MARGIN, counter)
        return Estimate(lr_pm, bic, y_hat, tuple(lr.shape[-2:]))

    @torch.no_grad()
    def denoise(
        self,
        est: Estimate,
        weight: torch.Tensor,
        *,
        seed: int = 0,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        tile_batch: int = 1,
        progress: Progress | None = None,
        noise: torch.Tensor | None = None,
        same_noise: bool = False,
        preview: Preview | None = None,
    ) -> torch.Tensor:
        """Diffusion stage over tiles -> sr (B,3,4h,4w) float32 in [0,1] (whatever the nets' dtype).

        weight: w (B, 1|3, 4Hp, 4Wp) in [0,1]. One ε field (seed contract: image i uses
        seed + i; with ``same_noise`` every image uses seed) covers the whole padded image
        and is sliced per tile. ``preview(x0)``: see :data:`Preview`.
        """
        check_estimate(est)
        check_progress(progress)
        check_preview(preview)
        self._warn_if_slow()
        b, _, hp, wp = est.lr_pm.shape
        check_weight_and_noise(weight, noise, b, (hp, wp))
        check_noise_choice(noise, same_noise)
        if noise is None:
            noise = starting_noise(seed, b, (hp, wp), same_noise=same_noise)
        weight = weight.float().cpu().expand(b, 3, *est.bicubic_pm.shape[-2:])
        sr = self._tile_loop(est.lr_pm, est.size, lambda i, group, _counter: _gather(est, weight, noise, i, group),
                             tile, overlap, tile_batch, progress, preview=preview)
        return self._checked(sr)

    def _tile_loop(self, lr_pm: torch.Tensor, size: tuple[int, int], inputs, tile: int, overlap: int,
                   tile_batch: int, progress: Progress | None, sink: RowSink | None = None,
                   estimator_units: int = 0, preview: Preview | None = None) -> torch.Tensor | None:
        """Denoise every tile of every image; blend into a (B,3,4h,4w) canvas -> sr in [0,1].

        ``inputs(i, tiles, counter)`` returns the (Estimate, weight, noise) batch of image i under
        ``tiles``; around each estimator block it runs it calls ``counter.check()`` before (a
        Cancel is seen first) and ``counter(1)`` after: ``estimator_units`` such blocks in all are
        counted in the progress total. With ``sink``, no full canvas is kept: see
        :meth:`upscale`; returns None then.
        """
        check_tiling(tile, overlap, self.multiple_of)
        check_tile_batch(tile_batch)
        b, _, hp, wp = lr_pm.shape
        h4, w4 = SCALE * size[0], SCALE * size[1]
        tiles = plan_tiles(hp, wp, tile, overlap, self.multiple_of)
        schedule = make_schedule()
        counter = StepCounter(progress, schedule.num_steps * len(tiles) * b + estimator_units, preview)
        if sink is not None:
            self._tile_loop_banded(tiles, b, h4, w4, inputs, tile_batch, schedule, counter, sink)
            return None
        out = torch.zeros(b, 3, h4, w4, dtype=torch.float32)
        norm = torch.zeros(h4, w4, dtype=torch.float32)
        for i in range(b):  # images one by one: memory is bounded by tile_batch tiles
            for group in batches(tiles, tile_batch):
                x = self._denoise_group(inputs, i, group, schedule, counter, (h4, w4))
                for j, t in enumerate(group):
                    r = t.scaled(SCALE)
                    hh, ww = t.visible(SCALE, h4, w4)
                    wt = tile_weight(t, tiles, SCALE)[:hh, :ww] if len(tiles) > 1 else 1.0
                    out[i, :, r.y : r.y + hh, r.x : r.x + ww] += x[j, :, :hh, :ww] * wt
                    if i == 0:
                        norm[r.y : r.y + hh, r.x : r.x + ww] += wt
        return out.div_(norm).clamp_(-1, 1).mul_(0.5).add_(0.5)  # in place: no extra full-size copies

    def _denoise_group(self, inputs, i: int, group: list[Tile], schedule, counter: StepCounter,
                       hr_size: tuple[int, int]) -> torch.Tensor:
        """Denoise image i under ``group`` (one batch) -> padded [-1,1] samples on the CPU;
        ``counter.step`` gets len(group) and the first tile's x̂0, cut to the image of HR size
        ``hr_size``, after every denoiser step."""
        sub, w_sub, n_sub = inputs(i, group, counter)
        dev = self.device
        seen = group[0].visible(SCALE, *hr_size)  # the first tile's part of the image: its preview
        return denoise_estimate(self._denoiser_call, sub.to(dev), w_sub.to(dev), n_sub.to(dev), schedule=schedule,
                                callback=lambda _k, _x, x0: counter.step(len(group), x0, seen),
                                crop=False, check_values=False).cpu()  # denoise() checked w and ε once

    def _tile_loop_banded(self, tiles: list[Tile], b: int, h4: int, w4: int, inputs, tile_batch: int,
                          schedule, counter: StepCounter, sink: RowSink) -> None:
        """The tile loop of ``_tile_loop`` with a canvas only for the rows still being blended.

        Tiles run row-major, so once every tile starting above LR row y is done, HR rows
        < 4y are final: they are normalised with the same arithmetic as the full canvas
        (each pixel gets the same sums in the same order, so the same bits), handed to
        ``sink(i, y0, rows)`` and dropped.
        """
        for i in range(b):
            buf = torch.zeros(3, 0, w4, dtype=torch.float32)  # HR rows [base, base + buf.shape[1])
            nrm = torch.zeros(0, w4, dtype=torch.float32)
            base = 0
            todo = list(tiles)
            for group in batches(tiles, tile_batch):
                x = self._denoise_group(inputs, i, group, schedule, counter, (h4, w4))
                for j, t in enumerate(group):
                    r = t.scaled(SCALE)
                    hh, ww = t.visible(SCALE, h4, w4)
                    need = r.y + hh - base
                    if need > buf.shape[1]:  # grow the band to this tile's last row
                        extra = need - buf.shape[1]
                        buf = torch.cat([buf, torch.zeros(3, extra, w4, dtype=torch.float32)], 1)
                        nrm = torch.cat([nrm, torch.zeros(extra, w4, dtype=torch.float32)], 0)
                    wt = tile_weight(t, tiles, SCALE)[:hh, :ww] if len(tiles) > 1 else 1.0
                    y = r.y - base
                    buf[:, y : y + hh, r.x : r.x + ww] += x[j, :, :hh, :ww] * wt
                    nrm[y : y + hh, r.x : r.x + ww] += wt
                del x
                todo = todo[len(group):]
                final = min(SCALE * todo[0].y, h4) if todo else h4
                if final > base:
                    n = final - base
                    rows = buf[:, :n].div(nrm[:n]).clamp_(-1, 1).mul_(0.5).add_(0.5)
                    sink(i, base, rows)
                    del rows
                    buf, nrm, base = buf[:, n:].clone(), nrm[n:].clone(), final

    @torch.no_grad()
    def upscale(
        self,
        lr: torch.Tensor,
        *,
        seed: int = 0,
        b_u: float = DEFAULT_B_U,
        psi_max: float = DEFAULT_PSI_MAX,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        tile_batch: int = 1,
        progress: Progress | None = None,
        noise: torch.Tensor | None = None,
        sink: RowSink | None = None,
        same_noise: bool = False,
        estimator_block: int = ESTIMATOR_BLOCK,
        preview: Preview | None = None,
    ) -> torch.Tensor | None:
        """lr (B,3,h,w) in [0,1] -> sr (B,3,4h,4w) float32 in [0,1] (whatever the nets' dtype); the
        official pipeline for LR <= tile.

        Streams: bicubic, ŷ, ψ and w are made per tile (ŷ from cached estimator blocks), so
        besides the LR, the noise field and the output canvas, only the block cache grows with
        the image — with its width: the estimator blocks of the tile rows in use (up to two
        rows of 512-px blocks, ~50 MB per block at ×4 in float32; at an LR width of 8192 ~1.6 GB).
        Equals ``denoise(estimate(lr), weight_noise(ψ))`` bit for bit.

        ``sink``: if given, the output canvas is not kept either: as each tile row finishes,
        the HR rows no later tile touches are handed over as ``sink(i, y0, rows)`` (image i,
        first HR row y0, rows (3, n, 4w) float32 in [0, 1], top to bottom, bit-identical to
        the same rows of the returned tensor without a sink) and freed; returns None then.

        ``same_noise``: every image of the batch gets the noise of ``seed`` instead of seed + i
        (video frames: static regions come out alike in every frame). ``noise``, if given,
        is used as it is (B, 48, Hp, Wp).

        ``estimator_block``: the estimator's block size in LR px (see :meth:`estimate`); smaller
        blocks need less memory and change ŷ a little everywhere, not only near the blocks' borders
        (ATD groups tokens and updates its dictionary per block): blocks of 64 on the sample photo
        (LR 128×96), demo model: up to 0.051, mean 0.0049 (2026-11-29).

        ``preview(x0)``: see :data:`Preview` (a live view of the sampling, e.g. ComfyUI's).
        """
        check_lr(lr)
        check_weight_params(b_u, psi_max)
        check_tiling(tile, overlap, self.multiple_of)
        check_block(estimator_block, "estimator_block")
        check_progress(progress)
        check_preview(preview)
        if sink is not None and not callable(sink):
            raise TypeError(f"sink must be a callable sink(i, y0, rows), got {type(sink).__name__}")
        self._warn_if_slow()
        check_tile_batch(tile_batch)
        lr_pm = pad_lr(lr.float().cpu(), self.multiple_of)
        b, _, hp, wp = lr_pm.shape
        check_weight_and_noise(None, noise, b, (hp, wp))  # a given ε: its shape was sliced per tile unchecked
        check_noise_choice(noise, same_noise)
        if noise is None:  # several tile rows: make ε band by band (same numbers, 1/48 of the memory)
            noise = (NoiseField(seed, b, (hp, wp), same_noise=same_noise) if hp > tile
                     else starting_noise(seed, b, (hp, wp), same_noise=same_noise))
        blocks = partition(hp, wp, estimator_block)
        cache: dict[tuple[int, Tile], torch.Tensor] = {}

        def inputs(i: int, group: list[Tile], counter: StepCounter):
            for key in [k for k in cache if k[0] != i or k[1].y + k[1].h <= group[0].y]:
                del cache[key]  # blocks above the current tile row are done with
            subs = []
            for t in group:
                lr_t = lr_pm[i : i + 1, :, t.y : t.y + t.h, t.x : t.x + t.w]
                bic = _bicubic_region(lr_pm[i : i + 1], t)
                y_hat = torch.empty_like(bic)
                for blk in blocks:
                    if blk.y < t.y + t.h and t.y < blk.y + blk.h and blk.x < t.x + t.w and t.x < blk.x + blk.w:
                        if (i, blk) not in cache:  # each block once per image (dropped when done with)
                            counter.check()  # a Cancel is seen before the block runs (up to 512² LR px)
                            cache[(i, blk)] = self._estimator_block(lr_pm[i : i + 1], blk, ESTIMATOR_MARGIN)
                            counter(1)
                        _paste(y_hat, cache[(i, blk)], blk, t)
                subs.append(Estimate(lr_t, bic, y_hat, (t.h, t.w)))
            fields = ("lr_pm", "bicubic_pm", "sr_estimate_pm")
            sub = Estimate(*(torch.cat([getattr(e, f) for e in subs]) for f in fields), subs[0].size)
            w = weight_noise(sub.uncertainty(), b_u, psi_max)
            n = torch.stack([noise[i, :, t.y : t.y + t.h, t.x : t.x + t.w] for t in group])
            return sub, w, n

        units = len(blocks) * b  # the estimator's share of the progress total
        if sink is None:
            return self._checked(self._tile_loop(lr_pm, tuple(lr.shape[-2:]), inputs, tile, overlap, tile_batch,
                                                 progress, estimator_units=units, preview=preview))
        self._tile_loop(lr_pm, tuple(lr.shape[-2:]), inputs, tile, overlap, tile_batch, progress,
                        lambda i, y0, rows: sink(i, y0, self._checked(rows)), estimator_units=units, preview=preview)
        return None


def _context_window(blk: Tile, margin: int, hp: int, wp: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the LR region the estimator sees for ``blk``, the block with ``margin``
    px of context on each side inside the padded (hp, wp) image."""
    return (max(blk.y - margin, 0), min(blk.y + blk.h + margin, hp),
            max(blk.x - margin, 0), min(blk.x + blk.w + margin, wp))


def _bicubic_region(lr_pm: torch.Tensor, t: Tile, margin: int = 2) -> torch.Tensor:
    """bicubic ×4 of one tile, computed from the tile plus ``margin`` LR px (the bicubic support),
    so it equals the same region of the whole-image bicubic."""
    hp, wp = lr_pm.shape[-2:]
    y0, x0 = max(t.y - margin, 0), max(t.x - margin, 0)
    y1, x1 = min(t.y + t.h + margin, hp), min(t.x + t.w + margin, wp)
    up = bicubic_x4(lr_pm[:, :, y0:y1, x0:x1])
    oy, ox = (t.y - y0) * SCALE, (t.x - x0) * SCALE
    return up[:, :, oy : oy + t.h * SCALE, ox : ox + t.w * SCALE]


def _paste(dst: torch.Tensor, src: torch.Tensor, blk: Tile, t: Tile) -> None:
    """Copy the part of block ``blk`` (HR tensor ``src``) inside tile ``t`` into ``dst`` (tile HR)."""
    y0, y1 = max(blk.y, t.y), min(blk.y + blk.h, t.y + t.h)
    x0, x1 = max(blk.x, t.x), min(blk.x + blk.w, t.x + t.w)
    s = SCALE
    dst[:, :, (y0 - t.y) * s : (y1 - t.y) * s, (x0 - t.x) * s : (x1 - t.x) * s] = \
        src[:, :, (y0 - blk.y) * s : (y1 - blk.y) * s, (x0 - blk.x) * s : (x1 - blk.x) * s]


def _gather(est: Estimate, weight: torch.Tensor, noise: torch.Tensor, i: int, group: list[Tile]):
    """Stack the slices of image i under each tile of ``group`` into a batch."""
    def lr_slice(x: torch.Tensor, t: Tile) -> torch.Tensor:
        ys, xs = t.slices()
        return x[i, :, ys, xs]

    def hr_slice(x: torch.Tensor, t: Tile) -> torch.Tensor:
        ys, xs = t.scaled(SCALE).slices()
        return x[i, :, ys, xs]

    sub = Estimate(
        torch.stack([lr_slice(est.lr_pm, t) for t in group]),
        torch.stack([hr_slice(est.bicubic_pm, t) for t in group]),
        torch.stack([hr_slice(est.sr_estimate_pm, t) for t in group]),
        (group[0].h, group[0].w),
    )
    return sub, torch.stack([hr_slice(weight, t) for t in group]), torch.stack([lr_slice(noise, t) for t in group])


def load_upsr(
    model: str | os.PathLike,
    estimator: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    category_size: int | None = None,
) -> UPSRModel:
    """Load the denoiser (and estimator) from official ``.pth`` or ``.safetensors`` files.

    ``model`` may hold both nets (a converted file); otherwise ``estimator`` names the
    ATD file. ``category_size``: ATD's AC-MSA group size, which no tensor shape shows; a file
    we wrote stores it (giving another value is an error), the authors' ``atd_real.pth`` does
    not and uses the default 128 (the oracle's reduced ATD: 48). Raises
    UnsupportedCheckpointError for a wrong or unreadable file, ValueError for a device this
    machine does not have.
    """
    for name, path in (("model", model), ("estimator", estimator)):
        if not (isinstance(path, (str, os.PathLike)) or (name == "estimator" and path is None)):
            raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(path).__name__}")
    device = check_device(device)
    source = f"{os.fspath(model)!r} (the model)"  # what the errors call the file
    sd, meta = read_checkpoint(model, source=source)
    nets = split_nets(sd, source)
    if "denoiser" not in nets:
        raise UnsupportedCheckpointError(
            f"{os.fspath(model)!r} holds ATD estimator weights; pass it as the estimator and give the "
            "UPSR denoiser (upsr.pth) as the model"
        )
    dcfg = _meta_config(meta, "denoiser_config", DenoiserConfig, model)
    den = build_denoiser(nets["denoiser"], dcfg)
    est_net = None
    if estimator is not None:
        source = f"{os.fspath(estimator)!r} (the estimator)"
        esd, emeta = read_checkpoint(estimator, source=source)
        enets = split_nets(esd, source)
        if "estimator" not in enets:
            raise UnsupportedCheckpointError(
                f"{os.fspath(estimator)!r} holds UPSR denoiser weights, expected the ATD estimator (atd_real.pth)"
            )
        ecfg = _estimator_config(enets["estimator"], emeta, estimator, category_size)
        est_net = build_estimator(enets["estimator"], ecfg)
    elif "estimator" in nets:
        est_net = build_estimator(nets["estimator"], _estimator_config(nets["estimator"], meta, model, category_size))
    elif category_size is not None:
        raise ValueError(f"category_size={category_size} was given, but no estimator: it applies to ATD's weights")
    m = UPSRModel(den, est_net, metadata=meta)
    return m.to(device, dtype)


def _estimator_config(sd, meta: dict[str, str], path, category_size: int | None) -> ATDConfig | None:
    """The ATD config of a file: its metadata's, else (with ``category_size`` given) the one its
    shapes give with that group size, else None (shapes and the official 128)."""
    cfg = _meta_config(meta, "estimator_config", ATDConfig, path)
    if category_size is None:
        return cfg
    if not is_int(category_size) or category_size < 1:
        raise ValueError(f"category_size must be an integer >= 1, got {category_size!r}")
    if cfg is not None:
        if cfg.category_size != category_size:
            raise ValueError(f"category_size={category_size} was given, but {os.fspath(path)!r} says it was trained "
                             f"with {cfg.category_size}: leave category_size out")
        return cfg
    return atd_config_from_state_dict(sd, category_size=int(category_size))


def _meta_config(meta: dict[str, str], key: str, cls, path) -> ATDConfig | DenoiserConfig | None:
    """The net config stored under ``key`` in a file's metadata (None if absent); a config that
    does not parse or does not fit ``cls`` is the file's fault: UnsupportedCheckpointError."""
    if key not in meta:
        return None
    try:
        return cls.from_dict(json.loads(meta[key]))
    except METADATA_CONFIG_ERRORS as e:
        raise UnsupportedCheckpointError(f"{os.fspath(path)!r}: its metadata {key!r} is not a valid "
                                         f"{cls.__name__} ({type(e).__name__}: {e})") from None

