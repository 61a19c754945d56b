"""GroupNorm (+ SiLU) on channels-last maps as Triton kernels (CUDA; inference and training),
and the conv-bias epilogue of the fast path.

``F.group_norm`` on CUDA makes a channels-last input contiguous NCHW (a copy in), writes NCHW
(the next conv copies back), and runs one thread block per image and group (32 at batch 1);
in the H100 profile of the eager fast path at LR 256 that is 27 % norm + 19 % copies of the
time, with the SiLU after each ResBlock norm another full pass. Here, on the NHWC memory itself:

1. ``_stats``: grid (B, S, ⌈C/BC⌉); each program sums x − K and (x − K)² over its share of the
   H·W rows for a block of channels, in float32 (K = the group's first value, a shift that
   keeps E[(x−K)²] − E[x−K]² free of cancellation unless |mean − K| is thousands of standard
   deviations), coalesced row reads;
2. ``_finalize``: grid (B·G,); adds the S partial sums of the group's channels → mean, 1/σ;
3. ``_apply``: grid (⌈HW/BP⌉, B, ⌈C/BC⌉); y = x·(γ/σ) + (β − mean·γ/σ), optionally SiLU, written
   channels-last in x's dtype.

One read for the statistics, one read and one write for the output (the native path: a copy,
two reads and a write for the norm, a copy back, SiLU's read and write). The fast path's
default on CUDA with channels-last when Triton is installed (``enable_fast(...,
triton_norm="auto")``): on one H100 (2026-11-27, full-size nets, batch 1, CUDA graphs) fp16
LR 64 went from 30.7 to 25.5 ms per image and LR 256 from 203 to 132 ms, bf16 from 27.3 to
22.2 and 173 to 102 ms (``bench --variants native-norm,triton-norm``); ``TRITON_INTERPRET=1``
runs the same kernels on the CPU, which is how the tests check them. Any failure to build or
launch a kernel is reported once and the caller falls back to the native norm.

Small maps (a group within :data:`SMALL_GROUP` values) take one kernel, ``_small``, instead of
the three. :func:`group_norm_nhwc_triton_autograd` adds a backward (``_bwd_stats``: per-channel
Σdy and Σdy·x̂ over row shares; ``_bwd_apply``: dx), for training; if the backward kernels fail,
that backward and every later one is computed with PyTorch's ops from the saved input.
:func:`bias_epilogue_nhwc_triton` (``_epilogue``) adds a conv's bias together with the GELU or
the residual that follows it. Not yet timed on a GPU: the small-map kernel, the backward, the
conv-bias folding (2026-11-27).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["available", "bias_epilogue_nhwc_triton", "group_norm_nhwc_triton", "group_norm_nhwc_triton_autograd"]

log = logging.getLogger("upsr_core")


SMALL_GROUP = 8192
"""Maps whose groups fit one program's registers (H·W and the channels per group, each rounded
up to a power of two, at most this many values) are normalised by one kernel instead of three:
at LR 64 on the full denoiser, 53 of the 80 norms per pass (8×8, 16×16, and 32×32 maps with up
to 8 channels per group; the three-kernel path's 1200 launches per image were the largest group
of the ~4800 at LR 64; not yet timed on a GPU)."""

MIN_CAPABILITY = (7, 0)
"""The oldest CUDA compute capability Triton compiles for (Volta; Inductor checks the same)."""


def available(device: torch.device) -> bool:
    """Triton is installed and can run on ``device``: a CUDA device of compute capability >=
    :data:`MIN_CAPABILITY`, a ROCm device (Triton's AMD backend; never timed here), or any
    device under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.version.hip is not None or torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


class _Kernels(NamedTuple):
    """The built kernels (``_kernels()``), by name; ``triton`` is the module (for ``cdiv``)."""

    triton: Any
    stats: Any
    finalize: Any
    apply: Any
    bwd_stats: Any
    bwd_apply: Any
    epilogue: Any
    small: Any


@functools.cache
def _kernels() -> _Kernels:
    import triton
    import triton.language as tl

    @triton.jit
    def _stats(X, XB, PART, HW, C, CG, rows_per, S, HAS_XB: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        # XB (HAS_XB): a per-channel bias of x (its conv's, not yet added): the norm of x + XB
        b = tl.program_id(0)
        s = tl.program_id(1)
        cb = tl.program_id(2)
        offc = cb * BC + tl.arange(0, BC)
        cmask = offc < C
        xb = X + b.to(tl.int64) * HW * C
        k = tl.load(xb + (offc // CG) * CG, mask=cmask, other=0.0).to(tl.float32)  # the group's first value
        if HAS_XB:  # k and x both without the bias: d = (x + XB[c]) - (k + XB[first])
            k = k + tl.load(XB + (offc // CG) * CG, mask=cmask, other=0.0).to(tl.float32)
            k = k - tl.load(XB + offc, mask=cmask, other=0.0).to(tl.float32)
        acc1 = tl.zeros([BP, BC], dtype=tl.float32)
        acc2 = tl.zeros([BP, BC], dtype=tl.float32)
        p0 = s * rows_per
        p1 = tl.minimum(p0 + rows_per, HW)
        for start in range(p0, p1, BP):
            rows = start + tl.arange(0, BP)
            m = (rows < p1)[:, None] & cmask[None, :]
            x = tl.load(xb + rows.to(tl.int64)[:, None] * C + offc[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - k[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        out = PART + (b * S + s).to(tl.int64) * 2 * C
        tl.store(out + offc, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(out + C + offc, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _finalize(X, XB, PART, STATS, HW, C, CG, G, S, eps, HAS_XB: tl.constexpr, BS: tl.constexpr,
                  BG: tl.constexpr):
        bg = tl.program_id(0)
        b = bg // G
        g = bg % G
        offs = tl.arange(0, BS)
        offg = tl.arange(0, BG)
        m = (offs < S)[:, None] & (offg < CG)[None, :]
        base = PART + (b * S + offs).to(tl.int64)[:, None] * 2 * C + g * CG + offg[None, :]
        s1 = tl.sum(tl.sum(tl.load(base, mask=m, other=0.0), axis=1), axis=0)
        s2 = tl.sum(tl.sum(tl.load(base + C, mask=m, other=0.0), axis=1), axis=0)
        n = (HW * 1.0) * CG  # in float: H·W·CG may pass 2**31
        d = s1 / n
        var = tl.maximum(s2 / n - d * d, 0.0)
        k = tl.load(X + b.to(tl.int64) * HW * C + g * CG).to(tl.float32)
        if HAS_XB:
            k = k + tl.load(XB + g * CG).to(tl.float32)
        tl.store(STATS + bg * 2, k + d)
        tl.store(STATS + bg * 2 + 1, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _apply(X, XB, Y, STATS, W, B_, HW, C, CG, G, WS, HAS_XB: tl.constexpr, SILU: tl.constexpr,
               BP: tl.constexpr, BC: tl.constexpr):
        pb = tl.program_id(0)  # row blocks on axis 0: the only grid axis without a 65535 limit
        b = tl.program_id(1)
        cb = tl.program_id(2)
        offc = cb * BC + tl.arange(0, BC)
        cmask = offc < C
        st = STATS + (b * G + offc // CG) * 2
        mean = tl.load(st, mask=cmask, other=0.0)
        rstd = tl.load(st + 1, mask=cmask, other=0.0)
        scale = tl.load(W + b * WS + offc, mask=cmask, other=0.0).to(tl.float32) * rstd  # WS: 0 or C
        shift = tl.load(B_ + b * WS + offc, mask=cmask, other=0.0).to(tl.float32) - mean * scale
        if HAS_XB:  # (x + XB)·scale + shift
            shift = shift + tl.load(XB + offc, mask=cmask, other=0.0).to(tl.float32) * scale
        rows = pb * BP + tl.arange(0, BP)
        m = (rows < HW)[:, None] & cmask[None, :]
        off = b.to(tl.int64) * HW * C + rows.to(tl.int64)[:, None] * C + offc[None, :]
        y = tl.load(X + off, mask=m, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _small(X, XB, Y, STATS, W, B_, HW, C, CG, G, WS, eps, HAS_XB: tl.constexpr, SILU: tl.constexpr,
               BP: tl.constexpr, BG: tl.constexpr):
        # a whole group in one program (small maps: BP >= H·W rows, BG >= its channels): load,
        # two-pass statistics in registers, apply; one launch instead of three
        bg = tl.program_id(0)
        b = bg // G
        g = bg % G
        rows = tl.arange(0, BP)
        j = tl.arange(0, BG)
        ch = g * CG + j
        cm = j < CG
        m = (rows < HW)[:, None] & cm[None, :]
        off = b.to(tl.int64) * HW * C + rows.to(tl.int64)[:, None] * C + ch[None, :]
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        if HAS_XB:
            x = x + tl.load(XB + ch, mask=cm, other=0.0).to(tl.float32)[None, :]
        n = (HW * 1.0) * CG
        mean = tl.sum(tl.sum(tl.where(m, x, 0.0), axis=1), axis=0) / n
        d = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / n + eps)
        a = tl.load(W + b * WS + ch, mask=cm, other=0.0).to(tl.float32)
        bb = tl.load(B_ + b * WS + ch, mask=cm, other=0.0).to(tl.float32)
        y = d * (rstd * a)[None, :] + bb[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
        tl.store(STATS + bg * 2, mean)
        tl.store(STATS + bg * 2 + 1, rstd)

    # _bwd_stats and _bwd_apply repeat their per-channel loads and the SiLU gradient: Triton
    # resolves a kernel's callees among module globals, and these kernels are built lazily here
    # (the module imports without Triton), so shared @triton.jit helpers would have to be
    # module-level; the repetition is the smaller cost
    @triton.jit
    def _bwd_stats(X, DZ, STATS, W, B_, PART, HW, C, CG, G, WS, rows_per, S, SILU: tl.constexpr,
                   BP: tl.constexpr, BC: tl.constexpr):
        # per channel over this program's rows: sum(dy) and sum(dy * xhat), dy the gradient at
        # the affine's output (through the SiLU, recomputed from x, when SILU)
        b = tl.program_id(0)
        s = tl.program_id(1)
        cb = tl.program_id(2)
        offc = cb * BC + tl.arange(0, BC)
        cmask = offc < C
        st = STATS + (b * G + offc // CG) * 2
        mean = tl.load(st, mask=cmask, other=0.0)
        rstd = tl.load(st + 1, mask=cmask, other=0.0)
        a = tl.load(W + b * WS + offc, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(B_ + b * WS + offc, mask=cmask, other=0.0).to(tl.float32)
        base = b.to(tl.int64) * HW * C
        acc1 = tl.zeros([BP, BC], dtype=tl.float32)
        acc2 = tl.zeros([BP, BC], dtype=tl.float32)
        p0 = s * rows_per
        p1 = tl.minimum(p0 + rows_per, HW)
        for start in range(p0, p1, BP):
            rows = start + tl.arange(0, BP)
            m = (rows < p1)[:, None] & cmask[None, :]
            off = base + rows.to(tl.int64)[:, None] * C + offc[None, :]
            xh = (tl.load(X + off, mask=m, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
            dy = tl.load(DZ + off, mask=m, other=0.0).to(tl.float32)  # 0 where masked
            if SILU:
                y = xh * a[None, :] + bb[None, :]
                sg = tl.sigmoid(y)
                dy = dy * sg * (1.0 + y * (1.0 - sg))
            acc1 += dy
            acc2 += dy * xh
        out = PART + (b * S + s).to(tl.int64) * 2 * C
        tl.store(out + offc, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(out + C + offc, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _bwd_apply(X, DZ, DX, STATS, W, B_, COEF, HW, C, CG, G, WS, SILU: tl.constexpr,
                   BP: tl.constexpr, BC: tl.constexpr):
        # dx = rstd * (dy * a - mean_g(dy * a) - xhat * mean_g(dy * a * xhat)), the group means in COEF
        pb = tl.program_id(0)
        b = tl.program_id(1)
        cb = tl.program_id(2)
        offc = cb * BC + tl.arange(0, BC)
        cmask = offc < C
        bg = b * G + offc // CG
        mean = tl.load(STATS + bg * 2, mask=cmask, other=0.0)
        rstd = tl.load(STATS + bg * 2 + 1, mask=cmask, other=0.0)
        c1 = tl.load(COEF + bg * 2, mask=cmask, other=0.0)
        c2 = tl.load(COEF + bg * 2 + 1, mask=cmask, other=0.0)
        a = tl.load(W + b * WS + offc, mask=cmask, other=0.0).to(tl.float32)
        bb = tl.load(B_ + b * WS + offc, mask=cmask, other=0.0).to(tl.float32)
        rows = pb * BP + tl.arange(0, BP)
        m = (rows < HW)[:, None] & cmask[None, :]
        off = b.to(tl.int64) * HW * C + rows.to(tl.int64)[:, None] * C + offc[None, :]
        xh = (tl.load(X + off, mask=m, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dy = tl.load(DZ + off, mask=m, other=0.0).to(tl.float32)
        if SILU:
            y = xh * a[None, :] + bb[None, :]
            sg = tl.sigmoid(y)
            dy = dy * sg * (1.0 + y * (1.0 - sg))
        dx = rstd[None, :] * (dy * a[None, :] - c1[None, :] - xh * c2[None, :])
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)

    @triton.jit
    def _epilogue(X, BIAS, BIAS2, SKIP, Y, ROWS, C, HAS_BIAS2: tl.constexpr, HAS_SKIP: tl.constexpr,
                  GELU: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        # y = act(x + BIAS[c] (+ BIAS2[c])) (+ SKIP) in float32, one rounding; (ROWS, C) rows = B·H·W
        pr = tl.program_id(0)
        cb = tl.program_id(1)
        offc = cb * BC + tl.arange(0, BC)
        cmask = offc < C
        bias = tl.load(BIAS + offc, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS2:
            bias = bias + tl.load(BIAS2 + offc, mask=cmask, other=0.0).to(tl.float32)
        rows = pr * BP + tl.arange(0, BP)
        m = (rows < ROWS)[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * C + offc[None, :]
        y = tl.load(X + off, mask=m, other=0.0).to(tl.float32) + bias[None, :]
        if GELU:  # exact (erf) GELU, nn.GELU()'s default
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        if HAS_SKIP:
            y = y + tl.load(SKIP + off, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)

    return _Kernels(triton, _stats, _finalize, _apply, _bwd_stats, _bwd_apply, _epilogue, _small)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _blocks(c: int) -> tuple[int, int]:
    """(BC, BP): channels and rows per program of the row-block kernels, ~4096 values each."""
    bc = min(128, _pow2(c))
    return bc, max(1, 4096 // bc)


@dataclass(frozen=True)
class _Plan:
    """Grid and block sizes for one (B, C, H, W) map: BC channels × BP rows per program; the
    statistics split the H·W rows into ``splits`` shares of ``rows_per`` rows."""

    b: int
    c: int
    hw: int
    cg: int
    bc: int
    bp: int
    splits: int
    rows_per: int


def _plan(x: torch.Tensor, num_groups: int) -> _Plan:
    return _plan_for(tuple(x.shape), num_groups)


@functools.lru_cache(maxsize=256)
def _plan_for(shape: tuple[int, int, int, int], num_groups: int) -> _Plan:
    # cached: eager callers (the ComfyUI nodes, training) pay this Python per norm call
    import triton

    b, c, h, w = shape
    hw = h * w
    bc, bp = _blocks(c)
    # enough programs to fill a GPU at batch 1 (the native kernel's 32 blocks were the problem),
    # each with at least a few row blocks of work
    splits = max(1, min(triton.cdiv(hw, 4 * bp), triton.cdiv(256, b * triton.cdiv(c, bc)), 128))
    rows_per = triton.cdiv(triton.cdiv(hw, splits), bp) * bp
    return _Plan(b, c, hw, c // num_groups, bc, bp, triton.cdiv(hw, rows_per), rows_per)


def _check(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, batched: bool) -> None:
    if x.dim() != 4 or x.shape[1] % num_groups:
        raise ValueError(f"the Triton GroupNorm needs (B, C, H, W) with C a multiple of num_groups={num_groups}, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("the Triton GroupNorm needs a channels-last contiguous input")
    shapes = [(x.shape[1],)] + ([(x.shape[0], x.shape[1])] if batched else [])
    if weight.shape not in shapes or bias.shape != weight.shape:
        raise ValueError(f"weight and bias must both be one of {shapes}, "
                         f"got {tuple(weight.shape)}, {tuple(bias.shape)}")


def _on_device(x: torch.Tensor):
    """Triton launches on the current device and its stream: make them x's (a model on cuda:1)."""
    other = x.is_cuda and x.device.index != torch.cuda.current_device()
    return torch.cuda.device(x.device) if other else contextlib.nullcontext()


def _forward(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
             silu: bool, x_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, stats): y channels-last in x's dtype; stats (B·G, 2) float32 mean and 1/σ per image and
    group (of x + x_bias, if given)."""
    xb = x if x_bias is None else x_bias  # a placeholder pointer where there is none
    k = _kernels()
    p = _plan(x, num_groups)
    ws = p.c if weight.dim() == 2 else 0
    has = x_bias is not None
    stats = torch.empty(p.b * num_groups, 2, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    bp, bg = _pow2(p.hw), _pow2(p.cg)
    if bp * bg <= SMALL_GROUP:  # one program per group, one launch
        with _on_device(x):
            k.small[(p.b * num_groups,)](x, xb, y, stats, weight, bias, p.hw, p.c, p.cg, num_groups, ws,
                                         float(eps), HAS_XB=has, SILU=silu, BP=bp, BG=bg,
                                         num_warps=8 if bp * bg >= 4096 else 4)
        return y, stats
    part = torch.empty(p.b, p.splits, 2, p.c, device=x.device, dtype=torch.float32)
    with _on_device(x):
        k.stats[(p.b, p.splits, k.triton.cdiv(p.c, p.bc))](x, xb, part, p.hw, p.c, p.cg, p.rows_per, p.splits,
                                                            HAS_XB=has, BP=p.bp, BC=p.bc)
        k.finalize[(p.b * num_groups,)](x, xb, part, stats, p.hw, p.c, p.cg, num_groups, p.splits, float(eps),
                                        HAS_XB=has, BS=_pow2(p.splits), BG=_pow2(p.cg))
        k.apply[(k.triton.cdiv(p.hw, p.bp), p.b, k.triton.cdiv(p.c, p.bc))](
            x, xb, y, stats, weight, bias, p.hw, p.c, p.cg, num_groups, ws, HAS_XB=has, SILU=silu,
            BP=p.bp, BC=p.bc)
    return y, stats


def group_norm_nhwc_triton(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool = False,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm of ``x`` (B, C, H, W), channels-last contiguous, any float dtype, with the
    per-channel affine ``weight``/``bias`` (C,) (any float dtype, used in float32) and, if
    ``silu``, SiLU after it; returns (B, C, H, W) channels-last in x's dtype. ``x_bias`` (C,):
    normalise x + x_bias instead (the bias of the conv that made x, so that conv runs without
    its separate bias pass), in float32. Statistics in float32 (float64 input is computed in
    float32 too). Inference only (no autograd; see :func:`group_norm_nhwc_triton_autograd` for
    training)."""
    _check(x, num_groups, weight, bias, batched=False)
    if x_bias is not None and x_bias.shape != (x.shape[1],):
        raise ValueError(f"x_bias must be ({x.shape[1]},), got {tuple(x_bias.shape)}")
    x_bias = None if x_bias is None else x_bias.contiguous()  # the kernels index them densely
    return _forward(x, num_groups, weight.contiguous(), bias.contiguous(), eps, silu, x_bias)[0]


def bias_epilogue_nhwc_triton(
    x: torch.Tensor, bias: torch.Tensor, *, bias2: torch.Tensor | None = None, skip: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """A conv's bias pass fused with what follows it, on channels-last maps: returns
    GELU?(x + bias (+ bias2)) (+ skip), computed in float32 and written once in x's dtype, into
    ``x`` itself (a conv output run without its bias: nothing else holds it). ``x`` and
    ``skip`` (B, C, H, W) channels-last contiguous, same shape; ``bias``/``bias2`` (C,). One
    pass instead of two or three: PyTorch's CUDA convolution adds its bias as a separate
    kernel (in the H100 profile at LR 256, 627 of them, 14 ms of 131), then the residual add
    or the GELU reads the map again."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"bias_epilogue_nhwc_triton needs a channels-last contiguous (B, C, H, W) x, "
                         f"got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("bias", bias), ("bias2", bias2)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name} must be ({c},), got {tuple(t.shape)}")
    if skip is not None and (skip.shape != x.shape or not skip.is_contiguous(memory_format=torch.channels_last)):
        cl = skip.is_contiguous(memory_format=torch.channels_last)
        raise ValueError(f"skip must be channels-last contiguous of x's shape {tuple(x.shape)}, got "
                         f"{tuple(skip.shape)} (channels-last: {cl})")
    bias = bias.contiguous()
    bias2 = None if bias2 is None else bias2.contiguous()
    k = _kernels()
    rows = x.numel() // c
    bc, bp = _blocks(c)
    with _on_device(x):
        k.epilogue[(k.triton.cdiv(rows, bp), k.triton.cdiv(c, bc))](
            x, bias, bias if bias2 is None else bias2, x if skip is None else skip, x, rows, c,
            HAS_BIAS2=bias2 is not None, HAS_SKIP=skip is not None, GELU=gelu, BP=bp, BC=bc)
    return x


def record_failure(latch: list[str], e: Exception, message: str) -> None:
    """Note a kernel's first failure in ``latch`` (its callers then skip the kernels) and warn
    once: ``message`` (what failed and what runs instead), then the error's first line."""
    latch.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    log.warning("%s: %s", message, latch[0])


_BACKWARD_FAILED: list[str] = []  # the first failure of the backward kernels (then never tried again)


def group_norm_f32(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """What the kernels compute, with PyTorch's ops: GroupNorm of ``x`` (B, C, H, W) in float32
    with the affine ``weight``/``bias`` (C,) or, per image, (B, C); float32 result."""
    view = (lambda t: t.float()[..., None, None]) if weight.dim() == 2 else (lambda t: t.float()[:, None, None])
    return F.group_norm(x.float(), num_groups, None, None, eps) * view(weight) + view(bias)


def _native_backward(dz, x, weight, bias, num_groups, eps, silu):
    """The gradients of :func:`group_norm_nhwc_triton_autograd` with PyTorch's ops (its
    fallback): the forward recomputed in float32 from the saved input, then autograd."""
    with torch.enable_grad():
        xf, w, b = (t.detach().float().requires_grad_() for t in (x, weight, bias))
        y = group_norm_f32(xf, num_groups, w, b, eps)
        y = F.silu(y) if silu else y
        dx, dw, db = torch.autograd.grad(y, (xf, w, b), dz.float())
    return (dx.to(x.dtype).contiguous(memory_format=torch.channels_last), dw.to(weight.dtype), db.to(bias.dtype),
            None, None, None)


class _GroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):  # noqa: D102 — see group_norm_nhwc_triton_autograd
        y, stats = _forward(x, num_groups, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.num_groups, ctx.silu, ctx.eps = num_groups, silu, eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):  # noqa: D102
        x, weight, bias, stats = ctx.saved_tensors
        if not _BACKWARD_FAILED:
            try:
                return _GroupNormFn._backward(ctx, dz, x, weight, bias, stats)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 — a JIT compiler's failures have no common base class
                record_failure(_BACKWARD_FAILED, e,
                               "Triton GroupNorm backward failed, computing it with PyTorch's ops from now on")
        return _native_backward(dz, x, weight, bias, ctx.num_groups, ctx.eps, ctx.silu)

    @staticmethod
    def _backward(ctx, dz, x, weight, bias, stats):
        k = _kernels()
        g = ctx.num_groups
        p = _plan(x, g)
        ws = p.c if weight.dim() == 2 else 0
        dz = dz.contiguous(memory_format=torch.channels_last)
        part = torch.empty(p.b, p.splits, 2, p.c, device=x.device, dtype=torch.float32)
        with _on_device(x):
            k.bwd_stats[(p.b, p.splits, k.triton.cdiv(p.c, p.bc))](
                x, dz, stats, weight, bias, part, p.hw, p.c, p.cg, g, ws, p.rows_per, p.splits,
                SILU=ctx.silu, BP=p.bp, BC=p.bc)
        sums = part.sum(1)  # (B, 2, C): per image and channel sum(dy), sum(dy * xhat); fixed order
        d_bias, d_weight = sums[:, 0], sums[:, 1]
        a = weight.float()
        n = p.hw * p.cg
        coef = (torch.stack([a * d_bias, a * d_weight], dim=-1).view(p.b, g, p.cg, 2).sum(2) / n).contiguous()
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        with _on_device(x):
            k.bwd_apply[(k.triton.cdiv(p.hw, p.bp), p.b, k.triton.cdiv(p.c, p.bc))](
                x, dz, dx, stats, weight, bias, coef, p.hw, p.c, p.cg, g, ws, SILU=ctx.silu, BP=p.bp, BC=p.bc)
        if weight.dim() == 1:
            d_weight, d_bias = d_weight.sum(0), d_bias.sum(0)
        return dx, d_weight.to(weight.dtype), d_bias.to(bias.dtype), None, None, None


def group_norm_nhwc_triton_autograd(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool = False
) -> torch.Tensor:
    """:func:`group_norm_nhwc_triton` with a backward (training on channels-last maps):
    ``x`` (B, C, H, W) channels-last contiguous, any float dtype; ``weight``/``bias`` (C,) or,
    per image, (B, C) (a ResBlock's scale-shift folded in: γ(1+s), β(1+s)+shift), float32 for
    the gradients to be float32; y = SiLU?(x̂·weight + bias) channels-last in x's dtype.

    Two kernels forward (as for inference, plus the statistics' finalize) and two backward
    (per-channel sums of dy and dy·x̂, then dx), all reading x and dy in place: the native
    norm on channels-last CUDA maps copies x to NCHW and back and the SiLU is its own pass,
    each forward and backward. Only x and the (B·G, 2) statistics are kept for the backward
    (the normalised map and SiLU are recomputed). Deterministic (no atomics). The gradient
    itself is not differentiable again."""
    if weight.dim() == 2 and weight.shape[0] == 1 and x.shape[0] > 1:  # one affine for the batch (one
        # timestep for all images): per image, as the kernels read it (the gradients sum back through expand)
        weight, bias = weight.expand(x.shape[0], -1), bias.expand(x.shape[0], -1)
    _check(x, num_groups, weight, bias, batched=True)
    return _GroupNormFn.apply(x, weight.contiguous(), bias.contiguous(), num_groups, float(eps), bool(silu))
