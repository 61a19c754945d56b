"""The wavelet colour fix (upsr_core.colorfix): formula, exact properties, streaming, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upsr_core.colorfix import (
    MAX_LEVELS,
    StreamedColorFix,
    bicubic_rows,
    halo,
    wavelet_color_fix,
    wavelet_lowpass,
)
from upsr_core.pipeline import bicubic_x4


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def lowpass_by_conv(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The low-pass written independently: a 2-D 3×3 binomial kernel, dilated, on a replicate-padded
    float64 image (F.pad's replicate needs the pad below the size: the test images are larger)."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    x = x.double()
    for i in range(levels):
        r = 2**i
        x = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k, dilation=r, groups=x.shape[1])
    return x


@pytest.mark.parametrize("levels", [1, 3, 5])
def test_lowpass_is_the_dilated_binomial_cascade(levels):
    x = rand(2, 3, 70, 45)
    # float32 sums against float64 ones: values in [0, 1], a few dozen roundings of 6e-8 each
    torch.testing.assert_close(wavelet_lowpass(x, levels).double(), lowpass_by_conv(x, levels), rtol=0, atol=1e-6)


def test_fix_is_detail_of_the_image_over_lowpass_of_the_reference():
    x, ref = rand(1, 3, 64, 48, seed=1), rand(1, 3, 64, 48, seed=2) * 0.5 + 0.25
    want = (x.double() - lowpass_by_conv(x, 5) + lowpass_by_conv(ref, 5)).clamp(0, 1)
    torch.testing.assert_close(wavelet_color_fix(x, ref).double(), want, rtol=0, atol=2e-6)


def test_a_flat_image_takes_the_reference_colour_exactly():
    # blurring a constant c gives (c + c + 2c) / 4 = c in floating point too: no rounding at all
    x = torch.full((2, 3, 40, 36), 0.3)
    ref = torch.tensor([0.125, 0.5, 0.875]).view(1, 3, 1, 1).expand(1, 3, 40, 36)
    out = wavelet_color_fix(x, ref)
    assert out.shape == (2, 3, 40, 36) and out.dtype == torch.float32
    assert torch.equal(out, ref.expand(2, -1, -1, -1))


def test_the_image_as_its_own_reference_is_unchanged_up_to_rounding():
    x = rand(1, 3, 50, 50, seed=3)
    torch.testing.assert_close(wavelet_color_fix(x, x), x, rtol=0, atol=2e-7)  # (x − a) + a: one rounding each


def test_an_lr_reference_is_its_clamped_bicubic_x4():
    x, lr = rand(2, 3, 48, 40, seed=4), rand(2, 3, 12, 10, seed=5)
    up = bicubic_x4(lr).clamp(0, 1)
    assert torch.equal(wavelet_color_fix(x, lr, levels=4), wavelet_color_fix(x, up, levels=4))
    # one reference for a batch
    assert torch.equal(wavelet_color_fix(x, lr[:1]), wavelet_color_fix(x, lr[:1].expand(2, -1, -1, -1)))


def lowpass_by_gathers(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The low-pass by clamped indices in float64 (edge replication at any reach, also past the size)."""
    x = x.double()
    for k in range(levels):
        r = 2**k
        for dim in (-2, -1):
            n = x.shape[dim]
            i = torch.arange(n)
            x = (x.index_select(dim, (i - r).clamp(0, n - 1)) + 2 * x
                 + x.index_select(dim, (i + r).clamp(0, n - 1))) / 4
    return x


@pytest.mark.parametrize("h, w", [(1, 1), (1, 7), (3, 2), (8, 12), (33, 5)])
@pytest.mark.parametrize("levels", [1, 4, MAX_LEVELS])
def test_reaches_beyond_the_image_size_replicate_the_edges(h, w, levels):
    x = rand(2, 3, h, w, seed=h * w + levels)
    torch.testing.assert_close(wavelet_lowpass(x, levels).double(), lowpass_by_gathers(x, levels), rtol=0, atol=1e-6)


@pytest.mark.parametrize("y0, n", [(0, 1), (0, 40), (3, 17), (21, 19), (39, 1)])
def test_bicubic_rows_equal_the_whole_image_rows(y0, n):
    lr = rand(3, 10, 7, seed=8) * 1.2 - 0.1  # overshoots: clamped as the whole image is
    whole = F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    assert torch.equal(bicubic_rows(lr, y0, n), whole[:, y0 : y0 + n])


@pytest.mark.parametrize("levels, strips", [
    (1, [5, 40, 1, 70, 32]),   # strips shorter and longer than the reach (1 row)
    (3, [148]),                # the whole image at once
    (5, [32] * 4 + [20]),      # the CLI's tile rows: each strip ~ the reach (31 rows)
    (5, [1] * 148),            # one row at a time
    (8, [100, 48]),            # the reach (255) beyond the image: everything waits for the end
])
def test_streamed_rows_equal_the_whole_image_bit_for_bit(levels, strips):
    # the blur is gathers and element-wise sums: a value never depends on the tensor's extent
    lr, x = rand(3, 37, 29, seed=9), rand(1, 3, 148, 116, seed=10)
    whole = wavelet_color_fix(x, lr[None], levels=levels)[0]
    got: list[tuple[int, torch.Tensor]] = []
    fix = StreamedColorFix(lr, lambda y0, rows: got.append((y0, rows)), levels=levels)
    y = 0
    for n in strips:
        fix(y, x[0, :, y : y + n])
        y += n
        assert sum(r.shape[1] for _, r in got) >= max(0, y - halo(levels)) or y == 148  # rows leave once ready
    fix.close()
    assert [y0 for y0, _ in got] == [sum(r.shape[1] for _, r in got[:i]) for i in range(len(got))]
    assert torch.equal(torch.cat([r for _, r in got], dim=1), whole)


@pytest.mark.parametrize("levels", [2, 5])
def test_strips_give_the_one_pass_result_bit_for_bit(monkeypatch, levels):
    import upsr_core.colorfix as cf

    x, lr = rand(2, 3, 200, 36, seed=13), rand(2, 3, 50, 9, seed=14)
    for ref in (lr, bicubic_x4(lr).clamp(0, 1)):  # the LR reference (rows of its bicubic) and a same-size one
        monkeypatch.setattr(cf, "STRIP_ROWS", 10_000)  # one window: the whole image
        whole = wavelet_color_fix(x, ref, levels=levels)
        monkeypatch.setattr(cf, "STRIP_ROWS", 16)  # 16 rows a strip, or 4 × the reach
        assert cf.strip_rows(levels) < 200
        assert torch.equal(wavelet_color_fix(x, ref, levels=levels), whole)


def test_stream_holds_only_its_context():
    lr, x = rand(3, 64, 8, seed=11), rand(1, 3, 256, 32, seed=12)
    fix = StreamedColorFix(lr, lambda *_: None, levels=3)
    for y in range(0, 256, 16):
        fix(y, x[0, :, y : y + 16])
        assert fix.buf.shape[1] <= 16 + 2 * halo(3)
    fix.close()


def test_errors_name_the_bad_value():
    x, lr = rand(1, 3, 16, 16), rand(1, 3, 4, 4)
    for bad in (0, MAX_LEVELS + 1, 2.5, True, "5"):
        with pytest.raises(ValueError, match=rf"levels must be an integer in \[1, {MAX_LEVELS}\], got"):
            wavelet_color_fix(x, lr, levels=bad)
    with pytest.raises(ValueError, match=r"reference is 5×4 and image 16×16: .* \(×4 smaller, 4×4\)"):
        wavelet_color_fix(x, rand(1, 3, 4, 5))
    with pytest.raises(ValueError, match="reference has 2 images, image 1"):
        wavelet_color_fix(x, rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"image must be a float \(B, 3, H, W\) tensor, got shape \(3, 16, 16\)"):
        wavelet_color_fix(x[0], lr)
    with pytest.raises(ValueError, match="reference contains NaN or Inf"):
        wavelet_color_fix(x, torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"reference must hold values in \[0, 1\], got \[.*\] \(divide 8-bit values"):
        wavelet_color_fix(x, lr * 255)
    with pytest.raises(ValueError, match=r"image must hold values in \[0, 1\], got \[-.*map \[-1, 1\]"):
        wavelet_color_fix(x * 2 - 1, lr)
    with pytest.raises(ValueError, match=r"the same size or the LR image \(×4 smaller\)$"):
        wavelet_color_fix(rand(1, 3, 17, 16), lr)  # no LR size to suggest for 17 rows
    with pytest.raises(ValueError, match=r"x must be a float \(…, H, W\) tensor with H, W >= 1, got shape \(5,\)"):
        wavelet_lowpass(torch.zeros(5))
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 4, 4\), torch.int64"):
        wavelet_lowpass(torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lr must be a float \(3, h, w\) tensor, got shape \(3, 4, 4\), torch.uint8"):
        StreamedColorFix((lr[0] * 255).to(torch.uint8), lambda *_: None)
    with pytest.raises(ValueError, match=r"lr is empty: shape \(3, 0, 4\)"):
        StreamedColorFix(torch.zeros(3, 0, 4), lambda *_: None)
    with pytest.raises(TypeError, match="emit must be a callable emit"):
        StreamedColorFix(lr[0], None)
    fix = StreamedColorFix(lr[0], lambda *_: None)
    with pytest.raises(ValueError, match=r"rows \[0, 4\) contains NaN or Inf"):
        fix(0, torch.full((3, 4, 16), float("nan")))
    with pytest.raises(ValueError, match="expected row 0 next, got 4"):
        fix(4, x[0, :, 4:8])
    with pytest.raises(ValueError, match=r"rows must be \(3, n, 16\), got \(3, 4, 12\)"):
        fix(0, x[0, :, :4, :12])
    fix(0, x[0, :, :8])
    with pytest.raises(ValueError, match=r"rows \[8, 20\) run past the image's 16 rows"):
        fix(8, torch.zeros(3, 12, 16))
    with pytest.raises(RuntimeError, match="got 8 of 16 rows"):
        fix.close()
    with pytest.raises(ValueError, match=r"rows \[14, 18\) are not inside"):
        bicubic_rows(lr[0], 14, 4)
    with pytest.raises(ValueError, match="n must be >= 1 row, got 0"):
        bicubic_rows(lr[0], 5, 0)
    with pytest.raises(ValueError, match=r"lr must be a float \(…, C, h, w\) tensor, got shape \(4, 4\)"):
        bicubic_rows(lr[0, 0], 0, 4)


def test_progress_is_called_after_each_strip_and_can_cancel():
    from upsr_core.colorfix import strip_rows

    x = torch.rand(1, 3, strip_rows(2) + 5, 12, generator=torch.Generator().manual_seed(0))
    seen = []
    want = wavelet_color_fix(x, x.flip(-1), levels=2)
    assert torch.equal(wavelet_color_fix(x, x.flip(-1), levels=2, progress=lambda d, t: seen.append((d, t))), want)
    assert seen == [(1, 2), (2, 2)]

    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wavelet_color_fix(x, x, levels=2, progress=cancel)
    with pytest.raises(TypeError, match="progress must be a callable progress\\(done, total\\) or None, got str"):
        wavelet_color_fix(x, x, progress="bar")
