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

Exit code 1 when a PASS/FAIL row fails; a check whose kernel raises is a FAIL row (INFO for fp16),
not the end of the run. Rows print as they finish. Nothing here is timed.
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
from upsr_core.cli import default_model_path, replace_unencodable_output  # noqa: E402
from upsr_core.errors import NonFiniteOutputError  # noqa: E402
from upsr_core.fast import enable_fast  # noqa: E402
from upsr_core.imageio import read_image  # noqa: E402
from upsr_core.nets.atd import official_sort, scatter_rows  # noqa: E402
from upsr_core.nets.attention import window_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FP32_MIN_PSNR = 30.0  # dB between the device's fp32 output and the CPU's (rounding and tie order only)


# what a device's missing or broken kernel raises (MPS: RuntimeError/NotImplementedError; an
# out-of-memory is a RuntimeError; a NaN result of the fast fp16 path NonFiniteOutputError)
PROBE_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError, NonFiniteOutputError)


class Rows:
    """The report: each row printed as it is made (a later crash keeps the earlier ones on screen)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        r = {"check": name, "status": "INFO" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail}
        self.rows.append(r)
        print(f"{r['status']:5} {r['check']:24} {r['detail']}", flush=True)

    def run(self, name: str, check, *, info: bool = False) -> None:
        """``check()`` -> (ok, detail); an error of the device becomes a FAIL row (INFO with ``info``)."""
        try:
            ok, detail = check()
        except PROBE_ERRORS as e:
            first = (str(e).splitlines() or [""])[0]
            ok, detail = False, f"raised {type(e).__name__}: {first}"
        self.add(name, None if info else ok, detail)


def probes(dev: torch.device, out: Rows) -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 64, (1, 331_776), generator=g)

    def int64_sort():
        got = torch.sort(keys.to(dev), dim=-1).values.cpu()
        return torch.equal(got, torch.sort(keys, dim=-1).values), "sorted values equal the CPU's"

    def sort_official():
        perm = official_sort(keys.to(dev)).cpu()
        is_perm = torch.equal(torch.sort(perm[0]).values, torch.arange(keys.shape[1]))
        return is_perm and bool((keys[0, perm[0]].diff() >= 0).all()), "a permutation that sorts the keys"

    def windows():
        idx, inv = (t.cpu() for t in window_index(64, 64, 8, 4, dev))
        return torch.equal(idx[inv], torch.arange(64 * 64)), "inv undoes idx (64×64, window 8, shift 4)"

    src, flat = torch.randn(4096, 96, generator=g), torch.randperm(4096, generator=g)

    def scatter():
        same = torch.equal(scatter_rows(src.to(dev), flat.to(dev)).cpu(), scatter_rows(src, flat))
        return same, "bit for bit with the CPU"

    def sdpa(d: int):
        q, k, v = (torch.randn(64, 4, 256, d, generator=g).to(dev).transpose(1, 2).contiguous().transpose(1, 2)
                   for _ in range(3))  # non-contiguous views, as the nets hand them over
        bias = torch.randn(1, 4, 256, 256, generator=g).to(dev)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=d**-0.5)
        math_ = ((q @ k.transpose(-2, -1)) * d**-0.5 + bias).softmax(-1) @ v
        err = float((fused - math_).abs().max())
        return err < 1e-4, f"fused vs math, max |Δ| {err:.1e} (< 1e-4)"

    def half_group_norm():
        x = (torch.randn(1, 320, 128, 128, generator=g) * 8).to(dev)
        w, b = torch.ones(320, device=dev), torch.zeros(320, device=dev)
        ref = F.group_norm(x, 32, w, b)
        half = F.group_norm(x.half(), 32, w.half(), b.half()).float()
        err = float((half - ref).abs().max())
        finite = bool(torch.isfinite(half).all())
        return None, (f"native fp16 vs fp32, max |Δ| {err:.2e} (finite: {finite}); the fast path keeps fp32 "
                      "statistics on MPS")

    out.run("int64 sort", int64_sort)
    out.run("official_sort", sort_official)
    out.run("window_index", windows)
    out.run("scatter_rows", scatter)
    for d in (24, 32):
        out.run(f"SDPA head {d}", lambda d=d: sdpa(d))
    out.run("fp16 GroupNorm", half_group_norm, info=True)


def upscales(dev: torch.device, model_path: str, image: str, out: Rows) -> None:
    lr = read_image(image).rgb[None]
    want = load_upsr(model_path, device="cpu").upscale(lr, seed=0)
    for name, fast, dtype in (("reference fp32", False, torch.float32), ("fast fp32", True, torch.float32),
                              ("fast fp16", True, torch.float16)):
        if dtype == torch.float16 and dev.type == "cpu":
            continue  # no fast fp16 kernels on the CPU (minutes): nothing to learn there

        def one(fast=fast, dtype=dtype):
            model = load_upsr(model_path, device=dev, dtype=dtype)
            if fast:
                enable_fast(model, cuda_graphs=False)
            got = model.upscale(lr, seed=0).float().cpu()
            mse = float((got - want).square().mean())
            psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
            diff = float((got - want).abs().max())
            bar = "" if dtype == torch.float16 else f" (≥ {FP32_MIN_PSNR:g} dB)"
            return psnr >= FP32_MIN_PSNR, f"vs CPU reference fp32: PSNR {psnr:.2f} dB, max |Δ| {diff:.2e}{bar}"

        out.run(f"upscale {name}", one, info=dtype == torch.float16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="mps, cuda, cuda:N (cpu: the script's own check)")
    ap.add_argument("--model", default=None, help="model file (default: the bundled demo)")
    ap.add_argument("--image", default=str(REPO / "docs" / "sample_lr.png"), help="LR image to upscale")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    replace_unencodable_output()  # Δ, ≥ on a cp1252 console (Windows)
    dev = torch.device(args.device)
    print(f"# device parity: {dev} against the CPU, torch {torch.__version__}", flush=True)
    out = Rows()
    probes(dev, out)
    upscales(dev, args.model or default_model_path(), args.image, out)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "rows": out.rows},
                                              indent=1) + "\n", encoding="utf-8")
    return 1 if any(r["status"] == "FAIL" for r in out.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
