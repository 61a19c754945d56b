#!/usr/bin/env python
"""Does another device (Apple silicon's MPS, a GPU) compute what the CPU computes? One run.

    python tools/device_parity.py --device mps [--model FILE] [--image PNG] [--json OUT]

Written for the MPS guards no Mac has run yet (docs/NODES.md, *Apple silicon*); works for any
device torch knows. Two parts, each row PASS / FAIL / INFO:

* **probes** of the ops the guards are about, on the device against the CPU: an int64 sort of
  331 776 keys (ATD's category sort at a 576-px block; some macOS 15 builds return wrong
  indices past the 256th), ``official_sort`` (a permutation that sorts), ``window_index`` (its
  ``inv`` undoes ``idx``), ``scatter_rows`` (bit for bit), SDPA with an additive mask at the
  nets' head sizes (24, 32) against the math path, and fp16 GroupNorm statistics on
  large-valued maps (INFO: how far from fp32);
* **upscale** of ``--image`` (default: the README's sample) with ``--model`` (default: the
  bundled demo) on the device — reference fp32, fast fp32, fast fp16 — against the CPU's
  reference fp32: PSNR between the outputs and max |Δ|. The same seed gives the same noise on
  every device; what remains is kernel rounding and, where ATD's unstable category sort meets
  ties, another token grouping (SPEC §8.3), so fp32 must stay above 30 dB, fp16 is INFO.

Exit code 1 when a PASS/FAIL row fails. Nothing here is timed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upsr_core import load_upsr  # noqa: E402
from upsr_core.cli import default_model_path  # noqa: E402
from upsr_core.fast import enable_fast  # noqa: E402
from upsr_core.imageio import read_image  # noqa: E402
from upsr_core.nets.atd import official_sort, scatter_rows  # noqa: E402
from upsr_core.nets.attention import window_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FP32_MIN_PSNR = 30.0  # dB between the device's fp32 output and the CPU's (rounding and tie order only)


def probes(dev: torch.device) -> list[dict]:
    rows = []

    def row(name: str, ok: bool | None, detail: str) -> None:
        rows.append({"check": name, "status": "INFO" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 64, (1, 331_776), generator=g)
    got = torch.sort(keys.to(dev), dim=-1).values.cpu()
    row("int64 sort", torch.equal(got, torch.sort(keys, dim=-1).values), "sorted values equal the CPU's")
    perm = official_sort(keys.to(dev)).cpu()
    is_perm = torch.equal(torch.sort(perm[0]).values, torch.arange(keys.shape[1]))
    row("official_sort", is_perm and bool((keys[0, perm[0]].diff() >= 0).all()), "a permutation that sorts the keys")
    idx, inv = (t.cpu() for t in window_index(64, 64, 8, 4, dev))
    row("window_index", torch.equal(idx[inv], torch.arange(64 * 64)), "inv undoes idx (64×64, window 8, shift 4)")
    src, flat = torch.randn(4096, 96, generator=g), torch.randperm(4096, generator=g)
    row("scatter_rows", torch.equal(scatter_rows(src.to(dev), flat.to(dev)).cpu(), scatter_rows(src, flat)),
        "bit for bit with the CPU")
    for d in (24, 32):
        q, k, v = (torch.randn(64, 4, 256, d, generator=g).to(dev).transpose(1, 2).contiguous().transpose(1, 2)
                   for _ in range(3))  # non-contiguous views, as the nets hand them over
        bias = torch.randn(1, 4, 256, 256, generator=g).to(dev)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=d**-0.5)
        math_ = ((q @ k.transpose(-2, -1)) * d**-0.5 + bias).softmax(-1) @ v
        err = float((fused - math_).abs().max())
        row(f"SDPA head {d}", err < 1e-4, f"fused vs math, max |Δ| {err:.1e} (< 1e-4)")
    x = (torch.randn(1, 320, 128, 128, generator=g) * 8).to(dev)
    w, b = torch.ones(320, device=dev), torch.zeros(320, device=dev)
    ref = F.group_norm(x, 32, w, b)
    try:
        half = F.group_norm(x.half(), 32, w.half(), b.half()).float()
        err = float((half - ref).abs().max())
        finite = bool(torch.isfinite(half).all())
        row("fp16 GroupNorm", None, f"native fp16 vs fp32, max |Δ| {err:.2e} (finite: {finite}); the fast path "
            "keeps fp32 statistics on MPS")
    except RuntimeError as e:
        row("fp16 GroupNorm", None, f"not run: {str(e).splitlines()[0]}")
    return rows


def upscales(dev: torch.device, model_path: str, image: str) -> list[dict]:
    lr = read_image(image).rgb[None]
    want = load_upsr(model_path, device="cpu").upscale(lr, seed=0)
    rows = []
    for name, fast, dtype in (("reference fp32", False, torch.float32), ("fast fp32", True, torch.float32),
                              ("fast fp16", True, torch.float16)):
        if dtype == torch.float16 and dev.type == "cpu":
            continue  # no fast fp16 kernels on the CPU (minutes): nothing to learn there
        model = load_upsr(model_path, device=dev, dtype=dtype)
        if fast:
            enable_fast(model, cuda_graphs=False)
        got = model.upscale(lr, seed=0).float().cpu()
        mse = float((got - want).square().mean())
        psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
        ok = None if dtype == torch.float16 else psnr >= FP32_MIN_PSNR
        diff = float((got - want).abs().max())
        rows.append({"check": f"upscale {name}", "status": "INFO" if ok is None else ("PASS" if ok else "FAIL"),
                     "detail": f"vs CPU reference fp32: PSNR {psnr:.2f} dB, max |Δ| {diff:.2e}"
                               + ("" if ok is None else f" (≥ {FP32_MIN_PSNR:g} dB)")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="mps, cuda, cuda:N (cpu: the script's own check)")
    ap.add_argument("--model", default=None, help="model file (default: the bundled demo)")
    ap.add_argument("--image", default=str(REPO / "docs" / "sample_lr.png"), help="LR image to upscale")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows = probes(dev) + upscales(dev, args.model or default_model_path(), args.image)
    print(f"# device parity: {dev} against the CPU, torch {torch.__version__}")
    for r in rows:
        print(f"{r['status']:5} {r['check']:24} {r['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "rows": rows},
                                              indent=1) + "\n", encoding="utf-8")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
