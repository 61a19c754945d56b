"""3×3 convolutions through NNPACK's Winograd kernels, for the fast path on AVX2 CPUs.

oneDNN computes a 3×3 convolution directly (9 multiply-adds per input channel and output
value); NNPACK, which PyTorch's CPU builds include, has Winograd F(6×6, 3×3) kernels that need
~2.25 per output value for the products of transformed 8×8 tiles, plus the transforms. On a
2-core AVX2 AMD EPYC VM (torch 2.13.0, fp32, 2026-11-29) one 3×3 conv of the full denoiser
took, oneDNN against NNPACK: 160 ch at 64² 10.9 → 6.1 ms, 128 ch at 256² 147 → 60 ms; on
small maps with many channels NNPACK lost (640 ch at 8²: 5.4 → 27.6 ms, its kernel transform
is redone on every call), so only maps of at least :data:`MIN_PIXELS` take it. NNPACK has no
AVX-512 kernels, and oneDNN's own are ~3× faster there: the fast path turns this on by
default only on AVX2-class x86 CPUs (:func:`auto_on`).

Numerics: Winograd's transforms round differently from a direct sum; one conv of fan-in
1152 (128 ch) with outputs of magnitude ~5 differed from float64 by up to 1.2e-4 against
oneDNN's 1e-5 (a relative 2e-5, 200× below bf16's rounding). The result does not depend on
where a map's rows start beyond that rounding: large maps run in row bands
(:data:`BAND_BYTES`), as NNPACK keeps a workspace of ~3.6× its input for the life of the
thread (128 ch at 1024² would have held 1.8 GB more; banded, ~0.1 GB).

Inference only (no gradient, no autocast); float32 CPU tensors only: anything else runs
PyTorch's own convolution, as does every call after NNPACK fails once (with one warning) or
while ``torch.backends.nnpack.set_flags(False)`` is in force. An out-of-memory error is raised as it is
(the caller retries with smaller tiles). NNPACK runs on a thread pool of its own, sized from
``torch.get_num_threads()`` at its first call and never resized by a later
``torch.set_num_threads``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import is_out_of_memory

__all__ = ["WinogradConv2d", "set_winograd", "available", "auto_on", "winograd_conv3x3",
           "MIN_PIXELS", "BAND_BYTES"]

log = logging.getLogger("upsr_core")

MIN_PIXELS = 64 * 64
"""Maps smaller than this (H·W) keep oneDNN's convolution. At 32² NNPACK won in isolation
(320 ch: 11.0 → 9.4 ms) but lost inside the denoiser (13.5 ms per call), and a whole LR-64
denoiser pass was as fast or faster with the cut at 64² (1.10 against 1.19 s, 2026-11-29)."""

BAND_BYTES = 32 << 20
"""Input bytes per NNPACK call: larger maps run in bands of rows (a multiple of 6, NNPACK's
output tile), each with its one-row halo. On the AVX2 VM 16–32 MiB bands were the fastest
(128 ch at 1024²: oneDNN 2.65 s; bands of 8, 16, 32 MiB 1.55, 1.11, 1.02 s), and NNPACK's
workspace stays ~3.6× a band."""

_FAILED: list[str] = []  # the first NNPACK failure (then PyTorch's convolution from there on)
_READY: list[bool] = []  # available()'s answer, once asked in this process


def available() -> bool:
    """Whether this PyTorch build has NNPACK and it initialised on this CPU (the check also
    initialises it: NNPACK's convolution fails until it has run, also in a process that
    unpickled a model made elsewhere)."""
    if not _READY:
        fn = getattr(torch, "_nnpack_available", None)
        _READY.append(bool(fn is not None and fn()))
    return _READY[0]


def auto_on() -> bool:
    """The fast path's default on the CPU: on where PyTorch's best kernels are AVX2 (x86
    without AVX-512, where NNPACK was faster than oneDNN), NNPACK runs and
    NNPACK is not switched off (``torch.backends.nnpack.set_flags``)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2" and _nnpack_enabled() and available()


def _nnpack_enabled() -> bool:
    """``torch.backends.nnpack.set_flags(enabled)``'s current value (True where torch lacks it)."""
    get = getattr(torch._C, "_get_nnpack_enabled", None)
    return bool(get()) if get is not None else True


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _eligible_module(conv: nn.Module) -> bool:
    return (type(conv) in (nn.Conv2d, WinogradConv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding == (1, 1)
            and conv.padding_mode == "zeros")


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) through NNPACK: ``x`` (B, C, H, W) float32 CPU,
    contiguous; ``weight`` (Cout, C, 3, 3), ``bias`` (Cout,) or None, float32 CPU; returns
    (B, Cout, H, W) float32, contiguous. One image per NNPACK call (its batched algorithm was
    slower: 2 × 160 ch at 64² 44 ms against oneDNN's 34) and maps over :data:`BAND_BYTES` in
    bands of rows. No gradient. Raises RuntimeError where NNPACK fails."""
    b, c, h, w = x.shape
    rows = max(6, (BAND_BYTES // (c * w * 4) - 2) // 6 * 6)
    if b == 1 and rows >= h:
        return torch._nnpack_spatial_convolution(x, weight, bias, [1, 1])
    out = x.new_empty(b, weight.shape[0], h, w)
    for i in range(b):
        xi = x[i:i + 1]
        if rows >= h:
            out[i:i + 1] = torch._nnpack_spatial_convolution(xi, weight, bias, [1, 1])
            continue
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            # rows r0-1 … r1 (the halo), zero rows where that passes the map's edge; NNPACK pads
            # the height symmetrically, so the band carries its own vertical padding
            band = F.pad(xi[:, :, max(r0 - 1, 0):min(r1 + 1, h)], (0, 0, int(r0 == 0), int(r1 == h)))
            out[i:i + 1, :, r0:r1] = torch._nnpack_spatial_convolution(band, weight, bias, [0, 1])
    return out


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3×3, stride 1, padding 1; the same parameters and state-dict keys)
    whose forward takes :func:`winograd_conv3x3` where it applies: float32 on the CPU,
    NCHW-contiguous maps of at least :data:`MIN_PIXELS`, nothing recording gradients, no CPU
    autocast, not while torch.compile traces, NNPACK not switched off (``torch.backends.nnpack.set_flags``). Elsewhere,
    and after NNPACK has failed once, ``nn.Conv2d``'s own forward. Made by
    :func:`set_winograd`, which also undoes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not _FAILED and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.shape[1] == self.in_channels
                and x.shape[-2] * x.shape[-1] >= MIN_PIXELS and x.is_contiguous()
                and not torch.compiler.is_compiling() and not _autocast_cpu()
                and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                         for t in (x, self.weight, self.bias)))
                and _nnpack_enabled() and available()):
            try:
                return winograd_conv3x3(x, self.weight, self.bias)
            except RuntimeError as e:
                if is_out_of_memory(e):  # not NNPACK's fault: the caller shrinks the tiles or reports
                    raise
                _FAILED.append(str(e))
                log.warning("NNPACK's Winograd convolution failed (%s): using PyTorch's convolution from now on",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
        return super().forward(x)


def set_winograd(net: nn.Module, on: bool) -> int:
    """Turn every 3×3 stride-1 padding-1 ``nn.Conv2d`` of ``net`` into a
    :class:`WinogradConv2d` (``on``) or back (in place: same parameters, keys and hooks);
    returns how many convolutions it switched to or left in that state. ``on`` where NNPACK
    does not run (:func:`available`) is a ValueError."""
    if on and not available():
        raise ValueError("set_winograd(net, True) needs NNPACK, which this PyTorch build lacks or which does "
                         "not run on this CPU")
    n = 0
    for m in net.modules():
        if _eligible_module(m):
            m.__class__ = WinogradConv2d if on else nn.Conv2d
            n += 1
    return n
