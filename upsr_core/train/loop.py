"""The training loop shared by both stages: AdamW, EMA, autocast, accumulation, DDP,
wall-clock budget, resumable checkpoints, progress bar and a JSON log.

A *task* supplies the trainable model and the loss of one micro-batch::

    class Task:
        model: nn.Module                          # trained (wrapped in DDP when distributed)
        def loss(self, model, generator) -> (loss tensor, {name: float})

Checkpoint (``torch.save``; atomic rename; rank 0 only): model, EMA shadow, optimiser,
step, elapsed seconds, generator states (data + torch CPU), the loop config, ``Trainer.meta``. Resuming
with the same data and settings continues the exact random stream (under DDP: rank 0's; the other
ranks start new streams, seeded by rank and step, rather than replaying their first run's).

Under DDP every rank follows rank 0's clock (the time budget and the time-driven cosine lr), and
the loss is averaged over ranks before the NaN check, so the replicas stay identical and stop together.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import UnsupportedCheckpointError, load_pickled
from ..imageio import write_atomically
from ..model import check_device
from .ema import EMA

__all__ = ["LoopConfig", "Task", "Trainer", "setup_distributed", "DistInfo"]

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
"""``torch.compile`` modes for ``--compile-mode``."""
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def restore_generator(gen: torch.Generator, state: torch.Tensor, name: str) -> bool:
    """Set ``gen`` to a checkpoint's ``state`` (uint8, from ``Generator.get_state``); returns
    False, with a warning, where the state is another device type's — a CUDA run resumed on
    the CPU or the reverse (a CUDA stream's state is 16 bytes, the CPU's 5056) — and leaves
    ``gen`` for the caller to reseed: the run goes on, its draws from here on differ from an
    uninterrupted run's. Any other unfitting state is set_state's RuntimeError."""
    if state.numel() != gen.get_state().numel():
        log.warning("the checkpoint's %s stream was written on another kind of device than this run's %s (%d "
                    "state bytes against %d): reseeded, so from here on its draws differ from the run that wrote it",
                    name, gen.device.type, state.numel(), gen.get_state().numel())
        return False
    gen.set_state(state)
    return True


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings of one training run."""

    steps: int = 1000  # optimiser steps (stop at whichever of steps / max_minutes comes first)
    max_minutes: float | None = None  # wall-clock budget of the training, resumes included (excl. model build)
    batch: int = 16  # per-device micro-batch
    accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "constant"  # or "cosine" (to 10 %, by the larger of step and time progress)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max gradient norm; None: no clipping (the official training)
    ema_decay: float = 0.999
    ema_warmup: bool = True  # EMA warm-up (see ema.EMA); off when the net starts from trained weights
    amp: str = "bf16"  # bf16 | fp16 | off
    seed: int = 0
    checkpoint: str | None = None  # path of the resumable checkpoint
    ckpt_every: int = 1000  # steps
    ckpt_minutes: float = 10.0  # and at least this often
    log_every: int = 50
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {sorted(_AMP)}, got {self.amp!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        for name in ("steps", "batch", "accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0 or None (off), got {self.grad_clip}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


class Task(Protocol):
    """What the Trainer trains: ``model`` and its ``loss`` (scalar tensor, logs) for one micro-batch
    drawn with ``generator``. Optional, used where present (``feed.DegradedPairs`` has them):
    ``training_state() -> dict`` / ``load_training_state(sd, device)``, the task's part of the
    checkpoint (key 'task'; rank 0's); ``snapshot()`` / ``restore(snap)`` around a step that may
    be redone (the compile fallback)."""

    model: nn.Module

    def loss(self, model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed from torchrun's env (nccl on CUDA, gloo on CPU), pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but CUDA is not available")
    dev = torch.device("cuda", local if world > 1 or device in ("auto", "cuda") else int(device.split(":")[1])) \
        if use_cuda else torch.device("cpu")
    if use_cuda:
        check_device(dev, label=f"--device {device} (GPU {dev.index})")  # cuda:3, or more ranks than GPUs
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cudnn.benchmark stays off: the degradations convolve ever-changing sizes (random
        # resizes), and benchmarking each new shape would cost more than it saves.
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


class _Bar:
    """One-line progress on a terminal; a log line every ``every`` steps otherwise."""

    def __init__(self, total: int, every: int, enabled: bool):
        self.total, self.every, self.enabled = total, max(every, 1), enabled
        self.tty = enabled and sys.stderr.isatty()

    def show(self, step: int, logs: dict[str, float], it_s: float, elapsed: float) -> None:
        if not self.enabled:
            return
        vals = " ".join(f"{k} {v:.4g}" for k, v in logs.items())
        msg = f"step {step}/{self.total} {vals} {it_s:.2f} it/s {elapsed / 60:.1f} min"
        if self.tty:
            frac = min(step / self.total, 1.0)
            sys.stderr.write(f"\r[{'#' * int(frac * 24):<24}] {msg}   ")
            sys.stderr.flush()
        elif step % self.every == 0 or step == 1:
            log.info(msg)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class Trainer:
    """Runs ``task`` for ``cfg.steps`` optimiser steps (or until ``cfg.max_minutes``)."""

    def __init__(self, task: Task, cfg: LoopConfig, dist_info: DistInfo | None = None):
        self.task, self.cfg = task, cfg
        self.di = dist_info or DistInfo()
        self.device = self.di.device
        self.model = task.model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, fused=self.device.type == "cuda",
        )
        self.ema = EMA(self.model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.fp16_skipped = 0  # optimiser steps the fp16 scaler skipped (inf/NaN gradients) in this process
        self.nonfinite_skipped = 0  # the same without a scaler (bf16, off): steps whose gradients were inf/NaN
        self._nonfinite_run = 0  # of them in a row (MAX_NONFINITE_RUN stops the run)
        self.wrapped: nn.Module = self.model
        if self.di.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed + 1000 * self.di.rank)
        self._eager: nn.Module | None = None  # the uncompiled net while torch.compile is on (see compile())
        self.step, self.elapsed_before = 0, 0.0
        self.history: list[dict] = []
        self.meta: dict = {}  # JSON-able facts about the run kept in the checkpoint (e.g. its --init file)

    # ------------------------------------------------------------------ schedule
    def lr_at(self, step: int, elapsed_s: float) -> float:
        c = self.cfg
        if c.warmup and step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        if c.schedule == "constant":
            return c.lr
        prog = (step - c.warmup) / max(c.steps - c.warmup, 1)
        if c.max_minutes:
            prog = max(prog, elapsed_s / (c.max_minutes * 60))
        prog = min(max(prog, 0.0), 1.0)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed_before,
            "generator": self.generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "history": self.history,
            "meta": self.meta,
            "loop": asdict(self.cfg),
            "task": self.task.training_state() if hasattr(self.task, "training_state") else {},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the resumable checkpoint (rank 0; atomic)."""
        if not self.di.main:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with write_atomically(path) as f:  # a crash or a full disk leaves the old checkpoint, not a torn one
            torch.save(self.state_dict(), f)

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint written by :meth:`save` for the same model."""
        try:  # tensors, numbers, strings and containers only: a checkpoint's pickle never runs code
            sd = load_pickled(Path(path))
        except UnsupportedCheckpointError as e:  # truncated by a crash of an older version, corrupted, foreign
            why = str(e).removeprefix(f"{Path(path)}: ")  # load_pickled's message names the file too
            raise ValueError(f"{str(path)!r} is not a readable training checkpoint ({why}): start over with --fresh "
                             "(which keeps this file as <name>.before-fresh), or give another --out") from None
        for key in ("model", "ema", "opt", "step"):
            if not isinstance(sd, dict) or key not in sd:
                raise ValueError(f"{str(path)!r} is not a training checkpoint (no {key!r} entry)")
        try:
            self.model.load_state_dict(sd["model"])
        except RuntimeError as e:  # missing keys or other shapes: another net than this run builds
            was = sd.get("meta", {}).get("config")
            raise ValueError(
                f"{str(path)!r} holds the training of another net ({type(self.model).__name__}"
                f"{f', config {was!r}' if was else ''}; {str(e).splitlines()[0].rstrip(':.')}) than this run builds: "
                "give the same --config (and --init) as the run that wrote it, another --out, or --fresh "
                "to start over") from None
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        if sd.get("scaler"):  # a bf16/off run saves a disabled scaler's {}: an fp16 resume starts a fresh one
            self.scaler.load_state_dict(sd["scaler"])
        self.step, self.elapsed_before = int(sd["step"]), float(sd["elapsed"])
        if self.di.rank == 0:  # the checkpoint holds rank 0's streams (and pair pool): it continues exactly
            if not restore_generator(self.generator, sd["generator"], "trainer's random"):
                self.generator.manual_seed(self.cfg.seed + 1_000_003 * self.step)  # as the other ranks reseed
            torch.set_rng_state(sd["cpu_rng"])
            if hasattr(self.task, "load_training_state"):
                self.task.load_training_state(sd.get("task", {}), self.device)
        else:  # other ranks' streams are not stored: a new one per (rank, step), not the first run's again;
            # their pair pools (if any) refill
            self.generator.manual_seed(self.cfg.seed + 1000 * self.di.rank + 1_000_003 * self.step)
        self.history = list(sd.get("history", []))
        self.meta = dict(sd.get("meta", {}))
        log.info("resumed %s at step %d (%.1f min trained)", path, self.step, self.elapsed_before / 60)

    # ------------------------------------------------------------------ loop
    def _micro(self, last: bool) -> tuple[torch.Tensor, dict[str, float]]:
        amp = _AMP[self.cfg.amp]
        sync = self.di.world == 1 or last
        ctx = self.wrapped.no_sync() if not sync else _nullcontext()
        with ctx:
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, logs = self.task.loss(self.wrapped, self.generator)
            self.scaler.scale(loss / self.cfg.accum).backward()
        return loss.detach(), logs

    def compile(self, mode: str = "default") -> None:
        """``torch.compile`` the trained net (after DDP wrapping) in ``mode`` (one of
        :data:`COMPILE_MODES`; ``reduce-overhead`` replays forward and backward as CUDA graphs).
        The first step compiles (minutes for the full config); if compiling fails, at that step
        or at a later recompile, the step is redone eagerly with the same random draws (a
        DataLoader feed's batch excepted), the run stays eager and a warning says why."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self._eager is None:
            self._eager = self.wrapped
            self.wrapped = torch.compile(self.wrapped, mode=mode)

    @property
    def compiled(self) -> bool:
        """True while the net runs compiled (:meth:`compile` called, no fallback to eager yet)."""
        return self._eager is not None

    def train_step(self, elapsed_s: float = 0.0) -> dict[str, float]:
        """One optimiser step over ``accum`` micro-batches; returns averaged logs."""
        if self._eager is None:
            return self._train_step(elapsed_s)
        rng = self.generator.get_state(), torch.get_rng_state()
        task_snap = self.task.snapshot() if hasattr(self.task, "snapshot") else None
        try:
            return self._train_step(elapsed_s)
        except torch._dynamo.exc.TorchDynamoException as e:  # inductor/backend failure, no compiler
            log.warning("torch.compile failed at step %d, training on eagerly: %s", self.step,
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            # nothing of the failed try reaches the weights, and the step draws the same t and noise
            self.opt.zero_grad(set_to_none=True)
            self.generator.set_state(rng[0])
            torch.set_rng_state(rng[1])
            if task_snap is not None:  # the pair pool and a separate degradation generator, as before the try
                self.task.restore(task_snap)
            self.wrapped, self._eager = self._eager, None
            return self._train_step(elapsed_s)

    def _train_step(self, elapsed_s: float) -> dict[str, float]:
        lr = self.lr_at(self.step, elapsed_s)
        for g in self.opt.param_groups:
            g["lr"] = lr
        total, agg = 0.0, {}
        for i in range(self.cfg.accum):
            loss, logs = self._micro(i == self.cfg.accum - 1)
            total += float(loss)
            for k, v in logs.items():
                agg[k] = agg.get(k, 0.0) + v / self.cfg.accum
        if self.di.world > 1:  # the mean over ranks: every rank logs it, and every rank stops on a NaN
            keys = sorted(agg)  # the task's terms (mse, lpips, …), the same on every rank
            t = torch.tensor([total] + [agg[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, *terms = (v / self.di.world for v in t.tolist())
            agg = dict(zip(keys, terms))
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {self.step + 1}: lower --lr"
                                     + (" or use --amp off" if self.cfg.amp != "off" else ""))
        self.scaler.unscale_(self.opt)
        gn = None
        if self.cfg.grad_clip:
            gn = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
            agg["gnorm"] = gn
        if not self.scaler.is_enabled() and not self._gradients_finite(gn):
            self._skip_nonfinite(agg)
        else:
            self._nonfinite_run = 0
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            # fp16: a step with inf/NaN gradients is skipped by the scaler (which then lowers its scale);
            # the EMA skips it too, so it does not drift towards weights that did not move
            if scale is not None and self.scaler.get_scale() < scale:
                self.fp16_skipped += 1
                agg["fp16_skipped"] = float(self.fp16_skipped)
            else:
                self.ema.update(self.model)
        self.step += 1
        return {"loss": total / self.cfg.accum, **agg, "lr": lr}

    MAX_NONFINITE_RUN = 10

    def _gradients_finite(self, norm: float | None) -> bool:
        """Whether every gradient is finite (the clipped norm when there is one, else one norm over
        all gradients: one host sync, as the loss's). A finite loss can still have NaN gradients:
        a NaN LPIPS value counted as 0 (as officially) back-propagates NaN through LPIPS."""
        if norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if not grads:
                return True
            norm = float(torch.stack(torch._foreach_norm(grads)).float().sum())
        return math.isfinite(norm)

    def _skip_nonfinite(self, agg: dict[str, float]) -> None:
        """Without a GradScaler, skip the optimiser and EMA step of inf/NaN gradients as the fp16
        scaler does (AdamW would write NaN into every weight and the EMA copy them); stop after
        MAX_NONFINITE_RUN such steps in a row. Every rank decides alike (the gradients are all-reduced)."""
        self.opt.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        self._nonfinite_run += 1
        if self._nonfinite_run >= self.MAX_NONFINITE_RUN:
            lpips_on = getattr(getattr(self.task, "lpips", None), "available", False)  # the denoiser stage's
            raise FloatingPointError(f"gradients were inf/NaN in {self._nonfinite_run} steps in a row (up to step "
                                     f"{self.step + 1}): lower --lr" + (", use --amp off" if self.cfg.amp != "off"
                                                                        else "") + (" or --lpips off" if lpips_on
                                                                                    else ""))
        if self.di.main:
            log.warning("step %d: inf/NaN gradients with a finite loss; the step is skipped (%d so far)",
                        self.step + 1, self.nonfinite_skipped)
        agg["nonfinite_skipped"] = float(self.nonfinite_skipped)

    def fit(self) -> dict:
        """Train until ``steps`` or the time budget; checkpoint at the end. Returns a summary."""
        c = self.cfg
        bar = _Bar(c.steps, c.log_every, c.progress and self.di.main)
        t0 = time.perf_counter()
        start_step = self.step
        budget = c.max_minutes * 60 if c.max_minutes else math.inf
        # the budget counts the minutes of earlier runs of a resumed training, as c.steps counts
        # their steps (and as the cosine schedule follows them): raise it to train on
        if self.elapsed_before >= budget and self.step < c.steps:
            log.warning("time budget of %.2f min already used by the resumed training (%.2f min, step %d): "
                        "raise --max-minutes to train on", c.max_minutes, self.elapsed_before / 60, self.step)
        if self.step >= c.steps and self.step > 0:
            log.warning("the resumed training is at step %d, --steps is %d: nothing to train (raise --steps to train "
                        "on; --fresh starts over)", self.step, c.steps)
        stop = _StopRequest()
        with stop.installed():
            logs = self._loop(c, bar, t0, budget, stop)
        bar.close()
        run_s = time.perf_counter() - t0
        self.elapsed_before += run_s
        if c.checkpoint:
            self.save(c.checkpoint)
        if stop.signum is not None:  # saved: leave as the signal asked, with the CLI's exit code
            if self.di.main:
                saved = (f"checkpoint {c.checkpoint} saved; run the same command again to resume" if c.checkpoint
                         else "no checkpoint path, nothing saved")
                log.warning("stopped at step %d by %s: %s", self.step, signal.Signals(stop.signum).name, saved)
            if stop.signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + stop.signum)
        steps = self.step - start_step
        summary = {"steps": self.step, "steps_this_run": steps, "minutes_this_run": round(run_s / 60, 3),
                   "it_s": round(steps / run_s, 3) if run_s > 0 else None, "last": logs,
                   "world_size": self.di.world}
        if self.device.type == "cuda":
            summary["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return summary

    def _loop(self, c: LoopConfig, bar: "_Bar", t0: float, budget: float, stop: "_StopRequest") -> dict[str, float]:
        """The steps of :meth:`fit` until ``steps``, the budget or a stop request (Ctrl-C, SIGTERM:
        between two steps, on every rank at the same step); returns the last step's logs."""
        last_ckpt, window_t, window_n = t0, t0, 0
        logs: dict[str, float] = {}
        while self.step < c.steps:
            run_s, stopping = self._clock(time.perf_counter() - t0, stop.signum is not None)
            if stopping:
                if stop.signum is None:  # another rank was asked: stop with it, as Ctrl-C stops
                    stop.signum = signal.SIGINT
                break
            if self.elapsed_before + run_s >= budget:
                log.info("time budget of %.2f min reached at step %d", c.max_minutes, self.step)
                break
            try:
                logs = self.train_step(self.elapsed_before + run_s)
            except (OSError, EOFError, RuntimeError) as e:
                if stop.signum is None:
                    raise
                # a signal to the process group ends the DataLoader workers too: the step under way
                # could not get its batch ("Connection reset by peer", "worker exited unexpectedly").
                # No weight has moved (the optimiser steps after the last micro-batch): save as it is
                log.info("step %d not run: the data loader's workers stopped with the %s (%s)", self.step + 1,
                         signal.Signals(stop.signum).name, str(e).strip().splitlines()[0] if str(e).strip()
                         else type(e).__name__)
                break
            window_n += 1
            now = time.perf_counter()
            if self.step % c.log_every == 0 or self.step == c.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                it_s = window_n / max(now - window_t, 1e-9)
                self.history.append({"step": self.step, "t": round(self.elapsed_before + now - t0, 2),
                                     "it_s": round(it_s, 3), **{k: round(v, 6) for k, v in logs.items()}})
                window_t, window_n = now, 0
                bar.show(self.step, logs, it_s, self.elapsed_before + now - t0)
            if c.checkpoint and (self.step % c.ckpt_every == 0 or now - last_ckpt > c.ckpt_minutes * 60):
                self._save_now(t0)
                last_ckpt = time.perf_counter()
        return logs

    def _save_now(self, t0: float) -> None:
        run_s = time.perf_counter() - t0
        self.elapsed_before += run_s
        self.save(self.cfg.checkpoint)
        self.elapsed_before -= run_s

    def _clock(self, local_s: float, stop: bool = False) -> tuple[float, bool]:
        """(Seconds this run has trained, as rank 0 counts them; whether any rank was asked to
        stop), the same on every rank.

        Under DDP the ranks must agree on everything that follows from the clock: when the time
        budget stops the run, and the learning rate (the cosine schedule follows the clock under
        ``max_minutes``). Each rank's own clock starts when it reaches :meth:`fit`, which can be
        seconds apart; different learning rates would let the replicas drift apart, since DDP
        averages only the gradients.
        """
        if self.di.world == 1:
            return local_s, stop
        t = torch.tensor([local_s if self.di.rank == 0 else 0.0, float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # rank 0's seconds (the others add 0), and the number of ranks asked to stop
        seconds, stops = t.tolist()
        return seconds, stops > 0

    def ema_model(self, build: "callable") -> nn.Module:
        """A fresh copy of the model (``build()``) holding the EMA weights, eval mode."""
        m = build().to(self.device)
        m.load_state_dict(self.model.state_dict())
        self.ema.copy_to(m)
        return m.eval().requires_grad_(False)

class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _StopRequest:
    """Ctrl-C and SIGTERM during :meth:`Trainer.fit`: the first one is noted (``signum``) and the
    loop stops after the step under way, saves its checkpoint and then leaves as the signal
    would have (KeyboardInterrupt, or SystemExit 128 + 15); a second one leaves at once, as
    without this (the periodic checkpoint is then the last). Installed in the main thread only
    (elsewhere Python allows no handlers: signals act as before)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:  # the second: at once
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save the checkpoint "
              "(again to stop at once)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in before.items():
                signal.signal(s, h)
