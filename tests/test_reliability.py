"""Reliability and safety (issue 6): hostile and broken inputs, bad parameters, Ctrl-C, OOM.

Every test here runs without the official oracle: a tiny random UPSR with the real
architectures (LR multiple 4) is built in-process, so these checks also run where
``shared/`` is absent (tests/test_checkpoint.py and tests/test_cli.py need the oracle and
cover the official layouts, the refusal messages and the basic CLI errors).

Rule checked throughout: a user mistake gives a correct result or one ``error: …`` line
naming the bad value (CLI exit code 2) — never a traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import errno
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import upsr_core.model as model_mod
from upsr_core import cli
from upsr_core.checkpoint import save_converted
from upsr_core.errors import UnsupportedCheckpointError
from upsr_core.fast import enable_fast
from upsr_core.imageio import write_png
from upsr_core.model import UPSRModel, load_upsr
from upsr_core.stages import sample_maps, weight_map
from upsr_core.uncertainty import weight_noise

from _support import tiny_upsr

REPO = Path(__file__).resolve().parents[1]
TILED = dict(tile=16, overlap=4)  # a 20×28 LR runs as 2×2 tiles: 4 tiles × 5 steps = 20 denoiser calls


@pytest.fixture(scope="module")
def model() -> UPSRModel:
    return tiny_upsr()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "tiny.safetensors"
    save_converted(path, model.denoiser, model.estimator)
    return path


def lr_batch(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def run_cli(capsys, *args) -> tuple[int, str]:
    """cli.main in-process -> (exit code, stderr). An uncaught exception fails the test."""
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ===================================================================== 1. checkpoints
class TouchesMarker:
    """Unpickling this runs a shell command: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("role", ["--model", "--estimator"])
def test_cli_refuses_a_hostile_checkpoint_without_running_it(model_file, tmp_path, capsys, role):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1), "x": TouchesMarker(marker)}}, evil)
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    models = ["--model", evil] if role == "--model" else ["--model", model_file, "--estimator", evil]
    rc, err = run_cli(capsys, "upscale", tmp_path / "in.png", "-o", tmp_path / "o.png", *models, "--device", "cpu")
    assert rc == 2
    line = one_error_line(err)
    assert "evil.pth" in line and "refused to load" in line and "nothing was executed" in line
    assert not marker.exists()
    assert not (tmp_path / "o.png").exists()


@pytest.fixture(scope="module")
def model_pth(model, tmp_path_factory) -> Path:
    """The tiny denoiser as an official-style .pth ({'params_ema': state_dict}, zip container)."""
    path = tmp_path_factory.mktemp("rel_pth") / "tiny_denoiser.pth"
    torch.save({"params_ema": model.denoiser.state_dict()}, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.999])
def test_truncated_files_are_refused_by_name(model_file, model_pth, tmp_path, kind, keep):
    """Cut to 0 (empty), 10 %, 50 % and 99.9 % of the file (oracle-free complement of test_checkpoint)."""
    good = (model_file if kind == "safetensors" else model_pth).read_bytes()
    bad = tmp_path / f"cut.{kind}"
    bad.write_bytes(good[: int(len(good) * keep)])
    with pytest.raises(UnsupportedCheckpointError, match=rf"cut\.{kind}: not a readable"):
        load_upsr(bad)


def test_garbage_in_the_tensor_data_is_refused_by_tensor_name(model_file, tmp_path):
    """A safetensors file whose header is intact but whose data were overwritten (0xFF bytes
    are NaN as float32): refused naming a tensor, not loaded into a net that outputs NaN."""
    data = bytearray(model_file.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    mid = header + (len(data) - header) // 2
    data[mid : mid + 4096] = b"\xff" * 4096
    bad = tmp_path / "garbled.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnsupportedCheckpointError, match=r"tensor '.+' holds NaN or Inf values"):
        load_upsr(bad)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_files_run_exactly_the_rounded_weights(model, tmp_path, dtype, torch_dtype):
    """A fp16/bf16 file loads as float32 nets holding exactly the stored values, and its
    output is bit-identical to the float32 model with those rounded weights."""
    path = tmp_path / f"tiny_{dtype}.safetensors"
    save_converted(path, model.denoiser, model.estimator, dtype=dtype)
    stored = load_file(str(path))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch_dtype}
    loaded = load_upsr(path)
    assert all(p.dtype == torch.float32 for p in loaded.denoiser.parameters())
    rounded = tiny_upsr()
    for name, net in (("denoiser", rounded.denoiser), ("estimator", rounded.estimator)):
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                v.copy_(v.to(torch_dtype).float())
            assert torch.equal(getattr(loaded, name).state_dict()[k], v), k
    lr = lr_batch(1, 9, 14)
    out = loaded.upscale(lr, seed=1, **TILED)
    assert torch.equal(out, rounded.upscale(lr, seed=1, **TILED))
    assert torch.isfinite(out).all()


def test_missing_and_unexpected_keys_are_listed_with_counts(model, tmp_path):
    """Several missing and several unexpected keys at once: counts, the first four of
    each, and what the file looks like — but not a wall of 100 keys."""
    sd = {f"denoiser.{k}": v for k, v in model.denoiser.state_dict().items()}
    dropped = sorted(k for k in sd if k.startswith("denoiser.output_blocks."))[:6]
    for k in dropped:
        del sd[k]
    sd.update({f"denoiser.extra.{i}.weight": torch.zeros(2) for i in range(5)})
    sd.update({f"estimator.{k}": v for k, v in model.estimator.state_dict().items()})
    path = tmp_path / "bad_keys.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(UnsupportedCheckpointError) as e:
        load_upsr(path)
    msg = str(e.value)
    assert "6 missing" in msg and "5 unexpected" in msg
    names = [k.removeprefix("denoiser.") for k in dropped]
    assert sum(repr(k) in msg for k in names) == 4  # the first four (in the net's order), not all six
    assert "'extra.0.weight'" in msg and "'extra.4.weight'" not in msg
    assert "the file holds [" in msg  # what the file looks like: its first keys and key count
    assert len(msg) < 1500


# ===================================================================== 2. images
@pytest.mark.parametrize("bad, what", [
    (float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (-float("inf"), "NaN or Inf")])
def test_non_finite_pixels_are_refused(model, bad, what):
    lr = lr_batch(1, 6, 7)
    lr[0, 1, 3, 4] = bad
    with pytest.raises(ValueError, match=what):
        model.upscale(lr)
    with pytest.raises(ValueError, match=what):
        model.estimate(lr)


@pytest.mark.parametrize("lr, err, match", [
    (torch.rand(1, 1, 8, 8), ValueError, r"expected an LR image \(B, 3, h, w\), got \(1, 1, 8, 8\)"),
    (torch.rand(1, 4, 8, 8), ValueError, r"got \(1, 4, 8, 8\)"),
    (torch.rand(3, 8, 8), ValueError, r"got \(3, 8, 8\)"),
    (torch.rand(1, 3, 0, 8), ValueError, "non-empty"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError, "float image.*torch.uint8"),
    (np.zeros((1, 3, 8, 8), np.float32), TypeError, "expected a torch.Tensor, got ndarray"),
])
def test_malformed_tensors_are_refused(model, lr, err, match):
    with pytest.raises(err, match=match):
        model.upscale(lr)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 9), (9, 1), (33, 17), (2, 3)])
@pytest.mark.parametrize("fill", ["black", "white", "random"])
def test_tiny_odd_and_flat_images(model, h, w, fill):
    lr = {"black": torch.zeros(1, 3, h, w), "white": torch.ones(1, 3, h, w), "random": lr_batch(1, h, w)}[fill]
    sr = model.upscale(lr, seed=0, **TILED)
    assert sr.shape == (1, 3, 4 * h, 4 * w)
    assert torch.isfinite(sr).all() and sr.min() >= 0 and sr.max() <= 1


def test_half_precision_input_tensors_are_accepted(model):
    """fp16/bf16 LR tensors are read as float32 (lossless widening): same result."""
    lr = lr_batch(1, 10, 11).half()
    ref = model.upscale(lr.float(), seed=2)
    assert torch.equal(model.upscale(lr, seed=2), ref)
    bf = lr.float().bfloat16()
    assert torch.equal(model.upscale(bf, seed=2), model.upscale(bf.float(), seed=2))


class RecordingDenoiser(nn.Module):
    """x̂0 = ŷ, pointwise (returns the estimate channels of lq); records every input shape."""

    multiple_of = 16

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x, t, lq):
        self.shapes.append(tuple(x.shape))
        return F.pixel_shuffle(lq[:, :48] * self.gain, 4)


class RecordingEstimator(nn.Module):
    """ŷ = nearest ×4; records every input shape."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return F.interpolate(x * self.gain, scale_factor=4, mode="nearest")


def test_large_image_networks_only_ever_see_tiles():
    """An LR larger than the estimator block and than the tile: every denoiser call is one
    tile (batch <= tile_batch) and every estimator call one block plus its context margin,
    whatever the image size — so network (GPU) memory is bounded by the tile.

    The block is shrunk from 512 to 64 LR px (``estimator_block``) so that a 150 × 170 image needs 3 × 3 blocks
    (the logic does not depend on the numbers; a real 512+ px image takes ~8 s here).
    With x̂0 = ŷ = nearest×4(LR), the last DDIM step returns x̂0 (k_0 = 1, m_0 = c_0 = 0),
    so the blended output must be nearest×4 of the LR: the tiles are reassembled correctly.
    Pipeline memory (noise field, output canvas) is measured by tools/large_image_rss.py.
    """
    block = 64
    den, est = RecordingDenoiser(), RecordingEstimator()
    model = UPSRModel(den, est)
    h, w = 150, 170  # padded to 160 × 176: 3 × 4 tiles of 64, 3 × 3 estimator blocks
    lr = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    sr = model.upscale(lr, seed=0, tile=64, overlap=16, tile_batch=5, estimator_block=block)
    assert sr.shape == (1, 3, 4 * h, 4 * w)
    assert max(s[0] for s in den.shapes) == 5 and {s[-2:] for s in den.shapes} == {(64, 64)}
    assert len(den.shapes) == 5 * math.ceil(12 / 5)  # 5 steps per group of <= 5 tiles
    limit = block + 2 * model_mod.ESTIMATOR_MARGIN
    assert len(est.shapes) == 9  # each block once: the cache never recomputes one
    assert all(s[0] == 1 and s[2] <= limit and s[3] <= limit for s in est.shapes)
    # a weighted average of equal values: float32 rounding only (BLEND_ATOL of test_tiling)
    torch.testing.assert_close(sr, F.interpolate(lr, scale_factor=4, mode="nearest"), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ image files through the CLI
def _frames(path: Path, fmt: str) -> None:
    ims = [Image.new("RGB", (12, 10), c) for c in ("red", "green", "blue")]
    ims[0].save(path, format=fmt, save_all=True, append_images=ims[1:])


def _float_tiff(values) -> callable:
    return lambda p: Image.fromarray(np.array(values, np.float32), "F").save(p)


RNG = np.random.default_rng(0)
GOOD_FILES = {  # name: (writer, expected output mode, expected output size (W, H))
    "rgb_33x17.png": (lambda p: Image.fromarray(RNG.integers(0, 256, (17, 33, 3), dtype=np.uint8)).save(p),
                      "RGB", (132, 68)),
    "one_pixel.png": (lambda p: Image.new("RGB", (1, 1), (10, 200, 30)).save(p), "RGB", (4, 4)),
    "row_1x9.png": (lambda p: Image.new("RGB", (9, 1), "white").save(p), "RGB", (36, 4)),
    "column_9x1.bmp": (lambda p: Image.new("RGB", (1, 9), "black").save(p), "RGB", (4, 36)),
    "black.png": (lambda p: Image.new("RGB", (8, 8), "black").save(p), "RGB", (32, 32)),
    "white.jpg": (lambda p: Image.new("RGB", (8, 8), "white").save(p, quality=95), "RGB", (32, 32)),
    "gray.png": (lambda p: Image.new("L", (12, 10), 128).save(p), "L", (48, 40)),
    "gray_alpha.png": (lambda p: Image.new("LA", (12, 10), (100, 50)).save(p), "LA", (48, 40)),
    "rgba.webp": (lambda p: Image.new("RGBA", (12, 10), (1, 2, 3, 128)).save(p, lossless=True), "RGBA", (48, 40)),
    "palette.png": (lambda p: Image.new("RGB", (12, 10), "teal").convert("P").save(p), "RGB", (48, 40)),
    "gray16.png": (lambda p: Image.fromarray(RNG.integers(0, 65536, (10, 12), dtype=np.uint16)).save(p),
                   "I;16", (48, 40)),
    "cmyk.jpg": (lambda p: Image.new("CMYK", (12, 10), (0, 128, 255, 30)).save(p, quality=95), "RGB", (48, 40)),
    "float_in_range.tif": (_float_tiff([[0.0, 0.25], [0.5, 1.0]]), "I;16", (8, 8)),
}
BAD_FILES = {  # name: (writer, words the one error line must contain)
    "animated.gif": (lambda p: _frames(p, "GIF"), ["animated.gif", "3 frames"]),
    "pages.tif": (lambda p: _frames(p, "TIFF"), ["pages.tif", "3 frames"]),
    "truncated.png": (lambda p: p.write_bytes(_png_bytes()[:60]), ["truncated.png", "not a readable image"]),
    "empty.jpg": (lambda p: p.write_bytes(b""), ["empty.jpg", "not a readable image"]),
    "text.png": (lambda p: p.write_text("hello"), ["text.png", "not a readable image"]),
    "nan.tif": (_float_tiff([[0.1, float("nan")], [0.2, 0.3]]), ["nan.tif", "NaN or Inf"]),
    "inf.tif": (_float_tiff([[0.1, float("inf")], [0.2, 0.3]]), ["inf.tif", "NaN or Inf"]),
    "float_out_of_range.tif": (_float_tiff([[-0.5, 0.2], [0.3, 3.0]]),
                               ["float_out_of_range.tif", "[0, 1]", "-0.5", "3"]),
    # Pillow decodes 16-bit colour to 8 bits: refused rather than silently truncated
    "rgb16.png": (lambda p: write_png(p, torch.rand(3, 5, 6), bits=16), ["rgb16.png", "16-bit colour"]),
    "rgba16.png": (lambda p: write_png(p, torch.rand(3, 5, 6), torch.rand(1, 5, 6), bits=16),
                   ["rgba16.png", "16-bit colour"]),
    "rgb16.tif": (lambda p: _tiff16_rgb(p, RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)),
                  ["rgb16.tif", "16-bit colour"]),
}


def _tiff16_rgb(path: Path, a: np.ndarray) -> None:
    """A minimal uncompressed little-endian 16-bit RGB TIFF (Pillow cannot write one); a (H, W, 3)."""
    h, w, _ = a.shape
    data = a.astype("<u2").tobytes()
    n = 10
    bps_at = 8 + 2 + 12 * n + 4  # after the IFD: BitsPerSample's three values, then the pixels
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, bps_at + 6), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd = struct.pack("<H", n) + b"".join(
        struct.pack("<HHI", tag, typ, cnt) + (struct.pack("<I", v) if typ == 4 or cnt > 1 else struct.pack("<HH", v, 0))
        for tag, typ, cnt, v in tags)
    head = b"II*\x00" + struct.pack("<I", 8)
    path.write_bytes(head + ifd + struct.pack("<I", 0) + struct.pack("<3H", 16, 16, 16) + data)


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_cli_image_kinds_that_work(model_file, tmp_path, capsys, name):
    writer, mode, size = GOOD_FILES[name]
    src, out = tmp_path / name, tmp_path / "out.png"
    writer(src)
    rc, err = run_cli(capsys, "upscale", src, "-o", out, "--model", model_file, "--device", "cpu", "-q",
                      "--tile", 16, "--overlap", 4)
    assert rc == 0, err
    assert err == ""  # not even a warning
    with Image.open(out) as im:
        assert (im.mode, im.size) == (mode, size)
        a = np.asarray(im)
    assert a.size and np.isfinite(a.astype(np.float64)).all()


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_cli_image_kinds_that_are_refused(model_file, tmp_path, capsys, name):
    writer, words = BAD_FILES[name]
    src, out = tmp_path / name, tmp_path / "out.png"
    writer(src)
    rc, err = run_cli(capsys, "upscale", src, "-o", out, "--model", model_file, "--device", "cpu", "-q")
    assert rc == 2
    line = one_error_line(err)
    assert all(w in line for w in words), line
    assert not out.exists() and not out.with_name("out.png.part").exists()


@pytest.mark.parametrize("bits, gray, with_alpha", [(8, False, True), (16, True, False), (8, True, True)])
def test_png_writer_converts_in_bands_exactly(tmp_path, bits, gray, with_alpha):
    """write_png quantizes 256-row bands (no full-size float copies of a huge result): the
    file must hold exactly the whole-image rounding, across band borders (600 rows)."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 600, 7, generator=g) * 1.2 - 0.1  # out-of-range values are clamped
    alpha = torch.rand(1, 600, 7, generator=g) if with_alpha else None
    write_png(tmp_path / "o.png", rgb, alpha, bits=bits, gray=gray)
    maxv = 2**bits - 1
    x = rgb.clamp(0, 1)
    if gray:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    if alpha is not None:
        x = torch.cat([x, alpha])
    expect = (x * maxv).round().permute(1, 2, 0).numpy().astype(np.uint16 if bits == 16 else np.uint8)
    with Image.open(tmp_path / "o.png") as im:
        got = np.asarray(im)
    assert np.array_equal(got.reshape(expect.shape), expect)
    with pytest.raises(ValueError, match=r"expected alpha \(1, 600, 7\) to match rgb, got \(1, 600, 6\)"):
        write_png(tmp_path / "bad.png", rgb, torch.zeros(1, 600, 6))


def test_a_bad_file_in_a_folder_stops_with_its_name_and_keeps_finished_outputs(model_file, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (6, 5), "red").save(src / "a.png")
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (6, 5), "blue").save(src / "c.png")
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "upscale", src, "-o", out, "--model", model_file, "--device", "cpu", "-q")
    assert rc == 2 and "b.png" in one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


# ===================================================================== 3. parameters
@pytest.mark.parametrize("kw, match", [
    (dict(b_u=-0.01), r"b_u must be in \[0, 1\], got -0.01"),
    (dict(b_u=1.5), r"b_u must be in \[0, 1\], got 1.5"),
    (dict(b_u=float("nan")), r"b_u must be in \[0, 1\], got nan"),
    (dict(psi_max=0.0), r"psi_max must be > 0, got 0.0"),
    (dict(psi_max=-0.05), r"psi_max must be > 0, got -0.05"),
    (dict(psi_max=float("inf")), r"psi_max must be finite and > 0, got inf"),
    (dict(psi_max=float("nan")), r"psi_max must be finite and > 0, got nan"),
    (dict(b_u="0.4"), r"b_u must be a real number, got '0.4'"),
    (dict(tile=0), "tile size must be a positive multiple of 4, got 0"),
    (dict(tile=18), "tile size must be a positive multiple of 4, got 18"),
    (dict(tile=16.0), "tile size must be a positive multiple of 4, got 16.0"),
    (dict(tile=16, overlap=16), r"overlap must be in \[0, tile size 16\), got 16"),
    (dict(tile=16, overlap=40), r"overlap must be in \[0, tile size 16\), got 40"),
    (dict(overlap=-1), r"overlap must be in \[0, tile size 512\), got -1"),
    (dict(tile_batch=0), "tile_batch must be an integer >= 1, got 0"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63 - batch\], got -1"),
    (dict(seed=2**63), r"got 9223372036854775808"),
    (dict(seed=2**80), r"got 1208925819614629174706176"),
    (dict(seed=1.5), r"got float 1.5"),
])
def test_bad_parameters_name_the_value(model, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.upscale(lr_batch(1, 6, 6), **kw)


def test_seed_of_the_wrong_type_is_a_type_error(model):
    for bad in (1.5, "7", True, None):
        with pytest.raises(TypeError, match=f"seed must be an integer .*got {type(bad).__name__}"):
            model.upscale(lr_batch(1, 6, 6), seed=bad)


def test_bad_weights_in_the_staged_path(model):
    lr = lr_batch(1, 6, 6)
    psi = torch.full((1, 3, 24, 24), 0.01)
    for bad in (dict(b_u=1.2), dict(psi_max=0.0)):
        with pytest.raises(ValueError, match="b_u|psi_max"):
            weight_map(psi, **bad)
    with pytest.raises(ValueError, match="finite and >= 0"):
        weight_noise(torch.full((1, 1, 4, 4), -0.1))
    est = torch.full((1, 3, 24, 24), 0.5)
    with pytest.raises(ValueError, match=r"noise weight must be in \[0, 1\], got \[0, 1.5\]"):
        sample_maps(model, lr, est, torch.linspace(0, 1.5, 24 * 24).view(1, 1, 24, 24))
    with pytest.raises(ValueError, match="noise weight contains NaN"):
        sample_maps(model, lr, est, torch.full((1, 1, 24, 24), float("nan")))


def test_boundary_parameters_work(model):
    lr = lr_batch(1, 7, 9)
    for kw in (dict(b_u=0.0), dict(b_u=1.0), dict(psi_max=1e-12), dict(psi_max=1e6),
               dict(tile=4, overlap=3), dict(seed=2**63 - 1)):
        sr = model.upscale(lr, **kw)
        assert sr.shape == (1, 3, 28, 36) and torch.isfinite(sr).all(), kw
    # b_u = 1: w = 1 everywhere, so ψ (and psi_max) cannot matter
    assert torch.equal(model.upscale(lr, b_u=1.0, psi_max=1e-12), model.upscale(lr, b_u=1.0, psi_max=1e6))


@pytest.mark.parametrize("args, match", [
    (["--b-u", "nan"], "argument --b-u: must be in [0, 1], got nan"),
    (["--psi-max", "inf"], "argument --psi-max: must be in (0, 0.5], got inf"),
    (["--seed", str(2**70)], "argument --seed: must be in [0, 9223372036854775807], got 1180591620717411303424"),
    (["--tile-batch", "0"], "argument --tile-batch: must be >= 1, got 0"),
    (["--tile", "-64"], "argument --tile: must be >= 1, got -64"),
    (["--tile", "102"], "tile size must be a positive multiple of 4, got 102"),
    (["--overlap", "-3"], "argument --overlap: must be >= 0, got -3"),
    (["--overlap", "512"], "--overlap (512; default 64) must be less than --tile (512)"),
])
def test_cli_parameter_errors_are_one_line(model_file, tmp_path, capsys, args, match):
    Image.new("RGB", (6, 6)).save(tmp_path / "in.png")
    rc, err = run_cli(capsys, "upscale", tmp_path / "in.png", "-o", tmp_path / "o.png", "--model", model_file,
                      "--device", "cpu", *args)
    assert rc == 2 and match in one_error_line(err)


# ===================================================================== 4. interrupt
class Interrupter:
    """A progress callback that raises KeyboardInterrupt (Ctrl-C) at its ``at``-th call."""

    def __init__(self, at: int):
        self.at, self.calls = at, []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if len(self.calls) == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("entry", ["upscale", "denoise"])
@pytest.mark.parametrize("tile_batch", [1, 3])
def test_interrupt_stops_within_one_denoiser_step_and_the_model_stays_usable(model, entry, tile_batch):
    lr = lr_batch(1, 20, 28)
    est = model.estimate(lr)
    w = weight_noise(est.uncertainty())

    def run(progress=None):
        if entry == "upscale":
            return model.upscale(lr, seed=5, tile_batch=tile_batch, progress=progress, **TILED)
        return model.denoise(est, w, seed=5, tile_batch=tile_batch, progress=progress, **TILED)

    ref = run()
    forward_calls = []
    hook = model.denoiser.register_forward_hook(lambda *_: forward_calls.append(1))
    # mid-way through the sampling of a tile that is not the first (upscale reports twice more: before
    # its estimator block runs, and after it, counting it)
    stop = Interrupter(at=7 + 2 * (entry == "upscale"))
    try:
        with pytest.raises(KeyboardInterrupt):
            run(stop)
    finally:
        hook.remove()
    assert len(forward_calls) == 7  # the step that reported, and not one more
    done, total = stop.calls[-1]
    assert total == 5 * 4 + (entry == "upscale") and done < total  # 5 steps × 4 tiles (+ 1 estimator block)
    assert torch.is_grad_enabled()  # the no_grad context was left on the way out
    assert not model.denoiser.training and not model.estimator.training
    assert torch.equal(run(), ref)  # the next run is the normal result, bit for bit


def _folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (9, 10, 3), dtype=np.uint8)).save(src / f"{name}.png")
    return src


def test_ctrl_c_in_the_cli_exits_130_and_a_rerun_resumes_to_the_normal_result(model_file, tmp_path, capsys,
                                                                              monkeypatch):
    src = _folder(tmp_path)
    common = ["--model", model_file, "--device", "cpu", "-q", "--seed", "3", "--tile", "8", "--overlap", "2"]
    rc, _ = run_cli(capsys, "upscale", src, "-o", tmp_path / "ref", *common)
    assert rc == 0

    class CtrlCOnTheSecondImage(cli.ProgressBar):
        made = 0

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            type(self).made += 1
            self.image = type(self).made

        def update(self, n, total=None):
            super().update(n, total)
            if self.image == 2 and n == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli, "ProgressBar", CtrlCOnTheSecondImage)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, "upscale", src, "-o", out, *common)
    assert rc == 130 and err.strip() == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # no b.png, no b.png.part
    monkeypatch.undo()
    rc, _ = run_cli(capsys, "upscale", src, "-o", out, *common)
    assert rc == 0
    for name in ("a.png", "b.png", "c.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(tmp_path / "ref" / name)))


SIGINT_SCRIPT = """
import os, signal, sys
from upsr_core import cli

# Ctrl-C in a terminal reaches a foreground process with Python's handler; a shell starts
# background jobs (`cmd &`) with SIGINT ignored, which the child would inherit
signal.signal(signal.SIGINT, signal.default_int_handler)

class Bar(cli.ProgressBar):
    def update(self, n, total=None):
        super().update(n, total)
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered mid-sampling

cli.ProgressBar = Bar
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill(SIGINT) on one's own process is POSIX-only")
def test_a_real_sigint_gives_exit_130_without_a_traceback(model_file, tmp_path):
    Image.new("RGB", (10, 9), "orange").save(tmp_path / "in.png")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_SCRIPT, "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"),
         "--model", str(model_file), "--device", "cpu", "-q"],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted"
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.png.part").exists()


@pytest.mark.parametrize("exc, rc", [(OSError(errno.ENOSPC, "No space left on device"), 2),
                                     (OSError(errno.EROFS, "Read-only file system"), 2),
                                     (KeyboardInterrupt(), 130)])
def test_a_failed_write_leaves_no_part_file(model_file, tmp_path, capsys, monkeypatch, exc, rc):
    """The disk fills up (or Ctrl-C comes) while the PNG is being written: one error line,
    and neither the output nor its half-written .part file is left; the error names the output
    (a write's ENOSPC names no file of its own)."""
    def half_save(self, fp, *a, **k):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise exc

    Image.new("RGB", (6, 6)).save(tmp_path / "in.png")
    monkeypatch.setattr(Image.Image, "save", half_save)
    code, err = run_cli(capsys, "upscale", tmp_path / "in.png", "-o", tmp_path / "o.png", "--model", model_file,
                        "--device", "cpu", "-q")
    assert code == rc
    if rc == 2:
        assert str(exc.strerror) in one_error_line(err) and f"cannot write {str(tmp_path / 'o.png')!r}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


# ===================================================================== 5. out of memory (CLI)
@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 4608000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"),
])
def test_out_of_memory_in_the_cli_is_one_line_with_advice(model_file, tmp_path, capsys, monkeypatch, exc):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(UPSRModel, "upscale", boom)
    Image.new("RGB", (6, 6)).save(tmp_path / "in.png")
    rc, err = run_cli(capsys, "upscale", tmp_path / "in.png", "-o", tmp_path / "o.png", "--model", model_file,
                      "--device", "cpu", "--tile", "32", "--overlap", "16", "--tile-batch", "4")
    assert rc == 2
    line = one_error_line(err)
    assert line.startswith("error: out of memory (") and str(exc).splitlines()[0].split(". ")[0] in line
    assert line.endswith("; try a smaller --tile (now 32) or --tile-batch 1 (now 4); if it ran out in the estimator, "
                         "a smaller --estimator-block (now 512)")


def test_other_runtime_errors_still_show_their_traceback(model_file, tmp_path, monkeypatch):
    """Only out-of-memory is a user-facing condition: a bug must not be hidden as an error line."""
    def bug(*a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(UPSRModel, "upscale", bug)
    Image.new("RGB", (6, 6)).save(tmp_path / "in.png")
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        cli.main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--model", str(model_file),
                  "--device", "cpu"])


# ===================================================================== 6. numeric overflow
def _nan_model(fast: bool) -> UPSRModel:
    """The tiny model with finite weights that overflow float32 (the time embedding × 1e30: the
    norms then make inf − inf), as fp16 overflows with some weights; clamp keeps NaN, so without
    a check it would come back as an image."""
    m = tiny_upsr()
    m.denoiser.time_embed[0].weight.data.mul_(1e30)
    return enable_fast(m) if fast else m


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_nan_output_raises_instead_of_returning_an_image(fast):
    from upsr_core.errors import NonFiniteOutputError

    m, lr = _nan_model(fast), lr_batch(1, 12, 12)
    for call in (lambda: m.upscale(lr), lambda: m.upscale(lr_batch(1, 20, 28), **TILED),
                 lambda: m.upscale(lr_batch(1, 20, 28), sink=lambda *a: None, **TILED),
                 lambda: m.denoise(m.estimate(lr), torch.ones(1, 1, 48, 48))):
        with pytest.raises(NonFiniteOutputError, match=r"the denoiser \(float32\) produced NaN in its .* output; "
                                                       r"the weights \(or their conversion\) are broken"):
            call()
    m.dtype = torch.float16  # the message names the fp16 overflow and the way out (not run: fp16 is slow on the CPU)
    advice = "fp16 overflowed with these weights: load the model in fp32 or bf16"
    with pytest.raises(NonFiniteOutputError, match=advice):
        m._checked(torch.full((1, 3, 4, 4), float("nan")))
    assert m._checked(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 4, 4)


def test_cli_nan_output_is_one_error_line(tmp_path, capsys):
    m = _nan_model(False)
    path = tmp_path / "nan.safetensors"
    save_converted(path, m.denoiser, m.estimator)
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)).save(img)
    rc, err = run_cli(capsys, "upscale", img, "-o", tmp_path / "out.png", "--model", path, "--device", "cpu")
    assert rc == 2 and "produced NaN" in one_error_line(err) and not (tmp_path / "out.png").exists()


def test_reference_masks_leave_with_the_weights_and_stay_few():
    """The reference path caches its shift masks per size, device and dtype. They are dropped
    when the nets move (ComfyUI offloads a model's weights to the CPU between runs: masks left
    on the GPU would hold memory outside its accounting), and at most 4 sizes are kept per
    module (a session sees many image sizes)."""
    from upsr_core.nets.denoiser import SwinBlock

    m = tiny_upsr()
    with torch.inference_mode():
        m.upscale(torch.rand(1, 3, 16, 16), seed=1)
    caches = [m.estimator._mask_cache] + [b._mask_cache for b in m.denoiser.modules()
                                          if isinstance(b, SwinBlock) and b.shift]
    assert len(caches) > 1 and all(len(c) == 1 for c in caches)
    m.denoiser.to(torch.float64)  # any move: device, dtype (nn.Module._apply)
    m.estimator.to(torch.float64)
    assert all(len(c) == 0 for c in caches)
    atd = m.estimator.float()
    ref = torch.zeros(1)
    masks = [atd._shift_mask(16 * k, 16, ref) for k in range(1, 7)]
    assert len(atd._mask_cache) == 4
    assert atd._shift_mask(96, 16, ref) is masks[-1]  # the recent ones are reused, not rebuilt
    assert torch.equal(atd._shift_mask(16, 16, ref), masks[0])  # an evicted one is rebuilt the same
