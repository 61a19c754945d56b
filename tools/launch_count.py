#!/usr/bin/env python
"""Kernel launches per image of the fast path, counted on the CPU (no GPU needed).

    python tools/launch_count.py [--lr 64] [--small] [--configs default,no-epilogue,three-kernel-norm,session-12]

At LR 64, batch 1, the GPU time is set by how many kernels run (the H100 profile of 2026-11-27:
~4700 kernels averaging 4.9 µs), so their count is a measure a CPU can take. Each config runs
the fast path once (Triton's kernels through its interpreter, ``TRITON_INTERPRET=1``: slow, a few
minutes at full size) and counts: operator calls that launch a kernel (views and allocations
excluded), Triton launches, and one bias ``add_`` per biased convolution (CUDA's cuDNN path adds
a conv's bias as its own kernel; the CPU's oneDNN fuses it). Not counted: kernels cuDNN or cuBLAS
split an op into, and the layout copies a GPU makes where the CPU makes none, so a GPU profile
shows a few percent more. Full-size random nets unless ``--small`` (the demo-size config).
Needs Triton (``pip install triton``).

Configs (enable_fast overrides): ``default`` (today's CUDA default: Triton norm, conv epilogue,
one-kernel norms on small maps), ``no-epilogue``, ``three-kernel-norm`` (SMALL_GROUP = 0), and
``session-12`` (both off: the default the H100 measured on 2026-11-27). On 2026-11-27 (2-core CPU
VM, full size, LR 64): session-12 4790, default 3760.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are built: CPU tensors need the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from upsr_core.cliargs import int_min  # noqa: E402

NOT_KERNELS = frozenset({
    "view", "_unsafe_view", "permute", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
    "detach", "alias", "split", "chunk", "unbind", "_reshape_alias", "as_strided", "split_with_sizes", "reshape",
    "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "set_", "resize_",
})
"""Operator calls that launch no kernel (views, allocations)."""

CONFIGS: dict[str, tuple[dict, int | None]] = {
    "default": ({}, None),
    "no-epilogue": ({"conv_epilogue": False}, None),
    "three-kernel-norm": ({}, 0),
    "session-12": ({"conv_epilogue": False}, 0),
}
"""name -> (enable_fast overrides, triton_norm.SMALL_GROUP or None for the module's)."""

class _Ops(TorchDispatchMode):
    def __init__(self, inside: list[bool]):
        super().__init__()
        self.inside = inside
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside[0]:  # not the interpreter's own tensor work inside a Triton launch
            name = func.overloadpacket.__name__
            self.counts[name] += 1
            if name == "convolution" and args[2] is not None:
                self.counts["conv bias add_ (CUDA)"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_triton(launches: collections.Counter, inside: list[bool]):
    from upsr_core.nets import triton_norm

    kernels = triton_norm._kernels()

    class Counted:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches[self.name] += 1
            fn = self.kernel[grid]

            def call(*a, **k):
                inside[0] = True
                try:
                    return fn(*a, **k)
                finally:
                    inside[0] = False
            return call

    wrapped = kernels._replace(**{n: Counted(getattr(kernels, n), n) for n in kernels._fields if n != "triton"})
    real = triton_norm._kernels
    triton_norm._kernels = lambda: wrapped
    try:
        yield
    finally:
        triton_norm._kernels = real


def count(model, lr: torch.Tensor, *, seed: int = 0) -> dict:
    """Launches of one ``model.upscale(lr)`` after a first, preparing call (a fast model on the
    CPU; a RuntimeError if a Triton kernel has failed in this process): {"ops": operator calls
    that launch a kernel, "triton": {kernel: launches}, "conv_bias_adds": CUDA's separate bias
    passes, "total": ops + Triton launches (the bias passes are among the ops)}."""
    from upsr_core.nets import denoiser, triton_norm

    with torch.no_grad():  # the first call prepares (masks, tables): not per image
        model.upscale(lr, seed=seed)
    launches: collections.Counter = collections.Counter()
    inside = [False]
    with _counting_triton(launches, inside), torch.no_grad(), _Ops(inside) as ops:
        model.upscale(lr, seed=seed)
    failed = denoiser._TRITON_NORM_FAILED + triton_norm._BACKWARD_FAILED
    if failed:  # the kernels are off for the rest of the process: the counts would mix both paths
        raise RuntimeError(f"a Triton kernel failed, the count is not the fast path's: {failed[0]}")
    n_ops = sum(v for k, v in ops.counts.items() if k not in NOT_KERNELS)
    return {"ops": n_ops, "triton": dict(launches), "conv_bias_adds": ops.counts["conv bias add_ (CUDA)"],
            "total": n_ops + sum(launches.values()), "by_op": dict(ops.counts.most_common(12))}


def build(config: str, den, atd):
    """A fast copy of the nets for ``config`` (channels-last, Triton norm, no CUDA graphs, no
    sub-pixel convs: the CUDA layout)."""
    from upsr_core.fast import enable_fast
    from upsr_core.model import UPSRModel

    overrides, _ = CONFIGS[config]
    return enable_fast(UPSRModel(copy.deepcopy(den), copy.deepcopy(atd)), channels_last=True, triton_norm=True,
                       subpixel=False, cuda_graphs=False, **overrides)


@contextlib.contextmanager
def small_group(config: str):
    from upsr_core.nets import triton_norm

    value = CONFIGS[config][1]
    real = triton_norm.SMALL_GROUP
    if value is not None:
        triton_norm.SMALL_GROUP = value
    try:
        yield
    finally:
        triton_norm.SMALL_GROUP = real


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=int_min(8), default=64, help="LR side, pixels")
    p.add_argument("--small", action="store_true", help="demo-size random nets instead of full size")
    p.add_argument("--configs", default="session-12,default", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--seed", type=int_min(0), default=0)
    a = p.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    from upsr_core.bench import FULL_ATD, FULL_DENOISER, _calibrate
    from upsr_core.nets.atd import ATD
    from upsr_core.nets.denoiser import UPSRDenoiser
    from upsr_core.train.presets import get_preset

    dcfg, acfg = (get_preset("small").denoiser, get_preset("small").estimator) if a.small else (FULL_DENOISER, FULL_ATD)
    torch.manual_seed(a.seed)
    den, atd = _calibrate(UPSRDenoiser(dcfg).eval()), ATD(acfg).eval()
    lr = torch.rand(1, 3, a.lr, a.lr, generator=torch.Generator().manual_seed(a.seed))
    print(f"# kernel launches per image, LR {a.lr}, {'demo-size' if a.small else 'full-size'} random nets, "
          f"torch {torch.__version__}")
    for c in configs:
        t0 = time.perf_counter()
        with small_group(c):
            r = count(build(c, den, atd), lr, seed=a.seed)
        print(f"{c:18s} total {r['total']:6d}  ops {r['ops']:6d} (conv bias add_ {r['conv_bias_adds']})  "
              f"triton {sum(r['triton'].values()):5d} {r['triton']}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
