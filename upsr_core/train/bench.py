"""``python -m upsr_core train bench``: training speed and peak memory of one stage-2 step.

Random HR data, LR by bicubic (no Real-ESRGAN degradation, no data loading): frozen estimator
forward (float32) → denoiser forward/backward (MSE, no LPIPS) → AdamW → EMA, under autocast. Reports
seconds per iteration (median of timed iterations after warm-up) and peak CUDA memory.
Official reference (full config, batch 16, HR 256², fp16 autocast, H200): 0.268 s/iter,
9.66 GiB.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from ..cliargs import int_min, writable_file
from ..imageio import write_text
from .denoiser import DenoiserTask, build_denoiser_net
from .estimator import build_estimator_net
from .loop import COMPILE_MODES, LoopConfig, Trainer
from .presets import get_preset

__all__ = ["add_bench_parser", "run_bench"]

log = logging.getLogger(__name__)


class RandomFeed:
    """HR crops of uniform noise, made on the device (measures the model, not the data)."""

    def __init__(self, crop: int, device: torch.device):
        self.crop, self.device = crop, device

    def next(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand((batch, 3, self.crop, self.crop), generator=generator, device=self.device)


def add_bench_parser(stages: argparse._SubParsersAction) -> None:
    b = stages.add_parser("bench", help="s/iter and peak memory of a denoiser training step (random data)",
                          description="Times the step the official training was timed with: by default the full "
                                      "config at batch 16, HR 256, bf16 autocast on CUDA (off on the CPU, as in "
                                      "train), not a --config preset's batch and crop; give --batch/--crop/--amp to "
                                      "time those.")
    b.add_argument("--config", default="full", choices=["small", "full", "tiny"])
    b.add_argument("--batch", type=int_min(1), default=16)
    b.add_argument("--crop", type=int_min(1), default=256, help="HR side")
    b.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="default: bf16 on CUDA, off on the CPU (as train)")
    b.add_argument("--fused", choices=["auto", "on", "off"], default="auto")
    b.add_argument("--triton-norm", choices=["auto", "on", "off"], default="auto",
                   help="Triton GroupNorm with a backward (auto: with --channels-last where Triton runs)")
    b.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    b.add_argument("--channels-last", action="store_true", help="the denoiser in channels-last memory format")
    b.add_argument("--warmup", type=int_min(0), default=5)
    b.add_argument("--iters", type=int_min(1), default=20)
    b.add_argument("--profile", type=int_min(0), default=0, metavar="N",
                   help="after the timed steps, profile one more and print its N most expensive ops")
    b.add_argument("--device", default="auto")
    b.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile (reduce-overhead: forward and backward as CUDA graphs)")
    b.add_argument("--json", type=writable_file(), default=None, help="also write the result here")
    b.set_defaults(func=_cmd_bench)


def run_bench(args: argparse.Namespace) -> dict:
    from .cli import (
        check_compile_mode,
        check_crop,
        hardware,
        set_fused,
        set_triton_norm,
        setup_device,
        training_amp,
        triton_norm_ran,
    )

    check_compile_mode(args)
    preset = get_preset(args.config)
    check_crop(args.crop, "denoiser", preset.denoiser)
    di = setup_device(args.device)
    amp = training_amp(args.amp, di.device, "train bench")
    torch.backends.cudnn.benchmark = True  # fixed shapes here (no degradations)
    torch.manual_seed(0)
    den = build_denoiser_net(preset.denoiser)
    if args.channels_last:
        den.to(memory_format=torch.channels_last)
    est = build_estimator_net(preset.estimator).to(di.device)  # frozen; float32 (make_inputs: no autocast)
    fused = set_fused(args.fused, di.device, den, est)
    triton_norm = set_triton_norm(args.triton_norm, di.device, den, args.channels_last)
    task = DenoiserTask(den, est, RandomFeed(args.crop, di.device), args.batch, degradation="bicubic")
    cfg = LoopConfig(steps=args.warmup + args.iters, batch=args.batch, lr=1e-4, amp=amp, progress=False,
                     ema_decay=0.999, grad_clip=None)
    tr = Trainer(task, cfg, di)
    if args.compile:
        tr.compile(args.compile_mode)
    times, warm = [], []
    sync = torch.cuda.synchronize if di.device.type == "cuda" else (lambda *a: None)
    for i in range(args.warmup + args.iters):
        if i == args.warmup and di.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(di.device)
        sync()
        t0 = time.perf_counter()
        tr.train_step()
        sync()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        else:  # the first step holds the compile: say how long it took before a timeout can hide it
            warm.append(dt)
            log.info("train bench: warm-up step %d/%d took %.1f s", i + 1, args.warmup, dt)
    res = {
        "config": args.config, "batch": args.batch, "hr": args.crop, "amp": amp, "fused": fused,
        "compile": tr.compiled, "compile_mode": args.compile_mode if tr.compiled else None,
        "channels_last": args.channels_last,
        # what normalised: compiled nets fuse their own norm; a failed kernel fell back to the native one
        "triton_norm": triton_norm and not tr.compiled and triton_norm_ran(),
        "s_per_iter_median": round(statistics.median(times), 4), "s_per_iter_mean": round(statistics.fmean(times), 4),
        "iters": args.iters,
        "warmup_s": [round(t, 2) for t in warm],
        "params_denoiser": sum(p.numel() for p in den.parameters()), "hardware": hardware(di.device),
    }
    if di.device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(di.device) / 2**30, 3)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(di.device) / 2**30, 3)
    else:  # no allocator statistics: the process's RSS high-water mark, an upper bound (imports included)
        res["peak_mem_gib"] = None
        from ..bench import peak_rss_gib

        rss = peak_rss_gib()
        res["peak_rss_gib"] = None if rss is None else round(rss, 3)
    if args.profile:  # after the timing and the peak: the profiled steps must not reach them
        from ..bench import print_profile, profile_table

        res["profile"] = profile_table(tr.train_step, di.device, args.profile)
        print_profile(res["profile"])
    return res


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.json:  # made first: an unwritable path fails before the timing, not after
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    res = run_bench(args)
    line = json.dumps(res)
    log.info("%s", line)
    if args.json:
        write_text(args.json, line + "\n")
    return 0
