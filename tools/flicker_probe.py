#!/usr/bin/env python
"""How much a batch of video frames flickers with per-image noise (seed + i) and with ``same_noise``.

    python tools/flicker_probe.py [--model FILE] [--image PNG] [--frames 6] [--size 64x120] [--sigma 2]

Two synthetic clips are cut from one LR image, both of ``--frames`` frames of ``--size`` (h×w):

* *static*: the same crop in every frame plus independent Gaussian noise of ``--sigma`` 8-bit
  levels (a still camera's sensor noise);
* *pan*: the crop moved one LR pixel to the right per frame (no added noise).

Each clip goes through ``model.upscale`` as one batch, once with image i's noise from seed + i and
once with every frame given the seed's noise. Flicker is the mean |Δ| in 8-bit levels between
consecutive output frames (for the pan, after shifting by the known 4 HR pixels, so only what
the model changed is counted); bicubic ×4 of the same frames is the reference row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upsr_core import load_upsr  # noqa: E402
from upsr_core.cli import default_model_path  # noqa: E402
from upsr_core.imageio import read_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def clips(lr: torch.Tensor, frames: int, h: int, w: int, sigma: float) -> dict[str, torch.Tensor]:
    """lr (1,3,H,W) [0,1] -> {'static', 'pan'}: (frames, 3, h, w) [0,1]."""
    if lr.shape[-2] < h or lr.shape[-1] < w + frames - 1:
        raise ValueError(f"--size {h}x{w} with {frames} frames needs an image of at least {h}x{w + frames - 1}, "
                         f"got {lr.shape[-2]}x{lr.shape[-1]}")
    g = torch.Generator().manual_seed(1)
    crop = lr[:, :, :h, :w]
    static = (crop + torch.randn((frames, 3, h, w), generator=g) * sigma / 255).clamp(0, 1)
    pan = torch.cat([lr[:, :, :h, k : k + w] for k in range(frames)])
    return {"static": static, "pan": pan}


def flicker(out: torch.Tensor, pan: bool) -> float:
    """Mean |Δ| between consecutive frames (B,3,H,W) [0,1], in 8-bit levels; pan: aligned by 4 px."""
    if pan:
        d = [(out[k + 1, ..., :-4] - out[k, ..., 4:]).abs().mean() for k in range(len(out) - 1)]
    else:
        d = [(out[k + 1] - out[k]).abs().mean() for k in range(len(out) - 1)]
    return 255 * torch.stack(d).mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--image", default=str(REPO / "docs" / "sample_lr.png"))
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--size", default="64x120", help="h×w of each frame, LR pixels")
    p.add_argument("--sigma", type=float, default=2.0, help="sensor noise of the static clip, 8-bit levels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.frames < 2:
        raise SystemExit(f"error: --frames must be >= 2, got {args.frames}")
    h, w = (int(v) for v in args.size.lower().split("x"))
    model = load_upsr(args.model)
    lr = read_image(args.image).rgb[None]
    print(f"| clip | bicubic | seed + i | same_noise |   ({args.frames} frames of {h}×{w} LR, "
          f"mean |Δ| between frames, 8-bit levels)")
    print("|---|---|---|---|")
    for name, frames in clips(lr, args.frames, h, w, args.sigma).items():
        pan = name == "pan"
        bic = F.interpolate(frames, scale_factor=4, mode="bicubic").clamp(0, 1)
        per = model.upscale(frames, seed=args.seed)
        same = model.upscale(frames, seed=args.seed, same_noise=True)
        print(f"| {name} | {flicker(bic, pan):.2f} | {flicker(per, pan):.2f} | {flicker(same, pan):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
