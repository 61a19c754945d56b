"""Command line: ``python -m upsr_core {upscale,convert,bench,train,eval} …``.

User mistakes (missing files, bad images, wrong checkpoints, bad parameters) end with a
one-line ``error: …`` on stderr and exit code 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch

from .cliargs import B_U_ARG, PSI_MAX_ARG, SEED_ARG, OneLineParser, UsageError, int_min, png_or_folder, writable_file
from .colorfix import DEFAULT_LEVELS, MAX_LEVELS
from .cpu_memory import claim_process, for_cpu_run
from .errors import NonFiniteOutputError, UnsupportedCheckpointError, is_out_of_memory
from .model import DEFAULT_OVERLAP, DEFAULT_TILE, ESTIMATOR_BLOCK, check_device

__all__ = ["main", "default_model_path"]

log = logging.getLogger("upsr_core")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEMO_MODEL = "upsr_demo_x4.safetensors"


def default_model_path() -> Path:
    """The bundled demo model (estimator + denoiser, trained by this project)."""
    return WEIGHTS_DIR / DEMO_MODEL


class ProgressBar:
    """A small stderr progress bar (shown only on a terminal or when forced)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc = max(total, 1), desc
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.n = 0

    def update(self, n: int, total: int | None = None) -> None:
        self.n = n
        if total:
            self.total = total
        if not self.enabled:
            return
        frac = min(self.n / self.total, 1.0)
        el = time.perf_counter() - self.t0
        bar = "#" * int(frac * 30)
        eta = el / frac - el if frac > 0 else 0.0
        sys.stderr.write(f"\r{self.desc} [{bar:<30}] {self.n}/{self.total} {el:6.1f}s eta {eta:5.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _device(name: str) -> torch.device:
    dev = _resolve_device(name)
    if dev.type == "cpu":  # in the CLI's own process: large tensors reuse freed memory (cpu_memory)
        for_cpu_run()
    return dev


def _resolve_device(name: str) -> torch.device:
    """``--device``: auto picks CUDA (this rank's GPU under torchrun), then MPS, then the CPU; a
    named device is checked by :func:`upsr_core.model.check_device` (CUDA present, index in range)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", name):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    dev = check_device(name, label=f"--device {name}")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return check_device(f"cuda:{int(os.environ['LOCAL_RANK'])}", label=f"--device {name} (LOCAL_RANK "
                            f"{os.environ['LOCAL_RANK']})")
    return dev


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # fp16, not bf16: the official nets were trained under fp16 autocast + GradScaler (SPEC §1),
        # so their activations fit fp16, whose 3 more mantissa bits give ~10x less error than bf16
        # (demo model, LR 64, denoiser only: max |d| 3.9e-4 vs 4.1e-3) at the same GPU speed.
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _add_upscale(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upscale", help="×4 super-resolution of images or folders")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("-o", "--output", required=True, type=png_or_folder,
                   help="output .png for one input file, else a folder (made if missing)")
    p.add_argument("--model", default=None, help="upsr.pth, or a converted .safetensors with both nets "
                   "(default: the bundled demo model)")
    p.add_argument("--estimator", default=None,
                   help="when --model holds only the denoiser: atd_real.pth, or a training run's estimator.safetensors")
    p.add_argument("--seed", type=SEED_ARG, default=0)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                   help="denoiser precision (fp32 = the faithful reference path; auto = fp16 on CUDA, else fp32)")
    p.add_argument("--b-u", type=B_U_ARG, default=0.4, help="noise floor b_u in [0, 1]")
    p.add_argument("--psi-max", type=PSI_MAX_ARG, default=0.05,
                   help="uncertainty ψ_max in (0, 0.5] ([0,1] units; ψ never exceeds 0.5)")
    p.add_argument("--tile", type=int_min(1), default=DEFAULT_TILE,
                   help="largest tile in LR pixels (multiple of 64); larger images run as the fewest tiles "
                        "of at most this size, each as small as the overlap allows")
    p.add_argument("--overlap", type=int_min(0), default=DEFAULT_OVERLAP, help="tile overlap in LR pixels")
    p.add_argument("--tile-batch", type=int_min(1), default=1, help="tiles per denoiser batch")
    p.add_argument("--estimator-block", type=int_min(1), default=ESTIMATOR_BLOCK,
                   help=f"the estimator g (ATD) runs on blocks of at most this many LR pixels per side (default "
                        f"{ESTIMATOR_BLOCK}: whole images up to that size, as the official code); smaller needs less "
                        "memory and changes g(y) a little everywhere (ATD's token groups are per block)")
    p.add_argument("--batch", type=int_min(1), default=1,
                   help="same-size images (of one tile row) per call, e.g. video frames; with --fast they share "
                        "denoiser batches (faster on a GPU, same results up to float rounding)")
    p.add_argument("--fast", action="store_true",
                   help="the fast path: fused attention, the sampling loop on the device, CUDA graphs (see bench)")
    p.add_argument("--compile", action="store_true",
                   help="with --fast: also torch.compile the denoiser and the estimator (compiles for minutes per "
                        "new image size; pays off over many same-size images; falls back to eager if compiling fails; "
                        "on the CPU it freezes the weights: ~4 min to compile at full size on 2 cores, then 11-15%% "
                        "faster)")
    p.add_argument("--color-fix", type=int_min(0, MAX_LEVELS), default=0, metavar="LEVELS",
                   help="wavelet colour fix after sampling (not in the official pipeline; off by default): the "
                        "result's detail over the low frequencies of the bicubic ×4 of the input, with this many "
                        f"levels (1-{MAX_LEVELS}; {DEFAULT_LEVELS} keeps structures up to ~32 px of the result); "
                        "0: off")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--bits", choices=["auto", "8", "16"], default="auto",
                   help="PNG bit depth (auto: as the input; a 16-bit colour PNG is not read back by upscale or "
                        "eval: Pillow reads 16-bit colour at 8 bits)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars, per-image lines or notes; warnings and errors still print")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write one .safetensors holding both nets")
    p.add_argument("--model", required=True, help="denoiser: upsr.pth or .safetensors")
    p.add_argument("--estimator", default=None, help="ATD: atd_real.pth (optional if --model holds both)")
    p.add_argument("-o", "--output", required=True, type=writable_file(".safetensors"),
                   help="the .safetensors to write (its folder is made if missing)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m upsr_core", description="UPSR ×4 super-resolution (CVPR 2025)")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_upscale(sub)
    _add_convert(sub)
    for name in ("bench", "evaluate", "train.cli"):  # optional subcommands register themselves
        if importlib.util.find_spec(f"{__package__}.{name}") is not None:
            importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return ap


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import save_converted
    from .model import load_upsr

    out = Path(args.output)
    for flag, given in (("--model", args.model), ("--estimator", args.estimator)):
        if given is not None and out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise ValueError(f"-o {args.output!r} is the {flag} file itself: write the converted file under "
                             "another name (the input stays as it is)")
    m = load_upsr(args.model, args.estimator)
    if m.estimator is None:
        raise ValueError(f"--model {args.model!r} holds only the denoiser, and convert needs the estimator too: pass "
                         "--estimator (the official atd_real.pth, or a training run's estimator.safetensors)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_converted(args.output, m.denoiser, m.estimator, dtype=args.dtype)
    print(f"wrote {args.output}")
    return 0


def replace_unencodable_output() -> None:
    """stdout and stderr write '?' for a character their encoding lacks instead of raising: a
    Windows pipe or redirect is cp1252, and ψ in --help (or Δ in a report) ended the run. For a
    process of our own only (a program calling :func:`main` keeps its streams as they are)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def console_main() -> int:
    """The installed ``upsr`` command: ``python -m upsr_core`` (the process is the CLI's)."""
    return main(own_process=True)


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """Run one command; returns its exit code. ``own_process``: the process is the CLI's
    (``python -m upsr_core``), so a command on the CPU may set glibc's allocator for large
    tensors (:mod:`upsr_core.cpu_memory`); a program calling ``main`` keeps its own."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = build_parser()
    try:
        if own_process:
            replace_unencodable_output()
            claim_process()  # checks $UPSR_CPU_MALLOC before any work
            signal.signal(signal.SIGTERM, _terminated)  # timeout, job schedulers: clean up as Ctrl-C does
            if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank: stop with the launcher
                _terminate_with_launcher()
        try:
            args = ap.parse_args(argv)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.command == "upscale":
            from .batch import run_upscale

            level = log.level
            if args.quiet:  # the notes too (skipped outputs, clamped values); warnings stay
                log.setLevel(logging.WARNING)
            try:
                return run_upscale(args, _device(args.device), _dtype, ProgressBar)
            finally:
                log.setLevel(level)
        if args.command == "convert":
            return _cmd_convert(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    # OSError: a missing file, a permission, a full disk, a read-only folder — not a bug;
    # FloatingPointError: training whose loss turned NaN/Inf (the message says what to change)
    except (ValueError, TypeError, UnsupportedCheckpointError, NonFiniteOutputError, OSError,
            FloatingPointError) as e:
        if os.environ.get("UPSR_TRACEBACK"):  # for bug reports: a TypeError may be ours, not the input's
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # CUDA OOM is a RuntimeError; the CPU and MPS allocators raise plain ones
        if not is_out_of_memory(e):
            raise  # a bug, not a user-facing condition: keep its traceback
        print(f"error: {_out_of_memory_advice(e, args)}", file=sys.stderr)
        return 2
    finally:
        # free what the command built (a DDP wrapper holds the process group's gloo threads) while
        # the interpreter is alive: left to its exit, their teardown can abort the process
        gc.collect()


def _terminated(signum: int, _frame) -> None:
    """SIGTERM in the CLI's own process: leave as Ctrl-C leaves (half-written .part files removed,
    no partial output), with the shell's exit code for it (128 + 15)."""
    print("\nterminated", file=sys.stderr)
    raise SystemExit(128 + signum)


def _terminate_with_launcher() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent (torchrun's agent) dies.
    torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL (an
    out-of-memory killer, a scheduler, kill -9) left its ranks running unattended, beyond the
    reach of Ctrl-C, writing into the folder a rerun writes into; now they stop as SIGTERM stops
    them (finished outputs and the last checkpoint kept). Elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    from ._launch import PARENT_AT_IMPORT

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no libc prctl (e.g. musl without it): as before
        ok = False
    if not ok:
        log.debug("could not ask for SIGTERM on the launcher's death")
    elif os.getppid() != PARENT_AT_IMPORT:  # it died before the request took effect (e.g. while torch loaded)
        _terminated(signal.SIGTERM, None)


def _out_of_memory_advice(e: RuntimeError, args: argparse.Namespace) -> str:
    """One line: torch's own reason (its informative line) and what to change."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "memory" in ln), lines[0] if lines else type(e).__name__)
    advice = ""
    if getattr(args, "tile", None) is not None:
        advice = f"; try a smaller --tile (now {args.tile})"
        if getattr(args, "tile_batch", 1) > 1:
            advice += f" or --tile-batch 1 (now {args.tile_batch})"
        if getattr(args, "estimator_block", None) is not None:
            advice += f"; if it ran out in the estimator, a smaller --estimator-block (now {args.estimator_block})"
    return f"out of memory ({reason}){advice}"
