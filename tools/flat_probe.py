#!/usr/bin/env python
"""How much texture a model invents on a perfectly flat input: the output's standard deviation.

    python tools/flat_probe.py [--model FILE ...] [--level 120] [--size 64] [--b-u 0.4,0] [--seed 0]

A flat grey LR (every pixel ``--level``/255) has nothing to restore, so a model's ×4 output
should be flat too; its std over all pixels and channels, in 8-bit levels, is texture the
model made up (sky and walls look noisy when it is high). One line per model and b_u. The
bundled demo gives 18.2 levels at b_u 0.4 and 13.2 at b_u 0 (CPU, seed 0, 2026-11-26): a
ship gate for retrained demos (tools/device_train.sh), beside A_val PSNR and NIQE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upsr_core import load_upsr  # noqa: E402
from upsr_core.cli import default_model_path  # noqa: E402
from upsr_core.cliargs import float_range, int_min  # noqa: E402


def flat_std(model, *, level: int = 120, size: int = 64, b_u: float = 0.4, seed: int = 0) -> tuple[float, float]:
    """(std, mean) of ×4 of a flat ``size``² LR at ``level``/255, in 8-bit levels."""
    sr = model.upscale(torch.full((1, 3, size, size), level / 255), seed=seed, b_u=b_u)
    return float(sr.std()) * 255, float(sr.mean()) * 255


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=[str(default_model_path())])
    p.add_argument("--level", type=float_range(0, 255), default=120.0, help="grey level of the input, 0-255")
    p.add_argument("--size", type=int_min(1), default=64, help="LR side, pixels")
    p.add_argument("--b-u", default="0.4,0", help="comma list of noise floors")
    p.add_argument("--seed", type=int_min(0), default=0)
    a = p.parse_args(argv)
    floors = [float(v) for v in a.b_u.split(",") if v.strip()]
    for path in a.model:
        model = load_upsr(path)
        for b_u in floors:
            std, mean = flat_std(model, level=a.level, size=a.size, b_u=b_u, seed=a.seed)
            print(f"{Path(path).name}  b_u {b_u:g}: flat {a.level:g}/255 -> output std {std:.2f} levels "
                  f"(mean {mean:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
