"""Reference results for the e2e tests, made under the ComfyUI server's python (same torch build).

    python tests/e2e/reference.py SPEC.json

SPEC: {"model", "image", "png", "npy", "seed", "tile", "overlap", "tile_batch", "fast", "color_fix"}. Writes
what ``python -m upsr_core upscale [--fast] [--color-fix N]`` writes (png) and the float result of
``UPSRModel.upscale`` (after ``enable_fast`` with "fast": true; through ``wavelet_color_fix`` with
"color_fix": N > 0) (npy, (H, W, 3) float32), both from the same LR file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from upsr_core import load_upsr
from upsr_core.cli import main
from upsr_core.colorfix import wavelet_color_fix
from upsr_core.fast import enable_fast
from upsr_core.imageio import read_image

spec = json.loads(Path(sys.argv[1]).read_text())
kw = {k: spec[k] for k in ("seed", "tile", "overlap", "tile_batch")}
rc = main(["upscale", spec["image"], "-o", spec["png"], "--model", spec["model"], "--device", "cpu", "-q",
           "--overwrite", *[a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))],
           *(["--fast"] if spec.get("fast") else []),
           *(["--color-fix", str(spec["color_fix"])] if spec.get("color_fix") else [])])
if rc != 0:
    sys.exit(rc)
model = load_upsr(spec["model"])
if spec.get("fast"):
    enable_fast(model)
lr = read_image(spec["image"]).rgb.unsqueeze(0)
sr = model.upscale(lr, **kw)
if spec.get("color_fix"):
    sr = wavelet_color_fix(sr, lr, levels=spec["color_fix"])
sr = sr[0]
np.save(spec["npy"], sr.movedim(0, -1).cpu().numpy())
