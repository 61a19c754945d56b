"""UPSRModel: the two networks, where they live, and tiled stage runners.

``load_upsr(model, estimator=None)`` returns an :class:`UPSRModel`; its methods run the
stages of :mod:`upsr_core.pipeline` over tiles so that peak memory is bounded by the
tile size and tile batch, not by the image size:

* :meth:`UPSRModel.estimate`  lr (B,3,h,w) [0,1] -> :class:`Estimate` (ATD tiled, feathered)
* :meth:`UPSRModel.denoise`   Estimate + w + seed -> sr (B,3,4h,4w) [0,1] (one noise field
  for the whole image, sliced per tile, feathered blend)
* :meth:`UPSRModel.upscale`   both, with w from ψ, b_u and ψ_max
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checkpoint import build_denoiser, build_estimator, read_checkpoint, split_nets
from .config import ATDConfig, DenoiserConfig
from .errors import UnsupportedCheckpointError
from .nets import ATD, UPSRDenoiser
from .pipeline import SCALE, Estimate, bicubic_x4, check_lr, crop_hr, denoise_estimate, pad_lr, run_estimator, starting_noise
from .schedule import make_schedule
from .tiling import Tile, batches, check_tiling, plan_tiles, tile_weight
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, check_weight_params, weight_noise

__all__ = ["UPSRModel", "load_upsr", "Progress", "DEFAULT_TILE", "DEFAULT_OVERLAP"]

DEFAULT_TILE = 512  # LR pixels: the official chop size, so images up to 512 px run untiled
DEFAULT_OVERLAP = 64  # LR pixels: the official chop overlap (512 − 448)

Progress = Callable[[int, int], None]
"""progress(done, total): called after each denoiser step over all tiles; may raise to cancel."""


@dataclass
class UPSRModel:
    denoiser: UPSRDenoiser
    estimator: ATD | None
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    scale: int = SCALE

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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "UPSRModel":
        """Move both nets; ``dtype`` applies to the denoiser, the estimator never goes to fp16."""
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        dtype = dtype or self.dtype
        self.denoiser.to(device=device, dtype=dtype)
        if self.estimator is not None:
            self.estimator.to(device=device, dtype=torch.float32 if dtype == torch.float16 else dtype)
        self.dtype = dtype
        return self

    # ------------------------------------------------------------------ network calls
    def _denoiser_call(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x.to(self.dtype), t, lq.to(self.dtype)).float()

    def _estimator_call(self, x01: torch.Tensor) -> torch.Tensor:
        if self.estimator is None:
            raise ValueError("this UPSRModel has no estimator: load one (--estimator) or pass sr_estimate")
        edt = next(self.estimator.parameters()).dtype
        return self.estimator(x01.to(edt)).float()

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def estimate(self, lr: torch.Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Estimate:
        """lr (B,3,h,w) in [0,1] -> Estimate at the padded size; ATD runs tiled when the
        padded LR exceeds ``tile`` (LR px), else exactly as the official code."""
        check_lr(lr)
        check_tiling(tile, overlap, self.multiple_of)
        lr_pm = pad_lr(lr.float().cpu(), self.multiple_of)
        bic = bicubic_x4(lr_pm)
        tiles = plan_tiles(*lr_pm.shape[-2:], tile, overlap)
        dev = self.device
        if len(tiles) == 1:
            y_hat = run_estimator(self._estimator_call, lr_pm.to(dev)).cpu()
            return Estimate(lr_pm, bic, y_hat, tuple(lr.shape[-2:]))
        acc = torch.zeros_like(bic)
        for t in tiles:
            ys, xs = t.slices()
            out = run_estimator(self._estimator_call, lr_pm[:, :, ys, xs].to(dev)).cpu()
            hs, ws_ = t.scaled(SCALE).slices()
            acc[:, :, hs, ws_] += out * tile_weight(t, tiles, SCALE)
        norm = torch.zeros(bic.shape[-2:])
        for t in tiles:
            hs, ws_ = t.scaled(SCALE).slices()
            norm[hs, ws_] += tile_weight(t, tiles, SCALE)
        return Estimate(lr_pm, bic, acc / norm, tuple(lr.shape[-2:]))

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
    ) -> torch.Tensor:
        """Diffusion stage over tiles -> sr (B,3,4h,4w) in [0,1].

        weight: w (B, 1|3, 4Hp, 4Wp) in [0,1]. One ε field (seed contract: image i uses
        seed + i) covers the whole padded image and is sliced per tile.
        """
        check_tiling(tile, overlap, self.multiple_of)
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
        b, _, hp, wp = est.lr_pm.shape
        if noise is None:
            noise = starting_noise(seed, b, (hp, wp))
        weight = weight.float().cpu().expand(b, 3, *est.bicubic_pm.shape[-2:])
        tiles = plan_tiles(hp, wp, tile, overlap)
        schedule = make_schedule()
        total = schedule.num_steps * len(tiles) * b
        dev = self.device
        out = torch.zeros_like(est.bicubic_pm)
        norm = torch.zeros(est.bicubic_pm.shape[-2:])
        done = 0
        for i in range(b):  # images one by one: memory is bounded by tile_batch tiles
            for group in batches(tiles, tile_batch):
                sub, w_sub, n_sub = _gather(est, weight, noise, i, group)

                def step(_k: int, _x: torch.Tensor, _x0: torch.Tensor, n: int = len(group)) -> None:
                    nonlocal done
                    done += n
                    if progress is not None:
                        progress(done, total)

                x = denoise_estimate(self._denoiser_call, sub.to(dev), w_sub.to(dev), n_sub.to(dev),
                                     schedule=schedule, callback=step, crop=False).cpu()
                for j, t in enumerate(group):
                    hs, ws_ = t.scaled(SCALE).slices()
                    wt = tile_weight(t, tiles, SCALE) if len(tiles) > 1 else 1.0
                    out[i, :, hs, ws_] += x[j] * wt
                    if i == 0:
                        norm[hs, ws_] += wt
        return crop_hr(out / norm, est.size).clamp(-1, 1) * 0.5 + 0.5

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
    ) -> torch.Tensor:
        """lr (B,3,h,w) in [0,1] -> sr (B,3,4h,4w) in [0,1]; the official pipeline for LR <= tile."""
        check_weight_params(b_u, psi_max)
        est = self.estimate(lr, tile=tile, overlap=overlap)
        w = weight_noise(est.uncertainty(), b_u, psi_max)
        return self.denoise(est, w, seed=seed, tile=tile, overlap=overlap, tile_batch=tile_batch, progress=progress)


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
) -> UPSRModel:
    """Load the denoiser (and estimator) from official ``.pth`` or ``.safetensors`` files.

    ``model`` may hold both nets (a converted file); otherwise ``estimator`` names the
    ATD file. Raises UnsupportedCheckpointError for a wrong or unreadable file.
    """
    sd, meta = read_checkpoint(model)
    nets = split_nets(sd)
    if "denoiser" not in nets:
        raise UnsupportedCheckpointError(
            f"{os.fspath(model)!r} holds ATD estimator weights; pass it as the estimator and give the "
            "UPSR denoiser (upsr.pth) as the model"
        )
    dcfg = DenoiserConfig.from_dict(json.loads(meta["denoiser_config"])) if "denoiser_config" in meta else None
    den = build_denoiser(nets["denoiser"], dcfg)
    est_net = None
    if estimator is not None:
        esd, emeta = read_checkpoint(estimator)
        enets = split_nets(esd)
        if "estimator" not in enets:
            raise UnsupportedCheckpointError(
                f"{os.fspath(estimator)!r} holds UPSR denoiser weights, expected the ATD estimator (atd_real.pth)"
            )
        ecfg = _atd_config(emeta)
        est_net = build_estimator(enets["estimator"], ecfg)
    elif "estimator" in nets:
        est_net = build_estimator(nets["estimator"], _atd_config(meta))
    m = UPSRModel(den, est_net, metadata=meta)
    return m.to(device, dtype)


def _atd_config(meta: dict[str, str]) -> ATDConfig | None:
    return ATDConfig.from_dict(json.loads(meta["estimator_config"])) if "estimator_config" in meta else None

