"""Exceptions raised by upsr_core, and the small helpers its argument checks share."""
from __future__ import annotations

import functools
import numbers
from typing import Mapping

import torch

__all__ = ["UnsupportedCheckpointError", "NonFiniteOutputError", "FastOptionError", "check_device", "cpu_has_fast_bf16",
           "describe_state_dict", "is_int", "is_out_of_memory", "is_size_limit"]


def is_int(v: object) -> bool:
    """True for an integer argument: Python's or NumPy's, not bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# what the allocators say when a tensor does not fit: CUDA raises torch.OutOfMemoryError; the
# CPU allocator ("can't allocate memory"), MPS ("MPS backend out of memory", and "Invalid
# buffer size" for one buffer over the device's limit) and DirectML ("not enough GPU video
# memory") raise plain RuntimeErrors
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "Invalid buffer size", "not enough GPU video memory",
                 "Cannot allocate memory")  # the last: strerror(ENOMEM), e.g. NNPACK's workspace (posix_memalign)
# the ones no amount of free memory cures, only a smaller tensor: one buffer over a device's
# per-buffer limit (MPS's own message, and the ×4 head's check before Metal would abort)
_SIZE_LIMIT_MESSAGES = ("Invalid buffer size", "per-tensor limit")


def is_out_of_memory(e: BaseException) -> bool:
    """True when ``e`` says a device (CUDA, CPU, MPS) could not allocate a tensor: a smaller
    tile or batch may fit. Any other error is a bug to show, not retry."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES)


def is_size_limit(e: BaseException) -> bool:
    """True for an out-of-memory that only a smaller tensor (tile) cures: one buffer over a
    device's per-buffer limit, whatever else is loaded."""
    return is_out_of_memory(e) and any(m in str(e) for m in _SIZE_LIMIT_MESSAGES)


def describe_state_dict(sd: Mapping, limit: int = 4) -> str:
    """One line saying what a state dict looks like: key count and its first keys."""
    keys = list(sd.keys())
    head = ", ".join(repr(k) for k in keys[:limit])
    more = f", … ({len(keys)} keys)" if len(keys) > limit else f" ({len(keys)} keys)"
    return f"[{head}{more}]" if keys else "an empty state dict"


class UnsupportedCheckpointError(ValueError):
    """A file is not a checkpoint of the network it was given as.

    The message says what was expected and what the file looks like.
    """

    def __init__(self, message: str, sd: Mapping | None = None):
        if sd is not None:
            message = f"{message}; the file holds {describe_state_dict(sd)}"
        super().__init__(message)


class FastOptionError(ValueError):
    """:func:`upsr_core.fast.enable_fast` was asked for switches that cannot run here or not
    together. ``options`` names them as enable_fast's keywords (e.g. ``("winograd",
    "channels_last")``), so that a front end can name its own flags without reading the message."""

    def __init__(self, message: str, *options: str):
        super().__init__(message)
        self.options = options


class NonFiniteOutputError(FloatingPointError):
    """The denoiser's output holds NaN: the net overflowed (fp16 with some weights) or its
    weights are broken. Raised instead of handing back a black or white image."""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has fast bf16 kernels: oneDNN's own test (x86 with AVX-512 BW/VL/DQ or
    AMX, Arm with BF16). Without them PyTorch runs bf16 convolutions in a slow generic loop: a
    3×3 conv of 128 channels at 64² took 3.5 s in bf16 against 14 ms in fp32 (2-core AMD EPYC
    with AVX2 only, torch 2.13.0, 2026-11-28), while on the AVX-512 BF16 VMs of earlier days
    bf16 was the faster CPU dtype. Builds without that test: AVX-512 or not."""
    test = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if test is None:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return bool(test())


def check_device(device: torch.device | str, *, label: str | None = None) -> torch.device:
    """``device`` as a torch.device that this machine has: ValueError naming it otherwise
    (torch's own error for a missing CUDA or XPU is a bare AssertionError; the meta device is
    refused, it holds no data). Other backends (XPU, DirectML) pass where torch has them. ``label`` is how the
    messages name it (default ``device 'cuda:1'``; the CLI says ``--device cuda:1``)."""
    want = "'cpu', 'cuda', 'cuda:N' or 'mps' (or a torch.device)"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be {want}, got {device!r}") from e
    what = label or f"device {str(dev)!r}"
    if dev.type == "meta":  # loads "successfully", then upscale cannot copy out a single value
        raise ValueError(f"device must be {want}, got {device!r}: the meta device holds no data")
    backend = getattr(torch, dev.type, None)  # torch.xpu, …: torch's own error for a missing one is an AssertionError
    if dev.type not in ("cpu", "cuda", "mps") and callable(getattr(backend, "is_available", None)) \
            and not backend.is_available():
        raise ValueError(f"{what} was asked for, but {dev.type.upper()} is not available here")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} was asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} was asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"{what} was asked for, but MPS (Apple silicon) is not available here")
    return dev
