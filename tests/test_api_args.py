"""The public library functions refuse input outside their stated shapes and ranges with an
error naming the argument — instead of a silent wrong image, NaN, or a deep torch error.

Each case was accepted (or crashed deep inside torch) before (2026-11-26 API audit).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from upsr_core.checkpoint import save_converted
from upsr_core.errors import UnsupportedCheckpointError
from upsr_core.fast import enable_fast
from upsr_core.model import load_upsr
from upsr_core.pipeline import crop_hr, denoise_estimate, pad_lr, starting_noise
from upsr_core.schedule import make_schedule
from upsr_core.tiling import tile_starts
from upsr_core.uncertainty import estimate_uncertainty, weight_noise

from _support import tiny_upsr

TILE = dict(tile=16, overlap=4)


@pytest.fixture(scope="module")
def model():
    return tiny_upsr()


@pytest.fixture(scope="module")
def est_w(model):
    lr = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    est = model.estimate(lr)
    return est, weight_noise(est.uncertainty())


# ------------------------------------------------------------------ LR values
@pytest.mark.parametrize("scale, shift", [(255.0, 0.0), (1.0, -2.0), (2.0, -1.0)])
def test_lr_outside_0_1_is_refused(model, scale, shift):
    lr = torch.rand(1, 3, 6, 6) * scale + shift  # 8-bit values, or [-1, 1]: was a normal-looking image
    with pytest.raises(ValueError, match=r"the LR image must hold values in \[0, 1\], got \["):
        model.upscale(lr, **TILE)
    with pytest.raises(ValueError, match="must hold values in"):
        model.estimate(lr)


def test_lr_overshoot_of_resampling_is_accepted(model):
    lr = torch.rand(1, 3, 6, 6).mul(1.04).sub(0.02)  # bicubic/Lanczos resizing upstream overshoots a little
    assert model.upscale(lr, **TILE).shape == (1, 3, 24, 24)


def test_clamp_overshoot_takes_a_resize_s_overshoot_and_refuses_other_ranges(model):
    from upsr_core.pipeline import clamp_overshoot

    lr = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert clamp_overshoot(lr, "x") == (lr, None)  # already in [0, 1]: the same tensor
    over = lr.mul(1.3).sub(0.15)  # ringing of a bicubic resize at sharp edges: ±0.15
    got, found = clamp_overshoot(over, "x")
    assert torch.equal(got, over.clamp(0, 1)) and found == pytest.approx((over.min().item(), over.max().item()))
    with pytest.raises(ValueError, match=r"the LR image must hold values in \[0, 1\], got \[.*\] \(a bicubic or "
                                         r"Lanczos resize overshoots: clamp to \[0, 1\]\)"):
        model.upscale(over, **TILE)  # the library does not clamp: it names the cure
    for bad, hint in ((lr * 255, "divide 8-bit values by 255"), (lr * 2 - 1, r"map \[-1, 1\]"),
                      (torch.full_like(lr, float("nan")), "NaN or Inf")):
        with pytest.raises(ValueError, match=hint):
            clamp_overshoot(bad, "the image")


# ------------------------------------------------------------------ weight and noise given to denoise
def test_denoise_refuses_weights_of_the_wrong_shape_range_or_dtype(model, est_w):
    est, w = est_w
    cases = [
        (w[0], ValueError, r"noise weight has shape \(3, 32, 32\); expected \(1 or 2, 1 or 3, 32, 32\)"),  # was
        # image 0's weight for every image
        (torch.cat([w, w[:1]]), ValueError, "noise weight has shape"),  # was an expand() RuntimeError
        (w[:, :2], ValueError, "noise weight has shape"),
        (w[..., :24, :24], ValueError, "padded HR size"),
        (w * 5, ValueError, r"noise weight must be in \[0, 1\], got \["),
        (-w, ValueError, r"noise weight must be in \[0, 1\], got \[-"),
        (torch.full_like(w, float("nan")), ValueError, r"noise weight must be in \[0, 1\], got \[nan, nan\]"),
        ((w * 255).to(torch.uint8), TypeError, "weight must be a float tensor, got dtype torch.uint8"),
        (0.5, TypeError, "weight must be a torch.Tensor, got float"),
    ]
    for weight, exc, match in cases:
        with pytest.raises(exc, match=match):
            model.denoise(est, weight, **TILE)


def test_denoise_and_upscale_refuse_noise_of_another_shape(model, est_w):
    est, w = est_w
    n = starting_noise(0, 2, (8, 8))
    for noise in (torch.cat([n, n[:1]]), n[:1], torch.randn(2, 48, 32, 32), n[:, :3]):
        with pytest.raises(ValueError, match=r"noise has shape .*; expected \(2, 48, 8, 8\)"):
            model.denoise(est, w, noise=noise, **TILE)
    with pytest.raises(ValueError, match="noise contains NaN"):
        model.denoise(est, w, noise=torch.full_like(n, float("nan")), **TILE)
    with pytest.raises(TypeError, match="noise must be a float tensor"):
        model.denoise(est, w, noise=n.to(torch.int64), **TILE)
    with pytest.raises(ValueError, match=r"noise has shape \(3, 48, 8, 8\); expected \(2, 48, 8, 8\)"):
        model.upscale(torch.rand(2, 3, 6, 6), noise=torch.cat([n, n[:1]]), **TILE)  # was sliced silently


# ------------------------------------------------------------------ ψ and w
def test_weight_noise_refuses_psi_max_that_float32_cannot_hold():
    psi = torch.rand(1, 3, 8, 8) * 0.2
    for bad in (1e-300, 1e300):  # 2·ψ_max is 0 or inf in float32: all-NaN w, or an overflow RuntimeError
        with pytest.raises(ValueError, match=r"psi_max must be in \[.*\] \(2·psi_max a normal float32\)"):
            weight_noise(psi, psi_max=bad)
    assert torch.isfinite(weight_noise(psi, psi_max=1e-30)).all()


def test_weight_noise_in_half_precision_keeps_a_small_psi_max():
    psi = torch.full((1, 1, 2, 2), 1e-3)
    w = weight_noise(psi.half(), b_u=0.4, psi_max=1e-8)  # 2e-8 is 0 in fp16: w was b_u everywhere
    assert w.dtype == torch.float16 and torch.equal(w, torch.ones_like(w))
    assert torch.equal(weight_noise(psi.half(), 0.4, 0.05), weight_noise(psi, 0.4, 0.05).half())


@pytest.mark.parametrize(("psi", "error"), [(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), TypeError),
                                            (np.zeros((1, 3, 4, 4), np.float32), TypeError),
                                            (torch.zeros(3, 4, 4), ValueError), (torch.zeros(1, 4, 4, 4), ValueError)])
def test_weight_noise_refuses_psi_of_other_dtype_or_shape(psi, error):
    # the kind of the value is a TypeError, its shape a ValueError, as for estimate_uncertainty
    with pytest.raises(error, match=r"uncertainty ψ must be a float \(B, 1\|3, H, W\) tensor, got"):
        weight_noise(psi)


def test_estimate_uncertainty_refuses_a_map_of_other_rank():
    with pytest.raises(ValueError, match=r"sr_estimate must be a float \(B, C, H, W\) tensor, got shape \(3, 2, 2\)"):
        estimate_uncertainty(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2))


def test_estimate_uncertainty_refuses_integer_images():
    a, b = torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.ones(1, 3, 2, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="sr_estimate must be a float"):  # 0 − 1 wrapped to 255: ψ was 127.5
        estimate_uncertainty(a, b)


# ------------------------------------------------------------------ sizes and parameters
def test_crop_hr_refuses_a_size_the_tensor_does_not_hold():
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"lr_size \(10, 10\) ×4 = 40x40 must be >= 1 and fit the tensor's 32x32"):
        crop_hr(x, (10, 10))  # returned 32×32
    with pytest.raises(ValueError, match="must be >= 1"):
        crop_hr(x, (-2, 6))
    assert crop_hr(x, (8, 5)).shape == (1, 3, 32, 20)


@pytest.mark.parametrize("kw, match", [
    (dict(num_steps=2.5), "num_steps must be an integer >= 2"),  # built 3 steps with η up to 1.47
    (dict(kappa=float("nan")), "kappa must be a finite number > 0"),
    (dict(kappa=float("inf")), "kappa must be a finite number > 0"),  # ZeroDivisionError
    (dict(power=0), "power must be a finite number > 0"),  # a constant η
    (dict(power=-1), "power must be"),
    (dict(min_noise_level=0), "min_noise_level must be"),  # ZeroDivisionError
    (dict(etas_end=1e-5), r"etas_end must exceed the start √η_1"),  # a decreasing η
    (dict(kappa="2"), "kappa must be a finite number > 0, got '2'"),
])
def test_make_schedule_refuses_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kw)


def test_small_helpers_refuse_bad_sizes(model):
    with pytest.raises(ValueError, match="multiple must be an integer >= 1, got 0"):
        pad_lr(torch.rand(1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        starting_noise(0, 0, (8, 8))
    with pytest.raises(ValueError, match=r"lr_hw must be two integers >= 1 .* got \(0, 8\)"):
        starting_noise(0, 1, (0, 8))  # was an empty tensor
    with pytest.raises(ValueError, match=r"overlap must be in \[0, tile size 16\), got 20"):
        tile_starts(40, 16, 20)  # returned [24]: [0, 24) uncovered
    with pytest.raises(ValueError, match=r"block must be an integer >= 1 \(LR pixels\), got 0"):
        model.estimate(torch.rand(1, 3, 4, 4), block=0)  # 0 meant the default 512


def test_fast_path_refuses_tile_batch_below_one(model):
    fast = enable_fast(tiny_upsr(), compile=False)
    for bad in (0, -3, 1.5):  # the one-tile fast path ran with these
        with pytest.raises(ValueError, match="tile_batch must be an integer >= 1"):
            fast.upscale(torch.rand(1, 3, 6, 6), tile_batch=bad, **TILE)
    with pytest.raises(ValueError, match="tile_batch must be an integer >= 1, got 1.5"):
        model.upscale(torch.rand(1, 3, 6, 6), tile_batch=1.5, **TILE)


def test_load_upsr_refuses_broken_config_metadata(model, tmp_path):
    good = tmp_path / "m.safetensors"
    save_converted(good, model.denoiser, model.estimator)
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    for key, value, match in (("denoiser_config", "{not json", "JSONDecodeError"),
                              ("estimator_config", json.dumps({"foo": 1}), "TypeError")):
        bad = tmp_path / f"bad_{key}.safetensors"
        save_file(tensors, str(bad), metadata=meta | {key: value})
        with pytest.raises(UnsupportedCheckpointError, match=rf"its metadata '{key}' is not a valid .*{match}"):
            load_upsr(bad)


def test_save_converted_refuses_swapped_nets_and_reserved_metadata(model, tmp_path):
    with pytest.raises(TypeError, match="denoiser must be an UPSRDenoiser, got ATD"):  # wrote an unreadable file
        save_converted(tmp_path / "x.safetensors", model.estimator, model.denoiser)
    with pytest.raises(TypeError, match="denoiser must be an UPSRDenoiser, got NoneType"):
        save_converted(tmp_path / "x.safetensors", None, model.estimator)
    with pytest.raises(ValueError, match=r"extra_metadata may not set \['denoiser_config'\]"):
        save_converted(tmp_path / "x.safetensors", model.denoiser, model.estimator,
                       extra_metadata={"denoiser_config": "{}"})
    assert not (tmp_path / "x.safetensors").exists()


def test_write_png_refuses_nan_and_integer_images(tmp_path):
    from upsr_core.imageio import write_png

    with pytest.raises(ValueError, match="rgb contains NaN or Inf"):  # was written black
        write_png(tmp_path / "a.png", torch.full((3, 4, 4), float("nan")))
    with pytest.raises(TypeError, match="rgb must be a float tensor in \\[0, 1\\], got dtype torch.uint8"):
        write_png(tmp_path / "a.png", torch.full((3, 4, 4), 200, dtype=torch.uint8))  # was white
    assert not (tmp_path / "a.png").exists()


def test_heatmap_refuses_nan_maps_and_ranges():
    from upsr_core.stages import heatmap

    with pytest.raises(ValueError, match="holding NaN/Inf"):  # an IndexError before
        heatmap(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="heatmap range must be finite with hi > lo"):
        heatmap(torch.zeros(1, 1, 2, 2), lo=float("nan"))
    with pytest.raises(ValueError, match=r"needs a finite float \(B, C, H, W\) map"):
        heatmap(torch.zeros(1, 2, 2))


# ------------------------------------------------------------------ 2026-11-27 API probe
def test_denoise_estimate_checks_values_as_denoise_does(model, est_w):
    """The functional stage ran w·5, −w and NaN noise into a plausible image or an all-NaN one."""
    from upsr_core.pipeline import denoise_estimate

    est, w = est_w
    n = starting_noise(0, 2, (8, 8))
    for weight, noise, match in [(w * 5, n, r"noise weight must be in \[0, 1\]"),
                                 (-w, n, r"noise weight must be in \[0, 1\], got \[-"),
                                 (w, n * float("nan"), "noise contains NaN")]:
        with pytest.raises(ValueError, match=match):
            denoise_estimate(model._denoiser_call, est, weight, noise)
    with pytest.raises(TypeError, match="est must be an Estimate .* got Tensor"):
        denoise_estimate(model._denoiser_call, est.lr_pm, w, n)
    with pytest.raises(TypeError, match="est must be an Estimate .* got Tensor"):
        model.denoise(est.lr_pm, w)  # was AttributeError: 'Tensor' object has no attribute 'lr_pm'
    # with valid inputs it is the model's own stage, up to the denoiser's batch-size rounding (both
    # images in one call here, one by one there: 4.5e-7 measured, see test_determinism.BATCH_ATOL)
    got = denoise_estimate(model._denoiser_call, est, w, n)
    torch.testing.assert_close(got, model.denoise(est, w, noise=n, tile=64, overlap=8), atol=1e-5, rtol=0)


def test_api_arguments_of_the_wrong_kind_are_named(model):
    lr = torch.rand(1, 3, 4, 4)
    cases = [
        (lambda: model.upscale(lr, estimator_block=0), ValueError, r"estimator_block must be an integer >= 1"),
        (lambda: model.upscale(lr, estimator_block=64.5), ValueError, r"estimator_block must be an integer >= 1"),
        (lambda: model.upscale(lr, progress=5), TypeError, "progress must be a callable"),  # failed after a block
        (lambda: model.upscale(lr, sink="rows"), TypeError, "sink must be a callable"),
        (lambda: crop_hr(torch.rand(1, 3, 16, 16), 4), ValueError, r"lr_size must be two integers \(h, w\)"),
        (lambda: crop_hr(torch.rand(1, 3, 16, 16), (2.5, 3)), ValueError, "lr_size must be two integers"),
        (lambda: starting_noise(0, 1, 64), ValueError, "lr_hw must be two integers"),  # was len() of an int
        (lambda: pad_lr(lr.numpy()), TypeError, "lr must be a torch.Tensor"),
        (lambda: pad_lr((lr * 255).byte()), TypeError, r"lr must be a float tensor .* \(divide 8-bit"),
        (lambda: pad_lr(lr[0, 0]), ValueError, r"lr must be \(B, 3, h, w\) in \[0, 1\], got shape \(4, 4\)"),
        (lambda: model.working_memory((64, 64), tile=0), ValueError, "tile must be an integer >= 1, got 0"),
        (lambda: load_upsr(None), TypeError, "model must be a file path"),
        (lambda: model.to(torch.float16, dtype=torch.float32), TypeError, "two dtypes"),
        (lambda: model.to("tpu"), ValueError, "device must be 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        # error audit 2026-11-28: a 4-channel LR was padded as if RGB; noise=None, 'meta' and a missing
        # CUDA in starting_noise were AttributeError, a model of no data, torch's AssertionError
        (lambda: pad_lr(torch.rand(1, 4, 8, 8)), ValueError, r"lr must be \(B, 3, h, w\) in \[0, 1\], got shape "
                                                              r"\(1, 4, 8, 8\) \(RGB only"),
        (lambda: model.to("meta"), ValueError, "got 'meta': the meta device holds no data"),
        (lambda: denoise_estimate(model._denoiser_call, model.estimate(lr), torch.ones(1, 1, 64, 64), None),
         TypeError, r"noise must be a \(B, 48, Hp, Wp\) \(starting_noise\(seed, B, \(Hp, Wp\)\)\) tensor, got None"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    with pytest.raises(ValueError, match=r"expected \(1, 1 or 3, 16, 16\)"):  # it said "(1 or 1, ..."
        model.denoise(model.estimate(lr), torch.ones(1, 3, 8, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_is_named_not_an_assertion(small_model_file):
    with pytest.raises(ValueError, match="device 'cuda' was asked for, but CUDA is not available"):
        load_upsr(small_model_file, device="cuda")  # torch's own: AssertionError "not compiled with CUDA"
    with pytest.raises(ValueError, match="device 'cuda' was asked for, but CUDA is not available"):
        starting_noise(0, 1, (8, 8), device="cuda")


@pytest.mark.skipif(not hasattr(torch, "xpu") or torch.xpu.is_available(), reason="checks the message on a machine "
                    "whose torch knows XPU (Intel GPUs) but has none")
def test_a_missing_xpu_is_named_not_an_assertion(small_model_file):
    with pytest.raises(ValueError, match="device 'xpu' was asked for, but XPU is not available here"):
        load_upsr(small_model_file, device="xpu")


def test_model_to_takes_a_dtype_first_as_nn_module_does():
    m = tiny_upsr()
    assert m.to(torch.bfloat16) is m  # was "to() received an invalid combination of arguments"
    assert m.dtype == torch.bfloat16 and next(m.denoiser.parameters()).dtype == torch.bfloat16
    assert next(m.estimator.parameters()).dtype == torch.bfloat16
    m.to(torch.float16)
    assert next(m.estimator.parameters()).dtype == torch.float32  # the estimator never goes to fp16


def test_an_estimator_whose_shapes_make_no_net_is_an_unsupported_checkpoint(model, tmp_path):
    sd = {k: v.clone() for k, v in model.estimator.state_dict().items()}
    sd["conv_first.weight"] = torch.zeros(18, 3, 3, 3)  # embed 18 read from here: fc1's 16 // 18 = mlp_ratio 0
    sd["conv_first.bias"] = torch.zeros(18)
    torch.save(sd, tmp_path / "est.pth")
    save_converted(tmp_path / "den.safetensors", model.denoiser, None)
    with pytest.raises(UnsupportedCheckpointError, match="ATD .*the tensor shapes do not describe a consistent net"):
        load_upsr(tmp_path / "den.safetensors", tmp_path / "est.pth")  # was "groups must be a positive integer"


def test_denoiser_and_save_converted_name_arguments_of_the_wrong_type(model, tmp_path):
    x, lq = torch.zeros(1, 48, 4, 4), torch.zeros(1, 96, 4, 4)
    with pytest.raises(TypeError, match="timesteps must be a torch.Tensor, got int"):
        model.denoiser(x, 4, lq)  # was AttributeError: 'int' object has no attribute 'device'
    with pytest.raises(TypeError, match=r"extra_metadata keys and values must be str .* got \{'n': 'int'\}"):
        save_converted(tmp_path / "m.safetensors", model.denoiser, model.estimator, extra_metadata={"n": 5})


def test_a_float64_noise_weight_runs_in_the_estimates_dtype():
    """``weight_noise`` returns ψ's dtype, so a float64 ψ gives a float64 w: the sampler state
    x_T = y + κ·√η·w·ε took w's dtype, the raw network then failed ("mat1 and mat2 must have the
    same dtype") and the model's wrapper ran the whole sampler in float64 (4.5e-7 off)."""
    from upsr_core.pipeline import default_weight, denoise_estimate, estimate

    m = tiny_upsr()
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    est = estimate(m.estimator, lr, m.multiple_of)
    w = default_weight(est)
    noise = starting_noise(1, 1, tuple(est.lr_pm.shape[-2:]))
    want = denoise_estimate(m.denoiser, est, w, noise)
    got = denoise_estimate(m.denoiser, est, w.double(), noise)  # the raw network, as documented
    assert got.dtype == torch.float32 and torch.equal(got, want)
    e = m.estimate(lr)
    w32 = weight_noise(e.uncertainty(), 0.4, 0.05)
    out = m.denoise(e, w32.double(), seed=1)
    assert out.dtype == torch.float32 and torch.equal(out, m.denoise(e, w32, seed=1))


def test_uncertainty_and_noise_weight_values_from_the_formulas():
    """ψ = ½|g(y) − y↑| and w = b_u + (1 − b_u)·min(ψ/ψ_max, 1) at hand-computed points, and the
    official defaults b_u = 0.4, ψ_max = 0.05: checked here without the oracle, which CI lacks
    (its test_noise_weight is the only other check of the constants; the fast path's
    noise_weight is compared with weight_noise, so a change to both would pass that one)."""
    from upsr_core.uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX

    assert (DEFAULT_B_U, DEFAULT_PSI_MAX) == (0.4, 0.05)
    g = torch.tensor([0.7, 0.2, 0.5, 1.25]).view(1, 4, 1, 1)
    bic = torch.tensor([0.5, 0.3, 0.5, -0.25]).view(1, 4, 1, 1)
    psi = estimate_uncertainty(g, bic)
    torch.testing.assert_close(psi.flatten(), torch.tensor([0.1, 0.05, 0.0, 0.75]), rtol=0, atol=1e-7)  # float32 ulps
    psi = torch.tensor([0.0, 0.025, 0.05, 0.2]).view(1, 1, 2, 2)
    torch.testing.assert_close(weight_noise(psi).flatten(), torch.tensor([0.4, 0.7, 1.0, 1.0]), rtol=0, atol=1e-7)
    torch.testing.assert_close(weight_noise(psi, b_u=0.0, psi_max=0.1).flatten(),
                               torch.tensor([0.0, 0.25, 0.5, 1.0]), rtol=0, atol=1e-7)
    assert torch.equal(weight_noise(psi, b_u=1.0, psi_max=0.1), torch.ones_like(psi))  # w ≡ 1: no weighting


# ------------------------------------------------------------------ 2026-11-28 style review
def test_a_hand_built_estimate_whose_maps_disagree_is_refused(model, est_w):
    # before: image 2 silently dropped by denoise (batch from lr_pm), or image 0's ε broadcast to both
    from upsr_core.pipeline import Estimate, denoise_estimate

    est, w = est_w
    cases = [
        (Estimate(est.lr_pm[:1], est.bicubic_pm, est.sr_estimate_pm, est.size), r"bicubic_pm must be \(1, 3, 32, 32\)"),
        (Estimate(est.lr_pm, est.bicubic_pm[..., :16, :16], est.sr_estimate_pm, est.size), r"×4 of lr_pm"),
        (Estimate(est.lr_pm, est.bicubic_pm, est.sr_estimate_pm[:, :1], est.size), r"sr_estimate_pm must be a \(B, 3"),
        (Estimate(est.lr_pm, est.bicubic_pm, est.sr_estimate_pm, (9, 6)), r"size must be the LR \(h, w\).*8x8"),
        (Estimate(est.lr_pm, est.bicubic_pm, est.sr_estimate_pm, (0, 6)), r"size must be"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            model.denoise(bad, w)
        with pytest.raises(ValueError, match=match):
            denoise_estimate(model._denoiser_call, bad, w, starting_noise(0, 2, (8, 8)))


def test_upsr_model_checks_what_it_is_built_from(model):
    from upsr_core import UPSRModel

    assert model.scale == 4
    with pytest.raises(TypeError, match="scale"):  # ×4 is the networks', not a setting (scale=2 gave ×4)
        UPSRModel(model.denoiser, model.estimator, scale=2)
    with pytest.raises(TypeError, match="denoiser must be an UPSRDenoiser, got str"):
        UPSRModel("not a net", None)
    with pytest.raises(TypeError, match="estimator must be an ATD module or None, got int"):
        UPSRModel(model.denoiser, 3)
    with pytest.raises(TypeError, match="denoiser must be an UPSRDenoiser, got ATD"):  # swapped: failed in upscale
        UPSRModel(model.estimator, model.denoiser)
    with pytest.raises(TypeError, match="estimator must be an ATD module or None, got UPSRDenoiser"):
        UPSRModel(model.denoiser, model.denoiser)
    with pytest.raises(ValueError, match=r"dtype torch.bfloat16 does not match the denoiser's weights \(torch.flo"):
        UPSRModel(model.denoiser, model.estimator, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        UPSRModel(model.denoiser, model.estimator, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no estimator \(g\): load one with load_upsr\(model, estimator=FILE\)"):
        UPSRModel(model.denoiser, None).upscale(torch.rand(1, 3, 8, 8))


def test_fast_path_checks_a_given_noise_for_nan_as_the_reference_does(model):
    # before: the fast path ran a NaN ε and blamed the weights (NonFiniteOutputError)
    import copy

    from upsr_core import UPSRModel

    fast = enable_fast(UPSRModel(copy.deepcopy(model.denoiser), copy.deepcopy(model.estimator)))
    n = starting_noise(0, 1, (8, 8))
    n[0, 0, 0, 0] = float("nan")
    for m in (model, fast):
        with pytest.raises(ValueError, match="noise contains NaN or Inf"):
            m.upscale(torch.rand(1, 3, 8, 8), noise=n)


@pytest.mark.parametrize("field, value", [("swin_num_heads", 0), ("model_channels", 0), ("window_size", 0),
                                          ("mlp_ratio", -1), ("model_channels", 64.0),
                                          ("channel_mult", (1, 0, 2, 4)), ("middle_swin", 1)])
def test_denoiser_config_refuses_values_no_net_can_have(field, value):
    from upsr_core.config import DenoiserConfig

    with pytest.raises(ValueError, match=rf"settings must be integers >= 1.*'{field}': {re.escape(repr(value))}"):
        DenoiserConfig(**{field: value})


def test_sampler_refuses_states_that_would_broadcast():
    from upsr_core.sampler import prior_sample, sample

    s = make_schedule()
    y, x_T = torch.rand(1, 48, 8, 8), torch.rand(2, 48, 8, 8)
    with pytest.raises(ValueError, match=r"x_T \(2, 48, 8, 8\) must have the shape of y \(1, 48, 8, 8\)"):
        sample(lambda x, t: x, y, x_T, s)
    with pytest.raises(ValueError, match=r"denoise returned \(1, 48, 1, 1\) at step t=4"):
        sample(lambda x, t: torch.zeros(1, 48, 1, 1), y, y.clone(), s)
    with pytest.raises(TypeError, match="callback must be callable or None, got int"):
        sample(lambda x, t: x, y, y.clone(), s, callback=5)
    with pytest.raises(ValueError, match=r"weight \(1, 3, 32, 32\) must have the shape of y.*unshuffled"):
        prior_sample(y, torch.rand(1, 3, 32, 32), torch.rand(1, 48, 8, 8), s)
    with pytest.raises(ValueError, match=r"noise must be a \(B, 48, h, w\) tensor"):
        prior_sample(y, torch.rand(1, 48, 8, 8), torch.rand(48, 8, 8), s)


def test_the_nets_name_inputs_of_the_wrong_rank_channels_or_batch(model):
    den, atd = model.denoiser, model.estimator
    x, lq = torch.rand(2, 48, 8, 8), torch.rand(2, 96, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must be a \(B, 3, h, w\) tensor, got \(3, 16, 16\)"):
        atd(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"x must be a \(B, 3, h, w\) tensor, got \(1, 4, 16, 16\)"):
        atd(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"x must be \(B, 48, h, w\), got \(2, 47, 8, 8\)"):
        den(x[:, :47], t, lq)
    with pytest.raises(ValueError, match=r"lq must be \(B, 96, h, w\) with x's B 2, got \(1, 96, 8, 8\)"):
        den(x, t, lq[:1])
    with pytest.raises(ValueError, match=r"timesteps must be one step per image, shape \(2,\), got \(3,\)"):
        den(x, torch.zeros(3, dtype=torch.long), lq)


def test_options_that_a_given_noise_or_estimator_would_drop_are_refused(model):
    # before: same_noise=True with a given ε, and block= with another estimator, did nothing, silently
    import copy

    from upsr_core import UPSRModel
    from upsr_core.stages import estimate_maps

    lr = torch.rand(2, 3, 8, 8)
    n = starting_noise(0, 2, (8, 8))
    fast = enable_fast(UPSRModel(copy.deepcopy(model.denoiser), copy.deepcopy(model.estimator)))
    for m in (model, fast):
        with pytest.raises(ValueError, match="same_noise=True chooses how the noise is made from the seed"):
            m.upscale(lr, noise=n, same_noise=True)
    est = model.estimate(lr)
    with pytest.raises(ValueError, match="same_noise=True"):
        model.denoise(est, weight_noise(est.uncertainty()), noise=n, same_noise=True)
    with pytest.raises(ValueError, match="block=256 sets ATD's block size; another estimator runs on whole images"):
        estimate_maps(model, lr, estimator=lambda x: torch.nn.functional.interpolate(x, scale_factor=4), block=256)


# ------------------------------------------------------------------ 2026-11-28 security review
def test_model_files_that_declare_more_than_they_hold_are_refused_before_building(model, tmp_path):
    """A small file could ask the loader for terabytes: stride-0 views in a .pth (87 KB declaring
    1.2 TB), sizes in the metadata, or a parameter count beyond any UPSR net. Refused with
    UnsupportedCheckpointError before the net is allocated."""
    from safetensors import safe_open

    from upsr_core.checkpoint import MAX_NET_PARAMS, read_checkpoint
    from upsr_core.config import DenoiserConfig

    sd = {f"denoiser.{k}": v for k, v in model.denoiser.state_dict().items()}
    sd |= {f"estimator.{k}": v for k, v in model.estimator.state_dict().items()}
    bomb = dict(sd)
    bomb["denoiser.time_embed.0.weight"] = torch.zeros(1).expand(4 * 32768, 32768)  # 4 bytes of storage
    torch.save(bomb, tmp_path / "stride0.pth")
    with pytest.raises(UnsupportedCheckpointError, match=r"declares more elements than its storage holds"):
        read_checkpoint(tmp_path / "stride0.pth")
    # an index outside the size: torch >= 2.14 refuses it inside torch.load (weights_only checks sparse
    # invariants), torch 2.13 leaves it to the loader's own check; one inside reaches that check on both
    dense_only = r"is not a dense CPU tensor \(layout torch.sparse_coo"
    for index, match in ((10**7, dense_only + "|size is inconsistent with indices"), (1, dense_only)):
        sparse = dict(sd)
        sparse["estimator.conv_first.bias"] = torch.sparse_coo_tensor(torch.tensor([[index]]), torch.ones(1), (4,),
                                                                       check_invariants=False)
        torch.save(sparse, tmp_path / "sparse.pth")
        with pytest.raises(UnsupportedCheckpointError, match=match):
            read_checkpoint(tmp_path / "sparse.pth")
    for key in ("estimator.conv_first.weight", "denoiser.input_blocks.0.0.weight"):  # sizes are inferred from these
        empty = dict(sd)
        empty[key] = torch.zeros(sd[key].shape[0], 0, *sd[key].shape[2:])
        torch.save(empty, tmp_path / "empty.pth")  # error audit 2026-11-28: a ZeroDivisionError traceback
        with pytest.raises(UnsupportedCheckpointError, match=rf"tensor '{key}' has shape \(\d+, 0, 3, 3\): a "
                                                             "zero-size dimension is not a weight of these nets"):
            read_checkpoint(tmp_path / "empty.pth")

    good = tmp_path / "m.safetensors"
    save_converted(good, model.denoiser, model.estimator)
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    den = json.loads(meta["denoiser_config"])
    atd = json.loads(meta["estimator_config"])
    cases = [
        ("denoiser_config", {**den, "model_channels": 32768}, r"above what this project builds.*channels <= 1024"),
        ("denoiser_config", {**den, "swin_depth": 10**6}, r"swin_depth <= 32"),
        ("estimator_config", {**atd, "category_size": 10**9}, r"category_size <= 4096"),
        ("denoiser_config", "[" * 100_000, r"RecursionError"),
        ("denoiser_config", {**den, "model_channels": 10**40}, r"model_channels"),
        # within every bound, but 8.6 G parameters: the meta-device probe counts them first
        ("denoiser_config", {**den, "model_channels": 1024, "channel_mult": [16] * len(den["channel_mult"])},
         rf"parameters, more than this loader builds \({MAX_NET_PARAMS:,}"),
    ]
    for key, value, match in cases:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata=meta | {key: value if isinstance(value, str) else json.dumps(value)})
        with pytest.raises(UnsupportedCheckpointError, match=match):
            load_upsr(bad)
    assert DenoiserConfig(model_channels=1024).model_channels == 1024  # the bounds leave room


def test_atd_config_from_many_keys_is_linear(monkeypatch):
    """The ATD layout was read with one regex pass over all keys per residual group (a 2.3 MB file of
    zero-size tensors took 26 s; ~40 min extrapolated for 6 MB): the number of key matches must grow
    with the keys, not with keys × groups (counted, not timed)."""
    from upsr_core import config

    sd = dict(tiny_upsr().estimator.state_dict())
    n0 = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    extra = {f"layers.{b}.residual_group.layers.0.attn_win.relative_position_bias_table": torch.zeros(0, 2)
             for b in range(n0, 3000)}
    calls = []
    monkeypatch.setattr(config.re, "match", lambda *a, **k: calls.append(1) or _match(*a, **k))
    with pytest.raises(ValueError, match=r"levels <= 32"):  # and then refused: no UPSR estimator has 3000
        config.atd_config_from_state_dict(sd | extra, category_size=16)
    keys = len(sd) + len(extra)
    assert len(calls) <= 3 * keys, (len(calls), keys)  # quadratic: ~3000 × keys


_match = re.match


# ------------------------------------------------------------------ 2026-11-29 house-rules review
def _bicubic_g(scale: float = 1.0, shift: float = 0.0, nan: bool = False):
    def g(x):
        y = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False) * scale + shift
        if nan:
            y[..., 0, 0] = float("nan")
        return y
    return g


@pytest.mark.parametrize("g, error, match", [
    (_bicubic_g(255.0), ValueError, r"the estimator must return values in \[0, 1\] .*got \[-?[0-9.]+, 2[0-9.]+\]"),
    (_bicubic_g(2.0, -1.0), ValueError, r"the estimator must return values in \[0, 1\] .*got \[-1"),
    (_bicubic_g(nan=True), ValueError, "the estimator returned NaN or Inf values"),
    (lambda x: x, ValueError, r"the estimator must upscale ×4 to \(1, 3, 32, 32\), got \(1, 3, 8, 8\)"),  # tiny: 8s
    (lambda x: None, TypeError, "the estimator must return a float tensor .* got NoneType"),
    (lambda x: (x * 255).to(torch.uint8), TypeError, "got a torch.uint8 tensor"),
])
def test_another_estimators_output_is_checked_before_it_becomes_the_estimate(model, g, error, match):
    """A g returning 0..255 became an estimate with ψ up to 127 (every w 1) and NaN surfaced later as
    "the denoiser produced NaN … the weights are broken"; None gave an AttributeError."""
    from upsr_core.pipeline import estimate
    from upsr_core.stages import estimate_maps

    lr = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(error, match=match):
        estimate(g, lr, model.multiple_of)
    with pytest.raises(error, match=match.replace("the estimator", "upscale_model")):
        estimate_maps(model, lr, estimator=g, estimator_name="upscale_model")


def test_another_estimators_overshoot_is_taken_as_it_is(model):
    from upsr_core.pipeline import estimate

    lr = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    est = estimate(_bicubic_g(1.2, -0.1), lr, model.multiple_of)  # ringing of a sharp ×4 model
    want = (torch.nn.functional.interpolate(lr_pm := pad_lr(lr, model.multiple_of), scale_factor=4, mode="bicubic",
                                            align_corners=False) * 0.5 + 0.5) * 1.2 - 0.1
    torch.testing.assert_close(est.sr_estimate, want, rtol=0, atol=1e-6)  # the [-1,1] round trip: float rounding
    assert lr_pm.shape == (1, 3, 8, 8)


def test_uncertainty_mask_refuses_what_is_no_psi(model):
    from upsr_core.stages import uncertainty_mask

    psi = torch.rand(1, 3, 8, 8) * 0.1
    torch.testing.assert_close(uncertainty_mask(psi), psi.mean(1, keepdim=True), rtol=0, atol=0)
    assert uncertainty_mask(psi + 2.0).unique().tolist() == [1.0]  # a mask's range; w is 1 from ψ_max on anyway
    with pytest.raises(ValueError, match=r"uncertainty ψ must be finite and >= 0, got values in \[-0\.9"):
        uncertainty_mask(psi - 1.0)  # came out as all zeros
    nan = psi.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        uncertainty_mask(nan)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) tensor, got shape \(3, 8, 8\)"):
        uncertainty_mask(psi[0])  # gave a (3, 1, 8) "mask"
    with pytest.raises(TypeError, match="got a torch.int64 tensor"):
        uncertainty_mask(psi.long())


def test_sample_maps_refuses_maps_of_another_range_or_dtype(model):
    from upsr_core.stages import estimate_maps, sample_maps, weight_map

    lr = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    sr, psi = estimate_maps(model, lr)
    w = weight_map(psi)
    with pytest.raises(ValueError, match=r"sr_estimate must hold values in \[0, 1\] .*got \[-?[0-9.]+, [0-9]{2,}"):
        sample_maps(model, lr, sr * 255, w, **TILE)  # returned an image
    with pytest.raises(TypeError, match="sr_estimate must be a float tensor in \\[0, 1\\] units, got a torch.int64"):
        sample_maps(model, lr, sr.round().long(), w, **TILE)
    with pytest.raises(TypeError, match="noise weight must be a float tensor .* got a torch.int64"):
        sample_maps(model, lr, sr, torch.ones_like(w, dtype=torch.long), **TILE)  # was taken as w ≡ 1


def test_nets_and_helpers_name_inputs_of_the_wrong_dtype_or_size(model):
    from upsr_core.pipeline import Estimate, bicubic_x4

    atd = model.estimator
    with pytest.raises(TypeError, match=r"x must be a float image in \[0, 1\], got dtype torch.uint8"):
        atd((torch.rand(1, 3, 8, 8) * 255).to(torch.uint8))  # returned values in [-125, 140]
    with pytest.raises(ValueError, match=r"x must be a non-empty \(B, 3, h, w\) image, got \(1, 3, 0, 8\)"):
        atd(torch.rand(1, 3, 0, 8))
    with pytest.raises(ValueError, match=r"lr must be a non-empty \(B, 3, h, w\) image, got shape \(1, 3, 0, 5\)"):
        pad_lr(torch.rand(1, 3, 0, 5))
    den, c = model.denoiser, model.denoiser.config
    m = model.multiple_of
    x, lq = torch.zeros(1, c.in_channels, m, m), torch.zeros(1, c.lq_channels, m, m)
    with pytest.raises(TypeError, match="timesteps must be integer step indices .* got dtype torch.float32"):
        den(x, torch.tensor([1.5]), lq)
    with pytest.raises(TypeError, match="x must be a float tensor, got dtype torch.int64"):
        den(x.long(), torch.tensor([1]), lq)
    lr_pm = pad_lr(torch.rand(1, 3, 6, 6), model.multiple_of)
    est = Estimate(lr_pm, bicubic_x4(lr_pm), bicubic_x4(lr_pm), (6, 6))
    w, n = torch.ones(1, 3, 4 * m, 4 * m), starting_noise(0, 1, (m, m))
    with pytest.raises(TypeError, match="schedule must be a ResShiftSchedule .* got str"):
        denoise_estimate(model.denoiser, est, w, n, schedule="x")  # an AttributeError from the sampler
    for size in ((0, 10), (10,), (10.5, 10)):
        with pytest.raises(ValueError, match=r"lr_size must be the LR \(h, w\), two integers >= 1"):
            model.working_memory(size)  # (0, 10) gave 0 bytes
    with pytest.raises(ValueError, match=r"got \(1, 4, 6, 6\) \(RGB only: drop an alpha channel, repeat a gray one\)"):
        model.upscale(torch.rand(1, 4, 6, 6), **TILE)  # the hint pad_lr had never reached upscale's callers


# ------------------------------------------------------------------ 2026-11-29 (session 34)
def test_estimator_memory_is_the_measured_activations_of_one_block():
    """ATD's share of a run's device memory (ComfyUI asked for none for it): per LR px of a block,
    90 B per channel + 3850 B per head in fp32 (fitted to the live tensors of one call counted on
    the CPU: 16.1 KB for the full-size ATD, 10.6 KB for the demo's; x 1.19, the denoiser's GPU /
    CPU-count ratio, + 1/4), 100 + 50 B as the fast path runs it (6.5 KB counted); the largest
    block with its margins, the image whole when it fits one; the larger of the two nets in a run."""
    from upsr_core.config import ATDConfig, DenoiserConfig
    from upsr_core.fast import FastUPSRModel
    from upsr_core.model import UPSRModel
    from upsr_core.nets import ATD, UPSRDenoiser
    from upsr_core.train.presets import get_preset

    def full(dtype=torch.float32, est_dtype=torch.float32, atd=ATDConfig()):
        with torch.device("meta"):  # full-size shapes, no memory
            return UPSRDenoiser(DenoiserConfig()).to(dtype), ATD(atd).to(est_dtype)

    full_px = 90 * 96 + 3850 * 4
    assert full_px == 24040  # 16.1 KB counted x 1.48
    m = UPSRModel(*full())
    assert m.estimator_memory((128, 128)) == 128 * 128 * full_px
    # 1000 x 700 pads to 1024 x 704: blocks of 512 get 32 px of context inside the image: 544 a side
    assert m.estimator_memory((1000, 700)) == 544 * 544 * full_px
    assert m.estimator_memory((1000, 700), block=128) == (128 + 64) ** 2 * full_px  # inner blocks: both margins
    assert m.estimator_memory((128, 128), images=3) == 3 * 128 * 128 * full_px
    assert UPSRModel(*full(est_dtype=torch.bfloat16)).estimator_memory((128, 128)) == 128 * 128 * full_px // 2
    demo = UPSRModel(*full(atd=get_preset("small").estimator))
    assert demo.estimator_memory((128, 128)) == 128 * 128 * (90 * 48 + 3850 * 3)  # 15.9 KB: 10.6 counted x 1.48
    assert UPSRModel(full()[0], None).estimator_memory((128, 128)) == 0
    # in a run: the larger of the two (they do not run at once)
    assert m.working_memory((128, 128), estimator_block=512) == max(m.working_memory((128, 128)),
                                                                   m.estimator_memory((128, 128)))
    fast = FastUPSRModel.__new__(FastUPSRModel)  # its memory rule alone (enable_fast cannot prepare meta nets)
    fast.__dict__.update(vars(UPSRModel(*full(torch.float16), dtype=torch.float16)))
    assert fast.estimator_memory((64, 64), images=8) == 8 * 64 * 64 * (100 * 96 + 50 * 4)  # 9.8 KB: 6.5 x 1.48
    den_call = 8 * 64 * 64 * 7000 * 2  # the denoiser too: all 8 images in its call (it counted one 64² tile)
    canvas = (3 * 8 + 1) * 256 * 256 * 4  # the fast path's output canvases and norm stay on the device
    assert fast.working_memory((64, 64), batch=8, estimator_block=512) == \
        max(den_call, fast.estimator_memory((64, 64), images=8)) + canvas
    assert fast.working_memory((64, 64), batch=8) == 64 * 64 * 7000 * 2 + canvas  # denoise: one at a time
    with pytest.raises(ValueError, match="block must be an integer >= 1, got 0"):
        m.estimator_memory((64, 64), block=0)
    with pytest.raises(ValueError, match="estimator_block must be an integer >= 1, got 0"):
        m.working_memory((64, 64), estimator_block=0)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("b,hw,tile,tile_batch,block", [
    (4, (16, 16), 512, 2, 512), (3, (20, 12), 512, 1, 8), (2, (40, 24), 16, 3, 512), (1, (40, 72), 16, 2, 16)])
def test_the_memory_rule_counts_what_upscale_runs_at_once(fast, b, hw, tile, tile_batch, block):
    """The pixels the rule assumes in one call of each net are the largest a real upscale makes:
    a batch of small images in one fast call, one image at a time otherwise, a tile batch, a block
    with its margins."""
    from upsr_core.model import ESTIMATOR_MARGIN, _context_window
    from upsr_core.pipeline import padded_size
    from upsr_core.tiling import partition

    from _support import tiny_upsr

    m = tiny_upsr()
    if fast:
        m = enable_fast(m)
    seen = {"den": 0, "est": 0}

    def record(name):
        return lambda mod, args, out: seen.__setitem__(name, max(seen[name], args[0].shape[0] * args[0].shape[-2]
                                                                  * args[0].shape[-1]))

    hooks = [m.denoiser.register_forward_hook(record("den")), m.estimator.register_forward_hook(record("est"))]
    step = m.denoiser.forward_step  # the fast path's denoiser calls (no forward hook sees them)
    m.denoiser.forward_step = lambda x, *a: record("den")(None, (x,), None) or step(x, *a)
    try:
        m.upscale(torch.rand(b, 3, *hw), tile=tile, overlap=4, tile_batch=tile_batch, estimator_block=block)
    finally:
        for h in hooks:
            h.remove()
        del m.denoiser.forward_step
    hp, wp = padded_size(*hw, m.multiple_of)
    kw = dict(batch=b, tile=tile, tile_batch=tile_batch, estimator_block=block)
    images = m._images_at_once(hp, wp, **kw)
    assert seen["den"] == m._denoiser_px(hp, wp, images, tile=tile, tile_batch=tile_batch)
    est_px = images * max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in
                          (_context_window(blk, ESTIMATOR_MARGIN, hp, wp) for blk in partition(hp, wp, block)))
    assert seen["est"] <= est_px and (seen["est"] == est_px or block < max(hp, wp))


def test_the_activation_counter_behind_those_constants_counts_live_storages():
    """tools/activation_memory.py's LivePeak: the peak of the summed sizes of the tensors alive at
    once (views of a counted storage not again; freed tensors no longer)."""
    from _support import load_tool

    am = load_tool("activation_memory")
    with am.LivePeak() as p:
        a = torch.zeros(1000)  # 4000 B
        b = a + 1  # 4000 B more: 8000 alive
        v = b[:10].clone()  # 40 B: 8040
        del a  # 4040 alive
        c = torch.zeros(500) * 2  # a temporary of 2000 B and c, 2000 B: 8040 at most
        assert p.now == 4040 + 2000
    assert p.peak == 8040 and (b.numel(), v.numel(), c.numel()) == (1000, 10, 500)
