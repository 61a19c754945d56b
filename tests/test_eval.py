"""Metrics on known values, NIQE plumbing, and the eval CLI on a tiny folder with a tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from upsr_core.checkpoint import save_converted
from upsr_core.cli import main
from upsr_core.evaluate import (
    _means,
    lr_files,
    manifest_entries,
    manifest_ids,
    mod_crop,
    pair_files,
    paired,
    paired_table,
    run_methods,
    table,
)
from upsr_core.imageio import read_image, write_png
from upsr_core.metrics import psnr, rgb_to_y, ssim, to_uint8_levels
from upsr_core.model import load_upsr
from upsr_core.niqe import (
    NIQEUnavailable,
    _resize_matrix,
    find_niqe_params,
    load_niqe_params,
    matlab_resize_half,
    niqe,
)
from upsr_core.pipeline import bicubic_x4, default_weight
from upsr_core.train.denoiser import build_denoiser_net
from upsr_core.train.estimator import build_estimator_net
from upsr_core.train.presets import get_preset


def test_psnr_identical_is_inf_and_known_mse():
    a = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(a, a)).all()
    b = torch.zeros(1, 3, 8, 8)
    c = b + 5 / 255  # MSE = 25 on the 0-255 scale
    assert float(psnr(c, b)[0]) == pytest.approx(10 * math.log10(255**2 / 25))
    assert float(psnr(c, b, y_channel=True)[0]) > float(psnr(c, b)[0])  # Y scales differences by < 1


def test_ssim_identical_is_one_and_drops_with_noise():
    a = torch.rand(1, 3, 32, 32)
    assert float(ssim(a, a)[0]) == pytest.approx(1.0)
    assert float(ssim(a, a, y_channel=True)[0]) == pytest.approx(1.0)
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert float(ssim(noisy, a)[0]) < 0.9
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, a[..., :16])


def test_metrics_run_in_float64_where_the_images_are_except_on_mps():
    """float64 on the images' device (CUDA, CPU); MPS has no float64 (`.double()` raises there),
    so MPS images are measured on the CPU (no Mac here: the device choice is what is tested)."""
    from upsr_core.metrics import float64_device

    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device(torch.device("cpu")) == torch.device("cpu")
    a = torch.rand(1, 3, 16, 16)
    assert psnr(a, a.clamp(0.1, 0.9)).dtype == torch.float64


def test_rgb_to_y_range_and_quantise():
    assert float(rgb_to_y(torch.ones(1, 3, 1, 1))) * 255 == pytest.approx(235.0, abs=1e-3)
    assert float(rgb_to_y(torch.zeros(1, 3, 1, 1))) * 255 == pytest.approx(16.0)
    q = to_uint8_levels(torch.tensor([-0.1, 0.5, 1.2]))
    torch.testing.assert_close(q, torch.tensor([0.0, 128 / 255, 1.0]))


def test_matlab_half_resize_rows_and_constant():
    m = _resize_matrix(10, 0.5)
    assert m.shape == (5, 10)
    torch.testing.assert_close(m.sum(1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(matlab_resize_half(torch.full((8, 6), 3.0, dtype=torch.float64)),
                               torch.full((4, 3), 3.0, dtype=torch.float64))


def _niqe_probe() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    base = F.interpolate(torch.rand(1, 3, 24, 24, generator=g), size=(288, 288), mode="bicubic", align_corners=False)
    return (base + 0.1 * torch.rand(1, 3, 288, 288, generator=g)).clamp(0, 1)


_REPO_NIQE = Path(__file__).resolve().parents[1] / ".devcarry" / "niqe" / "niqe_pris_params.npz"


@pytest.mark.skipif(find_niqe_params() is None and not _REPO_NIQE.is_file(),
                    reason="the official NIQE parameters are not on this machine (pip install --no-deps iqa-torch, "
                           "or set UPSR_NIQE_PARAMS)")
def test_niqe_matches_iqa_torch():
    """Values of iqa-torch 1.2.1's ``niqe`` (float32; the official MATLAB release re-implemented) on
    one fixed image: its default gray luma, its YCbCr-Y (test_y_channel=True) and a 4-px border
    crop, recorded 2026-11-27. Tolerance 1e-5: the luma is iqa-torch's float32 one (its .5 ties), the rest
    is float64 here and float32 there (4.7e-7 apart on 26 images, 2026-11-28)."""
    params = load_niqe_params(find_niqe_params() or _REPO_NIQE)
    img = _niqe_probe()
    assert float(niqe(img, params)[0]) == pytest.approx(14.61030102, abs=1e-5)
    assert float(niqe(img, params, luma="y")[0]) == pytest.approx(14.23740768, abs=1e-5)
    assert float(niqe(img, params, crop_border=4)[0]) == pytest.approx(12.87820721, abs=1e-5)


def test_niqe_luma_is_matlab_rgb2gray_by_default(tmp_path):
    """The default luma is rgb2gray's 0.299/0.587/0.114 on 0-255 (not YCbCr's 16-235): an image
    whose gray is a given plane scores as that plane does, as an (R=G=B) image of it."""
    p = tmp_path / "params.npz"
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    np.savez(p, mu_pris_param=np.ones((1, 36)), cov_pris_param=np.eye(36),
             gaussian_window=np.outer(g, g) / g.sum() ** 2)
    params = load_niqe_params(p)
    img = _niqe_probe()
    x = img.float()  # as niqe computes: float32, as pyiqa and iqa-torch
    gray = torch.einsum("bchw,c->bhw", x, torch.tensor([0.299, 0.587, 0.114])).clamp(0, 1).double()
    same = torch.round(gray * 255) / 255
    assert float(niqe(img, params)[0]) == pytest.approx(float(niqe(same.expand(1, 3, -1, -1), params)[0]), abs=1e-9)
    assert float(niqe(img, params, luma="y")[0]) != pytest.approx(float(niqe(img, params)[0]), abs=1e-3)
    with pytest.raises(ValueError, match="luma must be 'gray' or 'y', got 'yiq'"):
        niqe(img, params, luma="yiq")


def test_niqe_with_a_parameter_file(tmp_path, monkeypatch):
    p = tmp_path / "params.npz"
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    np.savez(p, mu_pris_param=np.ones((1, 36)), cov_pris_param=np.eye(36), gaussian_window=win)
    params = load_niqe_params(p)
    img = torch.rand(2, 3, 200, 200)
    q = niqe(img, params)
    assert q.shape == (2,) and torch.isfinite(q).all()
    with pytest.raises(ValueError, match="at least 96"):
        niqe(torch.rand(1, 3, 64, 64), params)
    monkeypatch.setenv("UPSR_NIQE_PARAMS", str(tmp_path / "missing.npz"))
    with pytest.raises(NIQEUnavailable, match="iqa-torch"):
        load_niqe_params()


@pytest.fixture()
def tiny_pairs(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    for i in range(2):
        hr = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(hr).save(tmp_path / "hr" / f"img{i}.png")
        Image.fromarray(hr).resize((16, 16), Image.BICUBIC).save(tmp_path / "lr" / f"img{i}.png")
    torch.manual_seed(0)
    p = get_preset("tiny")
    model = tmp_path / "tiny.safetensors"
    save_converted(model, build_denoiser_net(p.denoiser).eval(), build_estimator_net(p.estimator).eval())
    return tmp_path, model


def test_eval_crops_an_hr_up_to_3_px_larger_than_x4_as_basicsr(tiny_pairs, monkeypatch, caplog, capsys):
    """An HR of 4h+3 × 4w+1 is cut to 4h × 4w at the top left (BasicSR's test sets) and scores as
    the pre-cut HR does; 4 px more is an error naming both sizes."""
    import logging

    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    hr = np.asarray(Image.open(root / "hr" / "img0.png"))
    wide = np.pad(hr, ((0, 3), (0, 1), (0, 0)), mode="reflect")
    (root / "hr_big").mkdir()
    Image.fromarray(wide).save(root / "hr_big" / "img0.png")
    argv = ["eval", "--lr", str(root / "lr"), "--model", str(model), "--device", "cpu", "--sheet", "0",
            "--limit", "1", "--method", "bicubic,estimator"]
    assert main([*argv, "--hr", str(root / "hr"), "--out", str(root / "a")]) == 0
    with caplog.at_level(logging.INFO, logger="upsr_core.evaluate"):
        assert main([*argv, "--hr", str(root / "hr_big"), "--out", str(root / "b")]) == 0
    assert "img0.png: HR (67, 65) cropped to (64, 64)" in caplog.text
    a, b = (json.loads((root / d / "results.json").read_text())["mean"] for d in "ab")
    assert a == b
    Image.fromarray(np.pad(hr, ((0, 4), (0, 0), (0, 0)), mode="reflect")).save(root / "hr_big" / "img0.png")
    assert main([*argv, "--hr", str(root / "hr_big"), "--out", str(root / "c")]) != 0
    err = capsys.readouterr().err
    assert f"img0.png: HR (68, 64) is not ×4 of LR (16, 16) ({root / 'lr' / 'img0.png'}) (or up to 3 px more)" in err
    with pytest.raises(ValueError, match=r"img0.png: HR \(64, 60\) is not ×4 of LR \(16, 16\)"):
        mod_crop(torch.zeros(1, 3, 64, 60), (16, 16), "img0.png")


def test_crop_border_reaches_every_metric(tiny_pairs, tmp_path):
    """evaluate(crop_border=c) scores PSNR, SSIM and NIQE on the image without c px per side."""
    from upsr_core.evaluate import evaluate, pair_files
    from upsr_core.imageio import read_image

    root, _ = tiny_pairs
    big = tmp_path / "big"
    for d in ("hr", "lr"):
        (big / d).mkdir(parents=True)
    rng = np.random.default_rng(2)
    hr = (rng.random((440, 440, 3)) * 255).astype(np.uint8)
    Image.fromarray(hr).save(big / "hr" / "a.png")
    Image.fromarray(hr).resize((110, 110), Image.BICUBIC).save(big / "lr" / "a.png")
    p = tmp_path / "params.npz"
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    np.savez(p, mu_pris_param=np.ones((1, 36)), cov_pris_param=np.eye(36),
             gaussian_window=np.outer(g, g) / g.sum() ** 2)
    params = load_niqe_params(p)
    means, _ = evaluate(None, pair_files(big / "hr", big / "lr"), ["bicubic"], crop_border=8, niqe_params=params)
    sr = run_methods(None, read_image(big / "lr" / "a.png").rgb[None], ["bicubic"], 0)["bicubic"]
    ref = read_image(big / "hr" / "a.png").rgb[None]
    c = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert means["bicubic"]["niqe"] == pytest.approx(float(niqe(sr[c], params)[0]), abs=1e-9)
    assert means["bicubic"]["psnr"] == pytest.approx(float(psnr(sr[c], ref[c])[0]), abs=1e-9)
    assert means["bicubic"]["ssim"] == pytest.approx(float(ssim(sr[c], ref[c])[0]), abs=1e-9)


def test_gray_pairs_are_scored_as_the_grayscale_png_upscale_writes(tiny_pairs, tmp_path):
    from upsr_core.evaluate import evaluate, pair_files
    from upsr_core.imageio import read_image, write_png
    from upsr_core.metrics import psnr
    from upsr_core.pipeline import crop_hr

    root, model_file = tiny_pairs
    for d in ("hr", "lr"):
        for f in (root / d).iterdir():
            Image.open(f).convert("L").save(f)
    model = load_upsr(model_file, device="cpu")
    _, rows = evaluate(model, pair_files(root / "hr", root / "lr"), ["estimator"], niqe_params=None)
    for row in rows:
        lr = read_image(root / "lr" / f"{row['image']}.png")
        est = model.estimate(lr.rgb[None])
        sr = crop_hr(est.sr_estimate, est.size)[0]
        assert (sr[0] - sr[1]).abs().max() > 1 / 255  # the net's output has colour
        write_png(tmp_path / "sr.png", sr, gray=True)  # what upscale writes for a gray input
        saved = read_image(tmp_path / "sr.png").rgb[None]
        hr = read_image(root / "hr" / f"{row['image']}.png").rgb[None]
        # it scored the colour output (0.13 dB from the written file in a probe's pair)
        assert row["metrics"]["estimator"]["psnr"] == pytest.approx(float(psnr(saved, hr)[0]), abs=1e-9)


def test_eval_cli_tiny(tiny_pairs, monkeypatch):
    root, model = tiny_pairs
    monkeypatch.delenv("UPSR_NIQE_PARAMS", raising=False)  # no file anywhere: NIQE skipped with a warning
    monkeypatch.setattr("upsr_core.niqe.find_niqe_params", lambda: None)
    out = root / "ev"
    rc = main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out", str(out),
               "--device", "cpu", "--sheet", "1", "--limit", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["mean"]) == {"bicubic", "estimator", "upsr_w1", "upsr"}
    assert {"psnr", "psnr_y", "ssim", "ssim_y"} <= set(res["mean"]["upsr"])
    assert len(res["per_image"]) == 1 and not res["info"]["niqe"]
    assert Image.open(out / "contact_sheet.png").size == (192 * 6, 16 + 192)
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--method", "nope"]) == 2


def test_upsr_cf_is_the_upsr_sample_colour_fixed_and_not_a_default(tiny_pairs, monkeypatch):
    from upsr_core.colorfix import wavelet_color_fix
    from upsr_core.evaluate import ALL_METHODS, METHODS

    assert "upsr_cf" in ALL_METHODS and "upsr_cf" not in METHODS  # not in the official pipeline: asked for
    root, model = tiny_pairs
    m = load_upsr(model, device="cpu")
    lr = read_image(root / "lr" / "img0.png").rgb[None]
    both = run_methods(m, lr, ["upsr", "upsr_cf"], 3)
    alone = run_methods(m, lr, ["upsr_cf"], 3)  # the official sample is drawn for it
    raw = m.denoise(m.estimate(lr), default_weight(m.estimate(lr)), seed=3)
    want = to_uint8_levels(wavelet_color_fix(raw.clamp(0, 1), lr))
    assert torch.equal(both["upsr_cf"], want) and torch.equal(alone["upsr_cf"], want)
    assert torch.equal(both["upsr"], to_uint8_levels(raw.clamp(0, 1)))
    monkeypatch.setattr("upsr_core.niqe.find_niqe_params", lambda: None)
    out = root / "ev"
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out", str(out),
                 "--device", "cpu", "--sheet", "0", "--method", "bicubic,upsr,upsr_cf", "--seeds", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["mean"]) == ["bicubic", "upsr", "upsr_cf"]
    assert set(res["paired"]["bicubic"]) == {"upsr", "upsr_cf"}
    assert set(res["per_image"][0]["per_seed"]) == {"upsr", "upsr_cf"}  # sampled, as the noise it fixes


def test_eval_leaves_non_finite_values_out_of_every_methods_mean(tiny_pairs, monkeypatch, caplog):
    """An HR that is exactly the bicubic ×4 of its LR gives bicubic PSNR ∞ there: that image leaves
    the PSNR means of every method (so they compare the same images), is named in the log, in
    results.md and in results.json (strict JSON: the value is null, no Infinity token)."""
    import logging

    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    lr = read_image(root / "lr" / "img1.png").rgb[None]
    write_png(root / "hr" / "img1.png", to_uint8_levels(bicubic_x4(lr))[0])
    out = root / "ev"
    with caplog.at_level(logging.WARNING, logger="upsr_core.evaluate"):
        rc = main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out",
                   str(out), "--device", "cpu", "--sheet", "0", "--method", "bicubic,estimator"])
    assert rc == 0
    text = (out / "results.json").read_text()
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    rows = {r["image"]: r["metrics"] for r in res["per_image"]}
    assert rows["img1"]["bicubic"]["psnr"] is None  # ∞
    assert rows["img1"]["bicubic"]["ssim"] == pytest.approx(1.0, abs=1e-12)  # identical (float64 rounding)
    assert res["info"]["left_out_of_means"] == {"psnr": ["img1"], "psnr_y": ["img1"]}
    for m in ("bicubic", "estimator"):
        assert res["mean"][m]["psnr"] == rows["img0"][m]["psnr"]  # img0 alone, for both methods
        assert res["mean"][m]["ssim"] == pytest.approx((rows["img0"][m]["ssim"] + rows["img1"][m]["ssim"]) / 2)
    assert "psnr: left out of the means (not finite for some method): img1" in (out / "results.md").read_text()
    assert "psnr is not finite for 1 image(s) (img1" in caplog.text
    # image by image against bicubic, over the same images as the means
    (cmp,) = res["paired"].values()
    assert list(res["paired"]) == ["bicubic"] and list(cmp) == ["estimator"]
    assert cmp["estimator"]["psnr"]["n"] == 1 and cmp["estimator"]["psnr"]["se"] is None  # NaN: one image
    assert cmp["estimator"]["psnr"]["diff"] == pytest.approx(res["mean"]["estimator"]["psnr"]
                                                             - res["mean"]["bicubic"]["psnr"])
    assert cmp["estimator"]["ssim"]["n"] == 2
    assert "| against bicubic | psnr | psnr_y | ssim | ssim_y |" in (out / "results.md").read_text()


def test_table_shows_a_mean_without_finite_values_as_a_dash():
    rows = [{"image": "flat", "metrics": {"bicubic": {"niqe": math.nan, "psnr": 20.0}}}]
    means = _means(rows)
    assert math.isnan(means["bicubic"]["niqe"]) and means["bicubic"]["psnr"] == 20.0
    assert table(means).splitlines()[-1] == "| bicubic | – | 20.000 |"


def test_paired_differences_their_standard_error_and_the_images_better():
    """paired() by hand: differences 1 and 3 dB give +2 ± stdev/√2 = 1; NIQE counts lower as
    better; an image whose PSNR is not finite for any method leaves that metric's comparison, as it
    leaves its means; the reference itself is no row, and a missing reference gives {}."""
    rows = [{"image": "a", "metrics": {"bicubic": {"psnr": 20.0, "niqe": 9.0}, "upsr": {"psnr": 21.0, "niqe": 8.0}}},
            {"image": "b", "metrics": {"bicubic": {"psnr": 22.0, "niqe": 9.0}, "upsr": {"psnr": 25.0, "niqe": 9.5}}},
            {"image": "c", "metrics": {"bicubic": {"psnr": math.inf, "niqe": 7.0}, "upsr": {"psnr": 30.0,
                                                                                             "niqe": 7.0}}}]
    cmp = paired(rows)
    assert list(cmp) == ["upsr"]
    assert cmp["upsr"]["psnr"] == {"diff": 2.0, "se": 1.0, "better": 2, "n": 2}
    niqe = cmp["upsr"]["niqe"]
    assert (niqe["diff"], niqe["better"], niqe["n"]) == (pytest.approx(-1 / 6), 1, 3)  # -1, +0.5, 0
    assert niqe["se"] == pytest.approx(math.sqrt(7 / 12) / math.sqrt(3))  # stdev of (-1, 0.5, 0)
    assert paired(rows, "estimator") == {}
    assert paired(rows[:1])["upsr"]["psnr"]["se"] != paired(rows[:1])["upsr"]["psnr"]["se"]  # NaN: one image
    assert paired_table(cmp).splitlines() == ["| against bicubic | psnr | niqe |", "|---|---|---|",
                                              "| upsr | +2.000 ± 1.000 (2/2) | -0.167 ± 0.441 (1/3) |"]
    assert paired_table(paired(rows[:1])).splitlines()[-1] == "| upsr | +1.000 (1/1) | -1.000 (1/1) |"
    assert paired_table({}) == ""


def test_eval_sweeps_the_weighting_function(tiny_pairs, monkeypatch):
    """--b-u/--psi-max lists: one upsr row per pair, the official pair still named 'upsr'; b_u = 1 is
    w ≡ 1 whatever ψ_max, so its row equals upsr_w1 exactly (same ε)."""
    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    out = root / "sweep"
    rc = main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out", str(out),
               "--device", "cpu", "--sheet", "1", "--method", "upsr_w1,upsr", "--b-u", "0.4,1", "--psi-max",
               "0.05,0.2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["mean"]) == ["upsr_w1", "upsr", "upsr b_u=0.4 psi_max=0.2", "upsr b_u=1 psi_max=0.05",
                                 "upsr b_u=1 psi_max=0.2"]
    assert res["info"]["b_u_psi_max"] == [[0.4, 0.05], [0.4, 0.2], [1.0, 0.05], [1.0, 0.2]]
    assert res["mean"]["upsr b_u=1 psi_max=0.05"] == res["mean"]["upsr_w1"]
    assert res["mean"]["upsr b_u=1 psi_max=0.2"] == res["mean"]["upsr_w1"]
    assert res["mean"]["upsr"] != res["mean"]["upsr b_u=0.4 psi_max=0.2"]
    assert Image.open(out / "contact_sheet.png").size == (192 * 7, 16 + 192)
    # image by image: no bicubic row asked for, so only UPSR against UPSR with w ≡ 1 (every weighting)
    assert list(res["paired"]) == ["upsr_w1"]
    assert list(res["paired"]["upsr_w1"]) == list(res["mean"])[1:]
    assert res["paired"]["upsr_w1"]["upsr b_u=1 psi_max=0.2"]["psnr"] == {"diff": 0.0, "se": 0.0, "better": 0,
                                                                         "n": 2}
    psnr = {r["image"]: r["metrics"]["upsr"]["psnr"] - r["metrics"]["upsr_w1"]["psnr"] for r in res["per_image"]}
    assert res["paired"]["upsr_w1"]["upsr"]["psnr"]["diff"] == pytest.approx(sum(psnr.values()) / 2)
    md = (out / "results.md").read_text()
    assert "| against upsr_w1 | psnr | psnr_y | ssim | ssim_y |" in md and "against bicubic" not in md


def test_eval_seeds_average_the_noisy_methods_over_samples(tiny_pairs, monkeypatch, capsys):
    """--seeds 3 --seed 5: upsr and upsr_w1 are scored on seeds 5, 6, 7 and each image's row holds
    the mean; every sample's scores are kept (per_seed), each equal to a one-seed run with that
    seed; bicubic, which has no noise, runs once. A last seed past 2**63 − 1 is refused before
    the model loads."""
    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")

    def run(out: str, *extra: str) -> dict:
        assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out",
                     str(root / out), "--device", "cpu", "--sheet", "0", "--method", "bicubic,upsr_w1,upsr",
                     *extra]) == 0
        return json.loads((root / out / "results.json").read_text())

    three = run("s3", "--seed", "5", "--seeds", "3")
    assert three["info"]["seed"] == 5 and three["info"]["seeds"] == 3
    singles = [run(f"s{k}", "--seed", str(k)) for k in (5, 6, 7)]
    for i, row in enumerate(three["per_image"]):
        assert set(row["per_seed"]) == {"upsr_w1", "upsr"}  # bicubic: no noise, one run
        for m in ("upsr_w1", "upsr"):
            assert row["per_seed"][m] == [one["per_image"][i]["metrics"][m] for one in singles]
            for k, v in row["metrics"][m].items():
                assert v == pytest.approx(sum(s[k] for s in row["per_seed"][m]) / 3, rel=1e-12)
        assert row["metrics"]["bicubic"] == singles[0]["per_image"][i]["metrics"]["bicubic"]
    assert three["per_image"][0]["metrics"]["upsr"] != singles[0]["per_image"][0]["metrics"]["upsr"]
    assert "per_seed" not in singles[0]["per_image"][0]
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(root / "missing.pth"),
                 "--seed", str(2**63 - 1), "--seeds", "2", "--out", str(root / "bad")]) == 2
    assert f"the last seed, {2**63}, is past 2**63 − 1" in capsys.readouterr().err


@pytest.mark.parametrize("b_u,psi_max,match", [("0.4,x", "0.05", "comma list of numbers, got '0.4,x'"),
                                               ("", "0.05", "--b-u is empty"),
                                               ("1.5", "0.05", "--b-u / --psi-max: b_u must be in"),
                                               ("0.4", "0", "psi_max must be"),
                                               ("0.4", "0.05,0.7", r"--psi-max must be in \(0, 0.5\] \(a computed "
                                                                   r"ψ never exceeds 0.5\), got 0.7"),
                                               ("0.4,0.4", "0.05", "repeat a value")])
def test_eval_grid_rejects_bad_values(b_u, psi_max, match):
    from upsr_core.evaluate import parse_grid

    with pytest.raises(ValueError, match=match):
        parse_grid(b_u, psi_max)


@pytest.mark.parametrize("bad, match", [
    (lambda a: a * 255, r"must hold values in \[0, 1\], got \[.*, 25\d"),     # 8-bit levels as float
    (lambda a: a * 2 - 1, r"must hold values in \[0, 1\], got \[-"),           # [-1, 1] convention
    (lambda a: a.masked_fill(a > 0.5, float("nan")), "NaN or Inf"),
])
def test_metrics_refuse_images_outside_unit_range(bad, match):
    # Before: psnr/ssim scaled 0-255 input by 255 again and returned a plausible wrong number;
    # NIQE clamped it to an all-white image. The ±0.05 slack keeps raw network overshoot usable.
    a = torch.rand(1, 3, 96, 96)
    for fn in (lambda x: psnr(x, a), lambda x: ssim(a, x), lambda x: niqe(x, None)):
        with pytest.raises(ValueError, match=match):
            fn(bad(a))
    with pytest.raises(TypeError, match="uint8"):
        psnr((a * 255).to(torch.uint8), a)
    assert torch.isfinite(psnr(a * 1.04 - 0.02, a)).all()  # overshoot within the slack is measured


def _flat_niqe_params(path: Path):
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    np.savez(path, mu_pris_param=np.ones((1, 36)), cov_pris_param=np.eye(36),
             gaussian_window=np.outer(g, g) / g.sum() ** 2)
    return path


def test_eval_without_hr_is_a_no_reference_run(tiny_pairs, tmp_path):
    """No --hr: every LR image is scored by NIQE alone (the paper's RealSet65 column), with the
    same values NIQE gives the methods' outputs directly; the sheet has no HR column and keeps
    a 32×24 image's aspect (white letterbox)."""
    from upsr_core.imageio import read_image

    root, model = tiny_pairs
    lr_dir = tmp_path / "lr_only"
    lr_dir.mkdir()
    rng = np.random.default_rng(5)
    for name, (h, w) in {"wide": (24, 32), "tall": (32, 24)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(lr_dir / f"{name}.png")
    (lr_dir / "notes.txt").write_text("not an image")
    params = _flat_niqe_params(tmp_path / "p.npz")
    out = tmp_path / "nr"
    assert main(["eval", "--lr", str(lr_dir), "--model", str(model), "--out", str(out), "--device", "cpu",
                 "--niqe-params", str(params), "--sheet", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["info"]["hr"] is None and res["info"]["pairs"] == 2
    assert [r["image"] for r in res["per_image"]] == ["tall", "wide"]
    assert all(set(m) == {"niqe"} for m in res["mean"].values())
    assert "2 images, no reference" in (out / "results.md").read_text()
    lr = read_image(lr_dir / "wide.png").rgb[None]
    outs = run_methods(load_upsr(model, device="cpu"), lr, ["bicubic", "estimator", "upsr_w1", "upsr"], 0)
    want = {m: float(niqe(sr, load_niqe_params(params))[0]) for m, sr in outs.items()}
    assert res["per_image"][1]["metrics"] == {m: {"niqe": v} for m, v in want.items()}
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (16 + 2 * 192, 5 * 192, 3)  # LR + 4 methods, no HR
    # row 2 is the 128×96 'wide' output fitted to 192×144: 24 white rows above (behind the label)
    # and below it
    assert (sheet[16 + 192 + 168 : 16 + 384, 192 * 2 : 192 * 3] == 255).all()
    assert not (sheet[16 + 192 + 24 : 16 + 192 + 168, 192 * 2 : 192 * 3] == 255).all()


def test_eval_without_hr_refuses_what_it_cannot_measure(tiny_pairs, tmp_path, monkeypatch, capsys):
    """A no-reference run with NIQE off (or unavailable) and no pyiqa metric measures nothing, and
    a full-reference pyiqa metric needs HR: errors that say so, before any image is run."""
    import sys
    import types

    root, model = tiny_pairs
    base = ["eval", "--lr", str(root / "lr"), "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main([*base, "--niqe-params", "off"]) == 2
    assert "with --niqe-params off measures nothing" in capsys.readouterr().err
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    assert main(base) == 2
    assert "with $UPSR_NIQE_PARAMS off measures nothing" in capsys.readouterr().err
    monkeypatch.delenv("UPSR_NIQE_PARAMS")
    monkeypatch.setattr("upsr_core.niqe.find_niqe_params", lambda: None)
    assert main(base) == 2
    assert "a no-reference run (no --hr) needs NIQE or --pyiqa metrics, and NIQE is unavailable" in \
        capsys.readouterr().err
    monkeypatch.setenv("UPSR_NIQE_PARAMS", str(tmp_path / "none.npz"))  # a file named is not optional
    assert main([*base, "--hr", str(root / "hr")]) == 2
    assert "$UPSR_NIQE_PARAMS '" in (err := capsys.readouterr().err) and "none.npz'" in err
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")

    class FakeMetric:
        def __init__(self, mode):
            self.metric_mode, self.device = mode, "cpu"

    fake = types.SimpleNamespace(create_metric=lambda n, device: FakeMetric("FR" if n == "lpips" else "NR"))
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    assert main([*base, "--pyiqa", "musiq,lpips"]) == 2
    assert "--pyiqa lpips: full-reference, needs --hr" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([*base[:2], str(tmp_path / "missing"), *base[3:]]) == 2
    assert "missing' does not exist" in capsys.readouterr().err


def test_eval_compares_pyiqa_metrics_in_their_own_direction(tiny_pairs, tmp_path, monkeypatch):
    """A pyiqa metric says which way is better (``lower_better``): the paired table counts the
    images better that way, and its note names the lower-is-better metrics present (NIQE off)."""
    import sys
    import types

    class FakeMetric:
        def __init__(self, name):
            self.device, self.lower_better = "cpu", name == "lpips"
            self.metric_mode = "FR" if name == "lpips" else "NR"

        def __call__(self, sr, hr=None):
            return (sr - hr).abs().mean() if hr is not None else sr.std()

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=lambda n, device: FakeMetric(n)))
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    root, model = tiny_pairs
    out = tmp_path / "o"
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--device", "cpu",
                 "--out", str(out), "--sheet", "0", "--method", "bicubic,estimator", "--pyiqa", "lpips,musiq"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = [r["metrics"] for r in res["per_image"]]
    cmp = res["paired"]["bicubic"]["estimator"]
    assert cmp["lpips"]["better"] == sum(r["estimator"]["lpips"] < r["bicubic"]["lpips"] for r in rows)
    assert cmp["musiq"]["better"] == sum(r["estimator"]["musiq"] > r["bicubic"]["musiq"] for r in rows)
    assert {cmp["lpips"]["better"], cmp["musiq"]["better"]} != {0}  # the directions were exercised
    assert "lower is better for lpips)." in (out / "results.md").read_text()


def test_pairing_refuses_two_images_of_one_name_and_names_the_unpaired(tiny_pairs, caplog):
    import shutil

    from upsr_core.evaluate import pair_files

    root, _ = tiny_pairs
    shutil.copy(root / "lr" / "img0.png", root / "lr" / "extra.png")
    with caplog.at_level("WARNING", logger="upsr_core"):
        assert len(pair_files(root / "hr", root / "lr")) == 2
    assert "1 LR image(s) in" in caplog.text and "have no HR image of the same name" in caplog.text
    assert "extra.png" in caplog.text
    Image.open(root / "hr" / "img1.png").save(root / "hr" / "img1.jpg")  # was scored twice, biasing the mean
    with pytest.raises(ValueError, match=r"holds 'img1.jpg' and 'img1.png': images are paired by name"):
        pair_files(root / "hr", root / "lr")
    (root / "hr" / "img1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"img0.png' is a file, not a folder"):
        pair_files(root / "hr", root / "lr" / "img0.png")


def _touch_png(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (90, 120, 150)).save(path)
    return path


def _names(pairs, hr_root, lr_root):
    return [(str(h.relative_to(hr_root)), str(lr.relative_to(lr_root))) for h, lr in pairs]


def test_pairing_takes_the_benchmark_layouts_as_they_are(tmp_path, caplog):
    """Nested folders pair by the path below each (as upscale reads a folder); a name left over
    pairs without its scale tag: DIV2K's 0801x4, DRealSR's _x1/_x4, and RealSR V3's _HR/_LR4 in
    one folder given as both --hr and --lr. An exact name wins over a tag (box4 is not box + x4)."""
    from upsr_core.evaluate import lr_files, pair_files

    hr, lr = tmp_path / "hr", tmp_path / "lr"
    for sub in ("Canon", "Nikon"):  # one name in two subfolders: two pairs, not one duplicate
        _touch_png(hr / sub / "001.png", 32), _touch_png(lr / sub / "001.png", 8)
    _touch_png(hr / "0801.png", 32), _touch_png(lr / "0801x4.png", 8)  # DIV2K
    _touch_png(hr / "DSC_1454_x1.png", 32), _touch_png(lr / "DSC_1454_x4.png", 8)  # DRealSR
    _touch_png(hr / "box4.png", 32), _touch_png(lr / "box4.png", 8), _touch_png(lr / "bo_x4.png", 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        pairs = pair_files(hr, lr)
    assert _names(pairs, hr, lr) == [("0801.png", "0801x4.png"), ("Canon/001.png", "Canon/001.png"),
                                     ("DSC_1454_x1.png", "DSC_1454_x4.png"), ("Nikon/001.png", "Nikon/001.png"),
                                     ("box4.png", "box4.png")]
    assert "1 LR image(s)" in caplog.text and "bo_x4.png" in caplog.text  # box4 was taken by its exact name
    assert _names(pair_files(hr, lr, {"0801", "DSC_1454"}), hr, lr) == [("0801.png", "0801x4.png"),
                                                                         ("DSC_1454_x1.png", "DSC_1454_x4.png")]
    assert [p.relative_to(lr).as_posix() for _, p in lr_files(lr, {"Canon/001", "0801"})] == ["0801x4.png",
                                                                                               "Canon/001.png"]
    real = tmp_path / "RealSR" / "Canon" / "Test" / "4"  # RealSR V3: HR and LR side by side
    for i in (1, 2):
        _touch_png(real / f"Canon_00{i}_HR.png", 32), _touch_png(real / f"Canon_00{i}_LR4.png", 8)
    assert _names(pair_files(real, real), real, real) == [("Canon_001_HR.png", "Canon_001_LR4.png"),
                                                          ("Canon_002_HR.png", "Canon_002_LR4.png")]
    assert len(pair_files(real, real, {"Canon_002"})) == 1


def test_pairing_refuses_what_it_cannot_tell_apart(tmp_path):
    """One folder as both without tags, and a name two tagged images of one side share, pair
    nothing rather than guess; eval's --out inside --lr is not read as images of the set."""
    from upsr_core.evaluate import lr_files, pair_files

    flat = tmp_path / "flat"
    _touch_png(flat / "a.png", 32)
    with pytest.raises(ValueError, match=r"--hr and --lr are one folder, .*flat': its HR and LR images are told "
                                         r"apart by a tag .* it holds 0 HR and 0 ×4 LR image\(s\) so tagged"):
        pair_files(flat, flat)
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    _touch_png(hr / "a.png", 32), _touch_png(lr / "a_x4.png", 8), _touch_png(lr / "a_LR4.png", 8)
    with pytest.raises(ValueError, match=r"no HR/LR pairs in .*hr' \(1 image\(s\), e.g. 'a'\) and .*lr' "
                                         r"\(2 image\(s\), e.g. 'a_LR4'\), 1 name\(s\) ambiguous \(see above\)"):
        pair_files(hr, lr)
    _touch_png(lr / "runs" / "contact_sheet.png", 8)
    assert [p.name for _, p in lr_files(lr, exclude=lr / "runs")] == ["a_LR4.png", "a_x4.png"]


def test_pairing_names_what_it_left_out_and_why(tmp_path, caplog):
    """Review of 2026-11-28: an ambiguous name is a warning naming the images (not a silent
    'no pairs'); 'no pairs' says what each folder holds and the rule; tags need a separator
    (cathr is not cat's HR) but the HR's whole name is tried first (night_gt / night_gt_x4); an
    --lr inside --hr is not counted as HR images; selected ids without an image are named; a
    stray duplicate outside the selected ids does not stop the run."""
    from upsr_core.evaluate import pair_files

    hr, lr = tmp_path / "hr", tmp_path / "lr"
    for name in ("a.png", "a_HR.png", "b.png", "cathr.png", "box1.png", "night_gt.png"):
        _touch_png(hr / name, 32)
    for name in ("a_x4.png", "b.png", "cat.png", "box1x4.png", "night_gt_x4.png"):
        _touch_png(lr / name, 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        pairs = pair_files(hr, lr)
    assert _names(pairs, hr, lr) == [("b.png", "b.png"), ("box1.png", "box1x4.png"),
                                     ("night_gt.png", "night_gt_x4.png")]
    assert "each of these names matches more than one image: a, a_HR, a_x4" in caplog.text
    assert "left out: a.png, a_HR.png, cathr.png" in caplog.text and "left out: a_x4.png, cat.png" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no HR/LR pairs in .*empty' \(no images\) and .*lr' \(5 image\(s\), e.g. "
                                         r"'a_x4'\): images pair by their path below each folder without the suffix, "
                                         r"or without a scale tag"):
        pair_files(empty, lr)
    nest = tmp_path / "nest"  # --lr inside --hr
    _touch_png(nest / "a.png", 32), _touch_png(nest / "lr" / "a.png", 8)
    caplog.clear()
    with caplog.at_level("WARNING", logger="upsr_core"):
        assert _names(pair_files(nest, nest / "lr"), nest, nest / "lr") == [("a.png", "a.png")]
    assert caplog.text == ""
    _touch_png(hr / "z.png", 32), _touch_png(hr / "z.jpg", 32)  # outside the ids: not this run's business
    with caplog.at_level("WARNING", logger="upsr_core"):
        assert _names(pair_files(hr, lr, {"b", "typo"}), hr, lr) == [("b.png", "b.png")]
    assert "1 of the 2 selected ids have no image here: typo" in caplog.text


def test_manifest_ids_of_another_crop_size_are_not_missing(tmp_path, caplog):
    """make_pairs.py puts the 256- and 512-px crops of a group in one manifest and in two folders:
    scoring the 256-px folder (the README's command) warned that every 512-px id had no image.
    Now only ids of a size found in the folder count; the others are logged at INFO."""
    man = tmp_path / "manifest.jsonl"
    rows = [("p_s256_c0", 256), ("p_s256_c1", 256), ("p_s512_c0", 512), ("q_s256_c0", 256)]
    man.write_text("".join(json.dumps({"id": i, "group": "A_val" if i != "q_s256_c0" else "A_train", "hr_size": n})
                           + "\n" for i, n in rows))
    entries = manifest_entries(man, "A_val")
    assert entries == {"p_s256_c0": 256, "p_s256_c1": 256, "p_s512_c0": 512}
    assert manifest_ids(man, "A_val", 512) == ["p_s512_c0"]
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    _touch_png(hr / "p_s256_c0.png", 32), _touch_png(lr / "p_s256_c0.png", 8)
    with caplog.at_level("INFO", logger="upsr_core"):
        assert _names(pair_files(hr, lr, entries), hr, lr) == [("p_s256_c0.png", "p_s256_c0.png")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["1 of the 2 selected ids have no image here: p_s256_c1"]
    assert "ids of HR size 512 are not in this folder (its images are of size 256)" in caplog.text
    with pytest.raises(ValueError, match="no entries of group 'B' in manifest"):
        manifest_entries(man, "B")


def test_eval_refuses_an_out_that_holds_its_inputs_and_skips_earlier_results(tiny_pairs, monkeypatch, capsys):
    """--out = --lr (or a parent of it, such as '.') made every input vanish behind 'no pairs';
    now it is refused by name before anything runs. An earlier run's results inside --lr (its
    sheet, its saved images) are not scored as inputs of a no-reference run; a --save-images
    target that cannot be written fails before the model loads."""
    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    base = ["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--method", "bicubic", "--sheet", "2"]
    for out in (root / "lr", root):
        assert main([*base, "--out", str(out)]) == 2
        assert f"--out {str(out)!r} is, or holds, the " in capsys.readouterr().err
    assert main([*base, "--out", str(root / "lr" / "run1"), "--save-images"]) == 0
    assert (root / "lr" / "run1" / "images" / "bicubic" / "img0.png").is_file()
    for name in ("results.json", "results.md", "contact_sheet.png"):  # as if killed (kill -9) before its results
        (root / "lr" / "run1" / name).unlink()
    assert (root / "lr" / "run1" / ".upsr-eval").is_file()  # written before the scoring: its images are no set's
    assert [lp.name for _, lp in lr_files(root / "lr")] == ["img0.png", "img1.png"]  # a no-reference run's listing
    assert main([*base, "--out", str(root / "lr" / "run2")]) == 0
    assert json.loads((root / "lr" / "run2" / "results.json").read_text())["info"]["pairs"] == 2
    capsys.readouterr()
    (root / "o3").mkdir()
    (root / "o3" / "images").write_text("a file")
    assert main([*base, "--out", str(root / "o3"), "--save-images", "--model", str(root / "missing.safetensors"),
                 "--method", "bicubic,estimator"]) == 2
    assert f"--out: {str(root / 'o3' / 'images')!r} cannot be made" in capsys.readouterr().err


def test_eval_row_names_do_not_depend_on_the_subset(tmp_path, monkeypatch):
    """--limit 1 named the one row 'x' where the whole set named it 'a/x': names are paths below --hr."""
    from upsr_core.evaluate import _row_names

    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    for sub in ("a", "b"):
        _touch_png(tmp_path / "hr" / sub / "x.png", 32), _touch_png(tmp_path / "lr" / sub / "x.png", 8)
    out = tmp_path / "ev"
    assert main(["eval", "--hr", str(tmp_path / "hr"), "--lr", str(tmp_path / "lr"), "--method", "bicubic",
                 "--out", str(out), "--limit", "1", "--sheet", "0", "--save-images"]) == 0
    assert [r["image"] for r in json.loads((out / "results.json").read_text())["per_image"]] == ["a/x"]
    assert (out / "images" / "bicubic" / "a" / "x.png").is_file()
    odd = [(tmp_path / "hr" / "a" / "x.png", tmp_path / "lr" / "a" / "x.png"),
           (tmp_path / "hr" / "a" / ".." / "b" / "x.png", tmp_path / "lr" / "b" / "x.png")]
    assert _row_names(odd) == ["a/x", "b/x"]  # spelled with '..': normalised, not '../b/x'
    with pytest.raises(ValueError, match=r"root .*lr'.*is not below it"):
        _row_names(odd, tmp_path / "lr")


def test_eval_names_nested_images_by_their_path(tmp_path, monkeypatch):
    """Two images of one name in two subfolders are two rows, named by their path below the folder."""
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    rng = np.random.default_rng(1)
    for sub in ("a", "b"):
        hr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        _touch_png(tmp_path / "hr" / sub / "x.png", 32)
        Image.fromarray(hr).save(tmp_path / "hr" / sub / "x.png")
        _touch_png(tmp_path / "lr" / sub / "x.png", 8)
    out = tmp_path / "lr" / "eval"  # inside --lr: not an input of the next run
    args = ["eval", "--hr", str(tmp_path / "hr"), "--lr", str(tmp_path / "lr"), "--method", "bicubic",
            "--out", str(out), "--sheet", "2"]
    for _ in range(2):
        assert main(args) == 0
        res = json.loads((out / "results.json").read_text())
        assert [r["image"] for r in res["per_image"]] == ["a/x", "b/x"] and res["info"]["pairs"] == 2


def test_eval_saves_the_outputs_it_scored(tiny_pairs, monkeypatch):
    """--save-images writes each method's output as the 8-bit PNG that was scored: read back, it
    gives the table's PSNR exactly; a sweep's rows get folders without spaces."""
    from upsr_core.imageio import read_image

    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    out = root / "ev"
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--method",
                 "bicubic,upsr", "--b-u", "0.4,0.6", "--out", str(out), "--save-images", "--sheet", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["info"]["images"] == str(out / "images")
    assert sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png")) == [
        f"{m}/img{i}.png" for m in ("bicubic", "upsr", "upsr_b_u=0.6_psi_max=0.05") for i in (0, 1)]
    for row in res["per_image"]:
        hr = read_image(root / "hr" / f"{row['image']}.png").rgb[None]
        for m, folder in (("bicubic", "bicubic"), ("upsr b_u=0.6 psi_max=0.05", "upsr_b_u=0.6_psi_max=0.05")):
            sr = read_image(out / "images" / folder / f"{row['image']}.png").rgb[None]
            assert float(psnr(sr, hr)[0]) == row["metrics"][m]["psnr"]


def test_a_crop_border_too_large_for_ssim_is_found_before_any_image_is_scored(tiny_pairs, monkeypatch):
    from upsr_core import evaluate as ev

    root, _ = tiny_pairs
    monkeypatch.setattr(ev, "run_methods", lambda *a, **k: pytest.fail("an image was scored before the check"))
    with pytest.raises(ValueError, match=r"^\S*img0\.png: 64×64 px \(×4 of its LR\) is 4×4 after --crop-border 30; "
                                         r"SSIM needs at least 11×11$"):
        ev.evaluate(None, ev.pair_files(root / "hr", root / "lr"), ["bicubic"], crop_border=30)


def test_eval_warns_when_hr_and_lr_differ_in_colour(tiny_pairs, caplog):
    from upsr_core.evaluate import evaluate, pair_files

    root, _ = tiny_pairs
    Image.open(root / "hr" / "img0.png").convert("L").save(root / "hr" / "img0.png")
    with caplog.at_level("WARNING", logger="upsr_core"):
        evaluate(None, pair_files(root / "hr", root / "lr"), ["bicubic"], niqe_params=None)
    assert "img0.png: the HR image is grayscale but the LR image is colour" in caplog.text
    assert "img1.png" not in caplog.text


def test_eval_warns_about_transparent_pixels(tiny_pairs, caplog):
    from upsr_core.evaluate import evaluate, pair_files

    root, _ = tiny_pairs
    im = Image.open(root / "hr" / "img0.png").convert("RGBA")
    a = np.asarray(im).copy()
    a[:, : a.shape[1] // 3, 3] = 0
    Image.fromarray(a).save(root / "hr" / "img0.png")
    Image.open(root / "lr" / "img1.png").convert("RGBA").save(root / "lr" / "img1.png")  # opaque alpha: no warning
    with caplog.at_level("WARNING", logger="upsr_core"):
        evaluate(None, pair_files(root / "hr", root / "lr"), ["bicubic"], niqe_params=None)
    assert "img0.png: has transparent pixels; the scores count their hidden colour too" in caplog.text
    assert "img1.png" not in caplog.text


def test_evaluate_checks_its_pairs_and_metrics_before_running(tiny_pairs, tmp_path, monkeypatch, capsys):
    """evaluate() (the library call) refuses an empty list, a mix of pairs with and without HR
    (naming both), a full-reference metric or no metric at all in a no-reference run, before
    any image runs; the CLI reads '--pyiqa ,' as no metric."""
    from upsr_core.evaluate import evaluate, lr_files, pair_files

    root, model = tiny_pairs

    class FakeMetric:
        def __init__(self, mode):
            self.metric_mode, self.device = mode, "cpu"

        def __call__(self, *a):
            raise AssertionError("no image may run")

    with pytest.raises(ValueError, match="pairs is empty"):
        evaluate(None, [], ["bicubic"])
    mixed = pair_files(root / "hr", root / "lr")[:1] + lr_files(root / "lr")[1:]
    with pytest.raises(ValueError, match=r"the first pair has .*img0.png, the pair of .*img1.png has none"):
        evaluate(None, mixed, ["bicubic"])
    nr = lr_files(root / "lr")
    with pytest.raises(ValueError, match=r"\['lpips'\] are full-reference"):
        evaluate(None, nr, ["bicubic"], extra={"lpips": FakeMetric("FR"), "musiq": FakeMetric("NR")})
    with pytest.raises(ValueError, match="nothing to measure"):
        evaluate(None, nr, ["bicubic"])
    loaded = []
    monkeypatch.setattr("upsr_core.model.load_upsr", lambda *a, **k: loaded.append(1))
    assert main(["eval", "--lr", str(root / "lr"), "--model", str(model), "--niqe-params", "off", "--pyiqa", " , ",
                 "--out", str(tmp_path / "o")]) == 2
    assert "with --niqe-params off measures nothing" in capsys.readouterr().err and loaded == []


def test_eval_fast_path_is_recorded_and_scores_as_the_reference(tiny_pairs, monkeypatch):
    """--fast runs the same math with other rounding: every mean within 0.05 dB / 1e-3 SSIM of
    the faithful run (8-bit rounding of outputs that differ by ~1e-6 flips a few levels), and
    results.json says which path and precision scored."""
    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    res = {}
    for name, extra in (("ref", []), ("fast", ["--fast"])):
        out = root / name
        assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out",
                     str(out), "--device", "cpu", "--sheet", "0", *extra]) == 0
        res[name] = json.loads((out / "results.json").read_text())
    assert (res["ref"]["info"]["path"], res["fast"]["info"]["path"]) == ("reference", "fast")
    assert res["ref"]["info"]["dtype"] == res["fast"]["info"]["dtype"] == "float32"
    for m, r in res["ref"]["mean"].items():
        f = res["fast"]["mean"][m]
        assert abs(f["psnr"] - r["psnr"]) < 0.05 and abs(f["ssim"] - r["ssim"]) < 1e-3, (m, r, f)


def test_an_interrupted_eval_writes_the_images_it_finished(tiny_pairs, monkeypatch, capsys):
    """Ctrl-C hours into a large set lost every score: the finished images are written, marked
    partial, and the exit code is still 130."""
    import upsr_core.evaluate as ev

    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    real, calls = ev.run_methods, []

    def second_interrupts(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "run_methods", second_interrupts)
    out = root / "ev"
    rc = main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out", str(out),
               "--device", "cpu", "--method", "bicubic,upsr"])
    assert rc == 130
    res = json.loads((out / "results.json").read_text())
    assert res["info"]["partial"] == "interrupted after 1 of 2" and len(res["per_image"]) == 1
    assert res["mean"]["upsr"]["psnr"] == res["per_image"][0]["metrics"]["upsr"]["psnr"]
    assert (out / "results.md").read_text().startswith("PARTIAL: the first 1 of 2 pairs")
    assert "interrupted after 1 of 2 images" in capsys.readouterr().err


def test_an_hr_of_the_wrong_size_stops_eval_before_any_image_is_scored(tiny_pairs, monkeypatch, capsys):
    """The pairs' sizes come from the files' headers first: a wrong pair at image k of a large set
    used to stop the run there, after k − 1 images' work, with nothing written."""
    import upsr_core.evaluate as ev

    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    Image.new("RGB", (64, 68)).save(root / "hr" / "img1.png")  # 68 rows: 4 more than ×4 of the LR's 16
    monkeypatch.setattr(ev, "run_methods", lambda *a, **k: pytest.fail("an image was scored before the check"))
    rc = main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out",
               str(root / "ev"), "--device", "cpu", "--method", "bicubic"])
    assert rc == 2
    assert "img1.png: HR (68, 64) is not ×4 of LR (16, 16)" in capsys.readouterr().err
    assert not (root / "ev" / "results.json").exists()


def test_an_image_that_fails_to_decode_part_way_keeps_the_scores_before_it(tiny_pairs, monkeypatch, capsys):
    """A truncated PNG (its header reads, its pixels do not) as the second LR: the first image's
    scores are written, marked partial with the error, and the error is still the run's outcome."""
    root, model = tiny_pairs
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    data = (root / "lr" / "img1.png").read_bytes()
    (root / "lr" / "img1.png").write_bytes(data[: len(data) // 2])
    out = root / "ev"
    rc = main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--model", str(model), "--out", str(out),
               "--device", "cpu", "--method", "bicubic"])
    err = capsys.readouterr().err
    assert rc == 2 and "img1.png: not a readable image" in err
    assert "stopped by an error after 1 of 2 images" in err
    res = json.loads((out / "results.json").read_text())
    assert res["info"]["partial"].startswith("stopped by an error after 1 of 2: ")
    assert "img1.png: not a readable image" in res["info"]["partial"]
    assert [r["image"] for r in res["per_image"]] == ["img0"]
    assert res["mean"]["bicubic"]["psnr"] == res["per_image"][0]["metrics"]["bicubic"]["psnr"]
    assert (out / "results.md").read_text().startswith("PARTIAL: the first 1 of 2 pairs (error: ")


def test_evaluate_attaches_the_finished_rows_to_an_error(tiny_pairs, monkeypatch):
    import upsr_core.evaluate as ev

    root, _ = tiny_pairs
    real, calls = ev.run_methods, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")
        return real(*a, **k)

    monkeypatch.setattr(ev, "run_methods", second_fails)
    with pytest.raises(ValueError, match="^boom$") as info:
        ev.evaluate(None, ev.pair_files(root / "hr", root / "lr"), ["bicubic"])
    means, rows = info.value.partial_results
    assert [r["image"] for r in rows] == ["img0"] and means["bicubic"]["psnr"] == rows[0]["metrics"]["bicubic"]["psnr"]


def test_image_size_reads_the_header_and_applies_the_exif_orientation(tmp_path):
    from upsr_core.imageio import image_size

    im = Image.new("RGB", (40, 24), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° to display
    im.save(tmp_path / "turned.jpg", exif=exif)
    im.save(tmp_path / "plain.png")
    assert image_size(tmp_path / "turned.jpg") == (40, 24) == tuple(read_image(tmp_path / "turned.jpg").rgb.shape[1:])
    assert image_size(tmp_path / "plain.png") == (24, 40) == tuple(read_image(tmp_path / "plain.png").rgb.shape[1:])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png: not a readable image: corrupt"):
        image_size(tmp_path / "junk.png")
    with pytest.raises(FileNotFoundError, match="input not found"):
        image_size(tmp_path / "missing.png")


def test_niqe_of_an_image_under_96_px_is_left_out_not_fatal(tiny_pairs):
    """The README promises that an image NIQE cannot score is left out of NIQE's means (null in
    results.json); one under NIQE's 96-px block used to stop the whole run."""
    from upsr_core.evaluate import _scores, evaluate, pair_files, unscored
    from upsr_core.niqe import NIQE_BLOCK

    root, _ = tiny_pairs
    sr = torch.rand(1, 3, 64, 64)
    params = object()  # never used: the image is too small for NIQE to be computed at all
    assert math.isnan(_scores(sr, None, 0, params, None, [])["niqe"])
    means, rows = evaluate(None, pair_files(root / "hr", root / "lr"), ["bicubic"], niqe_params=params)
    assert all(math.isnan(r["metrics"]["bicubic"]["niqe"]) for r in rows) and math.isnan(means["bicubic"]["niqe"])
    assert unscored(rows) == {"niqe": ["img0", "img1"]} and math.isfinite(means["bicubic"]["psnr"])
    assert NIQE_BLOCK == 96


def test_pyiqa_metrics_see_the_crop_border_as_the_built_in_ones_do():
    from upsr_core.evaluate import _scores

    seen = {}

    class FR:
        metric_mode = "FR"

        def __call__(self, sr, hr):
            seen["fr"] = (tuple(sr.shape), tuple(hr.shape))
            return torch.tensor(0.5)

    def nr(sr):
        seen["nr"] = tuple(sr.shape)
        return torch.tensor(1.5)

    sr, hr = torch.rand(1, 3, 40, 48), torch.rand(1, 3, 40, 48)
    r = _scores(sr, hr, 4, None, {"lpips": FR(), "musiq": nr}, ["lpips"])
    assert seen == {"fr": ((1, 3, 32, 40), (1, 3, 32, 40)), "nr": (1, 3, 32, 40)}
    assert r["lpips"] == 0.5 and r["musiq"] == 1.5 and r["psnr"] == float(psnr(sr, hr, crop_border=4)[0])


@pytest.mark.parametrize("size, view", [((256, 256), (32, 32, 192, 192, 1)), ((64, 64), (0, 0, 64, 64, 3)),
                                        ((256, 100), (32, 0, 192, 100, 1)), ((100, 400), (0, 104, 100, 192, 1)),
                                        ((40, 96), (0, 0, 40, 96, 2))])
def test_sheet_view_is_a_centre_region_on_the_lr_grid(size, view):
    from upsr_core.evaluate import sheet_view

    assert sheet_view(size, 192) == view
    top, left, h, w, _ = view
    assert top % 4 == left % 4 == h % 4 == w % 4 == 0


def test_the_contact_sheet_shows_pixels_as_scored_and_labels_the_sample_shown(tmp_path, monkeypatch):
    """Tiles are exact crops (no bicubic resampling that would blur the texture being compared) of
    one region in every column, the LR at nearest ×4; a --seeds run labels the pictured (first)
    sample with its own score, not the mean over seeds."""
    import upsr_core.evaluate as ev

    g = torch.Generator().manual_seed(0)
    up = to_uint8_levels(torch.rand(1, 3, 256, 256, generator=g))
    lr = to_uint8_levels(torch.rand(1, 3, 64, 64, generator=g))
    labels = []
    monkeypatch.setattr(ev, "_label", lambda m: labels.append(m) or "x")
    row = {"image": "a", "images": {"lr": lr, "upsr": up, "hr": up},
           "metrics": {"upsr": {"psnr": 20.0}}, "per_seed": {"upsr": [{"psnr": 21.0}, {"psnr": 19.0}]}}
    ev.contact_sheet([row], ["upsr"], tmp_path / "sheet.png")
    sheet = torch.from_numpy(np.array(Image.open(tmp_path / "sheet.png"))).permute(2, 0, 1).float() / 255
    head, tile = 16, 192
    below_label = slice(head + 40, head + tile)  # under the label box
    lr_tile, up_tile = sheet[:, below_label, :tile], sheet[:, below_label, tile:2 * tile]
    assert torch.equal(up_tile, up[0, :, 72:224, 32:224])  # centre 192 × 192: rows 32 + 40 …
    assert torch.equal(lr_tile, lr[0, :, 18:56, 8:56].repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert labels == [{"psnr": 21.0}]
    # the row's name on the LR tile (a dark box at its top left: rows had no name before)
    box = sheet[:, head + 6:head + 17, 1:13]
    assert (box == 0).all(0).float().mean() > 0.5 and (box > 0.5).all(0).any()  # black box, a light letter
    assert ev._row_name("a" * 40 + "/tail_001", 192) == "..." + ("a" * 40 + "/tail_001")[-26:]
    assert ev._row_name("café", 192) == "caf?"


def test_image_size_agrees_with_read_image_on_png_orientations(tmp_path, monkeypatch):
    """Pillow writes a PNG's eXIf chunk before IDAT, other writers after it (where Pillow reads it
    only by decoding); XMP's tiff:Orientation counts too. Only a PNG with such a chunk after its
    pixels is decoded for its size."""
    import struct

    from PIL import PngImagePlugin

    from upsr_core.imageio import image_size

    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 24)).save(tmp_path / "turned.png", exif=exif)
    data, chunks, at = (tmp_path / "turned.png").read_bytes(), [], 8
    while at < len(data):
        n = struct.unpack(">I", data[at:at + 4])[0]
        chunks.append(data[at:at + n + 12])
        at += n + 12
    assert [c[4:8] for c in chunks] == [b"IHDR", b"eXIf", b"IDAT", b"IEND"]
    chunks = [chunks[0], chunks[2], chunks[1], chunks[3]]  # eXIf after the pixels, as other writers place it
    (tmp_path / "late.png").write_bytes(data[:8] + b"".join(chunks))
    assert "exif" not in Image.open(tmp_path / "late.png").info  # not in the header Pillow reads
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    Image.new("RGB", (40, 24)).save(tmp_path / "xmp.png", pnginfo=info)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "a paint program")
    Image.new("RGB", (40, 24)).save(tmp_path / "plain.png", pnginfo=info)
    for name, want in (("turned.png", (40, 24)), ("late.png", (40, 24)), ("xmp.png", (40, 24)),
                       ("plain.png", (24, 40))):
        assert image_size(tmp_path / name) == want == tuple(read_image(tmp_path / name).rgb.shape[1:]), name
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels decoded"))
    assert image_size(tmp_path / "plain.png") == (24, 40)  # the chunks before the pixels suffice
    assert image_size(tmp_path / "xmp.png") == (40, 24)


def test_image_size_refuses_what_read_image_refuses_from_the_header(tmp_path):
    from upsr_core.imageio import image_size

    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 0), (255, 255, 255))]
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
    for f in (image_size, read_image):
        with pytest.raises(ValueError, match=r"two\.gif: has 2 frames"):
            f(tmp_path / "two.gif")


# ------------------------------------------------------------------ 2026-11-29 (session 34): eval review
def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def _fake_pyiqa(monkeypatch, value: float = 123.0):
    import sys
    import types

    class FakeMetric:
        device, lower_better, metric_mode = "cpu", False, "FR"

        def __call__(self, sr, hr=None):
            return torch.tensor(value)

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=lambda n, device: FakeMetric()))


def test_a_pyiqa_metric_named_as_a_built_in_column_gets_a_column_of_its_own(tiny_pairs, tmp_path, monkeypatch):
    """--pyiqa ssim wrote pyiqa's SSIM into eval's own 'ssim' column (BasicSR's), without a word."""
    _fake_pyiqa(monkeypatch)
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    root, model = tiny_pairs
    out = tmp_path / "o"
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--device", "cpu", "--out", str(out),
                 "--sheet", "0", "--method", "bicubic", "--pyiqa", "ssim,psnr,lpips"]) == 0
    mean = json.loads((out / "results.json").read_text())["mean"]["bicubic"]
    assert mean["pyiqa_ssim"] == mean["pyiqa_psnr"] == mean["lpips"] == 123.0
    assert 0 < mean["ssim"] < 1 and mean["psnr"] < 50  # eval's own, as before


def test_a_pyiqa_that_fails_to_import_is_not_called_missing(tiny_pairs, tmp_path, monkeypatch, capsys):
    import builtins
    import sys

    real = builtins.__import__

    def broken(name, *a, **k):
        if name == "pyiqa":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return real(name, *a, **k)

    monkeypatch.delitem(sys.modules, "pyiqa", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    root, _ = tiny_pairs
    argv = ["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--device", "cpu", "--out",
            str(tmp_path / "o"), "--method", "bicubic", "--pyiqa", "lpips"]
    assert main(argv) == 2
    line = one_error(capsys)
    assert "pyiqa package is installed but does not import" in line and "No module named 'torchvision'" in line


def test_manifest_ids_must_be_strings_and_an_empty_selection_says_what_the_folders_hold(tmp_path):
    """An int id never matched its image 5.png, and the error then said both folders held
    "no images" (it described them after the id filter)."""
    man = tmp_path / "m.jsonl"
    man.write_text(json.dumps({"id": 5, "group": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: 'id' must be a string .*got int 5"):
        manifest_entries(man, "A")
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    _touch_png(hr / "5.png", 32), _touch_png(lr / "5.png", 8)
    with pytest.raises(ValueError, match=r"\(0 of its 1 image\(s\) selected, none of the selected ids, e\.g\. '5'\) "
                                         r"and .* among the 1 selected ids"):
        pair_files(hr, lr, {"6": None})


def test_eval_refuses_flags_its_methods_cannot_use_and_records_no_model_it_did_not_load(tiny_pairs, tmp_path,
                                                                                        monkeypatch, capsys):
    """--b-u/--psi-max without upsr and --seeds without a noisy method ran, and were recorded as
    used; results named the default model though none was loaded."""
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    root, _ = tiny_pairs
    base = ["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--device", "cpu", "--sheet", "0"]
    assert main([*base, "--out", str(tmp_path / "a"), "--method", "bicubic,upsr_cf", "--b-u", "0.2,0.3"]) == 2
    assert "--b-u set the upsr method's weighting, and --method 'bicubic,upsr_cf' has no upsr" in one_error(capsys)
    assert main([*base, "--out", str(tmp_path / "a"), "--method", "bicubic,estimator", "--seeds", "3"]) == 2
    assert "--seeds 3: none of --method 'bicubic,estimator' draws noise" in one_error(capsys)
    assert main([*base, "--out", str(tmp_path / "a"), "--method", " , "]) == 2
    assert "--method: empty (' , ')" in one_error(capsys)
    assert main([*base, "--out", str(tmp_path / "b"), "--method", "bicubic", "--limit", "1"]) == 0
    info = json.loads((tmp_path / "b" / "results.json").read_text())["info"]
    assert info["model"] is None and info["b_u_psi_max"] is None and info["limit"] == 1 and info["manifest"] is None
    assert "model" not in (tmp_path / "b" / "results.md").read_text().splitlines()[0]


def test_sweep_values_that_would_share_a_row_name_are_refused():
    """0.2 and 0.2000001 both became the row 'upsr b_u=0.2 psi_max=0.05' (one of them dropped), and
    0.0500000001 passed for the official ψ_max."""
    from upsr_core.evaluate import parse_grid

    with pytest.raises(ValueError, match=r"\(0\.2, 0\.05\) and \(0\.2000001, 0\.05\) would both be named "
                                         r"'b_u=0\.2 psi_max=0\.05'"):
        parse_grid("0.2,0.2000001", "0.05")
    with pytest.raises(ValueError, match=r"\(0\.4, 0\.05\) and \(0\.4, 0\.0500000001\) would both be named"):
        parse_grid("0.4", "0.0500000001")
    assert parse_grid("0.4,0.2", "0.05") == [(0.4, 0.05), (0.2, 0.05)]


def test_eval_review_follow_ups(tiny_pairs, tmp_path, monkeypatch, capsys, caplog):
    """A full-reference --pyiqa psnr in a no-reference run was named by its column (pyiqa_psnr);
    the one-folder layout said it held 0 HR images when the ids selected none; counting a folder
    for that message tripped on a duplicate name the ids had left out; --model, --fast, --dtype
    with --method bicubic ran nothing and were recorded."""
    _fake_pyiqa(monkeypatch)  # full-reference metrics
    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    root, model = tiny_pairs
    assert main(["eval", "--lr", str(root / "lr"), "--device", "cpu", "--out", str(tmp_path / "a"),
                 "--pyiqa", "psnr"]) == 2
    assert "--pyiqa psnr: full-reference, needs --hr" in one_error(capsys)
    rs = tmp_path / "rs"
    _touch_png(rs / "Canon_001_HR.png", 32), _touch_png(rs / "Canon_001_LR4.png", 8)
    with pytest.raises(ValueError, match=r"0 HR and 0 ×4 LR image\(s\) so tagged among the 1 selected ids"):
        pair_files(rs, rs, {"Canon_002": None})
    hr, lr = tmp_path / "hr2", tmp_path / "lr2"
    for p, size in ((hr / "5.png", 32), (hr / "5.jpg", 32), (hr / "7.png", 32), (lr / "7.png", 8)):
        _touch_png(p, size)
    with pytest.raises(ValueError, match=r"\(0 of its 2 image\(s\) selected, none of the selected ids"):
        pair_files(hr, lr, {"6": None})
    for flag in (["--model", str(model)], ["--fast"], ["--dtype", "bf16"]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="upsr_core"):
            assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--device", "cpu", "--out",
                         str(tmp_path / "b"), "--method", "bicubic", "--sheet", "0", *flag]) == 0
        assert f"{flag[0]}: settings of the model, and --method 'bicubic' runs none (not used)" in caplog.text
        info = json.loads((tmp_path / "b" / "results.json").read_text())["info"]
        assert info["model"] is None and info["path"] is None and info["dtype"] is None


def test_results_record_the_images_left_unpaired(tiny_pairs, tmp_path, monkeypatch):
    """Only the log named them: two runs over different coverage looked alike in results.json."""
    import shutil

    monkeypatch.setenv("UPSR_NIQE_PARAMS", "off")
    root, _ = tiny_pairs
    hr, lr = tmp_path / "copy" / "hr", tmp_path / "copy" / "lr"
    shutil.copytree(root / "hr", hr), shutil.copytree(root / "lr", lr)
    _touch_png(hr / "sub" / "only_hr.png", 64), _touch_png(lr / "only_lr.png", 16)
    assert main(["eval", "--hr", str(hr), "--lr", str(lr), "--device", "cpu", "--out", str(tmp_path / "o"),
                 "--method", "bicubic", "--sheet", "0"]) == 0
    info = json.loads((tmp_path / "o" / "results.json").read_text())["info"]
    assert info["pairs"] == 2 and info["unpaired"] == {"hr": ["sub/only_hr.png"], "lr": ["only_lr.png"],
                                                       "ambiguous": []}
    assert main(["eval", "--hr", str(root / "hr"), "--lr", str(root / "lr"), "--device", "cpu", "--out",
                 str(tmp_path / "p"), "--method", "bicubic", "--sheet", "0"]) == 0
    assert json.loads((tmp_path / "p" / "results.json").read_text())["info"]["unpaired"] == \
        {"hr": [], "lr": [], "ambiguous": []}
