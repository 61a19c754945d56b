"""Determinism and the seed contract, with real (tiny, random) UPSR networks on the CPU.

The contract (pipeline.starting_noise): the noise of image i of a batch is drawn on the
CPU from ``torch.Generator('cpu').manual_seed(seed + i)``. Consequences tested here:

* the same seed gives bit-identical output across runs, and in a fresh process;
* image i of a batch of 3 equals that image alone with seed S + i, bit for bit;
* the order in which tiles are processed changes results only by float32 rounding;
* with ``tile_batch`` fixed, repeated runs are bit-identical;
* different seeds give different images; a zero noise weight makes the seed irrelevant;
* the CLI gives every file the seed itself (not seed + i), whatever the folder holds;
* ``same_noise=True`` gives every image of a batch the noise of the seed itself (video
  frames), so a batch then equals its images one by one with that seed, as the CLI runs them.

What is *not* promised (measured, see docs/RELIABILITY.md): bit-identity across
``tile_batch`` values (CPU GEMM/conv kernels block differently for batch 1 and batch n:
≤ 4.5e-7 measured here; tests/test_tiling.py bounds it for the oracle nets), across
devices, or across thread counts (equal here for 1 and 2 threads, but not promised).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import upsr_core.model as model_mod
from upsr_core import cli
from upsr_core.checkpoint import save_converted
from upsr_core.fast import enable_fast
from upsr_core.imageio import read_image
from upsr_core.model import UPSRModel
from upsr_core.pipeline import starting_noise
from upsr_core.stages import estimate_maps, sample_maps, weight_map

from _support import tiny_upsr

REPO = Path(__file__).resolve().parents[1]
ROUNDING_ATOL = 1e-6  # a weighted average of ≤ 4 tiles summed in another order: a few float32 ulp of 1
# tile_batch: the denoiser's last bits change with its batch (GEMM vs GEMV blockings), then
# 5 DDIM steps carry that on; measured 4.5e-7 here. 1e-5 leaves 20× for other CPUs' kernels
# and is still 400× below one 8-bit level (1/255).
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> UPSRModel:
    return tiny_upsr()


def lr_batch(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


TILED = dict(tile=16, overlap=4)  # a 20×28 LR runs as 2×2 tiles
UNTILED = dict(tile=64, overlap=8)


# ------------------------------------------------------------------ the noise itself
@pytest.mark.parametrize("seed", [0, 12345, 2**63 - 3])
def test_starting_noise_is_one_cpu_generator_per_image(seed):
    hp, wp = 8, 12
    eps = starting_noise(seed, 3, (hp, wp))
    assert eps.shape == (3, 48, hp, wp) and eps.dtype == torch.float32 and eps.device.type == "cpu"
    for i in range(3):
        ref = torch.randn((1, 48, hp, wp), generator=torch.Generator("cpu").manual_seed(seed + i))
        assert torch.equal(eps[i : i + 1], ref)
        assert torch.equal(starting_noise(seed + i, 1, (hp, wp)), ref)
    # the global RNG plays no part
    torch.manual_seed(999)
    assert torch.equal(starting_noise(seed, 3, (hp, wp)), eps)


def test_seed_range_boundaries():
    starting_noise(2**63 - 1, 1, (4, 4))  # the largest seed a batch of one can take
    starting_noise(2**63 - 3, 3, (4, 4))  # ... and a batch of three
    with pytest.raises(ValueError, match=r"2\*\*63 - batch.*9223372036854775806"):
        starting_noise(2**63 - 2, 3, (4, 4))  # image 2 would need seed 2**63
    # integer types: NumPy's are the same seed; bool is refused rather than read as 0/1
    assert torch.equal(starting_noise(np.int64(7), 2, (4, 4)), starting_noise(7, 2, (4, 4)))
    for bad in (True, 7.0, "7"):
        with pytest.raises(TypeError, match=f"got {type(bad).__name__} {bad!r}"):
            starting_noise(bad, 1, (4, 4))


def test_same_noise_gives_every_image_the_seed_s_noise():
    hp, wp = 64, 128
    eps = starting_noise(9, 3, (hp, wp), same_noise=True)
    one = starting_noise(9, 1, (hp, wp))
    assert eps.shape == (3, 48, hp, wp) and eps.is_contiguous()
    for i in range(3):
        assert torch.equal(eps[i : i + 1], one)
    starting_noise(2**63 - 1, 5, (4, 4), same_noise=True)  # only the seed itself must be in range
    with pytest.raises(ValueError, match="got -1"):
        starting_noise(-1, 2, (4, 4), same_noise=True)


@pytest.mark.parametrize("same_noise", [False, True])
def test_same_noise_batch_equals_images_alone(model, same_noise):
    """Untiled and tiled (NoiseField, band by band): image i of a batch equals that image alone
    with seed S (same_noise) or S + i, bit for bit; two identical frames give identical results
    with same_noise and different ones without."""
    frame = lr_batch(1, 20, 28, seed=3)
    lr = torch.cat([frame, frame, lr_batch(1, 20, 28, seed=4)])
    for kw in (UNTILED, TILED):
        batch = model.upscale(lr, seed=5, same_noise=same_noise, **kw)
        for i in range(3):
            alone = model.upscale(lr[i : i + 1], seed=5 if same_noise else 5 + i, **kw)
            assert torch.equal(batch[i : i + 1], alone), (kw, i)
        assert torch.equal(batch[0], batch[1]) == same_noise, kw
        est, psi = estimate_maps(model, lr)
        staged = sample_maps(model, lr, est, weight_map(psi), seed=5, same_noise=same_noise, **kw)
        assert torch.equal(staged, batch), kw  # the stage path takes the same noise


# ------------------------------------------------------------------ run to run
@pytest.mark.parametrize("plan, tile_batch", [(TILED, 1), (TILED, 3), (UNTILED, 1)],
                         ids=["tiled", "tiled-batch3", "untiled"])
def test_same_seed_is_bit_identical_across_runs(model, plan, tile_batch):
    lr = lr_batch(1, 20, 28)
    a = model.upscale(lr, seed=42, tile_batch=tile_batch, **plan)
    torch.manual_seed(1234)  # disturbing the global RNG must not matter
    random.seed(5)
    np.random.seed(5)
    b = model.upscale(lr, seed=42, tile_batch=tile_batch, **plan)
    assert torch.equal(a, b)


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


SUBPROCESS_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from test_determinism import tiny_upsr, lr_batch
sr = tiny_upsr().upscale(lr_batch(1, 20, 28), seed=42, tile=16, overlap=4)
print(hashlib.sha256(sr.contiguous().numpy().tobytes()).hexdigest())
"""


def test_same_seed_is_bit_identical_in_a_fresh_process(model):
    """Nothing carried in process state (caches, RNG, first-call paths) changes a result."""
    here = _digest(model.upscale(lr_batch(1, 20, 28), seed=42, **TILED))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SUBPROCESS_SCRIPT.format(tests=str(REPO / "tests"))],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here


# ------------------------------------------------------------------ batches and the seed contract
@pytest.mark.parametrize("plan", [TILED, UNTILED], ids=["tiled", "untiled"])
def test_image_i_of_a_batch_equals_it_alone_with_seed_plus_i(model, plan):
    lr = lr_batch(3, 20, 28)
    lr[1] = 0.0  # an all-black image in the middle of the batch
    s = 2**40 + 7
    batch = model.upscale(lr, seed=s, **plan)
    for i in range(3):
        assert torch.equal(batch[i : i + 1], model.upscale(lr[i : i + 1], seed=s + i, **plan)), f"image {i}"
    # and the contract is *seed + i*: image 1 alone with seed s is a different image
    assert not torch.equal(batch[1:2], model.upscale(lr[1:2], seed=s, **plan))


def test_staged_maps_equal_upscale(model):
    """The node chain (estimate -> ψ -> w -> sample on visible maps) gives upscale bit for bit."""
    lr = lr_batch(2, 19, 26)  # padded to 20×28: the maps carry their padded originals
    sr_est, psi = estimate_maps(model, lr)
    got = sample_maps(model, lr, sr_est, weight_map(psi), seed=9, **TILED)
    assert torch.equal(got, model.upscale(lr, seed=9, **TILED))


# ------------------------------------------------------------------ tile order
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_tile_order_changes_only_rounding(model, monkeypatch, order):
    """Processing the tiles in another order (and re-running estimator blocks that the
    row-major cache would have kept) gives the same image up to float32 rounding of the
    blend sums: the tiles are the same, only the order of the ≤ 4 additions per pixel moves."""
    lr = lr_batch(1, 20, 28)
    ref = model.upscale(lr, seed=3, **TILED)
    plan = model_mod.plan_tiles

    def reordered(*args):
        tiles = plan(*args)
        if order == "reversed":
            return tiles[::-1]
        return [tiles[i] for i in torch.randperm(len(tiles), generator=torch.Generator().manual_seed(1))]

    monkeypatch.setattr(model_mod, "plan_tiles", reordered)
    got = model.upscale(lr, seed=3, **TILED)
    torch.testing.assert_close(got, ref, rtol=0, atol=ROUNDING_ATOL)


def test_tile_batch_changes_only_rounding(model):
    lr = lr_batch(1, 20, 28)
    ref = model.upscale(lr, seed=3, tile_batch=1, **TILED)
    for tb in (2, 6):
        torch.testing.assert_close(model.upscale(lr, seed=3, tile_batch=tb, **TILED), ref, rtol=0, atol=BATCH_ATOL)


# ------------------------------------------------------------------ seeds matter (and only through ε)
def test_seeds_repeat_with_period_2_to_the_32():
    """Documented limit: the CPU Mersenne Twister keeps only the low 32 bits of a seed, so
    seeds equal modulo 2**32 draw the same noise (2**32 distinct fields). If torch ever
    seeds with all 64 bits this test fails and docs/RELIABILITY.md must be updated."""
    assert torch.equal(starting_noise(5, 2, (4, 4)), starting_noise(5 + 2**32, 2, (4, 4)))
    assert torch.equal(starting_noise(7, 1, (4, 4)), starting_noise(7 + 2**62, 1, (4, 4)))
    assert not torch.equal(starting_noise(5, 1, (4, 4)), starting_noise(6, 1, (4, 4)))


def test_different_seeds_differ(model):
    lr = lr_batch(1, 20, 28)
    outs = [model.upscale(lr, seed=s, **TILED) for s in (0, 1, 2**40 + 12345)]  # distinct modulo 2**32
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        d = (outs[a] - outs[b]).abs()
        # measured: ~78 % of values differ, mean |Δ| ≈ 2e-3 at b_u = 0.4; a seed ignored anywhere
        # (one tile, one image) would leave a block of exact zeros, so check every tile region
        assert d.mean() > 5e-4
        for y in range(0, 4 * 20, 48):
            for x in range(0, 4 * 28, 48):
                assert (d[..., y : y + 48, x : x + 48] > 0).any(), (a, b, y, x)


def test_zero_noise_weight_makes_the_seed_irrelevant(model):
    """w = 0 (b_u = 0 and ψ = 0) means x_T = y↑ exactly: no seed can change the result."""
    lr = lr_batch(1, 20, 28)
    est = model.estimate(lr)
    w = torch.zeros(1, 1, *est.bicubic_pm.shape[-2:])
    a = model.denoise(est, w, seed=0, **TILED)
    assert torch.equal(a, model.denoise(est, w, seed=987654321, **TILED))


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det") / "tiny.safetensors"
    save_converted(path, model.denoiser, model.estimator)
    return path


def test_cli_gives_every_file_the_seed_itself(model, model_file, tmp_path):
    """A folder of 2 images gives each file what it gives alone: no seed + i across files."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(src / f"{name}.png")
    common = ["--model", str(model_file), "--device", "cpu", "--seed", "17", "--tile", "8", "--overlap", "2", "-q"]
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "folder"), *common]) == 0
    for name in ("a", "b"):
        one = tmp_path / f"{name}.png"
        assert cli.main(["upscale", str(src / f"{name}.png"), "-o", str(one), *common]) == 0
        folder = np.asarray(Image.open(tmp_path / "folder" / f"{name}.png"))
        assert np.array_equal(folder, np.asarray(Image.open(one))), name
        # ... and the file is the 8-bit rounding of the library result with the same seed
        sr = model.upscale(read_image(src / f"{name}.png").rgb[None], seed=17, tile=8, overlap=2)[0]
        expect = (sr.clamp(0, 1) * 255).round().permute(1, 2, 0).to(torch.uint8).numpy()
        assert np.array_equal(folder, expect), name


@pytest.mark.parametrize("hw", [(64, 64), (128, 192), (16, 48)])
def test_noise_field_bands_equal_the_whole_field(hw):
    """NoiseField (band-by-band ε for large images) must give exactly the seed-contract noise:
    the CPU generator draws 16-value chunks, so 48 planes in a row equal one (1,48,H,W) draw."""
    from upsr_core.pipeline import NoiseField

    full = starting_noise(11, 2, hw)
    field = NoiseField(11, 2, hw)
    for i in range(2):
        assert torch.equal(field[i, :, 5 : hw[0] - 3, 2:40], full[i, :, 5 : hw[0] - 3, 2:40])
        assert torch.equal(field[i, :, 0 : hw[0], 0 : hw[1]], full[i])
    with pytest.raises(ValueError, match="seed"):
        NoiseField(-1, 1, hw)
    same = NoiseField(11, 3, hw, same_noise=True)
    for i in (2, 0, 1):  # any order: image i's band is image 0's
        assert torch.equal(same[i, :, 5 : hw[0] - 3, 2:40], full[0, :, 5 : hw[0] - 3, 2:40])


@pytest.mark.parametrize("hw", [(256, 64), (200, 48), (96, 40), (24, 12)])
def test_noise_field_restarts_bands_from_kept_states(hw, monkeypatch):
    """Bands in any order, overlapping, across images, equal the whole field; after an image's
    first band (one pass over its stream) a band draws only from the block of rows it starts
    in, not the whole stream again (tile rows of a tall image each redrew all 48 planes)."""
    from upsr_core.pipeline import NoiseField

    full = starting_noise(5, 2, hw)
    field = NoiseField(5, 2, hw)
    rng = random.Random(0)
    for _ in range(30):
        i, y0 = rng.randrange(2), rng.randrange(hw[0])
        y1 = rng.randrange(y0, hw[0] + 1)
        assert torch.equal(field[i, :, y0:y1, 3:17], full[i, :, y0:y1, 3:17])
    drawn = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: drawn.append(math.prod(a[:2])) or real(*a, **k))
    field = NoiseField(5, 1, hw)
    field[0, :, 0 : min(32, hw[0]), :]
    assert sum(drawn) == 48 * hw[0] * hw[1]  # the first band: one pass
    drawn.clear()
    y0 = max(hw[0] - 40, 1)
    assert torch.equal(field[0, :, y0 : y0 + 32, :], full[0, :, y0 : y0 + 32])
    rows, end = field.rows_per_state, (y0 + 32 if hw[1] % 16 == 0 else hw[0])  # (rows of 12: whole planes)
    assert sum(drawn) == 48 * (end - y0 // rows * rows) * hw[1]  # from its block's start only


def test_flicker_probe_tool(model_file, capsys):
    """tools/flicker_probe.py (the README's video figures) on the tiny nets: same_noise makes the
    static clip's frames differ only by their sensor noise, far less than seed + i does."""
    from _support import load_tool

    probe = load_tool("flicker_probe")
    assert probe.main(["--model", str(model_file), "--frames", "3", "--size", "16x24"]) == 0
    rows = {r.split("|")[1].strip(): [float(v) for v in r.split("|")[2:5]]
            for r in capsys.readouterr().out.splitlines() if r.startswith(("| static", "| pan"))}
    assert set(rows) == {"static", "pan"}
    bicubic, per, same = rows["static"]
    assert same < per / 2, rows
    assert rows["pan"][0] < rows["pan"][1]  # bicubic is shift-equivariant (but at the frame's borders)
    lr = torch.rand(1, 3, 16, 20)
    with pytest.raises(ValueError, match="at least 16x26"):
        probe.clips(lr, 3, 16, 24, 2.0)


def test_make_overview_tool(model, model_file, tmp_path):
    """tools/make_overview.py (the README's first figure) on the tiny nets: four panels of 4h x 4w
    side by side, the first bicubic x4 of the input and the last the model's own result for seed
    0 (both rounded to 8 bits, as the sheet stores them)."""
    from _support import load_tool

    lr8 = np.random.default_rng(3).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(lr8).save(tmp_path / "lr.png")
    out = tmp_path / "overview.png"
    tool = load_tool("make_overview")
    assert tool.main(["--model", str(model_file), "--input", str(tmp_path / "lr.png"), "--out", str(out)]) == 0
    sheet = np.asarray(Image.open(out))
    h, w = 48, 80
    assert sheet.shape == (h + 24, 4 * w + 30, 3)
    lr = torch.from_numpy(lr8).permute(2, 0, 1)[None].float() / 255
    bic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    sr = model.upscale(lr, seed=0)

    def as8(x):
        return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    np.testing.assert_array_equal(sheet[24:, :w], as8(bic))
    np.testing.assert_array_equal(sheet[24:, 3 * (w + 10) : 3 * (w + 10) + w], as8(sr))


# ------------------------------------------------------------------ torch's default dtype
@pytest.fixture(scope="module")
def fast_model() -> UPSRModel:
    return enable_fast(tiny_upsr(), compile=False)


@pytest.fixture
def default_float64():
    """A notebook that set ``torch.set_default_dtype(torch.float64)`` for other work."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def test_starting_noise_is_float32_whatever_the_default_dtype(default_float64):
    eps = starting_noise(3, 2, (8, 8))
    torch.set_default_dtype(torch.float32)
    assert eps.dtype == torch.float32 and torch.equal(eps, starting_noise(3, 2, (8, 8)))


@pytest.mark.parametrize("plan", [UNTILED, TILED, dict(TILED, sink=True), dict(TILED, fast=True)],
                         ids=["untiled", "tiled", "streamed", "fast"])
def test_the_default_dtype_does_not_change_the_image(model, fast_model, plan, default_float64):
    """The seed contract draws ε in float32 (README): float64 as torch's default dtype gave
    other noise and a float64 image (probe, 2026-11-27: max |Δ| 0.36 on the demo model)."""
    lr = lr_batch(1, 20, 28)
    kw = {k: v for k, v in plan.items() if k not in ("sink", "fast")}
    if plan.get("fast"):
        model = fast_model

    def run() -> torch.Tensor:
        if "sink" not in plan:
            return model.upscale(lr, seed=5, **kw)
        rows: list[torch.Tensor] = []
        model.upscale(lr, seed=5, sink=lambda i, y0, x: rows.append(x), **kw)
        return torch.cat(rows, -2)

    got = run()
    torch.set_default_dtype(torch.float32)
    want = run()
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
