"""Peak memory (RSS) of ``UPSRModel.upscale`` on the CPU for large LR images, and what dominates it.

Each size runs in a fresh child process, so every peak (``ru_maxrss``) belongs to one
image. Reported per size: the RSS before the upscale (interpreter, torch, model, the LR
tensor), the peak during ``upscale``, the peak after writing the result as an 8-bit PNG
(what the CLI does next), and the sizes the pipeline must hold whatever the tiling:

* ε, the noise field: B × 48 × Hp × Wp float32 (the seed contract draws it whole);
* the output canvas: B × 3 × 4h × 4w float32, and the blend norm 4h × 4w float32;
* "HR" below = one B × 3 × 4h × 4w float32 tensor = 192 bytes per LR pixel.

Usage::

    python tools/large_image_rss.py                         # tiny real nets, 512², 1024², 2048×1536
    python tools/large_image_rss.py --stub --sizes 6000x4000  # pipeline only (stub nets), any size
    python tools/large_image_rss.py --png-only --sizes 6000x4000  # write_png of the ×4 result alone
    python tools/large_image_rss.py --stub --stream --sizes 6000x4000  # rows streamed to the PNG (the CLI's path)

``--stub`` replaces both networks by pointwise stand-ins (no weights, no context), so
the time goes to the pipeline itself and very large images finish in minutes; the
network activations it leaves out are bounded by the tile (tests/test_reliability.py).
Not a test: nothing here is asserted, the numbers go to docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def build_model(stub: bool):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from upsr_core.config import ATDConfig, DenoiserConfig
    from upsr_core.model import UPSRModel
    from upsr_core.nets import ATD, UPSRDenoiser

    if stub:
        class StubDenoiser(nn.Module):
            multiple_of = 64  # the official net's

            def __init__(self):
                super().__init__()
                self.gain = nn.Parameter(torch.ones(()))

            def forward(self, x, t, lq):
                return F.pixel_shuffle(torch.tanh(x) * 0.1 + lq[:, :48] * self.gain, 4)

        class StubEstimator(nn.Module):
            def __init__(self):
                super().__init__()
                self.gain = nn.Parameter(torch.ones(()))

            def forward(self, x):
                return F.interpolate(x * self.gain, scale_factor=4, mode="nearest")

        return UPSRModel(StubDenoiser(), StubEstimator())
    torch.manual_seed(0)
    # the tiny random nets of the tests, but with the official window 8 and LR multiple 64
    den = UPSRDenoiser(DenoiserConfig(
        model_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=(1, 1, 1, 1), swin_levels=(64, 32, 16, 8),
        image_size=64, swin_depth=2, swin_embed_dim=32, swin_num_heads=2, window_size=8, mlp_ratio=1, num_feat=8))
    atd = ATD(ATDConfig(embed_dim=16, depths=(2,), num_heads=(2,), window_size=16, category_size=64,
                        num_tokens=8, reducted_dim=4, convffn_kernel_size=3))
    return UPSRModel(den.eval().requires_grad_(False), atd.eval().requires_grad_(False))


def child(h: int, w: int, stub: bool, tile: int, overlap: int, tile_batch: int, stream: bool = False) -> dict:
    import torch

    from upsr_core.imageio import PngStreamWriter, write_png
    from upsr_core.pipeline import padded_size

    model = build_model(stub)
    lr = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    hp, wp = padded_size(h, w, model.multiple_of)
    before = rss_now_mib()
    t0 = time.perf_counter()
    if stream:  # rows go to the PNG as they are final (what the CLI does for several tile rows)
        with tempfile.TemporaryDirectory() as d, PngStreamWriter(Path(d) / "sr.png", 4 * w, 4 * h) as png:
            model.upscale(lr, seed=0, tile=tile, overlap=overlap, tile_batch=tile_batch,
                          sink=lambda _i, _y0, rows: png.write_rows(rows))
        secs = time.perf_counter() - t0
        peak_upscale = peak_png = rss_peak_mib()
    else:
        sr = model.upscale(lr, seed=0, tile=tile, overlap=overlap, tile_batch=tile_batch)
        secs = time.perf_counter() - t0
        peak_upscale = rss_peak_mib()
        with tempfile.TemporaryDirectory() as d:
            write_png(Path(d) / "sr.png", sr[0])
        peak_png = rss_peak_mib()
    hr = 3 * 16 * h * w * 4 / MiB
    return {
        "lr": f"{w}x{h}", "padded": f"{wp}x{hp}", "stub": stub, "stream": stream, "tile": tile, "overlap": overlap,
        "tile_batch": tile_batch, "threads": torch.get_num_threads(), "seconds": round(secs, 1),
        "rss_before_mib": round(before), "peak_upscale_mib": round(peak_upscale), "peak_with_png_mib": round(peak_png),
        "hr_tensor_mib": round(hr), "noise_mib": round(48 * hp * wp * 4 / MiB), "norm_mib": round(hr / 3),
        "growth_over_hr": round((peak_upscale - before) / hr, 2),
    }


def child_png(h: int, w: int) -> dict:
    """RSS growth of write_png alone for a (3, 4h, 4w) float32 result (the CLI's last step)."""
    import torch

    from upsr_core.imageio import write_png

    sr = torch.rand(3, 4 * h, 4 * w, generator=torch.Generator().manual_seed(0))
    before = rss_now_mib()
    with tempfile.TemporaryDirectory() as d:
        write_png(Path(d) / "sr.png", sr)
    hr = 3 * 16 * h * w * 4 / MiB
    return {"lr": f"{w}x{h}", "png_only": True, "hr_tensor_mib": round(hr), "rss_before_mib": round(before),
            "peak_png_mib": round(rss_peak_mib()), "growth_over_hr": round((rss_peak_mib() - before) / hr, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512x512,1024x1024,2048x1536", help="LR sizes WxH, comma-separated")
    ap.add_argument("--stub", action="store_true", help="pointwise stand-in nets (pipeline memory only)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--tile-batch", type=int, default=1)
    ap.add_argument("--stream", action="store_true",
                    help="upscale(sink=…) into a PngStreamWriter (peak includes the PNG write)")
    ap.add_argument("--png-only", action="store_true", help="measure write_png of the result alone")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        w, h = map(int, args.child.split("x"))
        if args.png_only:
            row = child_png(h, w)
        else:
            row = child(h, w, args.stub, args.tile, args.overlap, args.tile_batch, args.stream)
        print(json.dumps(row))
        return 0
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for size in args.sizes.split(","):
        cmd = [sys.executable, __file__, "--child", size, "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--tile-batch", str(args.tile_batch)] + (["--stub"] if args.stub else [])
        cmd += ["--png-only"] if args.png_only else []
        cmd += ["--stream"] if args.stream else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"{size}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        if args.png_only:
            print(f"{row['lr']:>10} LR  write_png: before {row['rss_before_mib']:6d} MiB  "
                  f"peak {row['peak_png_mib']:6d} MiB"
                  f"  HR tensor {row['hr_tensor_mib']:5d} MiB  growth {row['growth_over_hr']:.2f} × HR", flush=True)
            continue
        print(f"{row['lr']:>10} LR  {row['seconds']:7.1f} s  before {row['rss_before_mib']:6d} MiB  "
              f"peak {row['peak_upscale_mib']:6d} MiB  (+PNG {row['peak_with_png_mib']:6d})  "
              f"HR tensor {row['hr_tensor_mib']:5d} MiB  noise {row['noise_mib']:5d} MiB  "
              f"growth {row['growth_over_hr']:.2f} × HR", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
