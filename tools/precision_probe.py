#!/usr/bin/env python
"""How far each denoiser precision is from fp32, and how much of it bf16 itself forces.

    python tools/precision_probe.py [--model FILE] [--device cpu|cuda] [--image PNG] [--fp16]

The same LR crops, estimate ŷ, weight w and noise go through the denoiser in each mode;
the table gives max / mean |Δ| of the [0,1] result against the fp32 reference path:

* fast fp32 / bf16 / fp16: ``enable_fast`` on a model in that dtype (what the CLI runs);
* autocast bf16: fp32 weights under ``torch.autocast`` (norms, softmax and the residual
  stream stay fp32; only matmuls/convs take bf16 operands);
* ideal bf16 GEMM: everything in fp32 except that every conv/linear's weights and inputs
  are rounded to bf16 (its output too, in the second row) — what a perfect bf16 kernel
  with fp32 accumulation gives. If this row is as far as the fast bf16 row, the error is
  bf16's 8-bit mantissa, not the kernels or the layout.

fp16 on the CPU has no fast kernels (minutes per crop): it runs only with ``--fp16``. CUDA
graphs stay off (this measures precision; graph replay computes the same kernels).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upsr_core import load_upsr, weight_noise  # noqa: E402
from upsr_core.cli import default_model_path  # noqa: E402
from upsr_core.fast import enable_fast  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _round_bf16(x):
    return x.bfloat16().float() if torch.is_tensor(x) and x.is_floating_point() else x


def ideal_bf16(model, outputs: bool):
    """A copy whose conv/linear weights, inputs (and outputs) are rounded to bf16, computed in fp32."""
    m = copy.deepcopy(model)
    for mod in m.denoiser.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            with torch.no_grad():
                for p in mod.parameters():
                    p.copy_(_round_bf16(p))
            mod.register_forward_pre_hook(lambda _m, args: tuple(_round_bf16(a) for a in args))
            if outputs:
                mod.register_forward_hook(lambda _m, _a, out: _round_bf16(out))
    return enable_fast(m, cuda_graphs=False)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file (default: the bundled demo model)")
    p.add_argument("--estimator", default=None)
    p.add_argument("--image", default=str(REPO / "docs" / "sample_lr.png"), help="LR image to take crops from")
    p.add_argument("--crop", type=int, default=64, help="LR crop side (default 64)")
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp16", action="store_true", help="also fp16 (slow on the CPU)")
    args = p.parse_args(argv)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (cuDNN convs default to TF32)
    torch.backends.cudnn.allow_tf32 = False
    try:
        _probe(args)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    return 0


def _probe(args: argparse.Namespace) -> None:
    dev = torch.device(args.device)
    ref = load_upsr(args.model or default_model_path(), args.estimator)
    img = np.asarray(Image.open(args.image).convert("RGB"))
    h, w = img.shape[:2]
    if min(h, w) < args.crop:
        raise ValueError(f"--image is {w}×{h}, smaller than --crop {args.crop}")
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(args.crops):
        y, x = int(rng.integers(0, h - args.crop + 1)), int(rng.integers(0, w - args.crop + 1))
        lr = torch.from_numpy(img[y : y + args.crop, x : x + args.crop].copy()).permute(2, 0, 1)[None].float() / 255
        est = ref.estimate(lr)
        wt = weight_noise(est.uncertainty(), b_u=0.4, psi_max=0.05)
        cases.append((est, wt, ref.denoise(est, wt, seed=0)))
    ref.to(dev)
    modes = {
        "fast fp32": lambda: enable_fast(copy.deepcopy(ref), cuda_graphs=False),
        "fast bf16": lambda: enable_fast(copy.deepcopy(ref).to(dtype=torch.bfloat16), cuda_graphs=False),
        "autocast bf16 (fp32 weights)": lambda: enable_fast(copy.deepcopy(ref), cuda_graphs=False),
        "ideal bf16 GEMM (operands)": lambda: ideal_bf16(ref, outputs=False),
        "ideal bf16 GEMM (operands+outputs)": lambda: ideal_bf16(ref, outputs=True),
    }
    if args.fp16:
        modes["fast fp16"] = lambda: enable_fast(copy.deepcopy(ref).to(dtype=torch.float16), cuda_graphs=False)
    print(f"{'mode':36} {'max|d|':>9} {'mean|d|':>9} {'s/crop':>7}")
    for name, make in modes.items():
        m = make()
        auto = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=name.startswith("autocast"))
        mx, mean, t = 0.0, 0.0, 0.0
        for est, wt, want in cases:
            with auto:
                t0 = time.perf_counter()
                out = m.denoise(est, wt, seed=0).float().cpu()
                t += time.perf_counter() - t0
            d = (out - want).abs()
            mx, mean = max(mx, d.max().item()), mean + d.mean().item() / len(cases)
        print(f"{name:36} {mx:9.2e} {mean:9.2e} {t / len(cases):7.2f}", flush=True)
        del m


if __name__ == "__main__":
    sys.exit(main())
