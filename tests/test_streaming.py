"""Streaming output (bounded memory for large images): ``upscale(sink=…)``, PngStreamWriter, the CLI.

Runs without the oracle: the tiny random UPSR of tests/test_reliability.py (LR multiple 4).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import upsr_core.batch as batch_mod
from upsr_core import cli
from upsr_core.checkpoint import save_converted
from upsr_core.colorfix import wavelet_color_fix
from upsr_core.imageio import PngStreamWriter, read_image, write_png
from upsr_core.model import UPSRModel

from _support import tiny_upsr


@pytest.fixture(scope="module")
def model() -> UPSRModel:
    return tiny_upsr()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "tiny.safetensors"
    save_converted(path, model.denoiser, model.estimator)
    return path


def streamed(model: UPSRModel, lr: torch.Tensor, **kw) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    b, _, h, w = lr.shape
    out = torch.full((b, 3, 4 * h, 4 * w), float("nan"))
    calls: list[tuple[int, int, int]] = []
    nxt = [0] * b

    def sink(i: int, y0: int, rows: torch.Tensor) -> None:
        assert rows.shape[0] == 3 and rows.shape[2] == 4 * w and rows.dtype == torch.float32
        assert y0 == nxt[i], "rows come top to bottom, without gaps"
        assert all(n == 4 * h for n in nxt[:i]), "images come one after another"
        nxt[i] = y0 + rows.shape[1]
        out[i, :, y0 : nxt[i]] = rows
        calls.append((i, y0, rows.shape[1]))

    assert model.upscale(lr, sink=sink, **kw) is None
    assert nxt == [4 * h] * b
    return out, calls


@pytest.mark.parametrize("b, h, w, tile, overlap, tile_batch, rows", [
    (1, 12, 20, 16, 4, 1, 1),    # one tile row (one sink call per image)
    (1, 22, 10, 16, 4, 1, 2),    # padded to 24: rows at 0, 8; visible 4h cropped
    (2, 20, 28, 16, 4, 1, 2),    # batch 2, 2×2 tiles
    (1, 30, 18, 12, 4, 3, 4),    # 4 tile rows, groups spanning tile rows
    (2, 26, 9, 8, 0, 2, 4),      # no overlap, 4 rows, batch 2
])
def test_sink_rows_equal_the_whole_output(model, b, h, w, tile, overlap, tile_batch, rows):
    lr = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    kw = dict(seed=3, tile=tile, overlap=overlap, tile_batch=tile_batch)
    ref = model.upscale(lr, **kw)
    got, calls = streamed(model, lr, **kw)
    assert torch.equal(got, ref)
    if tile_batch == 1:  # one hand-over per tile row
        assert len(calls) == rows * b
    else:  # a tile batch spanning two tile rows hands both over at once
        assert b < len(calls) <= rows * b


def test_progress_is_the_same_with_a_sink(model):
    lr = torch.rand(1, 3, 20, 12, generator=torch.Generator().manual_seed(1))
    a, c = [], []
    model.upscale(lr, tile=8, overlap=2, progress=lambda d, t: a.append((d, t)))
    model.upscale(lr, tile=8, overlap=2, progress=lambda d, t: c.append((d, t)), sink=lambda *_: None)
    assert a == c


def decode(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im).copy(), im.mode


def decode_raw(path) -> np.ndarray:
    """The samples of a PNG whose rows use filter type 0 (None) or 2 (Up), as (H, row bytes) uint8."""
    data = path.read_bytes()
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + body)
        ihdr = body if tag == b"IHDR" else ihdr
        idat += body if tag == b"IDAT" else b""
        pos += 12 + n
    w, h = struct.unpack(">II", ihdr[:8])
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, -1)
    assert set(raw[:, 0].tolist()) <= {0, 2}
    out = raw[:, 1:].copy()
    for y in range(h):
        if raw[y, 0] == 2 and y:  # Up: add the row above (mod 256); above the first row: zeros
            out[y] += out[y - 1]
    return out


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_stream_png_equals_write_png(tmp_path, bits, gray, with_alpha):
    g = torch.Generator().manual_seed(bits + gray * 2 + with_alpha * 4)
    h, w = 37, 13
    rgb = torch.rand(3, h, w, generator=g) * 1.4 - 0.2  # clamping exercised
    rgb[0, 0, 0] = 0.5 / 255  # ties of the rounding
    alpha = torch.rand(1, h, w, generator=g) if with_alpha else None
    write_png(tmp_path / "ref.png", rgb, alpha, bits=bits, gray=gray)
    with PngStreamWriter(tmp_path / "s.png", w, h, bits=bits, gray=gray, alpha=with_alpha) as png:
        png._IDAT = 64  # several IDAT chunks
        for y0, y1 in [(0, 1), (1, 9), (9, 30), (30, 37)]:
            png.write_rows(rgb[:, y0:y1], None if alpha is None else alpha[:, y0:y1])
    if bits == 16 and (not gray or with_alpha):
        # Pillow cannot decode 16-bit colour/LA at 16 bits: decode both here
        assert np.array_equal(decode_raw(tmp_path / "ref.png"), decode_raw(tmp_path / "s.png"))
        return
    a, ma = decode(tmp_path / "ref.png")
    s, ms = decode(tmp_path / "s.png")
    assert ma == ms and a.dtype == s.dtype and np.array_equal(a, s)
    if bits == 16:
        assert read_image(tmp_path / "s.png").bits == 16


def test_stream_png_checks_rows(tmp_path):
    png = PngStreamWriter(tmp_path / "x.png", 4, 3)
    with pytest.raises(ValueError, match="too many rows"):
        png.write_rows(torch.zeros(3, 4, 4))
    png.write_rows(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="2 of 3 rows"):
        png.close()
    assert list(tmp_path.iterdir()) == []  # a short image is no file, and no .part is left


def test_stream_png_and_write_png_are_all_or_nothing(tmp_path):
    """An existing output stays as it was when a new write of it fails part-way (here: an error
    in the band of rows being converted); a finished stream replaces it."""
    old = tmp_path / "o.png"
    write_png(old, torch.full((3, 4, 4), 0.5))
    before = old.read_bytes()
    with pytest.raises(ValueError, match="NaN"):
        with PngStreamWriter(old, 4, 4) as png:
            png.write_rows(torch.zeros(3, 2, 4))
            write_png(old, torch.full((3, 4, 4), float("nan")))
    assert old.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
    with PngStreamWriter(old, 4, 4) as png:
        png.write_rows(torch.zeros(3, 4, 4))
        assert old.read_bytes() == before  # not yet: the rows are in o.png.part
    assert read_image(old).rgb.max() == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def run_cli(model_file, src, dst, *extra) -> int:
    return cli.main(["upscale", str(src), "-o", str(dst), "--model", str(model_file), "--device", "cpu", "-q",
                     "--tile", "8", "--overlap", "2", *map(str, extra)])


@pytest.mark.parametrize("fix", [0, 3, 5])  # --color-fix 5: its low-pass reaches 31 rows, ~one tile row of 32
@pytest.mark.parametrize("kind", ["rgb", "rgba", "gray16"])
def test_cli_streams_multi_row_images_unchanged(model, model_file, tmp_path, monkeypatch, kind, fix):
    rng = np.random.default_rng(5)
    h, w = 21, 10  # padded 24: 4 tile rows of 8 with overlap 2
    if kind == "rgb":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    elif kind == "rgba":
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").save(tmp_path / "in.png")
    else:
        Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(tmp_path / "in.png")
    assert batch_mod._tile_rows(model, torch.zeros(1, 3, h, w), 8, 2) == 4
    calls = []
    real = PngStreamWriter.write_rows
    monkeypatch.setattr(PngStreamWriter, "write_rows", lambda self, *a: calls.append(1) or real(self, *a))
    assert run_cli(model_file, tmp_path / "in.png", tmp_path / "s.png", "--seed", 4, "--color-fix", fix) == 0
    assert len(calls) >= (3 if fix else 4)  # it streamed (the colour fix holds back the last strips' rows)
    monkeypatch.setattr(batch_mod, "_tile_rows", lambda *a: 1)  # the whole-canvas path
    assert run_cli(model_file, tmp_path / "in.png", tmp_path / "ref.png", "--seed", 4, "--color-fix", fix) == 0
    a, ma = decode(tmp_path / "ref.png")
    s, ms = decode(tmp_path / "s.png")
    assert ma == ms and a.shape == (4 * h, 4 * w) + a.shape[2:] and np.array_equal(a, s)
    if kind == "rgb":  # and both equal model.upscale + write_png
        lr = read_image(tmp_path / "in.png").rgb[None]
        sr = model.upscale(lr, seed=4, tile=8, overlap=2)
        write_png(tmp_path / "m.png", (wavelet_color_fix(sr, lr, levels=fix) if fix else sr)[0])
        assert np.array_equal(decode(tmp_path / "m.png")[0], s)
    if kind == "gray16":
        assert read_image(tmp_path / "s.png").bits == 16


def test_fast_model_streams_through_the_base_tile_loop(tmp_path):
    """--fast with a multi-tile-row image: FastUPSRModel.upscale(sink=) must stream (it
    delegates to the banded loop) and give the rows of its own non-streaming result."""
    from upsr_core.fast import enable_fast

    fast = enable_fast(tiny_upsr())
    lr = torch.rand(1, 3, 30, 18, generator=torch.Generator().manual_seed(5))
    whole = fast.upscale(lr, seed=2, tile=12, overlap=4).cpu()
    rows, calls = streamed(fast, lr, seed=2, tile=12, overlap=4)
    assert len(calls) > 1
    # same denoiser calls and blend order as the non-streaming tiled path of the fast model
    assert torch.equal(rows, whole)
