"""CUDA-graph capture and replay of fixed-shape device functions (used by :mod:`upsr_core.fast`).

A :class:`GraphCache` maps a key (the stage and its tensor shapes) to a captured graph.
The first call with a key warms the function up on a side stream (cuDNN autotuning,
torch.compile, lazy caches), captures it, and keeps it; later calls copy the inputs into
the graph's static buffers and replay it: one launch instead of thousands. All graphs of
a cache share one memory pool, so outputs are cloned before they are returned (the next
replay may reuse their memory). Anything that cannot be captured (a host sync, a CPU
tensor) makes capture fail: the cache then logs it and runs that key eagerly from then on.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Hashable

import torch

from .errors import is_out_of_memory

__all__ = ["GraphCache", "check_max_graphs"]

log = logging.getLogger("upsr_core")

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
"""One warm-up stream per CUDA device, shared by every cache: PyTorch keeps a cuBLAS(Lt)
workspace per stream it has run a matmul on (allocated from, and counted in, the caching
allocator, and kept), so a fresh stream per capture could leave one more workspace behind with
every new shape (likely why the bench's peak-memory column grew by ~0.1 GiB with every captured
model on an H100, 2026-11-27; rows without graphs grew ~0.03 GiB: to confirm on a GPU)."""


def _side_stream() -> torch.cuda.Stream:
    dev = torch.cuda.current_device()
    if dev not in _SIDE_STREAMS:
        _SIDE_STREAMS[dev] = torch.cuda.Stream()
    return _SIDE_STREAMS[dev]

Fn = Callable[..., tuple[torch.Tensor, ...]]


def check_max_graphs(max_graphs: object) -> None:
    """ValueError unless ``max_graphs`` (captured shapes kept) is an int >= 1."""
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")


class GraphCache:
    """Captured CUDA graphs by key, at most ``max_graphs`` (least recently used dropped).

    ``enabled=False`` or inputs off CUDA: :meth:`run` just calls the function.
    """

    def __init__(self, enabled: bool = True, max_graphs: int = 6, warmup: int = 2):
        check_max_graphs(max_graphs)
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: OrderedDict[Hashable, tuple] = OrderedDict()
        self._eager: set[Hashable] = set()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def failed(self, key: Hashable) -> bool:
        """Whether capturing ``key`` failed (it then runs eagerly)."""
        return key in self._eager

    def replays(self, key: Hashable, device: torch.device) -> bool:
        """Whether :meth:`run` with ``key`` and inputs on ``device`` replays a graph (else it
        calls the function eagerly, so the function may call back into Python)."""
        return self.enabled and device.type == "cuda" and key not in self._eager

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self._graphs.clear()
        self._eager.clear()
        self._pool = None

    def run(self, key: Hashable, fn: Fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` -> tuple of tensors; replayed from a graph when possible.

        ``key`` must determine every shape, dtype and Python constant ``fn`` depends on.
        """
        if not inputs or not self.replays(key, inputs[0].device):
            return fn(*inputs)
        # the inputs' GPU as the current device: the side stream, the capture stream and the
        # replay belong to the current device, and a model on cuda:1 in a process whose current
        # device is cuda:0 (the CLI's --device cuda:1, a host's second GPU) would otherwise be
        # warmed up and captured on cuda:0's streams (not yet run on a machine with two GPUs)
        with torch.cuda.device(inputs[0].device):
            return self._run(key, fn, inputs)

    def _run(self, key: Hashable, fn: Fn, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, fn, inputs)
            if entry is None:
                return fn(*inputs)
        self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for s, x in zip(static_in, inputs):
            s.copy_(x)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _capture(self, key: Hashable, fn: Fn, inputs: tuple[torch.Tensor, ...]):
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        static_in = tuple(x.clone() for x in inputs)
        side = _side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = fn(*static_in)
        except RuntimeError as e:  # e.g. a host sync or a CPU tensor inside fn
            if is_out_of_memory(e):  # the caller's to handle (smaller tiles), not a reason to stay eager
                raise
            log.warning("CUDA graph capture failed for %s, running it eagerly: %s", key, str(e).splitlines()[0])
            self._eager.add(key)
            torch.cuda.synchronize()
            return None
        entry = (graph, static_in, tuple(static_out))
        self._graphs[key] = entry
        return entry
