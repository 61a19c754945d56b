"""Training datasets, image reading and packed crops (small images made in tmp_path)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upsr_core.train.data import (
    ImageFolderDataset,
    PackedCropsDataset,
    augment_dihedral,
    list_images,
    load_image_array,
    main,
    pack_crops,
    photos_of_group,
)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """rgb.png 80×96, gray.jpg 70×70, sub/alpha.png (RGBA, half transparent), deep16.png
    (16-bit gray), tiny.bmp 20×24, sub/pic.webp 72×72, notes.txt (not an image)."""
    Image.fromarray(_rgb(80, 96, 0)).save(tmp_path / "rgb.png")
    Image.fromarray(_rgb(70, 70, 1)[:, :, 0]).save(tmp_path / "gray.jpg", quality=95)
    (tmp_path / "sub").mkdir()
    rgba = np.concatenate([_rgb(64, 64, 2), np.full((64, 64, 1), 255, np.uint8)], axis=2)
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sub" / "alpha.png")
    deep = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep16.png")
    Image.fromarray(_rgb(20, 24, 3)).save(tmp_path / "tiny.bmp")
    Image.fromarray(_rgb(72, 72, 4)).save(tmp_path / "sub" / "pic.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_list_images_recursive(folder: Path) -> None:
    names = [p.relative_to(folder).as_posix() for p in list_images(folder)]
    assert names == ["deep16.png", "gray.jpg", "rgb.png", "sub/alpha.png", "sub/pic.webp", "tiny.bmp"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(folder / "missing")


def test_load_image_modes(folder: Path) -> None:
    g, gmax = load_image_array(folder / "gray.jpg")
    assert g.shape == (70, 70, 3) and gmax == 255 and np.array_equal(g[..., 0], g[..., 2])
    a, _ = load_image_array(folder / "sub" / "alpha.png")
    assert (a[:, :32] == 255).all()  # transparent pixels composited over white
    assert np.array_equal(a[:, 32:], _rgb(64, 64, 2)[:, 32:])
    d, dmax = load_image_array(folder / "deep16.png")
    assert d.dtype == np.uint16 and dmax == 65535 and int(d.max()) == 4095 * 16
    half, _ = load_image_array(folder / "rgb.png", prescale=2)
    assert half.shape == (40, 48, 3)


def test_load_image_array_reads_as_read_image_does(tmp_path: Path, caplog) -> None:
    """The training reader against upscale's: a tRNS colour key is alpha (composited over white),
    a float TIFF is [0, 1] gray, a 32-bit integer TIFF of 8-bit values is 8-bit, and 16-bit colour
    (Pillow reads its high bytes) is named in a warning."""
    key = np.zeros((4, 4, 3), np.uint8)
    key[:2] = (0, 255, 0)
    key[2:] = (10, 20, 30)
    Image.fromarray(key).save(tmp_path / "key.png", transparency=(0, 255, 0))
    a, m = load_image_array(tmp_path / "key.png")
    assert m == 255 and (a[:2] == 255).all() and (a[2:] == (10, 20, 30)).all()  # the key showed green
    f = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(f).save(tmp_path / "f.tif")
    a, m = load_image_array(tmp_path / "f.tif")
    assert m == 65535 and a.dtype == np.uint16 and np.array_equal(a[..., 1], np.round(f * 65535))  # was black
    Image.fromarray(np.arange(16, dtype=np.int32).reshape(4, 4) * 17).save(tmp_path / "i.tif")
    a, m = load_image_array(tmp_path / "i.tif")
    assert m == 255 and a.dtype == np.uint8 and int(a.max()) == 255  # was /65535: nearly black
    rgb16 = (np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1000).astype(">u2")
    _write_png16(tmp_path / "c16.png", rgb16)
    with caplog.at_level("WARNING", logger="upsr_core.train.data"):
        a, m = load_image_array(tmp_path / "c16.png")
    assert m == 255 and np.array_equal(a, (rgb16.astype(np.uint16) >> 8).astype(np.uint8))
    assert any("c16.png: 16-bit colour" in r.getMessage() for r in caplog.records)


def _write_png16(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_folder_dataset_crops(folder: Path) -> None:
    torch.manual_seed(0)
    ds = ImageFolderDataset(folder, crop=32, repeat=2)
    assert len(ds) == 12
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with pytest.raises(IndexError):
        ds[12]


def test_folder_dataset_small_images_pad_or_skip(folder: Path) -> None:
    padded = ImageFolderDataset(folder, crop=64, augment=False, random_crop=False)
    assert len(padded) == 6 and padded[padded.files.index(folder / "tiny.bmp")].shape == (3, 64, 64)
    skipped = ImageFolderDataset(folder, crop=64, small="skip")
    assert sorted(p.name for p in skipped.files) == ["alpha.png", "deep16.png", "gray.jpg", "pic.webp", "rgb.png"]
    with pytest.raises(ValueError, match=r"no images of at least 512 px on the short side in .*TIFF is not read"):
        ImageFolderDataset(folder, crop=512, small="skip")
    with pytest.raises(ValueError, match="small"):
        ImageFolderDataset(folder, crop=32, small="crop")  # type: ignore[arg-type]


def test_folder_dataset_centre_crop_values(folder: Path) -> None:
    ds = ImageFolderDataset(None, crop=32, files=[folder / "rgb.png", folder / "deep16.png"],
                            augment=False, random_crop=False)
    ref = torch.from_numpy(_rgb(80, 96, 0)[24:56, 32:64].astype(np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(ds[0], ref, rtol=0, atol=0)
    deep = (np.arange(64 * 64).reshape(64, 64) * 16)[16:48, 16:48] / 65535.0
    torch.testing.assert_close(ds[1][1], torch.from_numpy(deep).float(), rtol=0, atol=1e-7)


def test_augment_dihedral_covers_the_8_symmetries() -> None:
    x = torch.arange(9.0).reshape(1, 3, 3)
    g = torch.Generator().manual_seed(0)
    seen = {tuple(augment_dihedral(x, g).flatten().tolist()) for _ in range(200)}
    assert len(seen) == 8
    with pytest.raises(ValueError, match="square"):
        augment_dihedral(torch.zeros(3, 4, 5))


def test_photos_of_group(folder: Path) -> None:
    (folder / "SOURCES.tsv").write_text("file\ttier\tgroup\nrgb.png\t1\tA_train\ngray.jpg\t2\tA_val\n"
                                        "tiny.bmp\t2\tA_train\n")
    assert photos_of_group(folder, "A_train") == [folder / "rgb.png", folder / "tiny.bmp"]
    with pytest.raises(ValueError, match=r"expected one of \['A_train', 'A_val'\]"):
        photos_of_group(folder, "B")
    with pytest.raises(FileNotFoundError, match=r"SOURCES\.tsv"):
        photos_of_group(folder / "sub", "A_train")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_pack_round_trip(folder: Path, tmp_path: Path, suffix: str) -> None:
    files = [folder / "rgb.png", folder / "sub" / "pic.webp", folder / "tiny.bmp"]
    out = tmp_path / "out" / f"pack{suffix}"
    info = pack_crops(None, out, crop=32, per_image=3, seed=5, files=files, prescale=1)
    assert info["count"] == 6  # tiny.bmp (20×24) is skipped by default
    side = json.loads(out.with_suffix(".json").read_text())
    assert side == info and [i["file"] for i in side["items"]] == ["rgb.png"] * 3 + ["pic.webp"] * 3
    ds = PackedCropsDataset(out, augment=False)
    assert len(ds) == 6
    for k, item in enumerate(side["items"]):
        src = _rgb(80, 96, 0) if item["file"] == "rgb.png" else _rgb(72, 72, 4)
        ref = src[item["y"]:item["y"] + 32, item["x"]:item["x"] + 32]
        expected = torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1) / 255
        torch.testing.assert_close(ds[k], expected, rtol=0, atol=0)
    again = pack_crops(None, tmp_path / f"again{suffix}", crop=32, per_image=3, seed=5, files=files[::-1], prescale=1)
    assert sorted(map(str, again["items"])) == sorted(map(str, info["items"]))  # order-independent positions
    other = pack_crops(None, tmp_path / f"other{suffix}", crop=32, per_image=3, seed=6, files=files, prescale=1)
    assert other["items"] != info["items"]


def test_packed_dataset_recrop_and_errors(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.npy"
    pack_crops(folder, out, crop=32, per_image=2, seed=0, small="pad", prescale=1)
    torch.manual_seed(0)
    ds = PackedCropsDataset(out, crop=24, repeat=3)
    assert len(ds) == 36 and ds[35].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="larger than the packed crops"):
        PackedCropsDataset(out, crop=40)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"is not a packed-crops file \(a .npy of uint8 \(N, 3, S, S\).*"
                                         r"it holds torch.float32 \(2, 3, 8, 8\)"):
        PackedCropsDataset(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"\.npy or \.safetensors"):
        pack_crops(folder, tmp_path / "p.png", crop=32)


def test_cli_packs_a_group(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder / "SOURCES.tsv").write_text("file\tgroup\nrgb.png\tA_train\ngray.jpg\tA_train\nsub/pic.webp\tA_val\n")
    out = tmp_path / "train.npy"
    main(["--photos", str(folder), "--group", "A_train", "--out", str(out), "--crop", "32", "--per-image", "2",
          "--min-texture", "3"])
    assert np.load(out).shape == (4, 3, 32, 32)
    assert "4 crops of 32px from 2 images" in capsys.readouterr().out
