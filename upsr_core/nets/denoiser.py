"""The UPSR denoiser: a Swin-UNet on PixelUnshuffled pixels (official ``UNetModelSwin``).

Written from SPEC §3. Module and parameter names follow the official state_dict so
``load_state_dict(strict=True)`` takes the authors' ``upsr.pth`` without remapping.
Quirks of the official code that the trained weights depend on are replicated on
purpose and marked ``# SPEC §8.N``.

Shapes: ``forward(x, t, lq)`` takes ``x`` (B, in_channels, h, w) — the scaled,
unshuffled state — ``t`` int64 (B,) raw step indices, ``lq`` (B, 96, h, w), and returns
the x0 prediction (B, out_channels, 4h, 4w) in [-1, 1] space (not clamped). ``h`` and
``w`` must be multiples of ``config.multiple_of`` (64 for the official net).
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DenoiserConfig
from .attention import CarriesFastTensors, SizeCache, WindowAttention, window_index, window_partition, window_reverse

__all__ = ["UPSRDenoiser", "timestep_embedding", "group_norm_nhwc", "set_triton_train_norm"]

log = logging.getLogger("upsr_core")


def group_norm_nhwc(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """GroupNorm of a channels-last map without leaving its layout (inference only).

    ``x`` (B, C, H, W), channels-last contiguous (anything else is copied by the view
    below), any float dtype; returns the same shape, dtype and layout. ``F.group_norm``
    makes a non-CPU input contiguous NCHW first, so in a channels-last net every norm costs
    a copy in and one out, and its kernel runs one thread block per image and group (32 at
    batch 1). Here the statistics are full-occupancy reductions over a view of the NHWC
    memory (float32/64: one Welford ``var_mean``; bf16/fp16: mean and mean square read from
    the 16-bit values and accumulated in float32, var = E[x²] − E[x]², whose float32
    cancellation stays far below the output's 16-bit rounding while the mean is within ~100
    standard deviations), and the affine is one eval-mode ``batch_norm`` per image
    (per-channel float32 constants, channels-last aware, output in the input's dtype).
    Gradients do not flow through the statistics (eval ``batch_norm`` treats them as
    constants): never use this for training.
    """
    if x.dim() != 4 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_nhwc needs (B, C, H, W) with C a multiple of num_groups={num_groups}, "
                         f"got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    cg = c // num_groups
    xv = x.permute(0, 2, 3, 1).reshape(b, h * w, num_groups, cg)  # a view of channels-last memory
    if x.dtype not in (torch.float16, torch.bfloat16):
        var, mean = torch.var_mean(xv, dim=(1, 3), correction=0)  # (B, G) each, Welford
    else:  # read as 16-bit, accumulated in float32, no float32 copy of x
        mean = xv.mean(dim=(1, 3), dtype=torch.float32)
        msq = torch.linalg.vector_norm(xv, 2, dim=(1, 3), dtype=torch.float32).square_().div_(h * w * cg)
        var = torch.addcmul(msq, mean, mean, value=-1.0).clamp_(min=0.0)
    stats = torch.stack([mean, var]).repeat_interleave(cg, dim=2)  # (2, B, C), float32 (float64 for float64 x)
    w_, b_ = weight.to(stats.dtype), bias.to(stats.dtype)  # batch_norm wants its parameters in that type
    outs = [F.batch_norm(x[i:i + 1], stats[0, i], stats[1, i], w_, b_, False, 0.0, eps) for i in range(b)]
    return outs[0] if b == 1 else torch.cat(outs)


_TRITON_NORM_FAILED: list[str] = []  # the first failure of a Triton kernel (then never tried again)


def _run_triton(what: str, instead: str, fn, *args, **kwargs) -> torch.Tensor | None:
    """``fn(*args, **kwargs)``, or None after recording its failure (the caller then computes
    the same thing with PyTorch's ops, and every Triton kernel is skipped from then on)."""
    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 — a JIT compiler's failures have no common base class;
        # PyTorch's ops compute the same thing, so say so once and use them
        from .triton_norm import record_failure

        record_failure(_TRITON_NORM_FAILED, e, f"Triton {what} failed, using {instead} from now on")
        return None


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Autograd would record an op on these (None: absent; the kernels without a backward must
    not run then)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_runs_on(device: torch.device) -> bool:
    from .triton_norm import available

    return available(device)


def conv_nobias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` without its bias (which :func:`conv_epilogue` or a norm's ``x_bias`` then adds)."""
    return conv._conv_forward(x, conv.weight, None)  # PyTorch's own path: any padding_mode


def conv_epilogue(x: torch.Tensor, bias: torch.Tensor, *, bias2: torch.Tensor | None = None,
                  skip: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """GELU?(x + bias (+ bias2)) (+ skip) for a conv output ``x`` made by :func:`conv_nobias`
    (fast path, where :meth:`GroupNorm32.fuses`): one Triton pass, overwriting x, or, once a
    Triton kernel has failed, PyTorch's ops."""
    cl = torch.channels_last
    grads = _needs_grad(x, bias, bias2, skip)  # the kernel writes x in place
    if not _TRITON_NORM_FAILED and not grads and x.is_contiguous(memory_format=cl) and (
            skip is None or (skip.shape == x.shape and skip.is_contiguous(memory_format=cl))):
        from .triton_norm import bias_epilogue_nhwc_triton

        y = _run_triton("conv epilogue", "PyTorch's ops", bias_epilogue_nhwc_triton, x, bias, bias2=bias2,
                        skip=skip, gelu=gelu)
        if y is not None:
            return y
    y = x + (bias if bias2 is None else bias + bias2).to(x.dtype)[:, None, None]
    y = F.gelu(y) if gelu else y
    return y if skip is None else skip + y


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 and cast back (official ``normalization``).

    The affine parameters are used in float32 too, so a bf16/fp16 net runs on any device
    (the official fp16 conversion keeps them float32). Fast path switches (inference only,
    set per instance by :func:`upsr_core.fast.enable_fast`): ``native``: normalise in the
    input dtype (the kernels still accumulate the statistics in float32); ``nhwc``: a
    channels-last input that needs no gradient is normalised by :func:`group_norm_nhwc`
    (no layout copies); ``triton``: such an input goes through the Triton kernels of
    :mod:`upsr_core.nets.triton_norm` (norm and SiLU in one pass; if they fail to build or
    run, a warning and the other paths from then on; under torch.compile, which fuses the native
    norm itself, never); anything else takes the other paths. Training switch
    (:func:`set_triton_train_norm`): ``triton_train``: any channels-last input, with or
    without gradients, goes through the kernels' autograd version
    (:func:`upsr_core.nets.triton_norm.group_norm_nhwc_triton_autograd`), and the ResBlocks
    fold their scale-shift and SiLU into it.
    """

    native: bool = False
    nhwc: bool = False
    triton: bool = False
    fuse_bias: bool = False
    triton_train: bool = False

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.bias)

    def fuses(self, x: torch.Tensor) -> bool:
        """The fast path's Triton kernels will take ``x`` (inference, channels-last, no failure
        so far): the convolutions around this norm then leave their biases to the kernels
        (:meth:`normalize`'s ``x_bias``, :func:`conv_epilogue`)."""
        # grad mode off: the folded biases are added in place, out of autograd's sight, so any
        # recorded op around them (a trainable conv, bias or input) would lose its gradient
        return (self.triton and self.fuse_bias and not _TRITON_NORM_FAILED and not torch.is_grad_enabled()
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and not torch.compiler.is_compiling())

    def normalize(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu: bool = False,
                  x_bias: torch.Tensor | None = None) -> torch.Tensor:
        """This norm with another affine, per channel (C,) (the fast path's folded scale-shift)
        or per image and channel (B, C) (training's, :attr:`triton_train` only), followed by
        SiLU if ``silu``. ``x_bias`` (C,): normalise x + x_bias (a conv's bias, see :meth:`fuses`)."""
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        fast_ok = cl and not _needs_grad(x, weight, bias, x_bias)  # the inference kernels have no backward
        kernel, kw = None, {}
        if self.triton_train and cl and x_bias is None and _triton_runs_on(x.device):
            kernel = "group_norm_nhwc_triton_autograd"
        elif self.triton and fast_ok:
            kernel, kw = "group_norm_nhwc_triton", {"x_bias": x_bias}
        if kernel and not _TRITON_NORM_FAILED and not torch.compiler.is_compiling():
            from . import triton_norm

            y = _run_triton("GroupNorm", "the native norm", getattr(triton_norm, kernel),
                            x, self.num_groups, weight, bias, self.eps, silu, **kw)
            if y is not None:
                return y
        if x_bias is not None:
            x = x + x_bias.to(x.dtype)[:, None, None]
        if weight.dim() == 2:  # training's per-image affine without the kernels: float32, then x's dtype
            from .triton_norm import group_norm_f32

            y = group_norm_f32(x, self.num_groups, weight, bias, self.eps).to(x.dtype)
        elif self.nhwc and fast_ok:
            y = group_norm_nhwc(x, self.num_groups, weight, bias, self.eps)
        elif self.native:
            y = F.group_norm(x, self.num_groups, weight.to(x.dtype), bias.to(x.dtype), self.eps)
        else:
            y = F.group_norm(x.float(), self.num_groups, weight.float(), bias.float(), self.eps).to(x.dtype)
        return F.silu(y) if silu else y


def set_triton_train_norm(net: nn.Module, on: bool) -> int:
    """Switch every :class:`GroupNorm32` of ``net`` to (or off) the Triton norm with a backward
    (training on a channels-last net; the caller checks :func:`upsr_core.nets.triton_norm.available`).
    Returns how many norms it set."""
    norms = [m for m in net.modules() if isinstance(m, GroupNorm32)]
    for m in norms:
        m.triton_train = bool(on)
    return len(norms)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps, (B,) -> (B, dim); cosines first (SPEC §3.2)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on the time embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n1, n2 = self.in_layers[0], self.out_layers[0]
        if n2.triton_train and not torch.compiler.is_compiling():
            # training with the Triton norm: the scale-shift (float32, per image) folded into the
            # second norm's affine and each SiLU into its norm; same math, one rounding fewer
            h = self.in_layers[2](n1.normalize(x, n1.weight, n1.bias, silu=True))
            scale, shift = self.emb_layers(emb).float().chunk(2, dim=1)
            a, b = n2.weight * (1 + scale), n2.bias * (1 + scale) + shift
            return self.skip_connection(x) + self.out_layers[3](n2.normalize(h, a, b, silu=True))
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[1](h))
        return self.skip_connection(x) + h

    def folded_affine(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (emb_dim,) of one step -> (2, cout) in emb's dtype: the second norm's affine with
        the step's scale-shift folded in, γ(1+s) and β(1+s)+shift (GN(h)·γ+β, then ·(1+s)+shift)."""
        lin, norm = self.emb_layers[1], self.out_layers[0]
        scale, shift = F.linear(F.silu(emb), lin.weight.to(emb.dtype), lin.bias.to(emb.dtype)).chunk(2)
        return torch.stack([norm.weight.to(emb.dtype) * (1 + scale), norm.bias.to(emb.dtype) * (1 + scale) + shift])

    def forward_folded(self, x: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for a batch that shares one step, with ``affine`` (2, cout) from
        :meth:`folded_affine`: the second norm applies the scale-shift itself (no emb MLP,
        no separate multiply and add), and each norm its SiLU (one pass with the Triton norm)."""
        n1, n2 = self.in_layers[0], self.out_layers[0]
        c1, c2, sk = self.in_layers[2], self.out_layers[3], self.skip_connection
        if n1.fuses(x):  # Triton: the convs' biases go into the next norm and the residual pass
            h = conv_nobias(c1, n1.normalize(x, n1.weight, n1.bias, silu=True))
            h = conv_nobias(c2, n2.normalize(h, affine[0], affine[1], silu=True, x_bias=c1.bias))
            if isinstance(sk, nn.Conv2d):
                return conv_epilogue(h, c2.bias, bias2=sk.bias, skip=conv_nobias(sk, x))
            return conv_epilogue(h, c2.bias, skip=x)
        h = c1(n1.normalize(x, n1.weight, n1.bias, silu=True))
        h = c2(n2.normalize(h, affine[0], affine[1], silu=True))
        return sk(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def prepare_subpixel(conv: nn.Conv2d) -> None:
    """Give a 3x3 conv that follows a nearest ×2 upsampling its 4 sub-pixel 2x2 kernels.

    Output row 2i+a of conv(nearest×2(x)) reads x rows {i−1: w0, i: w1+w2} (a = 0) or
    {i: w0+w1, i+1: w2} (a = 1); columns alike. So the pair is 4 convolutions with 2x2
    kernels at the LR size: 16 taps per LR pixel instead of 36 (same math, other rounding).
    """
    with torch.no_grad():
        w = conv.weight.float()
        rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
                torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
        conv.subpixel = tuple(
            k.to(conv.weight.dtype).contiguous()
            for r in rows
            for k in (torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1),
                      torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))
        )


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest ×2 (x)), (B,C,h,w) -> (B,Cout,2h,2w); sub-pixel form after :func:`prepare_subpixel`,
    which keeps a channels-last ``x``'s layout (each sub-pixel map written straight to its places)."""
    kernels = getattr(conv, "subpixel", None)
    if kernels is None:
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    n, _, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    places = [(a, b) for a in (0, 1) for b in (0, 1)]  # output row/column parity of each sub-pixel map
    maps = (F.conv2d(xp[:, :, a : a + h + 1, b : b + w + 1], kernels[2 * a + b], conv.bias) for a, b in places)
    if not channels_last(x):
        y = torch.stack(list(maps), 2)
        c = y.shape[1]
        return y.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)
    first = next(maps)  # the output takes the conv's dtype (autocast may change it), channels-last
    out = first.new_empty(n, 2 * h, 2 * w, first.shape[1])
    grid = out.view(n, h, 2, w, 2, first.shape[1])
    for (a, b), y in zip(places, itertools.chain([first], maps)):  # one map alive at a time
        grid[:, :, a, :, b] = y.permute(0, 2, 3, 1)
    return out.permute(0, 3, 1, 2)


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-d map is laid out channels-last (and not also NCHW-contiguous, as maps with
    one channel or one pixel are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Metal (MPS) buffers are limited to 4 GiB per tensor, and a larger one aborts the process
# (pytorch#143859) instead of raising
MPS_MAX_TENSOR_BYTES = 2**32 - 1


def head_batch(shape: torch.Size | tuple[int, ...], itemsize: int, device_type: str) -> int:
    """How many images of a (B, num_feat, h, w) map (``itemsize`` bytes per value) the ×4 head
    may take at once: all, except on MPS, where its (n, num_feat, 4h, 4w) maps must stay under
    the per-tensor limit; when one image's map is over it, a ``torch.cuda.OutOfMemoryError``
    naming the sizes (callers retry with smaller tiles, as after any out-of-memory)."""
    if device_type != "mps":
        return shape[0]
    per_image = shape[1] * 16 * shape[-2] * shape[-1] * itemsize
    if per_image > MPS_MAX_TENSOR_BYTES:
        raise torch.cuda.OutOfMemoryError(  # the alias every torch build has
            f"out of memory: the denoiser's ×4 head would hold a {per_image / 2**30:.1f} GiB tensor for one "
            f"{shape[-2]}×{shape[-1]} LR tile, over MPS's 4 GiB per-tensor limit: use a smaller tile "
            "(or fp16)")
    return max(1, MPS_MAX_TENSOR_BYTES // per_image)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv)


class Conv1x1(nn.Module):
    """Holds a 1x1 conv under the key ``proj`` (official ``patch_embed``/``patch_unembed``)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def official_shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """The attention mask the official shifted blocks actually apply, (nW, N, N) float32.

    SPEC §8.2: the official code indexes a (1,1,H,W) map as if it were (1,H,W,1), so
    only windows in the last window-row are masked, and there by the token's *column*
    inside the window (label A for column < window - shift, else B). -100 between labels.
    """
    nwh, nww = h // window, w // window
    col = torch.arange(window * window) % window
    label = (col >= window - shift).float()
    # |a - b| of 0/1 labels, not a bool !=: inductor (torch 2.11-2.13) fails to constant-fold a
    # bool != when the training step compiles the denoiser (the values are the same 0 / -100)
    pair = (label[:, None] - label[None, :]).abs() * -100.0
    mask = torch.zeros(nwh * nww, window * window, window * window)
    mask[(nwh - 1) * nww :] = pair
    return mask


class SwinBlock(nn.Module):
    """Swin block on channels-first maps with GroupNorm and 1x1-conv MLP (SPEC §3.3, §8.9).

    ``fast`` (inference only, set by :meth:`prepare_fast`): SDPA with masks precomputed once.
    """

    fast: bool = False

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: int, nominal: int):
        super().__init__()
        self.window, self.shift = window, shift
        if shift:
            # Stored in official checkpoints but never read by the official forward (§1).
            self.register_buffer("attn_mask", official_shift_mask(nominal, nominal, window, shift))
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, heads, window, index_key="relative_position_index")
        self.norm2 = GroupNorm32(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self._mask_cache = SizeCache()

    def _apply(self, fn, *args, **kwargs):
        self._mask_cache.clear()  # masks made for the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    def _runtime_mask(self, h: int, w: int, ref: torch.Tensor) -> torch.Tensor | None:
        if not self.shift:
            return None
        build = lambda: official_shift_mask(h, w, self.window, self.shift).to(ref.device, ref.dtype)  # noqa: E731
        if torch.compiler.is_compiling():  # built inside the graph (folded to a constant): a cache
            # filled during tracing would fail the next call's guards and recompile the whole net
            return build()
        return self._mask_cache.get((h, w, ref.device, ref.dtype), build)

    def prepare_fast(self) -> None:
        """Precompute the fast path's attention masks (see :meth:`WindowAttention.prepare_fast`).

        The official mask is the same pair pattern in every masked window (SPEC §8.2), so
        one (N, N) pattern, taken from :func:`official_shift_mask` itself, serves every size.
        """
        ws = self.window
        self.attn.prepare_fast(official_shift_mask(ws, ws, ws, self.shift)[-1] if self.shift else None)
        self.fast = True

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s, ws = self.shift, self.window
        y = self.norm1(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view in channels-last
        idx, inv = window_index(h, w, ws, s, x.device)  # roll + partition as one row gather
        grid = (b, h // ws, w // ws)
        win = y.index_select(1, idx).view(-1, ws * ws, c)
        # official mask: only the last window-row is masked (SPEC §8.2)
        win = self.attn.forward_windows(win, grid, slice(grid[1] - 1, grid[1]) if s else None)
        y = win.view(b, h * w, c).index_select(1, inv)  # partition and roll undone
        x = x + y.view(b, h, w, c).permute(0, 3, 1, 2)
        if self.norm2.fuses(x):  # Triton: fc1's bias with the GELU, fc2's with the residual, one pass each
            m = self.mlp
            t = conv_epilogue(conv_nobias(m.fc1, self.norm2(x)), m.fc1.bias, gelu=True)
            return conv_epilogue(conv_nobias(m.fc2, t), m.fc2.bias, skip=x)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self._forward_fast(x)
        b, c, h, w = x.shape
        s = self.shift
        y = self.norm1(x)
        if s:
            y = torch.roll(y, (-s, -s), dims=(2, 3))
        win = window_partition(y.permute(0, 2, 3, 1), self.window)
        win = self.attn(win, mask=self._runtime_mask(h, w, x))
        y = window_reverse(win, self.window, h, w).permute(0, 3, 1, 2)
        if s:
            y = torch.roll(y, (s, s), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """Official ``BasicLayer``: 1x1 in, ``depth`` Swin blocks, 1x1 out, no outer residual (§8.9)."""

    def __init__(self, channels: int, cfg: DenoiserConfig, nominal: int):
        super().__init__()
        dim, ws = cfg.swin_embed_dim, cfg.window_size
        if nominal <= ws:  # official: window shrinks to the map, no shift (§8.10)
            ws, shifts = nominal, [0] * cfg.swin_depth
        else:
            shifts = [0 if i % 2 == 0 else ws // 2 for i in range(cfg.swin_depth)]
        self.patch_embed = Conv1x1(channels, dim)
        self.patch_unembed = Conv1x1(dim, channels)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, cfg.swin_num_heads, ws, sh, cfg.mlp_ratio, nominal) for sh in shifts
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.patch_unembed(x)


class EmbedSequential(nn.Sequential):
    """Sequential that feeds the time embedding to ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None,  # type: ignore[override]
                folded: Iterator[torch.Tensor] | None = None) -> torch.Tensor:
        """``folded``: the step's (2, cout) affines of the net's ResBlocks in module order
        (:meth:`UPSRDenoiser.forward_step`); each ResBlock here takes the next; ``emb`` is then unused."""
        for layer in self:
            if not isinstance(layer, ResBlock):
                x = layer(x)
            elif folded is None:
                x = layer(x, emb)
            else:
                x = layer.forward_folded(x, next(folded))
        return x


class UPSRDenoiser(CarriesFastTensors):
    """Swin-UNet x0-predictor of UPSR, key-compatible with the official ``UNetModelSwin``."""

    _step_table: torch.Tensor | None = None  # prepare_steps'
    _fast_tensors = ("_step_table",)

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(cfg.in_channels + cfg.lq_channels, mc, 3, padding=1))]
        )
        chans, ch, ds = [mc], mc, cfg.image_size
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for j in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, mult * mc, emb_dim)]
                ch = mult * mc
                if ds in cfg.swin_levels and j == 0:  # official: Swin after the first ResBlock only
                    layers.append(SwinLayer(ch, cfg, ds))
                self.input_blocks.append(EmbedSequential(*layers))
                chans.append(ch)
            if level != last:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds //= 2
        middle: list[nn.Module] = [ResBlock(ch, ch, emb_dim)]
        if cfg.middle_swin:
            middle.append(SwinLayer(ch, cfg, ds))
        middle.append(ResBlock(ch, ch, emb_dim))
        self.middle_block = EmbedSequential(*middle)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + chans.pop(), mc * mult, emb_dim)]
                ch = mc * mult
                if ds in cfg.swin_levels and i == 0:
                    layers.append(SwinLayer(ch, cfg, ds))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        nf = cfg.num_feat
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(mc, nf, 3, padding=1), nn.LeakyReLU(inplace=True))
        self.conv_up1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, cfg.out_channels, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    @property
    def multiple_of(self) -> int:
        return self.config.multiple_of

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """x (B,in_ch,h,w) float, timesteps int (B,), lq (B,96,h,w) float -> x0 (B,out_ch,4h,4w), [-1,1] space.

        ``x``: x_t scaled by its std (the sampler's ``scale_input``); ``timesteps``: the raw step
        index, 0 .. T−1 (T = 5 for the official schedule; not rescaled, SPEC §3.2; the range is not
        checked: reading it would sync a GPU); ``lq``: g(y) and bicubic(y), [-1,1], unshuffled; h, w
        multiples of the config's ``multiple_of``."""
        for name, v in (("x", x), ("timesteps", timesteps), ("lq", lq)):
            if not isinstance(v, torch.Tensor):  # an int t: torch.full((B,), t) (a deep AttributeError before)
                raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        for name, v in (("x", x), ("lq", lq)):
            if not v.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got dtype {v.dtype}")
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be integer step indices (int64), got dtype {timesteps.dtype}")
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, h, w), got {tuple(x.shape)}")
        if lq.dim() != 4 or lq.shape[1] != c.lq_channels or lq.shape[0] != x.shape[0]:
            raise ValueError(f"lq must be (B, {c.lq_channels}, h, w) with x's B {x.shape[0]}, got {tuple(lq.shape)}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be one step per image, shape ({x.shape[0]},), "
                             f"got {tuple(timesteps.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        return self._body(x, lq, emb, None)

    # ------------------------------------------------------------------ one shared step (fast path)
    @torch.no_grad()
    def prepare_steps(self, num_steps: int, dtype: torch.dtype) -> None:
        """Precompute, for each step t < ``num_steps``, every ResBlock's folded affine
        (:meth:`ResBlock.folded_affine`) from the current weights: one (num_steps, K) table
        of ``dtype`` on the weights' device, K = 2·Σ cout. Inference only; call it again
        after the weights, their dtype or device change (:func:`upsr_core.fast.enable_fast`
        does)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        p = next(self.parameters())
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32  # computed at least in float32
        lin1, lin2 = self.time_embed[0], self.time_embed[2]
        sin = timestep_embedding(torch.arange(num_steps, device=p.device), self.config.model_channels).to(acc)
        emb = F.linear(F.silu(F.linear(sin, lin1.weight.to(acc), lin1.bias.to(acc))),
                       lin2.weight.to(acc), lin2.bias.to(acc))
        blocks = [m for m in self.modules() if isinstance(m, ResBlock)]  # the order _body meets them in
        rows = [torch.cat([b.folded_affine(e).reshape(-1) for b in blocks]) for e in emb]
        self._step_table = torch.stack(rows).to(dtype)
        self._step_sizes = [2 * b.out_layers[0].num_channels for b in blocks]

    def forward_step(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for a batch whose images all take the same step (the sampler's case):
        ``t`` int64 (1,) on the device, < the ``num_steps`` of :meth:`prepare_steps` (not
        checked: that would be a host sync). The step's time embedding, each ResBlock's emb
        MLP and its scale-shift are read from the precomputed table and applied by the
        second norm's affine: one gather instead of ~5 small ops per ResBlock. Same shapes
        and value range as :meth:`forward`; same math, other rounding."""
        table = self._step_table
        if table is None:
            raise RuntimeError("forward_step needs prepare_steps(num_steps, dtype) first")
        row = table.index_select(0, t.reshape(1))[0]
        return self._body(x, lq, None, iter([p.view(2, -1) for p in row.split(self._step_sizes)]))

    def _body(self, x: torch.Tensor, lq: torch.Tensor, emb: torch.Tensor | None,
              folded: Iterator[torch.Tensor] | None) -> torch.Tensor:
        m = self.config.multiple_of
        if x.shape[-2] % m or x.shape[-1] % m or x.shape[-2:] != lq.shape[-2:]:
            raise ValueError(f"denoiser inputs x {tuple(x.shape)} and lq {tuple(lq.shape)} must share H×W, a multiple "
                             f"of {m} (pad the LR first, as upsr_core.pipeline.pad_lr does)")
        # the ×4 head's images per call (MPS: its maps under the per-tensor limit), checked before
        # the body runs, so a tile too large for it fails at once
        n = head_batch((x.shape[0], self.config.num_feat, *x.shape[-2:]), x.element_size(), x.device.type)
        h = torch.cat([x, lq.to(x.dtype)], dim=1)
        skips = []
        for blk in self.input_blocks:
            h = blk(h, emb, folded)
            skips.append(h)
        h = self.middle_block(h, emb, folded)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, skips.pop()], dim=1), emb, folded)
        h = self.conv_before_upsample(h)
        if n >= h.shape[0]:
            return self._head(h)
        return torch.cat([self._head(part) for part in h.split(n)])  # per image: the same values

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, num_feat, h, w) -> (B, out_ch, 4h, 4w): the ×4 upsampling head. Slope 0.01 on the
        first LeakyReLU (in conv_before_upsample), 0.2 on the rest (SPEC §8.8)."""
        h = self.lrelu(upsample_conv(h, self.conv_up1))
        h = self.lrelu(upsample_conv(h, self.conv_up2))
        return self.conv_last(self.lrelu(self.conv_hr(h)))
