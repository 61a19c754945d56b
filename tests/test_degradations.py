"""Real-ESRGAN degradation pipeline, blur kernels and torch JPEG (CPU, small tensors)."""
from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from upsr_core.train.blur_kernels import KERNEL_TYPES, mixed_kernels, sample_blur_kernels, sinc_kernels
from upsr_core.train.degradations import (
    DegradationStage,
    RealESRGANDegradation,
    _add_noise,
    _draw_plan,
    bicubic_degrade,
    degrade,
)
from upsr_core.train.jpeg import diffjpeg_compress, jpeg_compress, quant_tables


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _test_image(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) on 8-bit levels: gray random texture (R = G = B) plus smooth colour ramps."""
    tex = torch.rand(1, 1, h, w, generator=_gen(seed)).expand(1, 3, h, w) * 0.6
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ramps = torch.stack([0.2 * xx, 0.2 * yy, 0.2 * (1 - xx)])[None]
    return torch.round((tex + ramps).clamp(0, 1) * 255) / 255


def _photo_like(h: int, w: int, seed: int) -> torch.Tensor:
    """(1, 3, h, w) on 8-bit levels: 3×3-smoothed, mostly gray noise plus colour ramps."""
    n = torch.nn.functional.avg_pool2d(torch.rand(1, 3, h + 2, w + 2, generator=_gen(seed)), 3, 1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ramps = torch.stack([0.2 * xx, 0.2 * yy, 0.2 * (1 - xx)])[None]
    return torch.round(((0.7 * n[:, :1] + 0.3 * n) * 0.7 + ramps).clamp(0, 1) * 255) / 255


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- degrade
def test_degrade_shape_range_and_levels() -> None:
    hr = torch.rand(3, 3, 64, 48, generator=_gen(1))
    lr = degrade(hr, _gen(0))
    assert lr.shape == (3, 3, 16, 12) and lr.dtype == hr.dtype
    assert float(lr.min()) >= 0.0 and float(lr.max()) <= 1.0
    levels = lr * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


def test_degrade_deterministic_and_seed_dependent() -> None:
    hr = torch.rand(2, 3, 64, 64, generator=_gen(1))
    a, b = degrade(hr, _gen(7)), degrade(hr, _gen(7))
    assert torch.equal(a, b)
    others = [degrade(hr, _gen(s)) for s in (8, 9)]
    assert all(not torch.equal(a, o) for o in others)


def test_degrade_is_per_image() -> None:
    """Kernels, noise and JPEG quality are drawn per image: equal inputs give different outputs."""
    hr = torch.rand(1, 3, 64, 64, generator=_gen(2)).repeat(2, 1, 1, 1)
    lr = degrade(hr, _gen(3))
    assert not torch.equal(lr[0], lr[1])


def test_degrade_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiples of scale"):
        degrade(torch.rand(1, 3, 30, 32), _gen(0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 32, 32), _gen(0))
    with pytest.raises(TypeError, match="floating-point"):
        degrade(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), _gen(0))


def test_config_defaults_and_validation() -> None:
    cfg = RealESRGANDegradation()
    assert cfg.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert cfg.first.resize_range == (0.15, 1.5) and cfg.second.resize_range == (0.3, 1.2)
    assert cfg.first.noise_range == (1.0, 30.0) and cfg.second.noise_range == (1.0, 25.0)
    assert cfg.second.blur_sigma == (0.2, 1.5) and cfg.second_blur_prob == 0.8 and cfg.final_sinc_prob == 0.8
    # UPSR's option file: blur_kernel_size 21 / blur_kernel_size2 15, read as range(3, size, 2)
    # (realsrgan_dataset.py); not Real-ESRGAN's 7..21
    assert cfg.first.kernel_sizes == (3, 5, 7, 9, 11, 13, 15, 17, 19)
    assert cfg.second.kernel_sizes == (3, 5, 7, 9, 11, 13)
    with pytest.raises(ValueError, match="resize_probs"):
        DegradationStage(kernel_sizes=(3,), sinc_prob=0.1, blur_sigma=(0.2, 3.0), resize_probs=(0.5, 0.5, 0.5),
                         resize_range=(0.15, 1.5), noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0))
    for sizes in ((8,), (), (23,), (3.0,)):
        with pytest.raises(ValueError, match="kernel_sizes"):
            replace(cfg.first, kernel_sizes=sizes)


def _support(k: torch.Tensor) -> torch.Tensor:
    """Side of the smallest centred square holding each kernel's non-zero taps, (B,)."""
    c = k.shape[-1] // 2
    r = torch.arange(k.shape[-1]).sub(c).abs()
    dist = torch.maximum(r[:, None], r[None, :])  # Chebyshev distance from the centre
    return 2 * torch.where(k != 0, dist, 0).amax(dim=(1, 2)) + 1


def test_kernel_sizes_follow_the_two_orders() -> None:
    """k1 spans up to 19 taps, k2 and the final sinc up to 13 (UPSR's option file), and every
    allowed size is drawn."""
    plan = _draw_plan(4000, _gen(3), RealESRGANDegradation())
    s1, s2, s3 = _support(plan.k1), _support(plan.k2), _support(plan.k3)
    assert int(s1.max()) == 19 and int(s2.max()) == 13 and int(s3.max()) == 13
    # sinc kernels (and most others) fill their whole square; a pulse (skipped k2/k3) is 1×1
    assert set(s3.tolist()) == {1, 3, 5, 7, 9, 11, 13}


def test_gray_noise_is_equal_across_channels() -> None:
    stage = RealESRGANDegradation().first
    x = torch.full((2, 3, 32, 32), 0.5)
    for noise_type in (0.0, 0.99):  # u < 0.5 → Gaussian, else Poisson
        u = torch.tensor([[noise_type, 0.0, 0.5, 0.5]] * 2, dtype=torch.float64)  # u[1] = 0 < 0.4 → gray
        y = _add_noise(x, u, stage, _gen(0))
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
        assert float((y - x).abs().mean()) > 1e-3


def test_bicubic_degrade_matches_pillow() -> None:
    """Antialiased bicubic (a = -0.5) like Pillow; Pillow rounds to uint8 in two passes, so
    compare after rounding: mean < 0.5 level, max <= 4 levels."""
    hr = _test_image(64, 96, seed=3)
    ours = torch.round(bicubic_degrade(hr) * 255)
    ref = Image.fromarray(_to_uint8(hr)).resize((24, 16), Image.BICUBIC)
    ref_t = torch.from_numpy(np.asarray(ref).astype(np.float32)).permute(2, 0, 1)[None]
    diff = (ours - ref_t).abs()
    assert ours.shape == (1, 3, 16, 24)
    assert float(diff.mean()) < 0.5 and float(diff.max()) <= 4


# ----------------------------------------------------------------------------- kernels
def test_random_kernels_sum_to_one_and_have_their_size() -> None:
    u = torch.rand(64, 9, generator=_gen(4), dtype=torch.float64)
    k, p = sample_blur_kernels(u, sizes=(7, 9, 11, 13, 15, 17, 19, 21), type_probs=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                               sigma_range=(0.2, 3.0), betag_range=(0.5, 4.0), betap_range=(1.0, 2.0), sinc_prob=0.1)
    assert k.shape == (64, 21, 21)
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
    for ki, size in zip(k, p["size"].tolist(), strict=True):
        outside = torch.ones(21, 21, dtype=torch.bool)
        off = (21 - size) // 2
        outside[off:off + size, off:off + size] = False
        assert bool((ki[outside] == 0).all())  # zero padding around the kernel's own size
    assert set(p["type"].tolist()) == set(range(len(KERNEL_TYPES)))  # 64 draws hit every family


def test_gaussian_kernel_closed_form() -> None:
    """iso Gaussian = normalised exp(-(x²+y²)/2σ²); generalized with β = 1 is the same Gaussian."""
    ax = torch.arange(-3, 4, dtype=torch.float64)
    ref = torch.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * 1.3**2))
    ref = torch.nn.functional.pad(ref / ref.sum(), (7, 7, 7, 7))
    one = torch.ones(2, dtype=torch.float64)
    k = mixed_kernels(torch.tensor([0, 2]), torch.tensor([7, 7]), 1.3 * one, 0.4 * one, 0.7 * one, one)
    torch.testing.assert_close(k[0], ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(k[1], ref, rtol=0, atol=1e-15)


def test_sinc_kernel_is_low_pass() -> None:
    """Cut-off π/3 (1/6 cycle/pixel): gain 1 at DC, small above 0.3 cycles/pixel."""
    k = sinc_kernels(torch.tensor([21]), torch.tensor([math.pi / 3]))[0]
    torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    resp = torch.fft.fft2(k, s=(64, 64)).abs()
    f = torch.fft.fftfreq(64).abs()
    radius = torch.sqrt(f[:, None] ** 2 + f[None] ** 2)
    assert float(resp[0, 0]) == pytest.approx(1.0)
    assert float(resp[radius > 0.3].max()) < 0.15


def test_kernels_reject_even_sizes() -> None:
    with pytest.raises(ValueError, match="odd"):
        sinc_kernels(torch.tensor([8]), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- JPEG
def test_quant_tables_follow_libjpeg_scaling() -> None:
    luma, chroma = quant_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert luma[0, 0, 0] == 16 and chroma[0, 7, 7] == 99  # q = 50 is the Annex K table itself
    assert bool((luma[1] == 1).all()) and bool((chroma[1] == 1).all())  # q = 100: all steps 1
    assert luma[2, 0, 0] == 80  # q = 10: S = 500, (16·500 + 50) // 100


def test_jpeg_quality_100_is_near_identity() -> None:
    """At q = 100 every quantisation step is 1, so what is left are 8-bit roundings (YCbCr
    conversion, coefficients, IDCT, back to RGB) and 4:2:0 subsampling of the chroma, which is
    smooth here: tolerance mean < 1 level and max <= 5 levels (measured: 0.49 and 3)."""
    x = _test_image()
    d = (jpeg_compress(x, 100.0) - x).abs() * 255
    assert float(d.mean()) < 1.0 and float(d.max()) <= 5.0


def _high_freq_energy(x: torch.Tensor) -> float:
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    power = torch.fft.fft2(luma - luma.mean()).abs() ** 2
    f = torch.fft.fftfreq(x.shape[-1]).abs()
    return float(power[..., torch.maximum(f[:, None], f[None]) > 0.25].sum())


def test_jpeg_low_quality_removes_high_frequencies() -> None:
    x = _test_image()
    e0 = _high_freq_energy(x)
    assert _high_freq_energy(jpeg_compress(x, 100.0)) > 0.95 * e0
    assert _high_freq_energy(jpeg_compress(x, 10.0)) < 0.5 * e0


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_matches_pillow(quality: int) -> None:
    """Same codec as libjpeg up to its integer DCT: < 1 level on average (measured 0.1 to 0.65
    on such images; white noise, the worst case, gives up to 0.9)."""
    x = _photo_like(56, 72, seed=5)  # not a multiple of 16: exercises the edge padding
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=quality)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64)
    ours = jpeg_compress(x, float(quality))
    assert ours.shape == x.shape
    assert np.abs(_to_uint8(ours).astype(np.float64) - ref).mean() < 1.0


def test_jpeg_per_image_quality() -> None:
    x = torch.cat([_test_image(32, 32, 0), _test_image(32, 32, 1)])
    both = jpeg_compress(x, torch.tensor([20.0, 90.0]))
    torch.testing.assert_close(both[:1], jpeg_compress(x[:1], 20.0), rtol=0, atol=0)
    torch.testing.assert_close(both[1:], jpeg_compress(x[1:], 90.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(x, torch.tensor([0.5, 90.0]))


def _diffjpeg_probe() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 6, 5, generator=g)
    return F.interpolate(x, size=(24, 20), mode="bicubic", align_corners=False).clamp(0, 1)


def test_diffjpeg_matches_the_official_training_jpeg():
    """Values of BasicSR's ``DiffJPEG(differentiable=False)`` (the official UPSR training's JPEG,
    run unchanged, torch 2.13 CPU, 2026-11-27) on a fixed 24×20 pair at qualities 20 and 75: the
    mean, the sum of squares and six pixels (incl. the zero-padded corner). Tolerance 1e-5:
    float32 matmul order (the whole outputs agreed to 5e-5 levels; on four 250×243 photos at
    q 30/47.3/60/95 to 1e-4 levels, while libjpeg's model differs from it by 1.75 levels)."""
    out = diffjpeg_compress(_diffjpeg_probe(), torch.tensor([20.0, 75.0])).double()
    assert float(out.mean()) == pytest.approx(0.46727283030524835, abs=1e-6)
    assert float((out ** 2).sum()) == pytest.approx(798.7899191150152, abs=1e-3)
    for idx, v in (((0, 0, 0, 0), 0.0), ((0, 1, 5, 7), 0.3570382595062256), ((0, 2, 23, 19), 0.21041329205036163),
                   ((1, 0, 10, 3), 0.5752496719360352), ((1, 1, 17, 16), 0.37411361932754517),
                   ((1, 2, 0, 19), 1.0)):
        assert float(out[idx]) == pytest.approx(v, abs=1e-5), idx


def test_diffjpeg_option_of_the_degradation():
    """jpeg='diffjpeg' changes only the JPEG steps: same draws, a different LR; still 8-bit levels
    at the end (the final rounding); an unknown model or quality 100 is refused."""
    hr = torch.rand(2, 3, 64, 64, generator=_gen(0))
    a = degrade(hr, _gen(5))
    b = degrade(hr, _gen(5), config=RealESRGANDegradation(jpeg="diffjpeg"))
    assert a.shape == b.shape and not torch.equal(a, b)
    assert torch.equal(torch.round(b * 255) / 255, b)
    with pytest.raises(ValueError, match="jpeg must be one of"):
        RealESRGANDegradation(jpeg="pillow")
    with pytest.raises(ValueError, match="diffjpeg quality must be below 100"):
        diffjpeg_compress(hr, 100.0)


def test_kernel_recipes():
    """'upsr' (default, the official training) and 'realesrgan' (x4plus: 7..21 for all three,
    as the A_val pairs of shared/data/make_pairs.py); other ranges are the same."""
    up, re = RealESRGANDegradation.recipe("upsr"), RealESRGANDegradation.recipe("realesrgan", jpeg="diffjpeg")
    assert up == RealESRGANDegradation()
    assert re.first.kernel_sizes == re.second.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert re.jpeg == "diffjpeg" and replace(re.first, kernel_sizes=up.first.kernel_sizes) == up.first
    plan = _draw_plan(2000, _gen(4), re)
    assert int(_support(plan.k3).max()) == 21 and int(_support(plan.k2).max()) == 21
    with pytest.raises(ValueError, match="kernels must be one of"):
        RealESRGANDegradation.recipe("bsrgan")


def test_degrade_turns_autocast_off_itself():
    """Called inside a bf16 autocast region (a training step), degrade still computes in float32:
    the same LR as outside (bf16 convolutions and DCTs moved it by 11 levels on average)."""
    hr = torch.rand(2, 3, 64, 64, generator=_gen(0))
    ref = degrade(hr, _gen(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = degrade(hr, _gen(5))
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_gray_poisson_noise_takes_torchvisions_luma() -> None:
    """The official generate_poisson_noise_pt grays the image with torchvision's rgb_to_grayscale
    (0.2989, 0.587, 0.114); 0.299 was used here (a review of 2026-11-29)."""
    from upsr_core.train.degradations import poisson_luma

    x = torch.zeros(1, 3, 2, 2)
    x[:, 0] = 1.0
    assert torch.allclose(poisson_luma(x) * 255, torch.full((1, 1, 2, 2), 0.2989 * 255))
    y = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    want = 0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]
    assert torch.equal(poisson_luma(y)[:, 0], want)


def test_small_images_are_reflected_by_the_kernels_own_radius() -> None:
    """Kernels come zero-padded to 21 px, so every filter padded by 10 and an image of 8-10 px fell
    back to replicate padding where the official code reflects by the kernel's own k // 2 (a
    review of 2026-11-29: the tiny preset's 32-px crops meet such sizes after the first order)."""
    from upsr_core.train.degradations import _filter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 10, generator=g, dtype=torch.float64)
    small = torch.rand(2, 7, 7, generator=g, dtype=torch.float64)
    small /= small.sum((1, 2), keepdim=True)
    padded = torch.nn.functional.pad(small, (7, 7, 7, 7))  # as the pipeline hands them: 21 x 21
    want = torch.stack([torch.nn.functional.conv2d(
        torch.nn.functional.pad(x[i:i + 1].transpose(0, 1), (3, 3, 3, 3), mode="reflect"), small[i][None, None])
        .transpose(0, 1)[0] for i in range(2)])
    assert torch.allclose(_filter(x, padded), want, atol=1e-12)
    big = torch.rand(1, 3, 40, 40, generator=g, dtype=torch.float64)
    assert torch.allclose(_filter(big, padded[:1]), _filter(big, small[:1]), atol=1e-12)  # trimming is exact
