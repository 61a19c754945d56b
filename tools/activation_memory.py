"""Activation memory of the networks per LR pixel, counted as the peak of the live tensors of one call.

What ``UPSRModel.working_memory`` / ``estimator_memory`` ask ComfyUI to free rests on these
numbers (``_act_bytes_per_px``; ``_est_bytes_per_channel``, ``_est_bytes_per_head``). A
``TorchDispatchMode`` adds up the storages that every operator returns while they are alive: on
the CPU that is what a GPU's allocator would hold for the same tensors (its rounding,
fragmentation and kernels' workspaces aside). Random full-size weights; nothing is timed.

Usage::

    python tools/activation_memory.py atd 64 128          # the estimator: reference, fused, fast path
    python tools/activation_memory.py atd 64 128 --preset small   # the demo's sizes
    python tools/activation_memory.py denoiser 64 128     # the denoiser's five steps on one tile

2026-11-29, 2-core VM, torch 2.13 CPU, fp32, LR 64 / 128, full-size nets: ATD 63.7 / 251.6 MiB
(16.3 / 16.1 KB per LR px), with the `fused` training flag 46.2 / 181.9 MiB (11.6 KB), as the fast
path runs it 25.3 / 101.1 MiB (6.5 KB); the demo's ATD (``--preset small``) 10.6 / 7.4 / 3.3 KB;
denoiser (five steps, one tile) 89.0 / 355.9 MiB (22.8 KB per LR px; the H100's fp32 reference
run at LR 256: 27 KB).
"""
from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from upsr_core.config import FULL_ATD, FULL_DENOISER
from upsr_core.model import UPSRModel
from upsr_core.nets import ATD, UPSRDenoiser
from upsr_core.uncertainty import weight_noise


class LivePeak(TorchDispatchMode):
    """The peak of the summed sizes of the storages operators returned, while they were alive.
    The storages of ``modules``' weights and buffers are known from the start and count nothing
    (``Linear`` hands its weight's transpose, a view, to the matmul)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        super().__init__()
        self.live: dict[int, int] = {t.untyped_storage().data_ptr(): 0 for m in modules
                                     for t in (*m.parameters(), *m.buffers())}
        self.now = self.peak = 0

    def _count(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:  # a view of a storage already counted
            return
        self.live[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._drop, key)

    def _drop(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("net", choices=["atd", "denoiser"])
    ap.add_argument("sizes", type=int, nargs="+", help="LR sides (square)")
    ap.add_argument("--preset", choices=["full", "small"], default="full", help="net sizes (small: the demo's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.preset == "full":
        dcfg, acfg = FULL_DENOISER, FULL_ATD
    else:
        from upsr_core.train.presets import get_preset

        dcfg, acfg = get_preset("small").denoiser, get_preset("small").estimator
    atd = ATD(acfg).eval()
    model = UPSRModel(UPSRDenoiser(dcfg).eval(), atd) if args.net == "denoiser" else None
    # the estimator's three attention paths: the reference (math), the training flag `fused` (SDPA in
    # the window attention), and what the fast path (enable_fast) runs: prepare_fast()
    for mode in (["reference", "fused", "fast"] if args.net == "atd" else ["reference"]):
        atd.fused = mode == "fused"
        if mode == "fast":
            atd.prepare_fast()
        last = None
        for s in args.sizes:
            lr = torch.rand(1, 3, s, s)
            if model is None:
                with LivePeak(atd) as p:
                    atd(lr)
            else:
                est = model.estimate(lr)
                w = weight_noise(est.uncertainty())
                with LivePeak(model.denoiser, model.estimator) as p:
                    model.denoise(est, w, tile=max(64, s), overlap=16)
            what = f"{args.net} {mode}"
            # the slope between two sizes leaves out what does not grow with the image
            slope = f", {(p.peak - last[1]) / (s * s - last[0]):7.0f} B per added LR px" if last else ""
            print(f"{what:<18} LR {s:>4}: peak {p.peak / 2**20:8.1f} MiB, {p.peak / (s * s):7.0f} B per LR px"
                  f"{slope}", flush=True)
            last = (s * s, p.peak)


if __name__ == "__main__":
    main()
