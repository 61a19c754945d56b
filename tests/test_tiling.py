"""Tiled inference: plan, blend weights, exactness where it must be exact, no seams.

Toy networks that are pointwise in the unshuffled layout make every tile's output
independent of its context, so tiling may change results only by the float32 rounding
of the weighted average. The real (small oracle) nets are used for the seam test.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upsr_core.model import UPSRModel
from upsr_core.pipeline import bicubic_x4, crop_hr, denoise_estimate, estimate, pad_lr, starting_noise
from upsr_core.tiling import fits_one, partition, plan_tiles, tile_size, tile_starts, tile_weight
from upsr_core.uncertainty import weight_noise

from _support import ORACLE_ATOL

BLEND_ATOL = 1e-6  # Σ w_i·v / Σ w_i of equal values v (|v| <= 1): a few float32 ulp


class PointwiseDenoiser(nn.Module):
    """x̂0 from each LR position's own 48 + 96 channels only; ``identity`` returns the bicubic."""

    multiple_of = 16

    def __init__(self, identity: bool = False):
        super().__init__()
        self.identity = identity
        self.gain = nn.Parameter(torch.ones(()))  # gives the model a device and dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return F.pixel_shuffle(lq[:, 48:], 4)
        x0 = torch.tanh(x) * 0.4 + lq[:, :48] * 0.3 + lq[:, 48:] * 0.2 + 0.01 * t.view(-1, 1, 1, 1)
        return F.pixel_shuffle(x0 * self.gain, 4)


class PointwiseEstimator(nn.Module):
    """ŷ = nearest ×4 of a pointwise function of the LR: no spatial context at all."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.sqrt(x.clamp(min=0)) * self.gain, scale_factor=4, mode="nearest")


@pytest.fixture
def toy_model() -> UPSRModel:
    return UPSRModel(PointwiseDenoiser(), PointwiseEstimator())


def gradient_lr(h: int, w: int) -> torch.Tensor:
    """A smooth LR image (1, 3, h, w) in [0.1, 0.9]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * (xx - yy)])[None]


# ------------------------------------------------------------------ the plan and the weights
PLANS = [(40, 56, 16, 8), (44, 44, 16, 8), (32, 48, 16, 0), (48, 80, 32, 24), (16, 16, 16, 8), (40, 48, 16, 13)]


@pytest.mark.parametrize("h, w, tile, overlap", PLANS)
def test_tiles_cover_the_grid_with_positive_weights(h, w, tile, overlap):
    tiles = plan_tiles(h, w, tile, overlap)
    cover = torch.zeros(h, w)
    total = torch.zeros(h * 4, w * 4)
    for t in tiles:
        assert t.h == min(tile, h) and t.w == min(tile, w)  # equal sizes: tiles batch without padding
        assert 0 <= t.y and t.y + t.h <= h and 0 <= t.x and t.x + t.w <= w
        cover[t.slices()] += 1
        wt = tile_weight(t, tiles, 4)
        assert wt.shape == (t.h * 4, t.w * 4) and wt.dtype == torch.float32
        assert (wt > 0).all()  # the blend weights never vanish (ramps start at half a sample)
        assert wt.max() <= 1
        total[t.scaled(4).slices()] += wt
    assert (cover >= 1).all()
    assert (total > 0).all()
    # the raised-cosine ramps of two neighbours sum to 1 where the planned stride applies
    if overlap and len(tiles) > 1 and w == 56:
        torch.testing.assert_close(total[:, 8 * 4 : 16 * 4], torch.ones(h * 4, 32), rtol=0, atol=1e-6)


def test_tile_starts_keep_the_overlap():
    for length, tile, overlap in [(40, 16, 8), (41, 16, 8), (100, 32, 7), (17, 16, 0)]:
        s = tile_starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))  # never less overlap than asked


@pytest.mark.parametrize("length", [65, 512, 513, 576, 640, 1000, 1024, 1536, 2048, 3000, 4096])
@pytest.mark.parametrize("tile, overlap", [(512, 64), (256, 32), (384, 0)])
def test_tile_size_keeps_the_count_and_shrinks_the_tiles(length, tile, overlap):
    """The balanced size needs no more tiles than ``tile`` itself, keeps every overlap >= the
    one asked for, is a multiple of the net's 64 and never exceeds ``tile``."""
    length = -(-length // 64) * 64  # upscale tiles the padded grid
    size = tile_size(length, tile, overlap, 64)
    starts = tile_starts(length, size, overlap)
    assert size <= tile and (size == length or size % 64 == 0)
    assert len(starts) <= len(tile_starts(length, tile, overlap))
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:]))


def test_tile_size_for_1024_px():
    """The case of the speed issue: 3 tiles of 384 (not 512) per side, 56% of the pixels."""
    assert tile_size(1024, 512, 64, 64) == 384
    assert tile_starts(1024, 384, 64) == [0, 320, 640]
    assert [t.h for t in plan_tiles(1024, 2048, 512, 64, 64)][:1] == [384]
    assert {t.w for t in plan_tiles(1024, 2048, 512, 64, 64)} == {512}
    with pytest.raises(ValueError, match="overlap"):
        tile_size(1024, 64, 64, 64)


def test_partition_is_disjoint_and_covers():
    blocks = partition(40, 56, 16)
    cover = torch.zeros(40, 56)
    for b in blocks:
        cover[b.slices()] += 1
    assert torch.equal(cover, torch.ones(40, 56))


# ------------------------------------------------------------------ exactness
def test_one_tile_equals_the_untiled_pipeline(small_nets, small_model):
    """An image inside one tile runs exactly the official (untiled) pipeline, bit for bit."""
    den, atd = small_nets
    lr = torch.rand(1, 3, 20, 44)
    with torch.no_grad():
        est = estimate(atd, lr, multiple=16)
        ref = denoise_estimate(den, est, weight_noise(est.uncertainty()), starting_noise(5, 1, (32, 48)))
    assert torch.equal(small_model.upscale(lr, seed=5), ref)
    assert torch.equal(small_model.upscale(lr, seed=5, tile=48, overlap=8), ref)  # 48 >= both padded sides


def test_upscale_equals_estimate_then_denoise(small_model):
    lr = gradient_lr(24, 40)  # padded 32x48: 2 tiles of 32 (overlap 16)
    est = small_model.estimate(lr)
    w = weight_noise(est.uncertainty())
    kw = dict(seed=2, tile=32, overlap=16)
    assert torch.equal(small_model.upscale(lr, **kw), small_model.denoise(est, w, **kw))


def test_identity_network_tiled_reconstructs_the_bicubic(toy_model):
    model = UPSRModel(PointwiseDenoiser(identity=True), PointwiseEstimator())
    lr = torch.rand(1, 3, 40, 56)
    ref = crop_hr(bicubic_x4(pad_lr(lr, 16)), (40, 56)).clamp(-1, 1) * 0.5 + 0.5
    torch.testing.assert_close(model.upscale(lr, tile=16, overlap=8), ref, rtol=0, atol=BLEND_ATOL)


@pytest.mark.parametrize("tile, overlap", [(16, 8), (16, 0), (32, 24), (16, 13)])
def test_pointwise_network_tiled_equals_untiled(toy_model, tile, overlap):
    lr = torch.rand(1, 3, 40, 56)
    untiled = toy_model.upscale(lr, seed=1)
    torch.testing.assert_close(toy_model.upscale(lr, seed=1, tile=tile, overlap=overlap), untiled,
                               rtol=0, atol=BLEND_ATOL)


def test_estimator_blocks_are_exact_for_a_pointwise_estimator(toy_model):
    """Disjoint estimator blocks with context: no blending, so a context-free ŷ is bit-identical."""
    lr = torch.rand(1, 3, 40, 56)
    assert torch.equal(toy_model.estimate(lr, block=16).sr_estimate_pm, toy_model.estimate(lr).sr_estimate_pm)


def test_tile_batch_does_not_change_the_plan(toy_model):
    """With a batch-invariant (pointwise) network, tile_batch 1 and 3 are bit-identical:
    the gathering of inputs, the noise slices and the blend do not depend on it."""
    lr = torch.rand(2, 3, 40, 56)
    a = toy_model.upscale(lr, seed=4, tile=16, overlap=8, tile_batch=1)
    assert torch.equal(a, toy_model.upscale(lr, seed=4, tile=16, overlap=8, tile_batch=3))


def test_tile_batch_with_the_real_nets(small_model):
    """The real nets: tile_batch 1 vs 3 agree to float32 rounding, not bit for bit.

    PyTorch's CPU conv (oneDNN) and GEMM kernels pick different blockings for batch 1 and
    batch 3, so a tile's result changes in the last bits with its batch (measured 4.6e-6
    here, with 1 or 2 threads); ORACLE_ATOL is the scale of the official code's own spread.
    """
    lr = gradient_lr(16, 48)  # 5 tiles: batches of 3 + 2 against 5 of 1
    a = small_model.upscale(lr, seed=0, tile=16, overlap=8, tile_batch=1)
    b = small_model.upscale(lr, seed=0, tile=16, overlap=8, tile_batch=3)
    torch.testing.assert_close(a, b, rtol=0, atol=ORACLE_ATOL)


def test_batch_of_images_follows_the_seed_contract(toy_model):
    """Image i of a batch equals the same image alone with seed + i."""
    lr = torch.rand(3, 3, 16, 40)
    batch = toy_model.upscale(lr, seed=10, tile=16, overlap=8)
    for i in range(3):
        alone = toy_model.upscale(lr[i : i + 1], seed=10 + i, tile=16, overlap=8)
        assert torch.equal(batch[i : i + 1], alone)


def test_progress_counts_every_tile_step(toy_model):
    seen = []
    toy_model.upscale(torch.rand(2, 3, 16, 40), tile=16, overlap=8, tile_batch=2,
                      progress=lambda done, total: seen.append((done, total)))
    n_tiles = len(plan_tiles(16, 48, 16, 8))
    n = 5 * n_tiles * 2 + 2  # + the estimator: one block (of 512 LR px) per image
    assert seen[-1] == (n, n)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ------------------------------------------------------------------ seams
def level_steps(x: torch.Tensor) -> torch.Tensor:
    """L[c] = max over channels of |mean over rows and batch of (x[..., c] − x[..., c−1])|, c = 1..W−1."""
    return (x[..., 1:] - x[..., :-1]).mean(dim=(0, 2)).abs().amax(dim=0)


def tile_borders(length: int, tile: int, overlap: int) -> list[int]:
    """HR positions c where a tile starts or ends inside the image (the step is between c−1 and c)."""
    size = tile_size(length, tile, overlap, 16)  # the size upscale uses (nets' multiple 16)
    starts = tile_starts(length, size, overlap)
    edges = {s for s in starts if s > 0} | {s + size for s in starts if s + size < length}
    return sorted(4 * e for e in edges)


def seam_ratio(sr: torch.Tensor, lr_hw: tuple[int, int], tile: int, overlap: int) -> float:
    """Largest level step across a tile border / largest level step anywhere else (both axes).

    Why this metric: the small nets have random weights, so even a smooth input comes out
    with pixel-level texture (mean |step| ≈ 0.06 everywhere, untiled too); an absolute
    threshold would be meaningless, and so is the plain |step|, which texture dominates.
    Texture steps change sign from row to row and cancel in the mean along a whole border
    line (128–192 px); a seam, two tiles disagreeing in level, does not cancel. So a border
    whose mean signed step exceeds every interior line's is a seam: ratio > 1.
    """
    ratios = []
    for img, length in ((sr, lr_hw[1]), (sr.transpose(-1, -2), lr_hw[0])):
        steps = level_steps(img)
        border = torch.tensor([c - 1 for c in tile_borders(length, tile, overlap)], dtype=torch.long)
        if len(border) == 0:
            continue
        interior = torch.ones_like(steps, dtype=torch.bool)
        interior[border] = False
        ratios.append((steps[border].max() / steps[interior].max()).item())
    return max(ratios)


def test_no_seams_on_a_smooth_gradient(small_model):
    lr = gradient_lr(32, 32)
    sr = small_model.upscale(lr, seed=0, tile=16, overlap=8)  # 3 x 3 tiles, 8 px feathered overlaps
    assert seam_ratio(sr, (32, 32), 16, 8) <= 1  # measured 0.36
    # The metric sees a seam at this texture level: butted tiles (no overlap, no blend)
    # give a border step above every interior one (measured 1.45).
    hard = small_model.upscale(lr, seed=0, tile=16, overlap=0)
    assert seam_ratio(hard, (32, 32), 16, 0) > 1


@pytest.mark.parametrize("h,w,m", [(1, 1, 64), (64, 65, 64), (33, 17, 8), (40, 72, 16)])
def test_padded_size_is_the_size_pad_lr_gives(h, w, m):
    from upsr_core.pipeline import pad_lr, padded_size

    assert padded_size(h, w, m) == tuple(pad_lr(torch.rand(1, 3, h, w), m).shape[-2:])


def test_smaller_tiles_and_blocks_after_out_of_memory():
    """The retry policy the nodes use (upsr_core.tiling: the nodes hold no arithmetic)."""
    from upsr_core.tiling import smaller_block, smaller_tiles

    assert smaller_tiles(512, 64, (1000, 700), 64) == (256, 64)
    assert smaller_tiles(512, 64, (100, 90), 64) == (64, 32)  # halves the 128-px padded image, not the 512 tile
    assert smaller_tiles(128, 64, (300, 300), 64) == (64, 32)
    assert smaller_tiles(64, 32, (300, 300), 64) is None
    assert smaller_tiles(512, 64, (300, 300), 8) == (152, 64)  # a multiple of 8: the padded 304 halved
    assert smaller_tiles(64, 16, (300, 300), 8) is None  # 32 < the minimum of 64
    assert smaller_tiles(64, 16, (300, 300), 8, minimum=16) == (32, 16)
    assert [smaller_block(512), smaller_block(128), smaller_block(64)] == [256, 64, None]


def test_repeated_reflection_is_the_periodic_mirror_and_size_one_is_replicated():
    """SPEC §8.1's fallback, by value (only its shape was tested): where the official single
    reflect pad works (pad < size) it is that pad; beyond it the reflection repeats, i.e. index i
    reads the mirror-periodic index of period 2(n − 1); a side of 1 px is replicated."""
    from upsr_core.pipeline import reflect_pad

    def mirror(i: int, n: int) -> int:
        if n == 1:
            return 0
        m = i % (2 * (n - 1))
        return m if m < n else 2 * (n - 1) - m

    for h in range(1, 11):
        for w in (1, 2, 3, 7):
            x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
            for ph, pw in ((0, 0), (h - 1, 0), (17, 5), (63, 61)):
                if h == 1 and ph == 0 and pw == 0:
                    continue
                got = reflect_pad(x, ph, pw)
                rows = torch.tensor([mirror(i, h) for i in range(h + ph)])
                cols = torch.tensor([mirror(j, w) for j in range(w + pw)])
                assert torch.equal(got, x[..., rows[:, None], cols[None, :]]), (h, w, ph, pw)
                if 0 < ph < h and 0 < pw < w:
                    assert torch.equal(got, torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect"))


def test_bicubic_is_not_clamped():
    """SPEC §8.13: y↑ keeps its overshoot at a step edge (the denoiser was trained on it)."""
    from upsr_core.pipeline import bicubic_x4

    step = torch.full((1, 3, 8, 8), -1.0)
    step[..., 4:] = 1.0
    up = bicubic_x4(step)
    assert up.min() < -1.05 and up.max() > 1.05
    assert torch.equal(up, torch.nn.functional.interpolate(step, scale_factor=4, mode="bicubic", align_corners=False))


def test_fits_one_is_what_plan_tiles_and_partition_say():
    """The fast path and the memory estimate ask fits_one where the tile loop asks plan_tiles and
    partition: the same answer for padded sides around every size's boundary, any overlap."""
    for m in (4, 64):
        for size in {m, 2 * m, 128, 512}:
            sides = sorted({s for s in (m, size - m, size, size + m, 2 * size + m, 3 * size) if s > 0})
            for overlap in (0, size // 2, size - 1):
                for h in sides:
                    for w in sides:
                        one = fits_one(h, w, size)
                        assert one == (len(plan_tiles(h, w, size, overlap, m)) == 1), (h, w, size, overlap, m)
                        assert one == (len(partition(h, w, size)) == 1), (h, w, size)
