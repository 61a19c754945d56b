"""Make docs/overview.png (the README's first figure): bicubic LR | uncertainty ψ | noise weight w | UPSR result.

    python tools/make_overview.py [--model PATH] [--input docs/sample_lr.png] [--out docs/overview.png]

Defaults: the bundled demo model, seed 0, b_u 0.4, ψ_max 0.05, the reference path on the CPU
(remade on 2026-11-29 on the 2-core AVX2 VM: 1 level from the 2026-11-26 figure on 0.005 % of its
bytes, a difference of machines, as the code of that day gives today's bytes here).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn.functional as F
from PIL import Image, ImageDraw

from upsr_core import load_upsr, weight_noise
from upsr_core.cli import default_model_path
from upsr_core.imageio import read_image
from upsr_core.pipeline import crop_hr
from upsr_core.stages import heatmap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--input", default="docs/sample_lr.png")
    ap.add_argument("--out", default="docs/overview.png")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    model = load_upsr(a.model)
    lr = read_image(a.input).rgb.unsqueeze(0)
    est = model.estimate(lr)
    psi = est.uncertainty()
    w = weight_noise(psi)
    sr = model.denoise(est, w, seed=a.seed)
    bic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    panels = [bic, heatmap(crop_hr(psi, est.size), 0.0, 0.1), heatmap(crop_hr(w, est.size), 0.0, 1.0), sr]
    # ASCII: PIL's default font
    which = "demo model" if Path(a.model).resolve() == default_model_path().resolve() else Path(a.model).name
    names = ["bicubic x4", "uncertainty psi (0 to 0.1)", "noise weight w (0 to 1)", f"UPSR ({which})"]
    tiles = [Image.fromarray((p[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for p in panels]
    wd, ht = tiles[0].size
    sheet = Image.new("RGB", (4 * wd + 30, ht + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (t, n) in enumerate(zip(tiles, names)):
        sheet.paste(t, (i * (wd + 10), 24))
        draw.text((i * (wd + 10) + 4, 5), n, fill="black")
    sheet.save(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
