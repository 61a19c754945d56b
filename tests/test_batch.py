"""`upscale` over folders: torchrun-style sharding by RANK/WORLD_SIZE, and resuming.

Each rank must take files r, r+N, … and write exactly what a single process writes for
them (each file is its own image under the seed contract), so the shards' union is the
single-process result, byte for byte.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from upsr_core.checkpoint import save_converted
from upsr_core.cli import main
from upsr_core.nets import ATD, UPSRDenoiser
from upsr_core.train.presets import TINY


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_converted(path, UPSRDenoiser(TINY.denoiser).eval(), ATD(TINY.estimator).eval())
    return path


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (9 + k, 12, 3), dtype=np.uint8)).save(src / f"img{k}.png")
    return src


def _run(src, out, model, monkeypatch, rank=None, world=None):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["upscale", str(src), "-o", str(out), "--model", str(model), "--device", "cpu", "-q"]) == 0


def test_ranks_take_disjoint_shards_that_add_up_to_the_single_run(folder, tmp_path, tiny_model_file, monkeypatch):
    _run(folder, tmp_path / "single", tiny_model_file, monkeypatch)
    for r in range(2):
        _run(folder, tmp_path / f"rank{r}", tiny_model_file, monkeypatch, rank=r, world=2)
    got = {r: sorted(p.name for p in (tmp_path / f"rank{r}").glob("*.png")) for r in range(2)}
    assert got[0] == ["img0.png", "img2.png", "img4.png"]
    assert got[1] == ["img1.png", "img3.png"]
    for r, names in got.items():
        for n in names:
            assert (tmp_path / f"rank{r}" / n).read_bytes() == (tmp_path / "single" / n).read_bytes()


def test_rerun_skips_existing_outputs(folder, tmp_path, tiny_model_file, monkeypatch, caplog):
    out = tmp_path / "out"
    _run(folder, out, tiny_model_file, monkeypatch)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "img3.png").unlink()
    with caplog.at_level("INFO", logger="upsr_core"):
        _run(folder, out, tiny_model_file, monkeypatch)
    assert "skipping 4 image(s)" in caplog.text
    assert sorted(p.name for p in out.glob("*.png")) == [f"img{k}.png" for k in range(5)]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in stamp.items() if n != "img3.png")


def test_bad_rank_is_an_error(folder, tmp_path, tiny_model_file, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "o"), "--model", str(tiny_model_file)]) == 2
    assert "RANK 2 must be in [0, WORLD_SIZE 2)" in capsys.readouterr().err
