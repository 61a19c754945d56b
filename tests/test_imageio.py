"""Image files <-> tensors (upsr_core.imageio): formats, modes, bit depths, refusals."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from upsr_core.imageio import image_formats, read_image, write_png


def rgb_u8(h: int = 10, w: int = 14) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_u8(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0,1] holding k/255 values -> (H, W, C) uint8 (exact for such values)."""
    return (t * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def test_png_rgb(tmp_path):
    a = rgb_u8()
    Image.fromarray(a).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.rgb.shape == (3, 10, 14) and img.rgb.dtype == torch.float32
    assert (img.alpha, img.bits, img.gray) == (None, 8, False)
    assert torch.equal(img.rgb, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("fmt, kwargs", [("jpg", {"quality": 90}), ("webp", {"quality": 80})])
def test_lossy_formats_decode_like_pillow(tmp_path, fmt, kwargs):
    if fmt == "webp" and not features.check("webp"):
        pytest.skip("this Pillow build has no WebP codec")
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(rgb_u8()).save(path, **kwargs)
    with Image.open(path) as im:
        ref = np.asarray(im.convert("RGB"))
    img = read_image(path)
    assert (img.bits, img.gray, img.alpha) == (8, False, None)
    np.testing.assert_array_equal(as_u8(img.rgb), ref)


def test_webp_lossless_exact(tmp_path):
    if not features.check("webp"):
        pytest.skip("this Pillow build has no WebP codec")
    a = rgb_u8()
    Image.fromarray(a).save(tmp_path / "x.webp", lossless=True)
    np.testing.assert_array_equal(as_u8(read_image(tmp_path / "x.webp").rgb), a)


def test_gray_png_is_replicated_to_three_channels(tmp_path):
    g = rgb_u8()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert (img.gray, img.bits, img.alpha) == (True, 8, None)
    for c in range(3):
        assert torch.equal(img.rgb[c], torch.from_numpy(g).float() / 255)


def test_gray_with_alpha(tmp_path):
    Image.new("LA", (5, 4), (100, 50)).save(tmp_path / "la.png")
    img = read_image(tmp_path / "la.png")
    assert img.gray and img.alpha.shape == (1, 4, 5)
    assert (as_u8(img.rgb) == 100).all() and (as_u8(img.alpha) == 50).all()


def test_rgba_png(tmp_path):
    a = rgb_u8()
    alpha = np.arange(140, dtype=np.uint8).reshape(10, 14)
    Image.fromarray(np.concatenate([a, alpha[..., None]], -1), "RGBA").save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert not img.gray and img.bits == 8
    np.testing.assert_array_equal(as_u8(img.rgb), a)
    np.testing.assert_array_equal(as_u8(img.alpha)[..., 0], alpha)


def test_16bit_gray_png(tmp_path):
    a = (np.arange(10 * 14, dtype=np.uint16) * 467).reshape(10, 14)
    Image.fromarray(a).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert (img.bits, img.gray) == (16, True)
    assert torch.equal(img.rgb[0], torch.from_numpy(a.astype(np.float32)) / 65535)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 8), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)  # pure cyan
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    img = read_image(tmp_path / "c.jpg")
    assert (img.bits, img.gray, img.alpha) == (8, False, None)
    # a flat colour survives JPEG to within 2 levels (quantisation of the DC term)
    cyan = torch.tensor([0.0, 1.0, 1.0])[:, None, None].expand(3, 8, 16)
    torch.testing.assert_close(img.rgb, cyan, rtol=0, atol=2 / 255)


def test_palette_png(tmp_path):
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1] * 4)
    p.save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    assert img.alpha is None and not img.gray
    np.testing.assert_array_equal(as_u8(img.rgb)[0], [[255, 0, 0], [0, 255, 0]] * 2)


def test_palette_png_with_transparency(tmp_path):
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putdata([0, 1] * 4)
    p.save(tmp_path / "p.png", transparency=1)
    img = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(as_u8(img.alpha)[0, :, 0], [255, 0, 255, 0])


def test_multi_frame_gif_is_refused(tmp_path):
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="has 3 frames"):
        read_image(tmp_path / "a.gif")


def test_single_frame_gif_is_read(tmp_path):
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "a.gif")
    np.testing.assert_array_equal(as_u8(read_image(tmp_path / "a.gif").rgb)[0, 0], [0, 255, 0])


@pytest.mark.parametrize("damage", ["truncated-png", "truncated-jpeg", "random-bytes", "empty", "text"])
def test_corrupted_files_raise_value_error(tmp_path, damage):
    good_png, good_jpg = tmp_path / "g.png", tmp_path / "g.jpg"
    Image.fromarray(rgb_u8(64, 64)).save(good_png)
    Image.fromarray(rgb_u8(64, 64)).save(good_jpg)
    data = {
        "truncated-png": good_png.read_bytes()[:100],
        "truncated-jpeg": good_jpg.read_bytes()[: len(good_jpg.read_bytes()) // 2],
        "random-bytes": np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "empty": b"",
        "text": b"hello, not an image\n",
    }[damage]
    bad = tmp_path / ("bad.jpg" if "jpeg" in damage else "bad.png")
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=bad.name):
        read_image(bad)


def test_png_colour_key_transparency_becomes_alpha(tmp_path):
    # a tRNS colour key on an RGB or gray PNG (no alpha channel): the keyed pixels are transparent
    a = np.zeros((4, 4, 3), np.uint8)
    a[:2] = (0, 255, 0)
    a[2:] = (10, 20, 30)
    Image.fromarray(a).save(tmp_path / "rgb.png", transparency=(0, 255, 0))
    img = read_image(tmp_path / "rgb.png")
    assert not img.gray and img.alpha is not None  # was read as opaque RGB: the key colour showed
    np.testing.assert_array_equal(as_u8(img.alpha)[:, 0, 0], [0, 0, 255, 255])
    np.testing.assert_array_equal(as_u8(img.rgb)[3, 0], [10, 20, 30])
    g = np.full((4, 4), 7, np.uint8)
    g[0] = 0
    Image.fromarray(g).save(tmp_path / "l.png", transparency=0)
    img = read_image(tmp_path / "l.png")
    assert img.gray and img.alpha is not None
    np.testing.assert_array_equal(as_u8(img.alpha)[:, 0, 0], [0, 255, 255, 255])
    # 16-bit gray with a key (its alpha was dropped) and 1-bit with a key (refused as mode '1')
    g16 = (np.arange(16).reshape(4, 4) * 1000).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "l16.png", transparency=2000)
    img = read_image(tmp_path / "l16.png")
    assert img.gray and img.bits == 16 and img.alpha is not None
    np.testing.assert_array_equal(img.alpha[0, 0].numpy(), [1, 1, 0, 1])
    assert img.rgb[0, 1, 1].item() == np.float32(5000 / 65535)  # 16 bits kept
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True
    Image.fromarray(b).convert("1").save(tmp_path / "1.png", transparency=0)
    img = read_image(tmp_path / "1.png")
    assert img.gray and img.alpha is not None
    np.testing.assert_array_equal(as_u8(img.alpha)[..., 0], as_u8(img.rgb)[..., 0])  # black is the key


def test_mpo_jpeg_reads_its_primary_image(tmp_path):
    # many cameras' and phones' JPEGs carry an MPF index (previews, a depth or gain map): Pillow opens
    # them as MPO with n_frames >= 2, and they were refused as multi-frame files
    first, second = Image.new("RGB", (32, 24), (255, 0, 0)), Image.new("RGB", (32, 24), (0, 0, 255))
    first.save(tmp_path / "a.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2
    img = read_image(tmp_path / "a.jpg")
    assert img.rgb.shape == (3, 24, 32)
    assert (as_u8(img.rgb)[..., 0] >= 250).all() and (as_u8(img.rgb)[..., 2] <= 5).all()  # the red one


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width × height (8-bit gray) with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_huge_header_is_refused_even_after_the_training_code_is_imported(tmp_path):
    """The CLI imports upsr_core.train to register ``train``; its module set Pillow's limit to None
    for the whole process, so ``upscale`` tried to allocate 3.6 GB for this 11-byte-IDAT file."""
    from upsr_core.cli import build_parser
    was = Image.MAX_IMAGE_PIXELS
    build_parser()  # imports upsr_core.train.data
    assert Image.MAX_IMAGE_PIXELS == was  # no module changes the process-wide setting
    _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(ValueError, match=r"bomb.png: image too large \(60000x60000 px"):
        read_image(tmp_path / "bomb.png")


def test_large_photo_within_the_bound_opens_whatever_pillows_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # far below this 8x8 image: read_image sets its own
    Image.fromarray(rgb_u8(8, 8)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").rgb.shape == (3, 8, 8)
    assert Image.MAX_IMAGE_PIXELS == 16  # restored


def test_out_of_memory_while_decoding_is_one_line_naming_the_file_and_size(tmp_path, monkeypatch):
    Image.fromarray(rgb_u8(8, 6)).save(tmp_path / "a.png")

    def no_memory(self, *a, **kw):
        raise MemoryError()

    image_formats()  # Pillow's plugins load (and build images) on first use: before load is replaced
    monkeypatch.setattr(Image.Image, "load", no_memory)  # what a large photo on a small machine gives
    with pytest.raises(ValueError) as e:
        read_image(tmp_path / "a.png")
    assert str(e.value) == f"{tmp_path / 'a.png'}: out of memory while decoding its 6x8 px"


def test_a_bad_image_in_a_folder_run_is_named_by_its_path(tmp_path, capsys):
    """nest/a/x.png fine, nest/b/x.png truncated: the error said only "x.png" (error audit 2026-11-28)."""
    from upsr_core.cli import main

    for sub in ("a", "b"):
        (tmp_path / "nest" / sub).mkdir(parents=True)
        Image.fromarray(rgb_u8(8, 8)).save(tmp_path / "nest" / sub / "x.png")
    bad = tmp_path / "nest" / "b" / "x.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: not a readable image"):
        read_image(bad)
    assert main(["upscale", str(tmp_path / "nest"), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert f"error: {bad}: not a readable image" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow may also warn about the corrupt directory
def test_corrupt_tiff_directory_names_the_file(tmp_path):
    Image.fromarray(rgb_u8(8, 8)).save(tmp_path / "t.tif")
    b = bytearray((tmp_path / "t.tif").read_bytes())
    assert b[:2] == b"II"
    ifd = struct.unpack("<I", b[4:8])[0]
    nxt = ifd + 2 + 12 * struct.unpack("<H", b[ifd : ifd + 2])[0]
    b[nxt : nxt + 4] = struct.pack("<I", len(b) - 3)  # the next directory: past the end of the file
    (tmp_path / "bad.tif").write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"bad.tif: not a readable image \(TypeError"):
        read_image(tmp_path / "bad.tif")  # was the bare TypeError "Missing dimensions"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        read_image(tmp_path / "nope.png")


# ------------------------------------------------------------------ write_png
def test_write_png_8bit_round_trip(tmp_path):
    a = rgb_u8()
    x = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    write_png(tmp_path / "o.png", x)
    assert torch.equal(read_image(tmp_path / "o.png").rgb, x)


def test_write_png_8bit_rgba_round_trip(tmp_path):
    x = torch.from_numpy(rgb_u8()).permute(2, 0, 1).float() / 255
    alpha = torch.arange(140, dtype=torch.float32).reshape(1, 10, 14) / 255
    write_png(tmp_path / "o.png", x, alpha)
    back = read_image(tmp_path / "o.png")
    assert torch.equal(back.rgb, x) and torch.equal(back.alpha, alpha)


def test_write_png_clamps_and_rounds(tmp_path):
    x = torch.tensor([-0.5, 0.2 / 255, 0.6 / 255, 1.7]).reshape(1, 1, 4).expand(3, 1, 4)
    write_png(tmp_path / "o.png", x)
    np.testing.assert_array_equal(as_u8(read_image(tmp_path / "o.png").rgb)[0, :, 0], [0, 0, 1, 255])


def test_write_png_16bit_gray_round_trip(tmp_path):
    levels = torch.arange(0, 65536, 997, dtype=torch.float32)[:60].reshape(1, 6, 10)
    x = (levels / 65535).expand(3, -1, -1)
    write_png(tmp_path / "o.png", x, bits=16, gray=True)
    back = read_image(tmp_path / "o.png")
    assert (back.bits, back.gray) == (16, True)
    assert torch.equal((back.rgb[0] * 65535).round(), levels[0])


def read_png16(path: Path) -> np.ndarray:
    """Decode a 16-bit PNG written with filter type 0 (what write_png writes) -> (H, W, C) uint16."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.setdefault(tag, b"")
        chunks[tag] += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 16
    c = {0: 1, 4: 2, 2: 3, 6: 4}[ctype]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * c * 2)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].copy().view(">u2").reshape(h, w, c).astype(np.uint16)


def test_write_png_16bit_rgba_round_trip(tmp_path):
    levels = torch.randint(0, 65536, (4, 6, 10)).float()
    write_png(tmp_path / "o.png", levels[:3] / 65535, levels[3:] / 65535, bits=16)
    np.testing.assert_array_equal(read_png16(tmp_path / "o.png"), levels.permute(1, 2, 0).numpy().astype(np.uint16))


@pytest.mark.parametrize("with_alpha", [False, True])
def test_16bit_colour_png_is_never_silently_reduced_to_8_bit(tmp_path, with_alpha):
    """Pillow decodes 16-bit colour PNGs at 8 bits: read_image must refuse them or read all 16."""
    levels = torch.randint(0, 65536, (4, 6, 10)).float()
    write_png(tmp_path / "o.png", levels[:3] / 65535, levels[3:] / 65535 if with_alpha else None, bits=16)
    try:
        img = read_image(tmp_path / "o.png")
    except ValueError as e:
        assert "16-bit" in str(e)  # an explicit refusal that says why
        return
    assert img.bits == 16
    assert torch.equal((img.rgb * 65535).round(), levels[:3])


def test_16bit_gray_with_alpha_is_refused_with_advice_that_keeps_the_alpha(tmp_path):
    g = torch.rand(1, 6, 10)
    write_png(tmp_path / "la.png", g.expand(3, -1, -1), torch.rand(1, 6, 10), bits=16, gray=True)
    with pytest.raises(ValueError, match=r"la.png: 16-bit gray with alpha, .* save it as 8-bit gray \+ alpha"):
        read_image(tmp_path / "la.png")  # the advice was "8-bit colour or 16-bit grayscale" (dropping alpha)


@pytest.mark.parametrize("bad, match", [
    (dict(rgb=torch.zeros(1, 4, 4)), "expected rgb"),
    (dict(rgb=torch.zeros(3, 4, 4), bits=12), "bits must be 8 or 16"),
])
def test_write_png_rejects_bad_arguments(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_png(tmp_path / "o.png", **bad)


# ------------------------------------------------------------------ ICC colour profiles
ICC = b"not a real profile, but PNG and Pillow carry any bytes" * 4


@pytest.mark.parametrize("mode, bits", [("RGB", 8), ("RGBA", 8), ("L", 8), ("I;16", 16)])
def test_icc_profile_is_read_and_embedded_again(tmp_path, mode, bits):
    """A Display-P3 or Adobe RGB photo keeps its profile: the pixels are not colour-converted,
    so the source's profile still describes the result (8-bit, 16-bit and streamed writers)."""
    from upsr_core.imageio import PngStreamWriter

    arr = {"RGB": rgb_u8(), "RGBA": np.dstack([rgb_u8(), rgb_u8()[..., :1]]), "L": rgb_u8()[..., 0],
           "I;16": rgb_u8()[..., 0].astype(np.uint16) * 257}[mode]
    (Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr, mode)).save(tmp_path / "in.png", icc_profile=ICC)
    img = read_image(tmp_path / "in.png")
    assert img.icc == ICC and img.bits == bits
    write_png(tmp_path / "out.png", img.rgb, img.alpha, bits=bits, gray=img.gray, icc=img.icc)
    with PngStreamWriter(tmp_path / "stream.png", img.rgb.shape[2], img.rgb.shape[1], bits=bits, gray=img.gray,
                         alpha=img.alpha is not None, icc=img.icc) as png:
        png.write_rows(img.rgb, img.alpha)
    for name in ("out.png", "stream.png"):
        with Image.open(tmp_path / name) as im:
            assert im.info.get("icc_profile") == ICC, name
            assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "in.png"))), name
    write_png(tmp_path / "plain.png", img.rgb, bits=8)  # no profile given: none written
    with Image.open(tmp_path / "plain.png") as im:
        assert "icc_profile" not in im.info


def test_icc_profile_of_a_converted_mode_is_not_carried_over(tmp_path, caplog):
    cmyk = Image.fromarray(rgb_u8()).convert("CMYK")
    cmyk.save(tmp_path / "in.jpg", icc_profile=ICC)
    with caplog.at_level("INFO", logger="upsr_core"):
        img = read_image(tmp_path / "in.jpg")
    assert img.icc is None and "its CMYK colour profile is not carried over" in caplog.text


def test_upscale_cli_keeps_the_profile(tmp_path, tiny_model_file):
    from upsr_core.cli import main

    Image.fromarray(rgb_u8(12, 20)).save(tmp_path / "in.png", icc_profile=ICC)
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o.png"), "--model", str(tiny_model_file),
                 "--device", "cpu", "-q"]) == 0
    with Image.open(tmp_path / "o.png") as im:
        assert im.info.get("icc_profile") == ICC and im.size == (80, 48)


def test_formats_outside_the_list_are_refused_whatever_the_name(tmp_path, monkeypatch):
    """An EPS named .png reached Pillow's Ghostscript call (security review 2026-11-28); a TGA or
    other rarely used decoder was used for any name. Only PNG/JPEG(MPO)/WebP/BMP/TIFF/GIF decode."""
    from PIL import EpsImagePlugin

    from upsr_core.train.data import load_image_array

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    im = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt in ("EPS", "TGA", "PCX"):
        path = tmp_path / f"photo_{fmt.lower()}.png"
        im.save(path, format=fmt)
        with pytest.raises(ValueError, match=r"format not read here \(read: PNG, JPEG.*GIF, whatever"):
            read_image(path)
        with pytest.raises(OSError, match="photo_"):  # training's documented error: an OSError naming the file
            load_image_array(path, 1)
    assert calls == []


@pytest.mark.parametrize("bits, gray, alpha",
                         [(8, False, False), (8, False, True), (16, False, False), (16, True, True)])
def test_streamed_png_filters_rows_up_and_equals_write_png(tmp_path, bits, gray, alpha):
    """Rows in bands of any height, filter type 2 (Up) across the bands' seams: the pixels of
    write_png, and not the 1.3-2.4× larger files that filter type 0 gave on smooth images."""
    import zlib

    from upsr_core.imageio import PngStreamWriter

    g = torch.Generator().manual_seed(0)
    h, w = 61, 37
    rgb = torch.nn.functional.interpolate(torch.rand(1, 3, 9, 6, generator=g), size=(h, w), mode="bilinear")[0]
    a = torch.linspace(0, 1, h * w).view(1, h, w) if alpha else None
    with PngStreamWriter(tmp_path / "s.png", w, h, bits=bits, gray=gray, alpha=alpha) as png:
        for y0, y1 in ((0, 1), (1, 14), (14, 40), (40, 61)):
            png.write_rows(rgb[:, y0:y1], None if a is None else a[:, y0:y1])
    write_png(tmp_path / "w.png", rgb, a, bits=bits, gray=gray)
    with Image.open(tmp_path / "s.png") as s, Image.open(tmp_path / "w.png") as ref:
        assert np.array_equal(np.asarray(s), np.asarray(ref))
    data = (tmp_path / "s.png").read_bytes()
    idat, at = b"", 8
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        if data[at + 4:at + 8] == b"IDAT":
            idat += data[at + 8:at + 8 + n]
        at += n + 12
    raw = zlib.decompress(idat)
    stride = 1 + w * ((1 if gray else 3) + alpha) * bits // 8
    assert {raw[i] for i in range(0, len(raw), stride)} == {2}
    assert len(data) < 1.25 * (tmp_path / "w.png").stat().st_size


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("compression", [None, "tiff_deflate"])
def test_tiff_orientations_turn_the_picture_as_png_does(tmp_path, mode, compression):
    """Pillow 13 reports a TIFF of orientation 5-8 at its turned size at open, and its memory-mapped
    read of an uncompressed one then used that size on the unturned rows: 8-bit gray, 16-bit gray
    and RGBA came out scrambled at the stored size, and image_size turned every such TIFF twice (eval
    refused correct pairs). 2026-11-29 review."""
    from upsr_core.imageio import image_size
    from upsr_core.train.data import load_image_array

    g = np.random.default_rng(3)
    if mode == "I;16":
        src = Image.fromarray(g.integers(0, 65536, (12, 20), dtype=np.uint16))
    else:
        src = Image.fromarray(g.integers(0, 256, (12, 20, len(mode)), dtype=np.uint8).squeeze(-1) if mode == "L"
                              else g.integers(0, 256, (12, 20, len(mode)), dtype=np.uint8), mode)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        src.save(tmp_path / f"{o}.png", exif=exif)
        src.save(tmp_path / f"{o}.tif", exif=exif, **({"compression": compression} if compression else {}))
        want = read_image(tmp_path / f"{o}.png")
        got = read_image(tmp_path / f"{o}.tif")
        assert torch.equal(got.rgb, want.rgb), o
        assert (got.alpha is None) == (want.alpha is None) and (got.alpha is None or torch.equal(got.alpha, want.alpha))
        turned = (20, 12) if o >= 5 else (12, 20)
        assert tuple(want.rgb.shape[1:]) == turned == image_size(tmp_path / f"{o}.tif") == image_size(
            tmp_path / f"{o}.png"), o
        a, maxval = load_image_array(tmp_path / f"{o}.tif")  # the training reader opens it the same way
        assert a.shape == (*turned, 3), o
        if mode != "RGBA":  # (training composites alpha on white)
            assert np.array_equal(a, (want.rgb.permute(1, 2, 0).numpy() * maxval).round().astype(a.dtype)), o


def test_an_image_whose_decoding_would_not_fit_the_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    """A 7.8 KB 1-bit PNG of 8000² px took 1.3 GB to decode; one at MAX_PIXELS (~200 KB) would take
    ~27 GB, and the out-of-memory killer ends the process without a word (no MemoryError)."""
    import upsr_core.imageio as io

    Image.new("1", (300, 200)).save(tmp_path / "bomb.png")
    need = 300 * 200 * io.DECODE_BYTES_PER_PX
    monkeypatch.setattr(io, "available_bytes", lambda: need - 1)
    image_formats()  # Pillow's plugins load (and build images) on first use: before load is replaced
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels decoded"))
    with pytest.raises(ValueError, match=r"bomb\.png: decoding its 300x200 px needs about 0\.0 GiB of memory and "
                                         r"0\.0 GiB is available"):
        read_image(tmp_path / "bomb.png")
    monkeypatch.undo()
    monkeypatch.setattr(io, "available_bytes", lambda: need)
    assert read_image(tmp_path / "bomb.png").rgb.shape == (3, 200, 300)
    monkeypatch.setattr(io, "available_bytes", lambda: None)  # not Linux: not checked
    assert read_image(tmp_path / "bomb.png").rgb.shape == (3, 200, 300)


def test_to_pil_rounds_as_write_png_and_shrinks_to_max_side(tmp_path):
    """to_pil (the nodes' step previews): 8-bit as write_png writes it; ``max_side`` shrinks a larger
    image on its device, antialiased (a constant stays that constant; aspect kept), not a smaller one."""
    from upsr_core.imageio import to_pil, write_png

    x = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # clamped like write_png
    write_png(tmp_path / "x.png", x)
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(Image.open(tmp_path / "x.png")))
    assert to_pil(x, max_side=40).size == (40, 24)
    big = torch.full((3, 2048, 1536), 0.25)
    small = to_pil(big, max_side=512)
    assert small.size == (384, 512) and np.unique(np.asarray(small)).tolist() == [64]
    for bad in (0, 1.5, "512"):
        with pytest.raises(ValueError, match=f"max_side must be an integer >= 1 or None, got {bad!r}"):
            to_pil(x, max_side=bad)
    with pytest.raises(ValueError, match=r"to_pil needs a float \(3, H, W\) image in \[0, 1\], got \(1, 3, 24, 40\)"):
        to_pil(x[None])
