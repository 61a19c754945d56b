"""``python -m upsr_core train {estimator,denoiser,bench} …`` — see ``--help`` of each.

Stage 1 writes ``OUT/estimator.safetensors`` (EMA weights + config metadata); stage 2 takes
it with ``--estimator`` (frozen) and writes ``OUT/denoiser.safetensors`` and, with
``--export``, one file holding both nets (``upsr_core.checkpoint.save_converted``) with the
training record in its metadata. Each stage keeps a resumable ``OUT/<stage>.ckpt`` (resumed
automatically unless ``--fresh``) and a JSON log ``OUT/<stage>_log.json``.

Fine-tuning: ``--init FILE`` starts the stage's net from trained weights (the bundled demo
file holding both nets, a stage export, an official ``.pth``): the net config comes from the
file (its metadata, else its tensor shapes), fp16/bf16 weights are up-cast to fp32, the
optimiser is fresh and the EMA starts at those weights (without EMA warm-up). A resumable
checkpoint in ``--out`` still wins over ``--init`` unless ``--fresh``, so an interrupted
fine-tune resumes. The init file's name, sha256 and own training record go into the log JSON
and the written files' ``training`` metadata (key ``init``).
Several GPUs: ``torchrun --nproc-per-node N -m upsr_core train …`` (DDP; batch is per GPU).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ..checkpoint import (
    build_denoiser,
    build_estimator,
    detect_kind,
    read_checkpoint,
    save_converted,
    split_nets,
    write_safetensors,
)
from ..cliargs import B_U_ARG, PSI_MAX_ARG, float_range, int_min, off_or, writable_file
from ..config import METADATA_CONFIG_ERRORS, ATDConfig, DenoiserConfig
from ..cpu_memory import for_cpu_run
from ..errors import UnsupportedCheckpointError, cpu_has_fast_bf16
from ..imageio import write_text
from ..nets import ATD
from ..nets.attention import WindowAttention
from .degradations import KERNEL_SIZES, RealESRGANDegradation
from .denoiser import DenoiserTask, build_denoiser_net
from .estimator import EstimatorTask, build_estimator_net
from .feed import PairPool, default_pool_size, degradation_seed, make_feed
from .jpeg import JPEG_MODELS
from .loop import COMPILE_MODES, DistInfo, LoopConfig, Trainer, setup_distributed
from .losses import LPIPSHook
from .presets import PRESETS, TrainPreset, get_preset

__all__ = ["add_parser", "run_stage", "hardware", "read_init"]

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="folder of images, or a packed-crops .npy/.safetensors (or its folder)")
    p.add_argument("--config", default=None, choices=["small", "full", "tiny"],
                   help="net sizes and optimiser defaults (default: small; with --init the net comes from the file, "
                        "and the optimiser defaults from the preset with that net, else small's)")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="start the net from these weights (demo/converted .safetensors, a stage export, an official "
                        ".pth); fresh optimiser, EMA from the weights; a checkpoint in --out wins unless --fresh")
    p.add_argument("--out", default="runs/train", help="output folder (weights, checkpoint, log)")
    p.add_argument("--steps", type=int_min(1), default=None, help="optimiser steps (default: the preset's)")
    p.add_argument("--max-minutes", type=float_range(0, lo_open=True), default=None,
                   help="wall-clock budget of the training; a resumed training counts its earlier runs' minutes "
                        "too, as --steps counts their steps (raise it to train on)")
    p.add_argument("--batch", type=int_min(1), default=None, help="micro-batch per device (default: the preset's)")
    p.add_argument("--accum", type=int_min(1), default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=None,
                   help="peak AdamW learning rate (default: the --config preset's)")
    p.add_argument("--warmup", type=int_min(0), default=None,
                   help="steps of linear learning-rate warm-up from lr/warmup (default: the preset's)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant, or cosine from --lr down to 0.1×--lr, over --steps or "
                        "--max-minutes, whichever ends first")
    p.add_argument("--ema-decay", type=float_range(0, 1, hi_open=True), default=None)
    p.add_argument("--ema-warmup", choices=["auto", "on", "off"], default="auto",
                   help="EMA decay min(decay, (1+n)/(10+n)) over the first updates (auto: on for fresh nets, off "
                        "with --init; the official training: off)")
    p.add_argument("--grad-clip", type=off_or(float_range(0, lo_open=True)), default=None,
                   help="max gradient norm, or off (default: the preset's: off for full, as the official "
                        "training; 1.0 for small and tiny)")
    p.add_argument("--crop", type=int_min(1), default=None,
                   help="HR crop side (default: the preset's: 256 for small/full, 32 for tiny)")
    p.add_argument("--degradation", choices=["realesrgan", "bicubic"], default="realesrgan")
    p.add_argument("--kernels", choices=sorted(KERNEL_SIZES), default="upsr",
                   help="blur kernel sizes of the realesrgan degradation: upsr (the official training: 3-19 px, "
                        "then 3-13) or realesrgan (Real-ESRGAN x4plus and the A_val pairs of make_pairs.py: 7-21)")
    p.add_argument("--jpeg", choices=list(JPEG_MODELS), default="libjpeg",
                   help="JPEG model of the realesrgan degradation: libjpeg (real JPEG files' artefacts) or diffjpeg "
                        "(the official training's DiffJPEG: unrounded, transposed tables, nearest chroma)")
    p.add_argument("--pool", type=int_min(0), default=None,
                   help="degraded pairs mixed across batches (the official pool, queue_size 160), a multiple of "
                        "--batch; 0: off (default: 160 rounded down to a multiple of the batch with realesrgan, "
                        "0 with bicubic)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="default: bf16 on CUDA, off on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int_min(0), default=0)
    p.add_argument("--fresh", action="store_true",
                   help="start over: an existing checkpoint in --out is renamed to <name>.before-fresh first "
                        "(.before-fresh.1, .2, … when that name is taken)")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                   help="fused SDPA attention (auto: on for CUDA and the CPU)")
    p.add_argument("--channels-last", action="store_true",
                   help="the net in channels-last memory format (NHWC convolutions on CUDA; same math, compare "
                        "with `train bench --channels-last`)")
    p.add_argument("--triton-norm", choices=["auto", "on", "off"], default="auto",
                   help="the denoiser's GroupNorms (+ scale-shift + SiLU) as Triton kernels with a backward on the "
                        "channels-last maps (auto: with --channels-last on a CUDA device Triton runs on; on: an "
                        "error where it cannot run)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the trained net (the first step compiles, minutes for the full config; "
                        "falls back to eager with a warning if compiling fails)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile (reduce-overhead: forward and backward as CUDA graphs)")
    p.add_argument("--degrade-rng", choices=["device", "cpu"], default="device",
                   help="generator of the degradations: on the training device or a CPU one (fallback where "
                        "device generators are not supported); both are saved in the checkpoint")
    p.add_argument("--feed", choices=["loader", "device"], default="loader",
                   help="image folder: crops by DataLoader workers (loader), or from the decoded images held on the "
                        "training device (device: no workers, exactly resumable; the folder must fit the device)")
    p.add_argument("--workers", type=int_min(0), default=None,
                   help="DataLoader workers for an image folder (--feed loader; default 4, fewer on a machine with "
                        "fewer cores); other feeds have no workers and warn if given")
    p.add_argument("--min-texture", type=float_range(0), default=0.0,
                   help="image folder: re-draw random crops flatter than this mean luma gradient (8-bit units; "
                        "the packed crops and the A_val pairs used 3), up to 10 draws; 0: off")
    p.add_argument("--log-every", type=int_min(1), default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int_min(1), default=1000, help="steps between checkpoints")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the estimator (stage 1) or the denoiser (stage 2)")
    stages = p.add_subparsers(dest="stage", required=True)
    e = stages.add_parser("estimator", help="stage 1: ATD estimator g, L1 loss")
    _common(e)
    e.set_defaults(func=_cmd_train)
    d = stages.add_parser("denoiser", help="stage 2: UPSR denoiser, uncertainty-weighted noise, MSE")
    _common(d)
    d.add_argument("--estimator", required=True, help="stage-1 estimator.safetensors (or any file holding ATD)")
    d.add_argument("--b-u", type=B_U_ARG, default=0.4, help="noise floor b_u (1 = no uncertainty weighting)")
    d.add_argument("--psi-max", type=PSI_MAX_ARG, default=0.05, help="ψ_max in (0, 0.5]")
    d.add_argument("--lpips", default="off", choices=["off", "pyiqa", "lpips"],  # checked before the estimator loads
                   help="off | pyiqa (the official loss: pyiqa's lpips-vgg, called as UPSR's training does) | "
                        "lpips (the lpips package's VGG LPIPS); each needs its package and weights")
    d.add_argument("--lpips-weight", type=float_range(0), default=0.5)
    d.add_argument("--export", type=writable_file(".safetensors"), default=None,
                   help="write one .safetensors with both nets (EMA) here")
    d.add_argument("--export-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    d.add_argument("--data-note", default=None, help="free text about the data for the export metadata")
    d.set_defaults(func=_cmd_train)
    from .bench import add_bench_parser

    add_bench_parser(stages)


def hardware(device: torch.device) -> str:
    """One line naming the device (GPU name or CPU) and torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return f"{name}; torch {torch.__version__}"


def set_fused(mode: str, device: torch.device, *nets: torch.nn.Module) -> bool:
    """Switch the fused (SDPA) attention path of the ATD and Swin attention modules in ``nets``
    (those instances only: other nets of the process keep theirs); returns whether it is on."""
    # auto: CUDA, and the CPU, where SDPA's fused kernel made an estimator step 1.6x faster (small
    # config, batch 16, 2-core x86, torch 2.13, 2026-11-27); the math path elsewhere (MPS)
    on = mode == "on" or (mode == "auto" and device.type in ("cuda", "cpu"))
    for net in nets:
        for m in net.modules():
            if isinstance(m, (ATD, WindowAttention)):
                m.fused = on
    return on


def set_triton_norm(mode: str, device: torch.device, net: torch.nn.Module, channels_last: bool) -> bool:
    """Switch the Triton GroupNorm with a backward on the GroupNorms of ``net`` (the denoiser's;
    the ATD estimator has none); returns whether it is on. ``auto``: on for a channels-last net
    on a device Triton runs on (:func:`upsr_core.nets.triton_norm.available`); ``on`` where it
    cannot run is a ValueError naming why."""
    from ..nets.denoiser import set_triton_train_norm
    from ..nets.triton_norm import available

    runs = available(device)
    if mode == "on" and not (runs and channels_last):
        raise ValueError("--triton-norm on needs --channels-last and a device Triton runs on (a CUDA GPU of "
                         f"compute capability >= 7.0 with `pip install triton`); got device {device}, "
                         f"channels-last {channels_last}, Triton runs there: {runs}")
    on = mode == "on" or (mode == "auto" and runs and channels_last)
    n = set_triton_train_norm(net, on)
    if mode == "on" and n == 0:
        raise ValueError(f"--triton-norm on: the {type(net).__name__} has no GroupNorm (the denoiser stage has)")
    return on and n > 0


def triton_norm_ran() -> bool:
    """No Triton GroupNorm kernel (forward or backward) has failed in this process."""
    from ..nets import triton_norm
    from ..nets.denoiser import _TRITON_NORM_FAILED

    return not _TRITON_NORM_FAILED and not triton_norm._BACKWARD_FAILED


def check_compile_mode(args) -> None:
    if args.compile_mode != "default" and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compile")


_NET = {"estimator": ("estimator", ATDConfig, "ATD estimator",
                      "a stage-1 estimator.safetensors, a converted file holding both nets, or atd_real.pth"),
        "denoiser": ("denoiser", DenoiserConfig, "UPSR denoiser",
                     "a stage-2 denoiser.safetensors, a converted file holding both nets, or upsr.pth")}


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _meta_config(meta: dict, key: str, cls, path, flag: str) -> ATDConfig | DenoiserConfig | None:
    if key not in meta:
        return None
    try:
        return cls.from_dict(json.loads(meta[key]))
    except METADATA_CONFIG_ERRORS as e:
        raise UnsupportedCheckpointError(
            f"{flag} {str(path)!r}: metadata {key!r} is not a {cls.__name__} as JSON ({e}): {meta[key][:120]!r}"
        ) from None


def _read_net(path: str | Path, stage: str, flag: str):
    """-> (the ``stage`` net of ``path``: fp32, eval mode, frozen; its config if the metadata had
    one, else None; the state dict; the metadata). ``flag`` names the option in errors."""
    if stage not in _NET:
        raise ValueError(f"stage must be 'estimator' or 'denoiser', got {stage!r}")
    key, cls, what, expected = _NET[stage]
    if Path(path).suffix == ".ckpt":  # what train writes to resume from, not a net's weights
        raise ValueError(f"{flag} {str(path)!r} is a training checkpoint: to continue that training give its folder as "
                         f"--out (same settings); to start from its weights give the {stage}.safetensors written "
                         "beside it")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist")
    source = f"{flag} {str(path)!r}"  # what the errors call the file
    sd, meta = read_checkpoint(path, source=source)
    nets = split_nets(sd, source)
    if key not in nets:
        raise UnsupportedCheckpointError(
            f"{flag} {str(path)!r} holds no {what} weights (it holds: {', '.join(sorted(nets))}); expected {expected}")
    cfg = _meta_config(meta, f"{key}_config", cls, path, flag)
    build = build_estimator if stage == "estimator" else build_denoiser
    return build(nets[key], cfg), cfg, nets[key], sd, meta


def load_estimator_file(path: str | Path) -> tuple[ATD, dict[str, str]]:
    """The ATD of a stage-1 file or of a converted file holding both nets (frozen), and the
    file's metadata."""
    net, _, _, _, meta = _read_net(path, "estimator", "--estimator")
    return net, meta


def read_init(path: str | Path, stage: str) -> tuple[torch.nn.Module, dict]:
    """The ``stage`` net ('estimator' or 'denoiser') built from the weights in ``path`` (fp32,
    training mode, gradients on) and a JSON-able record of the file: path, name, sha256, stored
    dtype, where the config came from and the file's own training record (None if it has none)."""
    net, cfg, weights, sd, meta = _read_net(path, stage, "--init")
    net = net.train().requires_grad_(True)
    key = _NET[stage][0]
    both = detect_kind(sd) == "both"
    own = meta.get(f"{key}_training" if both and stage == "estimator" else "training")
    if own is not None:
        try:
            own = json.loads(own)
        except json.JSONDecodeError:
            pass  # keep the text as it is
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values() if v.is_floating_point()})
    record = {"file": str(path), "name": Path(path).name, "sha256": _sha256(path), "stored_dtype": ",".join(dtypes),
              "config_from": "metadata" if cfg is not None else "tensor shapes", "training": own}
    return net, record


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _config_diff(a, b) -> str:
    da, db = a.to_dict(), b.to_dict()
    return "; ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


def _init_preset(args: argparse.Namespace, net_config) -> TrainPreset:
    """The preset giving the optimiser defaults of a run whose net comes from ``--init``."""
    attr = _NET[args.stage][0]
    if args.config is not None:
        preset = get_preset(args.config)
        if getattr(preset, attr) != net_config:
            raise ValueError(
                f"--init {args.init!r} holds {_a(args.stage)} whose config differs from --config {args.config!r} "
                f"(file vs --config: {_config_diff(net_config, getattr(preset, attr))}); drop --config to take "
                f"the file's config, or name the matching preset")
        return preset
    match = next((p for p in PRESETS.values() if getattr(p, attr) == net_config), None)
    if match is None:
        log.info("--init %s: its %s config matches no preset: optimiser defaults of 'small'", args.init, args.stage)
        return get_preset("small")
    return match


def check_crop(crop: int, stage: str, denoiser_config: DenoiserConfig | None = None) -> int:
    """Return ``crop`` (HR side of a training crop) if the stage's nets take it: a multiple of 4
    (the ×4 degradation) and, for the denoiser, of 4 × its ``multiple_of`` (its LR side passes
    ``multiple_of``-aligned windows; 256 for the small and full configs). Else ValueError."""
    need = 4 if denoiser_config is None else 4 * denoiser_config.multiple_of
    if crop < need or crop % need:
        raise ValueError(f"--crop {crop} does not fit the {stage} stage: the HR crop side must be a positive multiple "
                         f"of {need}" + ("" if denoiser_config is None else
                                         f" (4 × the denoiser's LR multiple {denoiser_config.multiple_of})"))
    return crop


def training_amp(amp: str | None, device: torch.device, what: str) -> str:
    """The autocast of a training step on ``device``: ``amp`` (bf16, fp16, off) if given, else bf16
    on CUDA and off on the CPU. fp16 on the CPU, or bf16 on a CPU without fast bf16 kernels
    (:func:`upsr_core.errors.cpu_has_fast_bf16`), runs but far slower than fp32: logged, named by
    ``what`` (the command)."""
    amp = amp or ("bf16" if device.type == "cuda" else "off")
    if device.type != "cpu":
        return amp
    if amp == "fp16":
        log.warning("%s: --amp fp16 on the CPU has no fast kernels (9x slower than bf16 on an AVX-512 BF16 CPU, "
                    "2-core probe); use --amp off", what)
    elif amp == "bf16" and not cpu_has_fast_bf16():
        log.warning("%s: --amp bf16 on a CPU without fast bf16 kernels (oneDNN finds no AVX-512, AMX or Arm BF16 "
                    "here): its convolutions run about 250x slower than in fp32; use --amp off", what)
    return amp


def _loop_config(args: argparse.Namespace, preset, di: DistInfo, out: Path) -> LoopConfig:
    stage_lr = preset.estimator_lr if args.stage == "estimator" else preset.lr
    amp = training_amp(args.amp, di.device, "train")
    steps = preset.total_steps if args.steps is None else args.steps
    warmup = preset.warmup if args.warmup is None else args.warmup
    if steps and warmup >= steps:
        # --init DEMO --steps 2 trained at 2.5e-6 and 5e-6 under the small preset's 200 warm-up steps
        log.warning("--warmup %d >= --steps %d: the learning rate never gets past %.3g of --lr (give a smaller "
                    "--warmup, e.g. a tenth of --steps: %d)", warmup, steps, steps / warmup, steps // 10)
    return LoopConfig(
        # "is None", not "or": an explicit 0 must reach the checks below, not turn into the preset's value
        steps=steps, max_minutes=args.max_minutes,
        batch=preset.batch if args.batch is None else args.batch,
        accum=args.accum, lr=stage_lr if args.lr is None else args.lr,
        warmup=warmup,
        schedule=args.schedule, weight_decay=preset.weight_decay,
        ema_decay=preset.ema_decay if args.ema_decay is None else args.ema_decay,
        grad_clip=preset.grad_clip if args.grad_clip is None else (None if args.grad_clip == "off" else args.grad_clip),
        # trained weights need no warm-up of their average; the official training has none either
        ema_warmup=args.init is None if args.ema_warmup == "auto" else args.ema_warmup == "on",
        amp=amp, seed=args.seed,
        checkpoint=str(out / f"{args.stage}.ckpt"), ckpt_every=args.ckpt_every, log_every=args.log_every,
    )


def setup_device(device: str) -> DistInfo:
    """:func:`setup_distributed` for a training command; on the CPU, in the CLI's own process,
    large tensors then reuse freed memory (:mod:`upsr_core.cpu_memory`; ``$UPSR_CPU_MALLOC`` was
    checked by ``cli.main`` before this)."""
    di = setup_distributed(device)
    if di.device.type == "cpu":
        for_cpu_run()
    return di


def run_stage(args: argparse.Namespace) -> dict:
    """Train one stage as described by parsed CLI ``args``; returns the JSON record written."""
    check_compile_mode(args)  # before any device, data or net is set up
    t_start = time.time()
    di = setup_device(args.device)
    try:
        return _run_stage(args, di, t_start)
    finally:  # also on errors: a process group left to the interpreter's exit can abort it (gloo's threads)
        if di.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_stage(args: argparse.Namespace, di: DistInfo, t_start: float) -> dict:
    init_net, init = None, None
    if args.init is not None:
        init_net, init = read_init(args.init, args.stage)
        preset = _init_preset(args, init_net.config)
    else:
        preset = get_preset(args.config or "small")
    out = Path(args.out)
    made = _writable_folder(out, "--out", di.main)
    try:
        return _train_into(args, di, t_start, preset, init_net, init, out)
    except BaseException:
        # a run that failed before writing anything; rank 0 only: under torchrun every rank fails at
        # once, and another rank's look into the folder raced this removal (its own error line became
        # "No such file or directory", a flaky CI run of test_ddp)
        if made and di.main:
            _remove_if_empty(out)
        raise


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it is an empty folder (one a failed run made and wrote nothing into)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _writable_folder(folder: Path, flag: str, check: bool = True) -> bool:
    """Make ``folder`` (and its parents) and try writing in it, so that a folder training cannot
    write to fails now, not at its first checkpoint minutes or hours in. True if it was made."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {str(folder)!r} is a file; expected a folder")
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if check:
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as e:
        if made:
            _remove_if_empty(folder)
        raise ValueError(f"{flag} {str(folder)!r}: cannot write there ({e.strerror or e})") from None
    return made


def _train_into(args: argparse.Namespace, di: DistInfo, t_start: float, preset, init_net, init, out: Path) -> dict:
    if args.stage == "denoiser" and args.export and di.main:  # written after training: checked before it
        _writable_folder(Path(args.export).parent, "--export's folder")
        export = Path(args.export).resolve()
        for what, path in (("--estimator", Path(args.estimator)),
                           ("this stage's output", out / "denoiser.safetensors")):
            if export == path.resolve():
                raise ValueError(f"--export {args.export!r} is {what} ({str(path)!r}), which the export would "
                                 "overwrite; export to another file")
    cfg = _loop_config(args, preset, di, out)
    den_cfg = None if args.stage == "estimator" else (init_net.config if init_net is not None else preset.denoiser)
    crop = check_crop(preset.hr_size if args.crop is None else args.crop, args.stage, den_cfg)
    if args.stage == "denoiser":  # before the data folder's setup (a header scan of minutes, or its decoding)
        # and before the seed: LPIPS's own random init must not move the net's initial weights
        est = load_estimator_file(args.estimator)[0].to(di.device)
        lp = LPIPSHook.from_name(args.lpips, di.device)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    feed = make_feed(args.data, crop, di.device, cfg.batch, shard=(di.rank, di.world), workers=args.workers,
                     seed=args.seed, min_texture=args.min_texture, feed=args.feed)
    deg_gen = torch.Generator().manual_seed(degradation_seed(args.seed, di.rank)) if args.degrade_rng == "cpu" else None
    pool_size = default_pool_size(cfg.batch, args.degradation) if args.pool is None else args.pool
    if pool_size % cfg.batch:
        raise ValueError(f"--pool {pool_size} must be a multiple of the micro-batch {cfg.batch} (or 0: off)")
    pool = PairPool(pool_size) if pool_size else None
    deg_cfg = RealESRGANDegradation.recipe(args.kernels, args.jpeg)
    if args.stage == "estimator":
        net = init_net if init_net is not None else build_estimator_net(preset.estimator)
        task = EstimatorTask(net, feed, cfg.batch, args.degradation, deg_gen, pool, deg_cfg)
    else:
        net = init_net if init_net is not None else build_denoiser_net(preset.denoiser)
        if not lp.available:
            log.info("LPIPS term off (--lpips off): loss = MSE only")
        task = DenoiserTask(net, est, feed, cfg.batch, args.degradation, args.b_u, args.psi_max, lp,
                            args.lpips_weight, deg_generator=deg_gen, pool=pool, deg_config=deg_cfg)
    fused = set_fused(args.fused, di.device, net, *([est] if args.stage == "denoiser" else []))
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    triton_norm = set_triton_norm(args.triton_norm, di.device, net, args.channels_last)
    trainer = Trainer(task, cfg, di)
    if args.compile:
        trainer.compile(args.compile_mode)
    trainer.meta["init"] = init
    settings = _run_settings(args, cfg, preset.name, crop, pool_size)
    trainer.meta |= {"config": preset.name, "settings": settings}
    ckpt = Path(cfg.checkpoint)
    resumed = ckpt.is_file() and not args.fresh
    if args.fresh and ckpt.is_file() and di.main:
        # set aside now, not at the first save: a run killed before it (SIGKILL, power) must not leave the old
        # checkpoint for the next plain run to resume; the old one stays recoverable under its new name
        aside = ckpt.with_name(ckpt.name + ".before-fresh")
        n = 1
        while aside.exists() or aside.is_symlink():  # an earlier --fresh's: kept too (.before-fresh.1, .2, …)
            aside, n = ckpt.with_name(f"{ckpt.name}.before-fresh.{n}"), n + 1
        os.replace(ckpt, aside)
        log.info("--fresh: the existing checkpoint %s is set aside as %s", ckpt, aside.name)
    changes: dict[str, list] = {}
    if resumed:
        trainer.load(ckpt)  # its meta says which --init (if any) its weights descend from
        changes = _changed_settings(trainer.meta.get("settings"), settings)
        if changes:
            log.warning("resuming %s (step %d) with other settings than its last run: %s; the run goes on with the "
                        "new ones (--fresh starts over with them)", ckpt, trainer.step,
                        ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        trainer.meta |= {"config": preset.name, "settings": settings}
        if hasattr(feed, "resume_at"):  # a DataLoader feed draws from its own generator, not the trainer's
            feed.resume_at(trainer.step)
        if deg_gen is not None and not task.restored_deg_generator:  # rank > 0, or an older checkpoint:
            deg_gen.manual_seed(degradation_seed(args.seed, di.rank, trainer.step))  # new draws, not a replay
        if init is not None:
            was = trainer.meta.get("init")
            log.info("--init %s not used: resuming %s (at step %d), which started from %s; --fresh starts over "
                     "from --init", args.init, ckpt, trainer.step,
                     f"{was['name']} (sha256 {was['sha256'][:12]})" if was else "random weights")
    elif init is not None:
        log.info("%s starts from --init %s (sha256 %s, stored %s, config from its %s)", args.stage, init["file"],
                 init["sha256"][:12], init["stored_dtype"], init["config_from"])
    n_params = sum(p.numel() for p in net.parameters())
    log.info("%s stage: %s config, %.2fM params, batch %d×%d×%d " + ("GPU(s)" if di.device.type == "cuda" else
                                                                      "process(es)") +
             ", crop %d, pool %d, amp %s, fused %s, "
             "Triton norm %s, on %s", args.stage, preset.name, n_params / 1e6, cfg.batch, cfg.accum, di.world, crop,
             pool_size, cfg.amp, fused, triton_norm, hardware(di.device))
    summary = trainer.fit()
    record = {
        "stage": args.stage, "config": preset.name, "params": n_params,
        "loop": cfg.__dict__ | {"betas": list(cfg.betas)}, "crop": crop, "data": str(args.data),
        # packed crops ignore --min-texture (filtered when packed): the record says what ran
        "feed": type(feed).__name__, "min_texture": 0.0 if type(feed).__name__ == "PackedFeed" else args.min_texture,
        "degradation": args.degradation,
        "pool": pool_size, "jpeg": args.jpeg if args.degradation == "realesrgan" else None,
        "degrade_rng": args.degrade_rng,
        "kernels": args.kernels if args.degradation == "realesrgan" else None,
        "channels_last": args.channels_last, "triton_norm": triton_norm and not trainer.compiled and triton_norm_ran(),
        "compile": trainer.compiled, "compile_mode": args.compile_mode if trainer.compiled else None,
        "hardware": hardware(di.device),
        "init": trainer.meta.get("init"), "resumed": str(ckpt) if resumed else None,
        "changed_on_resume": changes or None,
        "summary": summary, "wall_minutes_total": round((time.time() - t_start) / 60, 3), "history": trainer.history,
    }
    if args.stage == "denoiser":
        record |= {"b_u": args.b_u, "psi_max": args.psi_max, "lpips": args.lpips if task.lpips.available else "off",
                   "lpips_weight": args.lpips_weight,
                   "estimator_file": str(args.estimator)}
    if resumed and not summary.get("steps_this_run"):
        last = _last_record(out / f"{args.stage}_log.json")
        if last is not None:  # nothing trained: the log and the exports keep what the weights came from
            log.info("nothing trained this run: %s_log.json (and any export) keeps the last run's record",
                     args.stage)
            record = last
    if di.main:
        _write_outputs(args, trainer, net, record, out)
    if di.world > 1:
        torch.distributed.barrier()  # the other ranks exit once rank 0 has written everything
    return record


def _last_record(path: Path) -> dict | None:
    """The training record a run wrote to ``path`` (its ``*_log.json``), or None where there is
    none or it cannot be read (then this run's is written)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "summary" in record else None


def _run_settings(args: argparse.Namespace, cfg: LoopConfig, config: str, crop: int, pool: int) -> dict:
    """What a resumed run should share with the run that wrote its checkpoint (stored in the
    checkpoint; :func:`_changed_settings` compares)."""
    settings = {"config": config, "lr": cfg.lr, "batch": cfg.batch, "accum": cfg.accum, "schedule": cfg.schedule,
                "warmup": cfg.warmup, "ema_decay": cfg.ema_decay, "ema_warmup": cfg.ema_warmup,
                "grad_clip": cfg.grad_clip, "amp": cfg.amp,
                "seed": cfg.seed, "crop": crop, "pool": pool, "degradation": args.degradation,
                "kernels": args.kernels, "jpeg": args.jpeg, "data": str(Path(args.data).resolve())}
    if args.stage == "denoiser":
        # by content: a file retrained in place is another estimator, a moved run folder is not
        settings |= {"estimator_sha256": _sha256(args.estimator), "b_u": args.b_u, "psi_max": args.psi_max,
                     "lpips": args.lpips, "lpips_weight": args.lpips_weight}
    return settings


def _changed_settings(old: dict | None, new: dict) -> dict[str, list]:
    """{setting: [checkpoint's, this run's]} for the settings that differ (none for a checkpoint
    written before settings were stored)."""
    if not isinstance(old, dict):
        return {}
    return {k: [old[k], v] for k, v in new.items() if k in old and old[k] != v}


def _write_outputs(args, trainer: Trainer, net, record: dict, out: Path) -> None:
    ema_net = trainer.ema_model(lambda: type(net)(net.config)).cpu()
    sd = {k: v.detach().contiguous() for k, v in ema_net.state_dict().items()}
    write_safetensors(sd, out / f"{args.stage}.safetensors",
                      metadata={f"{args.stage}_config": json.dumps(net.config.to_dict()),
                                "training": json.dumps(_brief(record))})
    if args.stage == "denoiser" and args.export:
        est, est_meta = load_estimator_file(args.estimator)
        meta = {"training": json.dumps(_brief(record) | {"data_note": args.data_note}),
                "estimator_training": _estimator_training(est_meta)}
        save_converted(args.export, ema_net, est, dtype=args.export_dtype, extra_metadata=meta)
        log.info("exported %s", args.export)
    write_text(out / f"{args.stage}_log.json", json.dumps(record, indent=1) + "\n")
    log.info("%s done: %s", args.stage, json.dumps(record["summary"]))


def _brief(record: dict) -> dict:
    """The record without the per-step history (for file metadata)."""
    return {k: v for k, v in record.items() if k != "history"}


def _estimator_training(meta: dict[str, str]) -> str:
    """The estimator's training record in a file's metadata: 'estimator_training' of a file
    holding both nets (its 'training' is the denoiser's), else 'training' of a stage-1 file."""
    return meta.get("estimator_training", meta.get("training", "unknown"))


def _cmd_train(args: argparse.Namespace) -> int:
    run_stage(args)
    return 0
