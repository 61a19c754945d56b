"""``python -m upsr_core bench``: speed, memory and accuracy of the fast path vs the reference.

One table, one row per (LR size, batch, path, dtype), printed as each row finishes:
seconds per image, images/s, peak memory, achieved TFLOP/s (the reference's FLOPs, counted
once per shape with ``FlopCounterMode`` on meta tensors, divided by the row's time: the model's
work per second on one scale for every row, not what a fast row executed — on the CPU its
sub-pixel convs do 15 % fewer FLOPs), the speed-up
over the reference path timed in the same run, and max/mean |Δ| in [0,1] against the
reference output for the same LR and the same noise ε, and ``den max|d|``: the same with the
reference's estimate ŷ and weight w given to both paths, so only the denoiser's precision shows
(with random weights ATD's category sort regroups tokens on last-bit differences, which
dominates ``max|d|``; trained weights sort stably).

* reference = :class:`UPSRModel` as loaded: fp32, eager, math attention (``fused=False``),
  TF32 off — our faithful port of the official code;
* fast = :func:`upsr_core.fast.enable_fast` with the denoiser in fp32 / tf32 (fp32 weights,
  TF32 matmuls and convs; CUDA only) / bf16 / fp16; the estimator (ATD, 4% of the FLOPs) runs
  in the row's dtype, except in fp16 rows, where it stays fp32;
* ``fast+compile``: the same with ``torch.compile`` (CUDA; the CPU with ``--compile on``, where
  Inductor freezes the weights; when time is left).

Without ``--model`` the full-size nets (``--small``: the demo-size nets) get a seeded random
init, with the last conv scaled so x̂0 has an image-like std of 0.5; the timing does not
depend on the weights, the differences do (trained weights may behave differently).

Memory: only the row's own model is on the device during its row (the others wait on the
CPU), so a peak is what one model needs. ``peak GiB`` is the steady state (CUDA max
allocated over the timed runs, after a warm-up); ``1st GiB`` includes the first call (cuDNN
benchmark's algorithm probing, CUDA-graph capture); the JSON also has the reserved figures. On
CPU the peak is the process's RSS high-water mark (when ``/proc/self/clear_refs`` allows a
reset, else "-"): every model built for the run and what earlier rows left mapped count too,
so it is an upper bound, not one row's need. ``--mem-cap-gib`` runs the fast rows under a hard CUDA memory cap
(``torch.cuda.set_per_process_memory_fraction``; default 6 GiB for the tiled row, the issue's
bar): a row that finishes under the cap fits a card with that much free memory; one that runs
out is reported as ``OOM``. ``--budget-s``: no row starts once that many seconds are spent (a
row under way finishes); every row left out is named in the table and the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .cliargs import check_tiling_flags, float_range, int_list, int_min, writable_file
from .config import FULL_ATD, FULL_DENOISER
from .errors import FastOptionError, NonFiniteOutputError, cpu_has_fast_bf16
from .fast import enable_fast
from .imageio import write_text
from .model import DEFAULT_OVERLAP, DEFAULT_TILE, ESTIMATOR_BLOCK, UPSRModel
from .nets import ATD, UPSRDenoiser
from .pipeline import padded_size, starting_noise
from .tiling import partition, plan_tiles
from .uncertainty import weight_noise

__all__ = ["add_parser", "run_bench"]

log = logging.getLogger("upsr_core")

HEADER = (f"{'LR':>6} {'batch':>5} {'path':<21} {'dtype':<5} {'s/img':>9} {'img/s':>8} {'peak GiB':>8} "
          f"{'1st GiB':>8} {'TFLOP/s':>8} {'vs ref':>7} {'max|d|':>9} {'mean|d|':>9} {'den max|d|':>10}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the fast path against the reference path (one table)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--model", default=None, help="checkpoint to load (default: random full-size nets)")
    p.add_argument("--estimator", default=None, help="ATD checkpoint when --model holds only the denoiser")
    p.add_argument("--small", action="store_true", help="random demo-size nets instead of full size")
    p.add_argument("--sizes", type=int_list(1), default=None,
                   help="LR sides, e.g. 64,128,256 (default: CUDA 64,128,256; CPU 64)")
    p.add_argument("--batches", type=int_list(1), default=None, help="batch sizes (default: CUDA 1,8; CPU 1)")
    p.add_argument("--dtypes", default=None, help="fp32,tf32,bf16,fp16 (default: CUDA all; CPU fp32,bf16, "
                   "fp32 alone on a CPU without fast bf16 kernels)")
    p.add_argument("--tiled", type=int_min(0), default=None,
                   help="LR side of the tiled row (default: CUDA 1024; CPU none; 0: none)")
    p.add_argument("--tiled-dtypes", default=None,
                   help="dtypes of the tiled row (default bf16; fp32 on a CPU without fast bf16 kernels)")
    p.add_argument("--tile", type=int_min(1), default=DEFAULT_TILE, help="tile size (LR px) for the tiled row")
    p.add_argument("--overlap", type=int_min(0), default=DEFAULT_OVERLAP, help="tile overlap (LR px)")
    p.add_argument("--tile-batch", type=int_min(1), default=1, help="tiles per denoiser call")
    p.add_argument("--no-tiled-ref", action="store_true", help="skip the (slow) reference run of the tiled row")
    p.add_argument("--mem-cap-gib", type=float_range(0), default=None,
                   help="CUDA memory cap for the fast rows (default: 6 for the tiled row, none for the others; "
                        "0 = none)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="add fast+compile rows (auto: CUDA with Triton, while the budget allows; on: also on "
                        "the CPU, where the compile freezes the weights and takes minutes)")
    p.add_argument("--compile-sizes", type=int_list(1), default=None,
                   help="LR sides of the compiled rows (batch 1; default 64,256 on CUDA, 64 on the CPU)")
    p.add_argument("--compile-dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the compiled rows (default bf16; fp32 on a CPU without fast bf16)")
    p.add_argument("--graphs", choices=["auto", "on", "off"], default="auto", help="CUDA graphs in the fast path")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="channels-last denoiser in the fast path (auto: CUDA with the Triton GroupNorm; the CPU "
                        "without Winograd or compile)")
    p.add_argument("--subpixel", choices=["auto", "on", "off"], default="auto",
                   help="sub-pixel form of the upsampling convs in the fast path (auto: CPU only)")
    p.add_argument("--winograd", choices=["auto", "on", "off"], default="auto",
                   help="NNPACK's Winograd 3x3 convs in the fast path on the CPU (auto: AVX2-class x86 CPUs; "
                        "never in the compiled rows)")
    p.add_argument("--variants", default="",
                   help="extra fast-path rows (not tiled) to A/B in the same run, comma-separated: "
                        + ", ".join(f"{k} ({v[1]})" for k, v in VARIANTS.items()))
    p.add_argument("--reps", type=int_min(1), default=None,
                   help="timed runs per fast row (default: CUDA 10; CPU 2); at most 3 for batch > 1 and tiled rows; "
                        "the reference: 3 after a warm-up at CUDA batch 1, else 1")
    p.add_argument("--budget-s", type=float_range(0), default=None, help="skip rows once this many seconds are used")
    p.add_argument("--profile", type=int_min(0), default=0, metavar="N",
                   help="after each batch-1 fast row, profile one more call and print its N most expensive ops")
    p.add_argument("--seed", type=int_min(0), default=0)
    p.add_argument("--json", type=writable_file(), default=None,
                   help="also write the rows (and the machine) to this JSON file")
    p.set_defaults(func=run_bench)


_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_dtype(name: str) -> str:
    """The fast model a dtype row runs on: tf32 rows use the fp32 model (TF32 is a backend switch)."""
    return "fp32" if name == "tf32" else name


def _dtypes(s: str, flag: str) -> list[str]:
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [n for n in names if n not in _DTYPES]
    if bad or not names:
        raise ValueError(f"{flag} {s!r}: {f'unknown dtype(s) {bad}' if bad else 'empty'}; choose from "
                         f"{', '.join(sorted(_DTYPES))}")
    return names


def _build(args: argparse.Namespace) -> tuple[UPSRDenoiser, ATD]:
    if args.model is not None:
        from .model import load_upsr

        m = load_upsr(args.model, args.estimator)
        if m.estimator is None:
            raise ValueError(f"--model {args.model!r} holds only the denoiser, and bench needs the estimator too: "
                             "pass --estimator (the official atd_real.pth, or a training run's "
                             "estimator.safetensors)")
        return m.denoiser.eval(), m.estimator.eval()
    from .train.presets import get_preset

    p = get_preset("small") if args.small else None
    dcfg, acfg = (p.denoiser, p.estimator) if p else (FULL_DENOISER, FULL_ATD)
    torch.manual_seed(args.seed)
    return _calibrate(UPSRDenoiser(dcfg).eval()), ATD(acfg).eval()


@torch.no_grad()
def _calibrate(den: UPSRDenoiser, target_std: float = 0.5) -> UPSRDenoiser:
    """Scale a random net's ``conv_last`` so x̂0 has std ``target_std`` in [-1,1] space, as an
    image has. A default-initialised full-size net outputs std ≈ 0.02, which would make every
    precision difference look 25x smaller than with trained weights."""
    m = den.multiple_of
    x, lq = torch.randn(1, den.config.in_channels, m, m), torch.randn(1, den.config.lq_channels, m, m)
    std = den(x, torch.full((1,), 2), lq).std().item()
    den.conv_last.weight.mul_(target_std / std)
    den.conv_last.bias.mul_(target_std / std)
    return den


class Flops:
    """Reference FLOPs of one upscale, counted on meta tensors (cached per shape)."""

    def __init__(self, den: UPSRDenoiser, atd: ATD):
        from torch.utils.flop_counter import FlopCounterMode

        self._mode = FlopCounterMode
        with torch.device("meta"):
            self.den, self.atd = copy.deepcopy(den).to("meta"), copy.deepcopy(atd).to("meta")
        self._cache: dict[tuple, int] = {}

    def _count(self, key: tuple, fn) -> int:
        if key not in self._cache:
            with torch.no_grad(), self._mode(display=False) as fc:
                fn()
            self._cache[key] = fc.get_total_flops()
        return self._cache[key]

    def denoiser(self, b: int, h: int, w: int) -> int:
        m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
        t = torch.zeros(b, dtype=torch.long, device="meta")
        return self._count(("d", b, h, w), lambda: self.den(m(b, 48, h, w), t, m(b, 96, h, w)))

    def estimator(self, b: int, h: int, w: int) -> int:
        return self._count(("a", b, h, w), lambda: self.atd(torch.empty(b, 3, h, w, device="meta")))

    def upscale(self, b: int, hp: int, wp: int, tile: int, overlap: int, steps: int = 5) -> int:
        """Same work split as :meth:`UPSRModel.upscale`: estimator blocks with margin, denoiser tiles."""
        from .model import ESTIMATOR_MARGIN, _context_window

        total = 0
        for blk in partition(hp, wp, ESTIMATOR_BLOCK):  # (one block: the window is the image)
            y0, y1, x0, x1 = _context_window(blk, ESTIMATOR_MARGIN, hp, wp)
            total += b * self.estimator(1, y1 - y0, x1 - x0)
        for t in plan_tiles(hp, wp, tile, overlap, self.den.multiple_of):
            total += b * steps * self.denoiser(1, t.h, t.w)
        return total


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device, empty: bool = True) -> bool:
    if dev.type == "cuda":
        if empty:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak(dev: torch.device, ok: bool) -> tuple[float | None, float | None]:
    """(peak allocated or RSS, peak reserved) in GiB."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30, torch.cuda.max_memory_reserved(dev) / 2**30
    return (peak_rss_gib() if ok else None), None


def peak_rss_gib() -> float | None:
    """The process's RSS high-water mark (Linux ``VmHWM``) in GiB, None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _time(fn, dev: torch.device, warmup: int, reps: int
          ) -> tuple[torch.Tensor, list[float], list[float], tuple, tuple, float | None]:
    """-> (last output, wall seconds per run, process CPU seconds per run (on a shared CPU OpenMP's
    spin-waiting inflates it too), peak (GiB, reserved GiB) including the warm-up, peak over the timed runs only,
    wall seconds of the warm-up (compiling, cuDNN probing, graph capture; None without one))."""
    out = None
    ok = _reset_peak(dev)
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    _sync(dev)
    warm_s = time.perf_counter() - t0 if warmup else None
    first = _peak(dev, ok)
    if warmup:
        ok = _reset_peak(dev, empty=False)
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    steady = _peak(dev, ok)
    if not warmup:
        first = steady
    else:
        first = tuple(None if a is None else max(a, b or 0.0) for a, b in zip(first, steady))
    return out, times, cpu, first, steady, warm_s


def _fmt(v: float | None, spec: str) -> str:
    """``v`` in ``spec``; None as "-" right-aligned in the spec's width (the columns stay aligned)."""
    if v is None:
        width = "".join(c for c in spec.split(".")[0] if c.isdigit())
        return "-".rjust(int(width or 1))
    return format(v, spec)


class Table:
    def __init__(self, path: str | None, meta: dict):
        self.rows: list[dict] = []
        self.path, self.meta = path, meta
        print(HEADER, flush=True)
        self._write()  # a run that finishes no row still leaves its file

    def _write(self) -> None:
        if self.path:
            write_text(self.path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))

    def comment(self, text: str, row: dict | None = None) -> None:
        """A ``# text`` line in the table (and ``row`` in the JSON)."""
        print(f"# {text}", flush=True)
        self.meta.setdefault("comments", []).append(text)
        if row is not None:
            self.rows.append(row)
        self._write()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        r = row
        print(f"{r['lr']:>6} {r['batch']:>5} {r['path']:<21} {r['dtype']:<5} {_fmt(r['s_per_img'], '9.4f')} "
              f"{_fmt(r['img_per_s'], '8.2f')} {_fmt(r['peak_gib'], '8.2f')} {_fmt(r['first_peak_gib'], '8.2f')} "
              f"{_fmt(r['tflops'], '8.1f' if r['tflops'] >= 10 else '8.3f')} "
              f"{_fmt(r['vs_ref'], '6.1f') + ('x' if r['vs_ref'] is not None else ''):>7} "
              f"{_fmt(r['max_abs'], '9.2e')} {_fmt(r['mean_abs'], '9.2e')} {_fmt(r.get('den_max_abs'), '10.2e')}"
              + (f"  (cap {r['mem_cap_gib']:g} GiB)" if r.get("mem_cap_gib") else ""), flush=True)
        self._write()


def _row(lr, b, path, dtype, timed, flops, ref_s, out, ref_out, **extra) -> dict:
    times, cpu, first, peak, warm_s = timed
    s = statistics.median(times) / b
    d = (out.float().cpu() - ref_out).abs() if ref_out is not None else None
    return {
        "lr": lr, "batch": b, "path": path, "dtype": dtype, "s_per_img": s, "img_per_s": 1.0 / s,
        "best_s_per_img": min(times) / b, "reps": len(times), "peak_gib": peak[0], "reserved_gib": peak[1],
        "first_peak_gib": first[0], "first_reserved_gib": first[1], "warmup_s": warm_s,
        "tflops": flops / (s * b) / 1e12, "vs_ref": (ref_s / s) if ref_s else None,
        "max_abs": d.max().item() if d is not None else None, "mean_abs": d.mean().item() if d is not None else None,
        "finite": bool(torch.isfinite(out).all()), "process_cpu_s_per_img": min(cpu) / b, **extra,
    }


_SWITCH = {"auto": "auto", "on": True, "off": False}
# enable_fast's keywords that bench's own flags set (a FastOptionError names keywords)
_FLAG_OF = {"winograd": "winograd", "channels_last": "channels_last", "cuda_graphs": "graphs",
            "subpixel": "subpixel"}  # keyword: its argparse dest


def _how(m: UPSRModel) -> dict:
    """How a fast model ran: layout, GroupNorm (the Triton kernels only where they ran: on their
    device, and not after a failure) and CUDA graphs, for the rows' JSON."""
    from .nets.denoiser import _TRITON_NORM_FAILED, GroupNorm32

    opts = m.fast_options
    norms = [g for g in m.denoiser.modules() if isinstance(g, GroupNorm32)]
    triton = any(g.triton for g in norms) and not _TRITON_NORM_FAILED
    return {"layout": "channels_last" if opts.channels_last else "nchw",
            "norm": "triton" if triton else "nhwc" if opts.nhwc_norm else "native",
            "conv_epilogue": triton and any(g.fuse_bias for g in norms),
            "cuda_graphs": bool(opts.cuda_graphs and m.device.type == "cuda"), "subpixel": opts.subpixel,
            # where its convs can take NNPACK: float32 NCHW maps on the CPU (bf16 and channels-last rows: never)
            "winograd": bool(opts.winograd and m.device.type == "cpu" and m.dtype == torch.float32
                             and not opts.channels_last)}

VARIANTS: dict[str, tuple[dict, str]] = {
    "nchw": ({"channels_last": False}, "denoiser in NCHW (CUDA: no layout copies around F.group_norm)"),
    "nhwc-norm": ({"channels_last": True, "nhwc_norm": True}, "channels-last with group_norm_nhwc"),
    "no-graphs": ({"cuda_graphs": False}, "no CUDA graphs, as the ComfyUI nodes run"),
    "triton-norm": ({"channels_last": True, "triton_norm": True}, "channels-last with the Triton GroupNorm(+SiLU)"),
    "native-norm": ({"channels_last": True, "triton_norm": False},
                    "channels-last with F.group_norm (CUDA's default before 2026-11-27)"),
    "no-graphs-native": ({"cuda_graphs": False, "channels_last": True, "triton_norm": False},
                         "the nodes' path before 2026-11-27: no CUDA graphs, channels-last, F.group_norm"),
    "no-graphs-nchw": ({"cuda_graphs": False, "channels_last": False},
                       "the nodes' path on CUDA without Triton: no CUDA graphs, NCHW"),
    "subpixel": ({"subpixel": True}, "nearest x2 + conv as four 2x2 sub-pixel convs (the CPU default)"),
    "no-winograd": ({"winograd": False}, "oneDNN's direct 3x3 convs on the CPU (the default on AVX-512 CPUs)"),
    "winograd": ({"winograd": True}, "NNPACK's Winograd 3x3 convs on the CPU (the default on AVX2 CPUs)"),
    "no-epilogue": ({"conv_epilogue": False},
                    "Triton norm, but the convs add their own biases (the default before the conv epilogue)"),
}
"""Fast-path variants ``--variants`` adds as rows ``fast/<name>``: enable_fast overrides, and why."""


def _variants(s: str) -> list[str]:
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {', '.join(map(repr, bad))}; expected some of {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def _fast_model(den: UPSRDenoiser, atd: ATD, dev: torch.device, dtype: torch.dtype, args: argparse.Namespace,
                compile: bool = False, **overrides) -> UPSRModel:
    """A fast copy of the nets: switched on ``dev`` (so "auto" is decided for it), then parked on
    the CPU until :func:`_resident` brings it back for its rows. ``overrides``: enable_fast
    keywords that replace the command line's switches (a ``--variants`` row)."""
    m = UPSRModel(copy.deepcopy(den).to(dev, dtype), copy.deepcopy(atd).to(dev, torch.float32), dtype=dtype)
    kw = dict(cuda_graphs=_SWITCH[args.graphs], subpixel=_SWITCH[args.subpixel],
              channels_last=_SWITCH[args.channels_last])
    if not compile:  # Winograd runs eagerly: the compiled rows keep oneDNN's convs
        kw["winograd"] = _SWITCH[args.winograd]
    m = enable_fast(m, compile=compile, **{**kw, **overrides})
    return m.to("cpu")


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def run_bench(args: argparse.Namespace) -> int:
    from .cli import _device

    dev = _device(args.device)
    cuda = dev.type == "cuda"
    sizes = args.sizes or ([64, 128, 256] if cuda else [64])
    batch_sizes = args.batches or ([1, 8] if cuda else [1])
    slow_bf16 = dev.type == "cpu" and not cpu_has_fast_bf16()  # bf16 convs ~250x slower than fp32 there
    dtypes = (_dtypes(args.dtypes, "--dtypes") if args.dtypes is not None
              else ["fp32", "tf32", "bf16", "fp16"] if cuda else ["fp32"] if slow_bf16 else ["fp32", "bf16"])
    tiled = args.tiled if args.tiled is not None else (1024 if cuda else 0)
    tiled_dtypes = (_dtypes(args.tiled_dtypes, "--tiled-dtypes") if args.tiled_dtypes is not None  # checked anyway
                    else ["fp32"] if slow_bf16 else ["bf16"])
    tiled_dtypes = tiled_dtypes if tiled else []
    reps = args.reps or (10 if cuda else 2)
    if args.estimator is not None and args.model is None:  # it would be ignored: random nets
        raise ValueError(f"--estimator {args.estimator!r} goes with --model (the denoiser it pairs with); "
                         "without --model bench times random nets")
    if args.small and args.model is not None:
        raise ValueError(f"--small and --model {args.model!r}: --small makes random demo-size nets, --model "
                         "loads a file's; give one")
    if args.json:  # made now: an unwritable path fails before minutes of timing, not after
        from .batch import check_writable

        check_writable({Path(args.json).parent}, flag="--json")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def out_of_time(need: float = 0.0) -> bool:
        return args.budget_s is not None and time.perf_counter() - t0 + need > args.budget_s

    _tf32(False)  # the reference and the fp32 rows are true fp32
    den, atd = _build(args)
    flops = Flops(den, atd)
    for mod in (*den.modules(), *atd.modules()):
        if hasattr(mod, "fused"):
            mod.fused = False  # reference: math attention, whatever the class default is
    ref = UPSRModel(den, atd)  # every model waits on the CPU; only the running one is on the device
    variants = _variants(args.variants)
    keys = [("", n) for n in dtypes + tiled_dtypes] + [(v, n) for v in variants for n in dtypes]
    fast = {}
    for v, n in dict.fromkeys((v, _model_dtype(n)) for v, n in keys):
        overrides = VARIANTS[v][0] if v else {}
        try:
            fast[(v, n)] = _fast_model(den, atd, dev, _DTYPES[n], args, **overrides)
        except FastOptionError as e:  # e.g. a Triton variant without Triton or CUDA: name the flags
            flags = [f"--variants {v}"] if v else []
            flags += [f"--{_FLAG_OF[o].replace('_', '-')} {getattr(args, _FLAG_OF[o])}" for o in e.options
                      if o in _FLAG_OF and o not in overrides and getattr(args, _FLAG_OF[o]) != "auto"]
            raise ValueError(f"{' '.join(flags)}: {e}" if flags else str(e)) from None
    meta = {"device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "weights": args.model or
            ("random demo-size" if args.small else "random full-size"),
            "estimator_dtype": "the row's, fp32 in fp16 rows",
            "cudnn_benchmark": cuda, "graphs": args.graphs, "subpixel": args.subpixel, "winograd": args.winograd,
            "channels_last": args.channels_last, "variants": variants,
            "load_avg_1min": _load(), "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    print(f"# bench on {meta['device']} ({dev}), torch {meta['torch']}, {meta['threads']} threads, "
          f"{meta['weights']} weights, ATD in the row's dtype (fp32 in fp16 rows); fp32 = TF32 off", flush=True)
    mult = ref.multiple_of
    if tiled:  # fail before any row runs, not after minutes of device time
        check_tiling_flags(args.tile, args.overlap, mult)
    table = Table(args.json, meta)
    if slow_bf16 and "bf16" not in dtypes + tiled_dtypes:
        table.comment("no bf16 row: this CPU has no fast bf16 kernels (no AVX-512/AMX), where bf16 convolutions "
                      "run ~250x slower than fp32; --dtypes fp32,bf16 (--tiled-dtypes bf16) times it anyway")
    tiled_flags = [f for f, given in (("--tiled-dtypes", args.tiled_dtypes is not None),
                                      ("--tile", args.tile != DEFAULT_TILE),
                                      ("--overlap", args.overlap != DEFAULT_OVERLAP),
                                      ("--tile-batch", args.tile_batch != 1), ("--no-tiled-ref", args.no_tiled_ref))
                   if given]
    if tiled_flags and not tiled:
        table.comment(f"{', '.join(tiled_flags)}: settings of the tiled row, and there is none (--tiled N adds it)")
    compiled = args.compile == "on" or (args.compile == "auto" and cuda)
    compile_flags = [f for f, v in (("--compile-sizes", args.compile_sizes), ("--compile-dtype", args.compile_dtype))
                     if v is not None]
    if compile_flags and not compiled:
        table.comment(f"{', '.join(compile_flags)}: settings of the fast+compile rows, and there are none "
                      f"(--compile {args.compile} on {dev.type}; --compile on adds them)")
    if cuda and args.graphs != "off":
        table.comment("peak GiB of a row run as a CUDA graph (JSON: graphs > 0) leaves out the graph's memory pool, "
                      "which its replays reuse without allocating: its 1st GiB (the warm-up, capture included) is "
                      "what the row needs")
    if not cuda:
        if args.graphs == "on":
            table.comment(f"--graphs on: a CUDA switch, without effect on {dev.type}")
        if "tf32" in dtypes + tiled_dtypes:
            table.comment(f"tf32 on {dev.type}: TF32 is a CUDA mode; these rows run fp32 (their difference from the "
                          "fp32 rows is noise)")
        if args.mem_cap_gib:
            table.comment(f"--mem-cap-gib: a CUDA memory cap, without effect on {dev.type}")
        table.comment(f"peak/1st GiB on {dev.type}: the process's RSS high-water mark (every model built for the run "
                      "and what earlier rows left mapped count too): an upper bound, not one row's need")
        load = meta["load_avg_1min"]
        if load is not None and load > (os.cpu_count() or 1):
            table.comment(f"load average {load:.1f} on {os.cpu_count()} CPUs: other processes share the cores, "
                          "so these times are slower and noisier than on a quiet machine")
    for v in variants:  # on some devices a variant's switches resolve to the plain fast path's
        same = [n for n in dtypes if (v, _model_dtype(n)) in fast and ("", _model_dtype(n)) in fast
                and _how(fast[(v, _model_dtype(n))]) == _how(fast[("", _model_dtype(n))])]
        if same:
            table.comment(f"fast/{v} runs as fast does on {dev.type} ({', '.join(same)}): same layout, norm, "
                          "graphs and convs, so their difference is noise")
    refs: dict[tuple[int, int], torch.Tensor] = {}
    # the targets first (batch 1, then the tiled row), larger batches while time is left
    first = [b for b in batch_sizes if b == 1] or batch_sizes[:1]
    plan = [(s, b, False) for b in first for s in sizes] + ([(tiled, 1, True)] if tiled else [])
    plan += [(s, b, False) for b in batch_sizes if b not in first for s in sizes]
    padded_note: set[int] = set()
    for k, (s, b, is_tiled) in enumerate(plan):
        if out_of_time():
            for s2, b2, t2 in plan[k:]:
                label2 = f"{s2}t" if t2 else str(s2)
                table.comment(f"budget reached: LR {label2} batch {b2} skipped",
                              {"lr": label2, "batch": b2, "path": "all", "skipped": "budget"})
            break
        hp = padded_size(s, s, mult)[0]
        if hp != s and s not in padded_note:
            padded_note.add(s)
            table.comment(f"LR {s} runs padded to {hp} (the nets' multiple of {mult}): its rows time that work")
        lr = torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(args.seed))
        noise = starting_noise(args.seed, b, (hp, hp))
        tile, overlap = (args.tile, args.overlap) if is_tiled else (max(DEFAULT_TILE, hp), DEFAULT_OVERLAP)
        kw = dict(tile=tile, overlap=overlap, tile_batch=args.tile_batch if is_tiled else 1)
        fl = flops.upscale(b, hp, hp, tile, overlap)
        label = f"{s}t" if is_tiled else str(s)
        ref_out, ref_s, est = None, None, None
        if not (is_tiled and args.no_tiled_ref):
            with _resident(ref, dev):
                # the reference runs images one by one: batch-1 rows already warmed its shapes up
                warm = 1 if (cuda and b == 1 and not is_tiled) else 0
                if cuda and is_tiled:
                    table.comment(f"LR {label}: the reference is timed once, cold (cuDNN's algorithm search "
                                  "for its tile shapes included)")
                ref_out, *timed = _time(lambda: ref.upscale(lr, noise=noise, **kw), dev, warm, 3 if warm else 1)
                ref_out = ref_out.float().cpu()
                if not is_tiled:
                    refs[(s, b)] = ref_out  # the compiled rows compare with the untiled run of their size
                    # the reference's estimate and weight, for the denoiser-only difference
                    est = ref.estimate(lr)
                    est = (est, weight_noise(est.uncertainty()))
            row = _row(label, b, "reference", "fp32", timed, fl, None, ref_out, None, warmup_runs=warm)
            ref_s = row["s_per_img"]
            table.add(row)
        cap = args.mem_cap_gib if args.mem_cap_gib is not None else (6.0 if is_tiled else 0.0)
        runs = [("", n) for n in tiled_dtypes] if is_tiled else [(v, n) for v in ["", *variants] for n in dtypes]
        for j, (variant, name) in enumerate(runs):
            if out_of_time():
                for v2, n2 in runs[j:]:
                    table.comment(f"budget reached: LR {label} batch {b} {f'fast/{v2}' if v2 else 'fast'} {n2} "
                                  "skipped", {"lr": label, "batch": b, "path": f"fast/{v2}" if v2 else "fast",
                                              "dtype": n2, "skipped": "budget"})
                break
            m = fast[(variant, _model_dtype(name))]
            path = f"fast/{variant}" if variant else "fast"
            _tf32(name == "tf32")
            n_rep = reps if b == 1 and not is_tiled else max(1, min(reps, 3))
            try:
                with _resident(m, dev, cap if cuda else 0.0):
                    lr_d, noise_d = lr.to(dev), noise.to(dev)
                    out, *timed = _time(lambda: m.upscale(lr_d, noise=noise_d, **kw), dev, 1, n_rep)
                    den_d = None
                    if est is not None:
                        den_out = m.denoise(est[0], est[1], noise=noise, **kw)
                        den_d = (den_out.float().cpu() - ref_out).abs().max().item()
                    row = _row(label, b, path, name, timed, fl, ref_s, out, ref_out, graphs=len(m.graphs),
                               den_max_abs=den_d, mem_cap_gib=cap if cuda and cap else None, **_how(m))
                    if args.profile and b == 1 and not is_tiled:
                        m.graphs.clear()  # profile the eager ops, not one opaque graph replay
                        m.graphs.enabled = False
                        try:
                            row["profile"] = profile_table(lambda: m.upscale(lr_d, noise=noise_d, **kw), dev,
                                                           args.profile)
                        finally:
                            m.graphs.enabled = m.fast_options.cuda_graphs
                table.add(row)
                if row.get("profile"):
                    print_profile(row["profile"])
            except NonFiniteOutputError as e:  # e.g. fp16 overflowing with these weights: a finding, not a crash
                table.comment(f"LR {label} batch {b} {path} {name}: {e}",
                              {"lr": label, "batch": b, "path": path, "dtype": name, "finite": False})
            except torch.cuda.OutOfMemoryError:
                table.comment(f"LR {label} batch {b} {path} {name}: OOM under the {cap:g} GiB cap",
                              {"lr": label, "batch": b, "path": path, "dtype": name, "oom": True, "mem_cap_gib": cap})
            finally:
                _tf32(False)
    if compiled:
        _compile_rows(args, den, atd, dev, flops, table, out_of_time, refs, reps,
                      args.compile_dtype or ("fp32" if slow_bf16 else "bf16"),
                      args.compile_sizes or ([64, 256] if cuda else [64]))
    print(f"# done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def print_profile(table: str) -> None:
    """A :func:`profile_table` printed as ``#``-comment lines under the rows."""
    print("\n".join("#   " + line for line in table.splitlines()), flush=True)


def profile_table(fn, dev: torch.device, top: int) -> str:
    """One call of ``fn`` under torch.profiler -> a table of the ``top`` ops by self device
    time (CUDA) or self CPU time, with call counts: where a row's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()  # warm (eager shapes, cuDNN choices)
    _sync(dev)
    with profile(activities=acts) as prof:
        fn()
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48)


@contextlib.contextmanager
def _resident(model: UPSRModel, dev: torch.device, cap_gib: float = 0.0):
    """Run a row with only ``model`` on ``dev`` (and, on CUDA with ``cap_gib`` > 0, under a hard
    memory cap); the model goes back to the CPU afterwards, its graphs dropped."""
    model.to(dev)
    # set_per_process_memory_fraction takes an index or an indexed device, not a bare "cuda"
    index = (torch.cuda.current_device() if dev.index is None else dev.index) if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        if cap_gib > 0:
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total), index)
    try:
        yield model
    finally:
        if getattr(model, "graphs", None) is not None:
            model.graphs.clear()
        model.to("cpu")
        if dev.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, index)
            torch.cuda.empty_cache()


def _compile_rows(args, den, atd, dev, flops, table, out_of_time, refs, reps: int, dtype: str,
                  sizes: list[int]) -> None:
    """fast+compile rows (``dtype``, batch 1, LR ``sizes``), each only if >= 90 s of the budget are left."""
    import importlib.util

    if args.compile == "auto" and importlib.util.find_spec("triton") is None:
        table.comment("compile rows skipped: Triton is not installed")
        return
    m = _fast_model(den, atd, dev, _DTYPES[dtype], args, compile=True)
    with _resident(m, dev):
        for s in sizes:
            if out_of_time(90.0):
                table.comment(f"compile row LR {s} skipped: less than 90 s of the budget left")
                continue
            hp = padded_size(s, s, m.multiple_of)[0]
            lr = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(args.seed)).to(dev)
            noise = starting_noise(args.seed, 1, (hp, hp)).to(dev)
            kw = dict(tile=max(DEFAULT_TILE, hp), overlap=DEFAULT_OVERLAP)
            # the warm-up call compiles, warms up and captures: its seconds are the row's warmup_s
            try:
                out, *timed = _time(lambda: m.upscale(lr, noise=noise, **kw), dev, 1, reps)
            except (NonFiniteOutputError, torch.cuda.OutOfMemoryError) as e:  # a finding; the other rows go on
                what = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else str(e)
                table.comment(f"LR {s} batch 1 fast+compile {dtype}: {what}",
                              {"lr": str(s), "batch": 1, "path": "fast+compile", "dtype": dtype,
                               **({"oom": True} if what == "OOM" else {"finite": False})})
                m.graphs.clear()
                continue
            ref_row = next((r for r in table.rows if r["lr"] == str(s) and r["batch"] == 1
                            and r["path"] == "reference"), None)
            fl = flops.upscale(1, hp, hp, kw["tile"], kw["overlap"])
            ref_s = ref_row["s_per_img"] if ref_row else None
            table.add(_row(str(s), 1, "fast+compile", dtype, timed, fl, ref_s,
                           out, refs.get((s, 1)), compiled=",".join(m.compiled) or "none"))
            m.graphs.clear()


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """``python -m upsr_core.bench …`` = ``python -m upsr_core bench …``: the same parser and the
    same error handling (one ``error:`` line, exit code 2; out-of-memory advice)."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)], own_process=own_process)


if __name__ == "__main__":
    sys.exit(main(own_process=True))
