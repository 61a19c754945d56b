"""Large CPU tensors reused instead of freshly mapped: glibc's allocator setting for CLI runs.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when the tensor dies, so each large activation of the networks
costs a page fault and a page of zeroing per 4 KiB, on every denoiser pass. At tile 512 the
feature maps are 50–800 MB: upscaling a 512×368 LR on the 2-core CPU with the demo model spent
80 of its 187 CPU seconds in the kernel (32.6 M page faults). :func:`keep_freed_memory`
tells glibc to serve large blocks from its heap and not to return a free heap top below
2 GiB (freed blocks below live ones stay too, whatever their size), so the next tensor of a
size reuses warm pages: the same image ran in 57 s instead of 102 s (1024×768 LR, tiled, tiny
nets: 49 s instead of 88 s; an estimator training step, small config, batch 16: 5.0 s
instead of 10.1 s), bit-identical, for a higher peak RSS (3.3 instead of 2.7 GB for the
1024×768 run; up to 2× on a single-tile image), measured 2026-11-27.

Only the CLI's own process gets it: ``python -m upsr_core`` (and ``python -m
upsr_core.bench``) claims the process (:func:`claim_process`), and its commands call
:func:`for_cpu_run` when they run on the CPU. ``upsr_core.cli.main()`` called from another
program, the library and the ComfyUI nodes leave the host's allocator alone (ComfyUI also runs
prompts in a worker thread, whose glibc arena maps large blocks afresh whatever the setting:
docs/NODES.md says how to start it instead). ``UPSR_CPU_MALLOC=system`` keeps glibc's
defaults. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = ["keep_freed_memory", "claim_process", "for_cpu_run", "host_hint", "available_bytes", "ENV", "HOST_ENV"]

log = logging.getLogger(__name__)
ENV = "UPSR_CPU_MALLOC"
CHOICES = ("reuse", "system")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept mapped (mallopt takes an int)
_applied: bool | None = None
_claimed = False
# how a host process (ComfyUI) gets the same from glibc at its start: one arena (its prompts run
# in a worker thread), no mmap for large blocks, 2 GiB of free heap top kept
HOST_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def _glibc() -> bool:
    """Whether this process runs on Linux's glibc, whose allocator the settings are for."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _choice() -> str:
    choice = os.environ.get(ENV, "reuse")
    if choice not in CHOICES:
        raise ValueError(f"${ENV} must be 'reuse' (the default) or 'system' (glibc's defaults), got {choice!r}")
    return choice


def keep_freed_memory() -> bool:
    """Switch glibc (once per process) to heap blocks for large allocations, freed memory kept
    for reuse; returns whether the setting is on. Off with ``UPSR_CPU_MALLOC=system`` and where
    the C library is not glibc; any other value of the variable is a ValueError. A glibc that
    refuses the setting is a warning (half of it would be worse than either)."""
    global _applied
    if _applied is not None:
        return _applied
    choice = _choice()
    _applied = False
    if choice == "system" or not _glibc():
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: the glibc already loaded
    mmap_off = libc.mallopt(M_MMAP_MAX, 0) == 1
    trim_set = mmap_off and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if mmap_off and not trim_set:  # heap-only blocks with the default trim: undo
        libc.mallopt(M_MMAP_MAX, 65536)
    if not trim_set:
        log.warning("glibc refused mallopt (M_MMAP_MAX %s, M_TRIM_THRESHOLD %s): its allocator defaults kept, "
                    "large CPU images run slower", "ok" if mmap_off else "refused", "refused")
    _applied = trim_set
    log.debug("large CPU blocks from glibc's heap, freed ones kept for reuse: %s (%s=system turns it off)",
              _applied, ENV)
    return _applied


def claim_process() -> None:
    """Mark this process as the CLI's own (``python -m upsr_core``): :func:`for_cpu_run` may then
    change its allocator. Checks ``$UPSR_CPU_MALLOC`` now, before any work (ValueError)."""
    global _claimed
    _choice()
    _claimed = True


def for_cpu_run() -> bool:
    """Where a CLI command starts on the CPU: :func:`keep_freed_memory` if the process is the
    CLI's own (:func:`claim_process`), else nothing; returns whether the setting is on."""
    return keep_freed_memory() if _claimed else False


def host_hint(environ: dict[str, str] | None = None) -> str | None:
    """For a host process running the nets on the CPU (ComfyUI): the one line saying how to start
    it with glibc's settings for large tensors, or None where it would not help (not glibc, or
    the variables are already set). Changes nothing itself."""
    environ = os.environ if environ is None else environ
    if not _glibc() or "MALLOC_MMAP_MAX_" in environ:
        return None
    start = " ".join(f"{k}={v}" for k, v in HOST_ENV.items())
    return (f"large images on the CPU run ~1.7x faster when the process starts with {start} (glibc then reuses "
            "freed memory instead of mapping every large tensor afresh; the process keeps its peak memory): "
            "see docs/NODES.md, CPU-only ComfyUI")


def available_bytes() -> int | None:
    """Memory a new allocation can get without swapping (Linux's MemAvailable), or None where it
    cannot be told (not Linux)."""
    if not os.path.exists("/proc/meminfo"):
        return None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
