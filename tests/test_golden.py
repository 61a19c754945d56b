"""A golden run of small random nets through the whole pipeline: the network math checked in CI.

The oracle tests (tests/test_oracle.py) pin every layer to the official code, but they need
../shared, which CI lacks; without it nothing else would notice a change of a softmax scale, a
norm's eps, the order of a time embedding's sin/cos or a transposed position-bias index (a
mutation run, 2026-11-27, found such changes pass CI). This test runs the ``tiny_upsr`` nets
(real architectures, random weights, every relative-position bias table made non-zero so the
bias path counts) on a fixed input and compares the estimate, ψ and the ×4 result, untiled and
tiled, with tests/golden/tiny_x4.safetensors, written by this code on 2026-11-27 while the
oracle tests passed (so the golden values carry the oracle's fidelity into CI).

Tolerance: fp32 on other CPUs, thread counts and torch versions reorders sums (oneDNN picks
its kernels per ISA): ~1e-6 relative per op, grown through ~40 layers and 5 passes; the fast
and reference paths, which reorder far more, agree within 5e-5 (test_fast.py), so 1e-4 here.
The mutations above moved outputs by 1e-3 … 1. Regenerate, after a deliberate change and with
the oracle tests passing, with ``UPSR_WRITE_GOLDEN=1 pytest tests/test_golden.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from upsr_core.nets.attention import relative_position_index
from upsr_core.nets.denoiser import timestep_embedding
from upsr_core.uncertainty import weight_noise

from _support import REPO, tiny_upsr

GOLDEN = REPO / "tests" / "golden" / "tiny_x4.safetensors"
ATOL = 1e-4  # see the module docstring


def _golden_run() -> dict[str, torch.Tensor]:
    m = tiny_upsr()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for net in (m.denoiser, m.estimator):
            for name, p in net.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
    # 10×13 px: padded to 12×16 for the nets (multiple_of 4), so the padding and the crop count too
    lr = torch.rand(1, 3, 10, 13, generator=torch.Generator().manual_seed(0))
    est = m.estimate(lr)
    psi = est.uncertainty()
    sr = m.denoise(est, weight_noise(psi, 0.4, 0.05), seed=3)
    # and through overlapping tiles (8 px, overlap 4: 2×3 tiles), blended
    tiled = m.upscale(lr, seed=3, tile=8, overlap=4)
    return {"sr_estimate": est.sr_estimate.contiguous(), "psi": psi.contiguous(), "sr": sr.contiguous(),
            "sr_tiled": tiled.contiguous()}


def test_tiny_pipeline_equals_the_golden_run():
    got = _golden_run()
    if os.environ.get("UPSR_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(got, str(GOLDEN))
        pytest.skip(f"wrote {GOLDEN} (UPSR_WRITE_GOLDEN=1)")
    want = load_file(str(GOLDEN))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    # the run is not degenerate: the result differs from the estimate and spans a range
    h, w = got["sr"].shape[-2:]
    assert (got["sr"] - got["sr_estimate"][..., :h, :w]).abs().max() > 0.05 and got["sr"].std() > 0.05


def test_relative_position_index_of_a_2x2_window():
    # Swin's index: (Δrow + w − 1)·(2w − 1) + (Δcol + w − 1) for query i, key j (row-major tokens).
    # Loaded checkpoints overwrite this buffer, so only nets built in code (training) depend on it.
    want = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), want)


def test_timestep_embedding_is_cosines_then_sines():
    # frequencies 10000^(−k/half): for dim 4, 1 and 0.01
    t = torch.tensor([1, 3])
    f = torch.tensor([1.0, 0.01])
    want = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=-1)
    torch.testing.assert_close(timestep_embedding(t, 4), want, atol=1e-7, rtol=0)
