"""Large CPU tensors reused instead of freshly mapped: glibc's allocator setting for CLI runs.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when the tensor dies, so each large activation of the networks
costs a page fault and a page of zeroing per 4 KiB, on every denoiser pass. At tile 512 the
feature maps are 50–800 MB: upscaling a 512×368 LR on the 2-core CPU with the demo model spent
80 of its 187 CPU seconds in the kernel (32.6 M page faults). :func:`keep_freed_memory`
tells glibc to serve large blocks from its heap and keep up to 2 GiB of freed heap mapped, so
the next tensor of that size reuses warm pages: the same image ran in 57 s instead of 102 s
(1024×768 LR, tiled, tiny nets: 49 s instead of 88 s), bit-identical, for a higher peak RSS
(3.3 instead of 2.7 GB there; up to 2× on a single-tile image), measured 2026-11-27.

The CLI (``python -m upsr_core``) calls it when a command runs on the CPU; the library and the
ComfyUI nodes never do (a host process's allocator is the host's business; ComfyUI also runs
prompts in a worker thread, whose glibc arena maps large blocks afresh whatever the setting).
``UPSR_CPU_MALLOC=system`` keeps glibc's defaults. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = ["keep_freed_memory", "ENV"]

log = logging.getLogger(__name__)
ENV = "UPSR_CPU_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept mapped (mallopt takes an int)
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Switch glibc (once per process) to heap blocks for large allocations with freed memory
    kept for reuse; returns whether the setting is on. Off with ``UPSR_CPU_MALLOC=system``, and
    where the C library is not glibc. Any other value of the variable is a ValueError."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "reuse")
    if choice not in ("reuse", "system"):
        raise ValueError(f"${ENV} must be 'reuse' (the default) or 'system' (glibc's defaults), got {choice!r}")
    _applied = False
    if choice == "system" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:  # a glibc without the usual soname: keep its defaults
        log.debug("libc.so.6 not loadable (%s): glibc's allocator defaults kept", e)
        return False
    _applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("large CPU blocks from glibc's heap, freed ones kept for reuse: %s (%s=system turns it off)",
              _applied, ENV)
    return _applied
