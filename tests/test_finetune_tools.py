"""The fine-tune tooling: tools/pack_photos.py, `eval --niqe-params off`, device_train.sh --prepare,
tools/flat_probe.py."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from upsr_core.cli import main

from _support import REPO, load_tool


def _pack_photos():
    return load_tool("pack_photos")


def _photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    ramp = np.linspace(0, 255, 2048, dtype=np.float32)
    big = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)  # short side 2048: 'auto' halves it
    Image.fromarray(big).save(d / "big.png")
    Image.fromarray(big[:300, :400]).save(d / "small.png")
    Image.fromarray(big[:300, :300]).save(d / "val.png")
    rows = ["file\tgroup", "big.png\tA_train", "small.png\tA_train", "val.png\tA_val"]
    (d / "SOURCES.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return d


def test_pack_photos_writes_the_group_as_jpeg(tmp_path, capsys):
    pp = _pack_photos()
    photos, out = _photos(tmp_path), tmp_path / "train_photos"
    assert pp.main(["--photos", str(photos), "--out", str(out)]) == 0
    info = json.loads((out / "PHOTOS.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["PHOTOS.json", "big.jpg", "small.jpg"]  # no A_val photo
    items = {i["source"]: i for i in info["items"]}
    assert items["big.png"]["prescale"] == 2 and items["big.png"]["size"] == [1024, 1024]
    assert items["small.png"]["prescale"] == 1 and items["small.png"]["size"] == [400, 300]
    for i in info["items"]:
        data = (out / i["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == i["sha256"] and len(data) == i["bytes"]
        with Image.open(out / i["file"]) as im:
            assert im.format == "JPEG" and list(im.size) == i["size"]
    assert info["total_bytes"] == sum(i["bytes"] for i in info["items"])
    assert pp.main(["--photos", str(photos), "--out", str(out), "--max-side", "512"]) == 0
    assert json.loads((out / "PHOTOS.json").read_text())["items"][0]["size"] == [512, 512]
    capsys.readouterr()
    assert pp.main(["--photos", str(photos), "--out", str(out), "--group", "B"]) == 2
    assert "group 'B'" in capsys.readouterr().err
    assert pp.main(["--photos", str(photos), "--out", str(out), "--budget-mib", "0.001"]) == 1
    assert "exceeds --budget-mib" in capsys.readouterr().err
    # two photos of one stem (a.png, a.jpg) would be one a.jpg: refused before anything is written
    Image.open(photos / "small.png").save(photos / "small.jpg")
    (photos / "SOURCES.tsv").write_text("file\tgroup\nsmall.png\tA_train\nsmall.jpg\tA_train\n", encoding="utf-8")
    assert pp.main(["--photos", str(photos), "--out", str(tmp_path / "dup")]) == 2
    assert "would both be written as" in capsys.readouterr().err and not (tmp_path / "dup").exists()


def _pairs(tmp_path):
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    hr.mkdir()
    lr.mkdir()
    rng = np.random.default_rng(0)
    for n in ("a", "b"):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(hr / f"{n}.png")
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(lr / f"{n}.png")
    return hr, lr


def test_eval_niqe_off(tmp_path, monkeypatch):
    hr, lr = _pairs(tmp_path)
    monkeypatch.setenv("UPSR_NIQE_PARAMS", str(tmp_path / "would_be_used.npz"))
    out = tmp_path / "eval"
    assert main(["eval", "--hr", str(hr), "--lr", str(lr), "--method", "bicubic", "--niqe-params", "off",
                 "--out", str(out), "--sheet", "0", "--device", "cpu"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["info"]["niqe"] is False and "niqe" not in res["mean"]["bicubic"] and res["info"]["pairs"] == 2


def _make_pairs_layout(tmp_path):
    """What shared/data/make_pairs.py writes: group A's pairs mixed in A/, the group in the manifest."""
    pairs = tmp_path / "pairs"
    rows = [("t0", "A_train", 256), ("v0", "A_val", 256), ("v1", "A_val", 256), ("v2", "A_val", 512)]
    for i, (cid, _, size) in enumerate(rows):
        for sub, px in ((f"hr{size}", size), (f"lr{size}_realesrgan", size // 4), (f"lr{size}_bicubic", size // 4)):
            (pairs / "A" / sub).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (px, px), (i, 2 * i, 3 * i)).save(pairs / "A" / sub / f"{cid}.png")
    (pairs / "manifest.jsonl").write_text("".join(json.dumps({"id": c, "group": g, "hr_size": s}) + "\n"
                                                  for c, g, s in rows))
    return pairs


def test_val_pairs_copies_one_group_byte_for_byte(tmp_path, capsys):
    # tools/val_pairs.py: make_pairs' layout mixes A_train and A_val; the GPU run carries A_val alone.
    vp = load_tool("val_pairs")
    pairs = _make_pairs_layout(tmp_path)
    out = tmp_path / "carry" / "A_val"
    assert vp.main([str(pairs), "--out", str(out)]) == 0
    for sub in ("hr256", "lr256_realesrgan"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["v0.png", "v1.png"]  # not t0, not the 512 one
        assert (out / sub / "v1.png").read_bytes() == (pairs / "A" / sub / "v1.png").read_bytes()
    assert not (out / "lr256_bicubic").exists()
    assert vp.main([str(pairs), "--out", str(out)]) == 0  # a rerun over its own copy is fine
    (out / "hr256" / "t0.png").write_bytes(b"stale")
    assert vp.main([str(pairs), "--out", str(out)]) == 2
    assert "holds 1 file(s) that are not A_val pairs (first: t0.png)" in capsys.readouterr().err
    (pairs / "A" / "lr256_realesrgan" / "v1.png").unlink()
    assert vp.main([str(pairs), "--out", str(tmp_path / "x")]) == 2
    assert "1 of the 2 A_val pairs are missing" in capsys.readouterr().err
    assert vp.main([str(pairs), "--group", "A_test", "--out", str(tmp_path / "y")]) == 2
    assert "no entries of group 'A_test' at HR 256" in capsys.readouterr().err
    with open(pairs / "manifest.jsonl", "a") as f:
        f.write('{"id": "v9", "group": "A_val"}\n')  # no hr_size
    assert vp.main([str(pairs), "--out", str(tmp_path / "z")]) == 2
    assert "line 5: expected a JSON object with 'id', 'group' and 'hr_size' (KeyError" in capsys.readouterr().err
    (pairs / "manifest.jsonl").write_text((pairs / "manifest.jsonl").read_text().replace('"v9"', '"v9", "hr_size": 64'))
    (pairs / "A" / "lr256_realesrgan" / "v1.png").write_bytes((pairs / "A" / "lr256_bicubic" / "v1.png").read_bytes())
    # eval reads make_pairs' own layout through --manifest/--group (the README's command)
    eval_out = tmp_path / "eval"
    assert main(["eval", "--hr", str(pairs / "A" / "hr512"), "--lr", str(pairs / "A" / "lr512_realesrgan"),
                 "--manifest", str(pairs / "manifest.jsonl"), "--group", "A_val", "--method", "bicubic",
                 "--niqe-params", "off", "--sheet", "0", "--device", "cpu", "--out", str(eval_out)]) == 0
    assert json.loads((eval_out / "results.json").read_text())["info"]["pairs"] == 1


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_device_train_prepare_checks_the_carry(tmp_path, mode):
    pack = tmp_path / "pack"
    for d in ("A_val/hr256", "A_val/lr256_realesrgan"):
        (pack / d).mkdir(parents=True)
    np.save(pack / "crops.npy", np.zeros((1, 3, 8, 8), np.uint8))
    photos = tmp_path / "train_photos"
    photos.mkdir()
    env = {**os.environ, "MODE": mode, "PACK": str(pack), "PHOTOS": str(photos),
           "NIQE_NPZ": str(tmp_path / "niqe" / "niqe_pris_params.npz")}
    run = lambda: subprocess.run(["bash", str(REPO / "tools" / "device_train.sh"), "--prepare"], cwd=REPO, env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=60)
    if mode == "finetune":
        r = run()
        assert r.returncode == 2 and "no photos" in r.stdout
        Image.new("RGB", (300, 300)).save(photos / "p.jpg")
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    carry = [str(photos), str(pack / "A_val")] if mode == "finetune" else [str(pack)]
    assert "carry: [" + ", ".join(f'"{c}"' for c in carry) in r.stdout
    assert "note: " in r.stdout  # the NIQE parameters are missing here


def test_flat_probe_measures_invented_texture(tiny_model_file, capsys):
    # tools/flat_probe.py, the ship gate for retrained demos: a flat input's output std.
    probe = load_tool("flat_probe")
    assert probe.main(["--model", str(tiny_model_file), "--size", "16", "--b-u", "0.4,0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "b_u 0.4: flat 120/255 -> output std" in lines[0]
    from upsr_core import load_upsr

    model = load_upsr(tiny_model_file)
    std, mean = probe.flat_std(model, size=16, b_u=0.4)
    sr = model.upscale(torch.full((1, 3, 16, 16), 120 / 255), seed=0, b_u=0.4)
    assert std == pytest.approx(float(sr.std()) * 255) and mean == pytest.approx(float(sr.mean()) * 255)
    assert f"output std {std:.2f} levels" in lines[0]
