"""`python -m upsr_core upscale` on real files, with the small oracle nets.

Every run passes ``--device cpu`` so the numbers do not depend on the test machine.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from upsr_core import cli
from upsr_core.imageio import read_image
from upsr_core.model import load_upsr

from _support import REPO


@pytest.fixture(scope="module")
def model(small_model_file):
    return load_upsr(small_model_file)


def upscale(model_file, *args: str) -> int:
    return cli.main(["upscale", *map(str, args), "--model", str(model_file), "--device", "cpu", "-q"])


def rgb_array(h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    noise = np.random.default_rng(0).random((h, w, 3)) * 0.2
    return (np.clip(np.stack([xx, yy, 1 - xx], -1) * 0.8 + noise, 0, 1) * 255).round().astype(np.uint8)


def to_u8(x: torch.Tensor) -> np.ndarray:
    """(3|1, H, W) in [0,1] -> (H, W[, C]) uint8, as write_png rounds."""
    a = (x.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    return a[..., 0] if a.shape[-1] == 1 else a


def test_upscale_one_png(small_model_file, tmp_path):
    Image.fromarray(rgb_array(12, 20)).save(tmp_path / "in.png")
    assert upscale(small_model_file, tmp_path / "in.png", "-o", tmp_path / "out.png") == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.mode == "RGB" and im.size == (80, 48)


def test_cli_equals_model_upscale_with_the_same_seed(small_model_file, model, tmp_path):
    Image.fromarray(rgb_array(12, 20)).save(tmp_path / "in.png")
    assert upscale(small_model_file, tmp_path / "in.png", "-o", tmp_path / "out.png", "--seed", 7) == 0
    lr = read_image(tmp_path / "in.png").rgb[None]
    with Image.open(tmp_path / "out.png") as im:
        got = np.asarray(im)
    np.testing.assert_array_equal(got, to_u8(model.upscale(lr, seed=7)[0]))
    assert not np.array_equal(got, to_u8(model.upscale(lr, seed=8)[0]))  # the seed matters


def test_rgba_alpha_is_upscaled_separately(small_model_file, tmp_path):
    rgb = rgb_array(12, 20)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((12, 20, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert upscale(small_model_file, tmp_path / "rgb.png", "-o", tmp_path / "rgb_x4.png") == 0
    assert upscale(small_model_file, tmp_path / "rgba.png", "-o", tmp_path / "rgba_x4.png") == 0
    with Image.open(tmp_path / "rgba_x4.png") as im, Image.open(tmp_path / "rgb_x4.png") as ref:
        assert im.mode == "RGBA" and im.size == (80, 48)
        out = np.asarray(im)
        np.testing.assert_array_equal(out[..., :3], np.asarray(ref))  # alpha never reaches the model
    assert (out[..., 3] == 128).all()  # bicubic of a constant alpha is that constant


def test_grayscale_in_grayscale_out(small_model_file, model, tmp_path):
    gray = rgb_array(12, 20)[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert upscale(small_model_file, tmp_path / "g.png", "-o", tmp_path / "g_x4.png") == 0
    with Image.open(tmp_path / "g_x4.png") as im:
        assert im.mode == "L" and im.size == (80, 48)
        out = np.asarray(im)
    sr = model.upscale(read_image(tmp_path / "g.png").rgb[None], seed=0)[0]
    luma = (0.299 * sr[0] + 0.587 * sr[1] + 0.114 * sr[2]).unsqueeze(0)  # ITU-R 601, as write_png
    np.testing.assert_array_equal(out, to_u8(luma))


def test_a_gray_palette_image_stays_gray_and_a_profile_of_another_colour_space_is_dropped(small_model_file, tmp_path,
                                                                                          caplog):
    """A gray GIF or PNG-8 (mode P, gray entries) came out as colour with casts of up to 24 levels;
    a gray JPEG with an RGB profile gave a gray PNG with that profile, which PNG forbids (libpng
    drops it). 2026-11-29 review."""
    from PIL import ImageCms

    gray = rgb_array(12, 20)[..., 0]
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P"
    assert read_image(tmp_path / "p.png").gray
    assert upscale(small_model_file, tmp_path / "p.png", "-o", tmp_path / "p_x4.png") == 0
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    assert upscale(small_model_file, tmp_path / "g.png", "-o", tmp_path / "g_x4.png") == 0
    with Image.open(tmp_path / "p_x4.png") as a, Image.open(tmp_path / "g_x4.png") as b:
        assert a.mode == "L" and np.array_equal(np.asarray(a), np.asarray(b))  # the same pixels in: the same out
    colour = Image.fromarray(rgb_array(12, 20)).convert("P")  # a colour palette stays colour
    colour.save(tmp_path / "c.png")
    assert not read_image(tmp_path / "c.png").gray
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(gray, "L").save(tmp_path / "gj.jpg", icc_profile=srgb)
    with caplog.at_level("INFO", logger="upsr_core"):
        loaded = read_image(tmp_path / "gj.jpg")
    assert loaded.gray and loaded.icc is None
    assert "gj.jpg: its RGB colour profile does not fit a gray image: not carried over" in caplog.text
    Image.fromarray(rgb_array(12, 20)).save(tmp_path / "cj.jpg", icc_profile=srgb)
    assert read_image(tmp_path / "cj.jpg").icc == srgb  # a colour image keeps its profile


def test_16bit_grayscale_in_16bit_out(small_model_file, tmp_path):
    a = (np.linspace(0, 65535, 12 * 20).reshape(12, 20)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert upscale(small_model_file, tmp_path / "g16.png", "-o", tmp_path / "g16_x4.png") == 0
    back = read_image(tmp_path / "g16_x4.png")
    assert back.bits == 16 and back.gray and back.rgb.shape == (3, 48, 80)
    levels = (back.rgb[0] * 65535).round()
    assert (levels % 257 != 0).any()  # real 16-bit levels, not 8-bit values scaled up


def test_folder_in_folder_out_and_resume(small_model_file, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(rgb_array(12, 16)).save(src / "a.png")
    Image.fromarray(rgb_array(16, 12)).save(src / "sub" / "b.jpg", quality=95)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert upscale(small_model_file, src, "-o", out) == 0
    with Image.open(out / "a.png") as a, Image.open(out / "sub" / "b.png") as b:
        assert a.size == (64, 48) and b.size == (48, 64)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["a.png", "sub/b.png"]
    # a second run skips outputs that exist: a stand-in file is left untouched
    (out / "a.png").write_bytes(b"stand-in")
    b_bytes = (out / "sub" / "b.png").read_bytes()
    assert upscale(small_model_file, src, "-o", out) == 0
    assert (out / "a.png").read_bytes() == b"stand-in"
    assert (out / "sub" / "b.png").read_bytes() == b_bytes
    assert upscale(small_model_file, src, "-o", out, "--overwrite") == 0
    with Image.open(out / "a.png") as a:
        assert a.size == (64, 48)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_quiet_silences_the_notes_and_restores_the_log_level(small_model_file, tmp_path, caplog):
    Image.fromarray(rgb_array(12, 16)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["upscale", str(tmp_path / "a.png"), "-o", str(out / "a.png"), "--model", str(small_model_file),
            "--device", "cpu"]
    assert cli.main([*args, "-q"]) == 0
    logger = logging.getLogger("upsr_core")
    level = logger.level
    with caplog.at_level(logging.INFO, logger="upsr_core"):
        assert cli.main([*args, "-q"]) == 0  # output exists: skipped, silently
        assert not [r for r in caplog.records if "skipping" in r.getMessage()]
        assert logger.level == logging.INFO  # -q set WARNING for its run only
        caplog.clear()
        assert cli.main(args) == 0
        assert [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()] == [
            "skipping 1 image(s) whose output exists (use --overwrite to redo)"]
    assert logger.level == level


@pytest.mark.parametrize("case, extra, match", [
    ("missing-input", [], "input not found"),
    ("corrupted-input", [], "not a readable image"),
    ("b_u", ["--b-u", "1.5"], "argument --b-u: must be in [0, 1], got 1.5"),
    ("psi_max", ["--psi-max", "0"], "argument --psi-max: must be in (0, 0.5], got 0"),
    ("tile", ["--tile", "100"], "tile size must be a positive multiple of 16, got 100"),
    ("overlap", ["--tile", "32", "--overlap", "32"], "--overlap (32; default 64) must be less than --tile (32): "
                                                     "lower --overlap or raise --tile"),
    ("default-overlap", ["--tile", "64"], "--overlap (64; default 64) must be less than --tile (64)"),
    ("seed", ["--seed", "-1"], "argument --seed: must be in [0, 9223372036854775807], got -1"),
    ("seed-64-bit", ["--seed", str(2**63)], "argument --seed: must be in [0, 9223372036854775807], got 9223372"),
    ("color-fix", ["--color-fix", "9"], "argument --color-fix: must be in [0, 8], got 9"),
    ("color-fix-name", ["--color-fix", "wavelet"], "--color-fix: expected an integer in [0, 8], got 'wavelet'"),
])
def test_bad_inputs_exit_2_with_one_line(small_model_file, tmp_path, capsys, case, extra, match):
    src = tmp_path / "in.png"
    if case == "corrupted-input":
        src.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    elif case != "missing-input":
        Image.fromarray(rgb_array(12, 20)).save(src)
    assert upscale(small_model_file, src, "-o", tmp_path / "out.png", *extra) == 2
    assert match in one_line_error(capsys)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("which", ["missing", "atd-only"])
def test_bad_model_file_exits_2(oracle, tmp_path, capsys, which):
    Image.fromarray(rgb_array(12, 20)).save(tmp_path / "in.png")
    model_file = tmp_path / "model.pth"
    if which == "atd-only":
        torch.save({"params_ema": oracle.net_state_dict("atd.")}, model_file)
    rc = cli.main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--model", str(model_file),
                   "--device", "cpu"])
    assert rc == 2
    line = one_line_error(capsys)
    assert ("checkpoint not found" if which == "missing" else "holds ATD estimator weights") in line


def test_module_entry_point_exits_2_without_traceback(small_model_file, tmp_path):
    """The real process: ``python -m upsr_core`` returns 2 and prints one line."""
    Image.fromarray(rgb_array(12, 20)).save(tmp_path / "in.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "upsr_core", "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"),
         "--model", str(small_model_file), "--device", "cpu", "--b-u", "1.5"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: argument --b-u: must be in [0, 1], got 1.5 (see python -m upsr_core upscale --help)"]


def test_upsr_traceback_keeps_the_traceback_of_an_error_line(small_model_file, tmp_path, monkeypatch, capsys):
    """A TypeError/ValueError is an error line (most are our checks of the input); for a bug
    report UPSR_TRACEBACK=1 lets it through with its traceback."""
    Image.fromarray(rgb_array(12, 20)).save(tmp_path / "in.png")
    argv = ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--model", str(small_model_file),
            "--device", "cpu", "--tile", "64"]
    assert cli.main(argv) == 2
    monkeypatch.setenv("UPSR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--overlap"):
        cli.main(argv)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be caught on Windows")
def test_sigterm_while_writing_leaves_no_part_file(small_model_file, tmp_path):
    """timeout(1), job schedulers: SIGTERM while a streamed PNG is half written exits 143 and
    removes the .part file, as Ctrl-C does."""
    import signal
    import time

    Image.fromarray(rgb_array(512, 64)).save(tmp_path / "in.png")  # several tile rows: rows stream to the .part
    out = tmp_path / "o.png"
    part = tmp_path / "o.png.part"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "upsr_core", "upscale", str(tmp_path / "in.png"), "-o", str(out),
                             "--model", str(small_model_file), "--device", "cpu", "--tile", "64", "--overlap", "16",
                             "-q"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert part.exists(), "the run ended before its .part file appeared"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert not part.exists() and not out.exists()


def test_auto_dtype_is_fp16_on_cuda_and_fp32_elsewhere():
    """--dtype auto: fp16 on CUDA (the official nets were trained under fp16 autocast; fp16 has
    ~10x less rounding error than bf16 at the same GPU speed), fp32 on CPU and MPS."""
    from upsr_core.cli import _dtype

    assert _dtype("auto", torch.device("cuda")) == torch.float16
    assert _dtype("auto", torch.device("cpu")) == torch.float32
    assert _dtype("auto", torch.device("mps")) == torch.float32
    assert _dtype("bf16", torch.device("cpu")) == torch.bfloat16
