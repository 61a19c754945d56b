"""Window attention shared by the denoiser's Swin layers and ATD's window branch.

Two numerically equivalent paths: the reference path writes the official math out
(``softmax(q·scale @ kᵀ + bias + mask) @ v``); the fused path hands the same bias and
mask, precomputed once per (shape, device, dtype), to ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "window_partition",
    "window_reverse",
    "window_index",
    "relative_position_index",
    "attend",
    "attend_windows",
    "WindowAttention",
    "CarriesFastTensors",
]

Fixup = tuple[slice, slice, torch.Tensor]
"""(window rows, window columns, additive mask (1, heads, N, N)): windows that need a mask."""


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, window², C); windows and tokens in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B·nW, window², C) -> (B, H, W, C), inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class SizeCache:
    """Size-dependent tensors (shift masks, window permutations), the ``max_entries`` most
    recently used, keyed by the caller (size, device, dtype, ...): a long session's many image
    sizes stay bounded. A module that owns one empties it when it moves (its ``_apply``), so
    its masks never keep memory on a device the weights have left (ComfyUI offloads models
    between runs)."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._d: OrderedDict[tuple, object] = OrderedDict()
        # one lock: the module-level window-index cache is shared by every model, and two threads
        # (two models, or a server's workers) otherwise evict a key between its lookup and its read
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickle) starts empty: entries are rebuilt on use
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def get(self, key: tuple, build):
        """The entry for ``key``, made by ``build()`` on a miss (built outside the lock: two
        threads missing the same key both build it, and the second one's copy is kept)."""
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = build()
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


_WINDOW_INDEX_MAX = 32  # sizes kept (least recently used dropped): a long session sees many sizes
_WINDOW_INDEX = SizeCache(_WINDOW_INDEX_MAX)


def index_build_device(device: torch.device) -> torch.device:
    """Where :func:`window_index` builds its permutations: on the device, except for MPS (CPU)."""
    return torch.device("cpu") if device.type == "mps" else device


def window_index(h: int, w: int, window: int, shift: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, inv), each (h·w,) int64. ``idx``: the flat row-major positions that
    ``window_partition(roll(x, -shift))`` reads, in its output order, so for x (B, h·w, C)
    ``x.index_select(1, idx)`` is the partition (as (B, h·w, C), windows and tokens in order);
    ``inv`` its inverse permutation, so ``y.index_select(1, inv)`` undoes partition and roll
    together. One row gather each way instead of a roll and a layout copy. Cached per size and
    device, the 32 most recently used (built in the graph when torch.compile traces, like the
    shift masks). For MPS the permutation is built on the CPU and copied (an exact integer copy):
    some macOS 15 builds' MPS argsort returns wrong int64 indices past the 256th element
    (pytorch#155560)."""
    key = (h, w, window, shift, torch.device(device))

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(h * w, device=index_build_device(key[-1])).view(1, h, w, 1)
        if shift:
            idx = torch.roll(idx, (-shift, -shift), dims=(1, 2))
        idx = window_partition(idx, window).reshape(-1)
        return idx.to(device), torch.argsort(idx).to(device)

    if torch.compiler.is_compiling():  # built in the graph, not cached while tracing
        return build()
    return _WINDOW_INDEX.get(key, build)


def relative_position_index(window: int) -> torch.Tensor:
    """Standard Swin index (N, N), N = window²: ``(Δr + w - 1)·(2w - 1) + (Δc + w - 1)``."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    fused: bool,
) -> torch.Tensor:
    """Windowed multi-head attention.

    q, k, v: (B·nW, heads, N, d); bias: (heads, N, N); mask: (nW, N, N) or None.
    Returns (B·nW, heads, N, d).
    """
    bw, heads, n, _ = q.shape
    if fused:
        full = bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            full = (full + mask.unsqueeze(1)).unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, heads, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype), scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(bw, heads, n, n)
    return attn.softmax(dim=-1) @ v


def attend_windows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    bias: torch.Tensor,
    fixups: tuple[Fixup, ...],
    scale: float,
) -> torch.Tensor:
    """Inference-only windowed attention with precomputed additive masks (fast path).

    q, k, v: (B·nWh·nWw, heads, N, d), windows row-major per image; ``grid`` = (B, nWh, nWw);
    bias: (1, heads, N, N), applied to every window; ``fixups``: windows ``[rows, cols]`` of
    each image are recomputed with their own mask (bias included). The shift masks of both
    nets are the same for every masked window of a region, so no mask of size nW·N² is
    ever built. Returns (B·nWh·nWw, heads, N, d). Writes in place: not for autograd.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if not fixups:
        return out
    shape = tuple(grid) + tuple(q.shape[1:])
    qg, kg, vg, og = q.view(shape), k.view(shape), v.view(shape), out.view(shape)
    for rows, cols, mask in fixups:
        sub = og[:, rows, cols]
        if sub.numel() == 0:
            continue
        flat = (-1,) + tuple(q.shape[1:])
        o = F.scaled_dot_product_attention(
            qg[:, rows, cols].reshape(flat), kg[:, rows, cols].reshape(flat), vg[:, rows, cols].reshape(flat),
            attn_mask=mask, scale=scale,
        )
        sub.copy_(o.view(sub.shape))
    return out


def _map_tensors(obj, fn):
    """``obj`` (a tensor, None, or tuples of them) with ``fn`` applied to every tensor; a tensor
    that was contiguous stays so (``Module.to(memory_format=channels_last)`` converts 4-D ones)."""
    if isinstance(obj, torch.Tensor):
        out = fn(obj)
        return out.contiguous() if obj.is_contiguous() else out
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    return obj


class CarriesFastTensors(nn.Module):
    """A module whose precomputed fast-path tensors — the attributes named in ``_fast_tensors``,
    each a tensor, None or tuples of them — move and cast with its weights, as buffers would,
    without entering its state dict. A host that moves the nets itself (ComfyUI offloading them
    to the CPU between runs) thus takes these off the GPU too (the official ATD's masks are
    ~60 MiB in fp32); the fast path still rebuilds them for a new placement."""

    _fast_tensors: tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for name in self._fast_tensors:
            value = self.__dict__.get(name)
            if value is not None:
                self.__dict__[name] = _map_tensors(value, fn)
        return out


class WindowAttention(CarriesFastTensors):
    """Denoiser Swin attention: ``qkv`` and ``proj`` Linear, bias table ((2w-1)², heads)."""

    fused: bool = False
    fast_masks: tuple[torch.Tensor, torch.Tensor | None] | None = None  # prepare_fast's
    _fast_tensors = ("fast_masks",)

    def __init__(self, dim: int, heads: int, window: int, index_key: str = "relative_position_index"):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer(index_key, relative_position_index(window))
        self._index_key = index_key
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def bias(self) -> torch.Tensor:
        """(heads, N, N) relative position bias."""
        n = self.window * self.window
        idx = getattr(self, self._index_key).reshape(-1)
        return self.relative_position_bias_table[idx].reshape(n, n, -1).permute(2, 0, 1)

    def prepare_fast(self, masked: torch.Tensor | None) -> None:
        """Precompute the fast path's masks in the parameters' dtype and device.

        ``masked``: (N, N) additive mask of the masked windows (None for unshifted blocks).
        Stores ``fast_masks`` = (bias, bias + masked), each (1, heads, N, N). Call again
        after moving the module or changing its weights.
        """
        with torch.no_grad():
            bias = self.bias().unsqueeze(0)
            ref = self.qkv.weight
            masked_bias = None if masked is None else (bias + masked.to(bias)).to(ref.dtype).contiguous()
            self.fast_masks = (bias.to(ref.dtype).contiguous(), masked_bias)

    def forward_windows(self, x: torch.Tensor, grid: tuple[int, int, int], rows: slice | None) -> torch.Tensor:
        """Fast path: x (B·nWh·nWw, N, C) -> same; windows in ``rows`` use the shift mask."""
        bw, n, c = x.shape
        masks = self.fast_masks
        if masks is None:
            raise ValueError("WindowAttention.forward_windows needs prepare_fast() first (see upsr_core.fast)")
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        fixups = () if rows is None else ((rows, slice(None), masks[1]),)
        out = attend_windows(qkv[0], qkv[1], qkv[2], grid, masks[0], fixups, self.scale)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B·nW, N, C) -> (B·nW, N, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attend(qkv[0], qkv[1], qkv[2], self.bias(), mask, self.scale, self.fused)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))
