"""The fast path (upsr_core.fast) against the reference path, on the CPU.

Tolerances: the fast path changes the order of floating-point operations, never the math
(SDPA instead of matmul-softmax-matmul, the same GroupNorm, the same sampler arithmetic),
so in fp32 it differs from the reference only by rounding: about 1e-7 relative per op,
grown through ~40 layers and 5 denoiser passes. Observed max |Δ| on the oracle nets is
7e-6 in [0,1]; FP32_ATOL = 5e-5 leaves room for other CPUs and thread counts and is still
far below one 16-bit gray level (1.5e-5 · 255 ≈ 4e-3 of an 8-bit level). bf16 keeps
8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per op), so BF16_* bound its drift.
Speed is measured by ``python -m upsr_core bench``, never here.
"""
from __future__ import annotations

import copy

import pytest
import torch

from upsr_core.fast import FastUPSRModel, enable_fast, noise_weight
from upsr_core.graphs import GraphCache
from upsr_core.model import UPSRModel
from upsr_core.nets.atd import ATD
from upsr_core.nets.denoiser import GroupNorm32, SwinBlock
from upsr_core.pipeline import padded_size, starting_noise
from upsr_core.uncertainty import weight_noise

from _support import bench_args, tiny_upsr

FP32_ATOL = 5e-5  # see the module docstring
# max / mean |Δ| in [0,1] of a half-precision denoiser vs the fp32 reference on the oracle
# nets (random weights), about 2x the observed values: bf16 6.8e-2 / 5.7e-3 (2% relative
# error per denoiser pass), fp16 5.9e-3 / 5.8e-4 (0.2% per pass).
HALF_BOUNDS = {torch.bfloat16: (0.15, 0.012), torch.float16: (0.015, 1.2e-3)}


def _fast(small_nets, dtype: torch.dtype = torch.float32) -> FastUPSRModel:
    den, atd = (copy.deepcopy(n) for n in small_nets)
    return enable_fast(UPSRModel(den.to(dtype=dtype), atd, dtype=dtype))


@pytest.fixture(scope="module")
def fast32(small_nets) -> FastUPSRModel:
    return _fast(small_nets)


@pytest.mark.parametrize(
    "shape,tile,overlap,tile_batch",
    [((1, 3, 16, 16), 512, 64, 1), ((2, 3, 20, 44), 512, 64, 1),
     ((1, 3, 40, 72), 32, 16, 1), ((2, 3, 40, 72), 32, 16, 3)],
)
def test_fast_fp32_equals_reference(small_model, fast32, shape, tile, overlap, tile_batch):
    lr = torch.rand(shape)
    kw = dict(seed=3, tile=tile, overlap=overlap, tile_batch=tile_batch)
    ref = small_model.upscale(lr, **kw)
    out = fast32.upscale(lr, **kw)
    assert out.shape == ref.shape == (shape[0], 3, 4 * shape[2], 4 * shape[3])
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("tile_batch", [1, 3])
def test_fast_tiled_batch_equals_reference_on_the_tiny_nets(tile_batch):
    """The multi-image tiled blend without the oracle (which CI lacks): two images of 3 × 5 tiles;
    blending the second image's tiles with the first's weights passed in CI before (2026-11-29
    mutation review)."""
    ref = tiny_upsr()
    fast = enable_fast(UPSRModel(copy.deepcopy(ref.denoiser), copy.deepcopy(ref.estimator)))
    lr = torch.rand(2, 3, 20, 36, generator=torch.Generator().manual_seed(4))
    kw = dict(seed=3, tile=16, overlap=8, tile_batch=tile_batch)
    want = ref.upscale(lr, **kw)
    torch.testing.assert_close(fast.upscale(lr, **kw), want, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(fast.upscale(lr[1:], **(kw | {"seed": 4})), want[1:], atol=FP32_ATOL, rtol=0)


def test_fast_denoise_equals_reference(small_model, fast32):
    lr = torch.rand(2, 3, 40, 72)
    est = small_model.estimate(lr)
    w = weight_noise(est.uncertainty())
    kw = dict(seed=5, tile=32, overlap=16, tile_batch=2)
    torch.testing.assert_close(fast32.denoise(est, w, **kw), small_model.denoise(est, w, **kw), atol=FP32_ATOL, rtol=0)


def test_fast_matches_the_official_oracle(oracle, fast32):
    """Case a of the official run, through the fast fused path with the recorded noise."""
    lr, noise = oracle["case_a.lr"], oracle["case_a.noise_xT"]
    out = fast32.upscale(lr, noise=noise, tile=512)
    torch.testing.assert_close(out, oracle["case_a.sr"], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("hw", [(2, 2), (4, 6), (8, 4)])
@pytest.mark.parametrize("batch", [1, 2])
def test_swin_block_fast_equals_reference(small_nets, hw, batch):
    """Shifted and unshifted blocks, including one window-row (nWh = 1) and non-square grids."""
    den = copy.deepcopy(small_nets[0])
    blocks = [m for m in den.modules() if isinstance(m, SwinBlock)]
    assert any(b.shift for b in blocks) and any(not b.shift for b in blocks)
    for blk in blocks[:2]:
        ws = blk.window
        x = torch.randn(batch, blk.norm1.num_channels, hw[0] * ws, hw[1] * ws)
        with torch.no_grad():
            ref = blk(x)
            blk.prepare_fast()
            out = blk(x)
        # fused SDPA vs explicit softmax(QKᵀ)V: float32 reassociation, ~1e-6 on values ~1
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (16, 24), (24, 8)])
def test_atd_fast_equals_reference(small_nets, hw):
    """Window fix-ups of the standard shift mask: last row, last column, corner, one-row maps."""
    atd = copy.deepcopy(small_nets[1])
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        ref = atd(x)
        atd.prepare_fast()
        out = atd(x)
    # fused attention reassociates float32 sums (~1e-6); a category-sort tie flipped by it would
    # be ~1e-2 and fail, which these inputs do not meet
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_with_fp32(small_model, small_nets, dtype):
    half = _fast(small_nets, dtype)
    lr = torch.rand(2, 3, 20, 44)
    ref = small_model.upscale(lr, seed=1)
    out = half.upscale(lr, seed=1)
    d = (out.float() - ref).abs()
    max_bound, mean_bound = HALF_BOUNDS[dtype]
    assert torch.isfinite(out).all()
    assert d.max().item() <= max_bound, d.max().item()
    assert d.mean().item() <= mean_bound, d.mean().item()


def test_reference_runs_in_bf16_on_cpu(small_nets):
    """GroupNorm keeps float32 affine parameters, so a bf16 reference net runs on the CPU."""
    den, atd = (copy.deepcopy(n) for n in small_nets)
    m = UPSRModel(den, atd).to(dtype=torch.bfloat16)
    out = m.upscale(torch.rand(1, 3, 16, 16), seed=0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_noise_weight_is_weight_noise():
    y_hat, bic = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    from upsr_core.pipeline import Estimate

    est = Estimate(torch.zeros(2, 3, 2, 2), bic, y_hat, (2, 2))
    assert torch.equal(noise_weight(y_hat, bic, 0.3, 0.07), weight_noise(est.uncertainty(), 0.3, 0.07))


def test_upscale_checks_noise_shape(fast32):
    with pytest.raises(ValueError, match="noise"):
        fast32.upscale(torch.rand(1, 3, 16, 16), noise=torch.zeros(1, 48, 8, 8))


def test_fast_upscale_uses_the_seed_contract(fast32):
    lr = torch.rand(2, 3, 16, 16)
    hp = -(-16 // fast32.multiple_of) * fast32.multiple_of
    a = fast32.upscale(lr, seed=7)
    b = fast32.upscale(lr, noise=starting_noise(7, 2, (hp, hp)))
    assert torch.equal(a, b)
    # images are batched in the fast path, so only rounding may differ from a batch of one
    torch.testing.assert_close(fast32.upscale(lr[1:], seed=8), a[1:], atol=FP32_ATOL, rtol=0)
    # same_noise: the seed's noise for every image, here and where a large image goes (the base tiling)
    same = fast32.upscale(lr, seed=7, same_noise=True)
    assert torch.equal(same, fast32.upscale(lr, noise=starting_noise(7, 2, (hp, hp), same_noise=True)))
    torch.testing.assert_close(same[1:], fast32.upscale(lr[1:], seed=7), atol=FP32_ATOL, rtol=0)
    big = torch.rand(1, 3, 40, 72).expand(2, -1, -1, -1)
    tiled = fast32.upscale(big, seed=7, same_noise=True, tile=32, overlap=8)
    assert torch.equal(tiled[0], tiled[1])


def test_enable_fast_rejects_bad_arguments(small_nets):
    with pytest.raises(TypeError, match="UPSRModel"):
        enable_fast(small_nets[0])
    with pytest.raises(ValueError, match="compile"):
        enable_fast(UPSRModel(*(copy.deepcopy(n) for n in small_nets)), compile="yes")
    with pytest.raises(ValueError, match="cuda_graphs"):
        enable_fast(UPSRModel(*(copy.deepcopy(n) for n in small_nets)), compile_mode="reduce-overhead")


def test_fast_to_reprepares_masks(small_nets):
    m = _fast(small_nets)
    m.to(dtype=torch.bfloat16)
    blk = next(b for b in m.denoiser.modules() if isinstance(b, SwinBlock))
    assert blk.attn.fast_masks[0].dtype == torch.bfloat16
    assert m.upscale(torch.rand(1, 3, 16, 16), seed=0).isfinite().all()


def test_fast_follows_nets_moved_behind_its_back(small_nets, monkeypatch):
    """ComfyUI loads/offloads the nn.Modules directly (not through FastUPSRModel.to): the next call
    must re-prepare masks, constants and graphs for the new storage, and only then."""
    m = _fast(small_nets)
    lr = torch.rand(1, 3, 16, 16)
    want = m.upscale(lr, seed=1)
    prepared = []
    original = m._prepare
    monkeypatch.setattr(m, "_prepare", lambda: (prepared.append(1), original())[1])
    est = m.estimate(lr)
    m.denoise(est, weight_noise(est.uncertainty(), 0.4, 0.05), seed=1)
    assert prepared == []  # nothing moved: no re-preparation
    for net in (m.denoiser, m.estimator):  # what Module.to(other device) does: new storage for every tensor
        for p in net.parameters():
            p.data = p.data.clone()
    blk = next(b for b in m.denoiser.modules() if isinstance(b, SwinBlock))
    old_masks = blk.attn.fast_masks
    assert torch.equal(m.upscale(lr, seed=1), want)
    assert prepared == [1] and blk.attn.fast_masks is not old_masks
    m.upscale(lr, seed=1)
    assert prepared == [1]



def test_fast_follows_weights_changed_in_place_or_replaced():
    """New values in the same storage (load_state_dict, an optimizer step, a patcher's copy_) or
    one parameter other than the first replaced: the tables folded from the weights (step table,
    window masks with the position bias, ATD gains, sub-pixel kernels) are rebuilt. Before, only
    the first parameter's storage was watched and the fast path ran the old weights (0.36 off).
    Random tiny nets (no oracle needed), so the check also runs in CI."""
    ref = tiny_upsr()
    m = enable_fast(copy.deepcopy(ref))
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
    other = tiny_upsr(denoiser_gain=3.0).denoiser
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for net in (ref.denoiser, m.denoiser):
        net.load_state_dict(other.state_dict())
    torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
    name = "input_blocks.1.0.emb_layers.1.weight"  # the step table folds this one
    value = 0.5 * ref.denoiser.get_parameter(name).detach()
    mod_name, _, attr = name.rpartition(".")
    for model in (ref, m):
        setattr(model.denoiser.get_submodule(mod_name), attr, torch.nn.Parameter(value.clone(), requires_grad=False))
    torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
    for model in (ref, m):  # and the estimator's weights (its gains and masks)
        with torch.no_grad():
            for p in model.estimator.parameters():
                p.mul_(0.9)
    torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
    other_atd = tiny_upsr(estimator_gain=2.0).estimator  # a net assigned anew
    ref.estimator, m.estimator = other_atd, copy.deepcopy(other_atd)
    torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)


def test_fast_runs_nets_made_under_inference_mode():
    """ComfyUI loads and runs everything under torch.inference_mode: such parameters have no
    version counter (reading it raised "Inference tensors do not track version counter" in the
    loader node, caught by the ComfyUI end-to-end tests); their storage is still watched."""
    with torch.inference_mode():
        ref = tiny_upsr()
        m = enable_fast(copy.deepcopy(ref))
        lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
        name = "input_blocks.1.0.emb_layers.1.weight"
        mod_name, _, attr = name.rpartition(".")
        value = 0.5 * ref.denoiser.get_parameter(name).detach()
        for model in (ref, m):  # a replaced parameter is still seen
            new = torch.nn.Parameter(value.clone(), requires_grad=False)
            setattr(model.denoiser.get_submodule(mod_name), attr, new)
        torch.testing.assert_close(m.upscale(lr, seed=1), ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)


def test_enable_fast_refused_leaves_the_model_as_it_was(small_nets):
    """max_graphs was checked after the model's class had been switched: the refused call left a
    half-made fast model whose every later call failed with an AttributeError."""
    model = UPSRModel(*(copy.deepcopy(n) for n in small_nets))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"max_graphs must be an int >= 1, got {bad!r}"):
            enable_fast(model, max_graphs=bad)
    assert type(model) is UPSRModel
    assert model.upscale(torch.rand(1, 3, 8, 8), seed=0).shape == (1, 3, 32, 32)

@pytest.mark.parametrize("shape,tile", [((2, 3, 16, 16), 512), ((1, 3, 40, 72), 32)])
def test_fast_reports_progress_after_every_step_off_cuda(fast32, shape, tile):
    """Without graph replay (CPU, or graphs off under ComfyUI) progress, and with it ComfyUI's
    cancel check, comes after every denoiser step, as in the reference path."""
    from upsr_core.tiling import plan_tiles

    seen = []
    lr = torch.rand(shape)
    fast32.upscale(lr, seed=0, tile=tile, overlap=16, progress=lambda d, t: seen.append((d, t)))
    hp, wp = padded_size(*shape[-2:], fast32.multiple_of)
    n = 5 * shape[0] * len(plan_tiles(hp, wp, tile, 16, fast32.multiple_of)) + shape[0]  # + 1 estimator block each
    one_call = len(plan_tiles(hp, wp, tile, 16, fast32.multiple_of)) == 1  # a batch of small images: one call
    per = shape[0] if one_call else 1
    # (plus reports that do not advance: before the estimator runs, so a Cancel is seen first)
    advancing = [s for i, s in enumerate(seen) if s[0] > (seen[i - 1][0] if i else 0)]
    assert advancing == [(k, n) for k in range(per, n + 1, per)]
    assert seen[0] == (0, n) and all(s[0] == seen[i - 1][0] for i, s in enumerate(seen) if s not in advancing and i)


def test_graph_cache_runs_eagerly_off_cuda():
    cache = GraphCache(enabled=True)
    x = torch.arange(4.0)
    (y,) = cache.run("k", lambda t: (t * 2,), x)
    assert torch.equal(y, x * 2) and len(cache) == 0
    cuda = torch.device("cuda")
    assert not cache.replays("k", x.device) and cache.replays("k", cuda) and not GraphCache(False).replays("k", cuda)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(max_graphs=0)


def test_graph_captures_share_one_warmup_stream(monkeypatch):
    """Every capture warms up on the same side stream of its device (PyTorch keeps a cuBLAS
    workspace per stream that ran a matmul: a new stream per capture left one behind for every
    new shape). The CUDA calls are stand-ins here: only a GPU can run a capture."""
    import contextlib

    from upsr_core import graphs

    made = []

    class FakeStream:
        def __init__(self):
            made.append(self)

        def wait_stream(self, other):
            pass

    class FakeGraph:
        def replay(self):
            pass

    current = FakeStream()
    made.clear()
    monkeypatch.setattr(graphs, "_SIDE_STREAMS", {}, raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: current)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    cache = GraphCache(enabled=True, max_graphs=2)
    for n in (3, 4, 5, 6):  # four shapes, two graphs kept
        assert cache._capture(("k", n), lambda t: (t * 2,), (torch.ones(n),)) is not None
    assert len(made) == 1 and len(cache) == 2

    # a model on cuda:1: warm-up, capture and replay run with cuda:1 as the current device (they
    # ran on the process's current device's streams); stand-in tensors, as above
    entered, during = [], []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    class OnGpu1:
        device = torch.device("cuda", 1)

        def clone(self):
            return self

        def copy_(self, other):
            return self

    monkeypatch.setattr(torch.cuda, "device", device)
    x = OnGpu1()
    for _ in range(2):  # capture, then replay
        assert cache.run("gpu1", lambda t: (during.append(list(entered)) or t,), x) == (x,)
    assert entered == [torch.device("cuda", 1)] * 2 and all(d == [torch.device("cuda", 1)] for d in during)


def test_bench_parser_registers():
    import argparse

    from upsr_core.bench import _dtypes, add_parser

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["bench", "--device", "cpu", "--sizes", "64"])
    assert callable(args.func) and args.sizes == [64]
    with pytest.raises(ValueError, match=r"--tiled-dtypes 'fp32,fp8': unknown dtype\(s\) \['fp8'\]; choose from"):
        _dtypes("fp32,fp8", "--tiled-dtypes")
    with pytest.raises(ValueError, match=r"--dtypes ',': empty; choose from bf16, fp16, fp32, tf32"):
        _dtypes(",", "--dtypes")


def test_atd_fast_flag_is_per_instance(small_nets):
    atd = copy.deepcopy(small_nets[1])
    atd.prepare_fast()
    assert atd.fast and not ATD.fast and not small_nets[1].fast


@pytest.mark.parametrize("hw", [(1, 1), (3, 5)])
def test_subpixel_upsample_conv_equals_nearest_then_conv(hw):
    from upsr_core.nets.denoiser import prepare_subpixel, upsample_conv

    conv = torch.nn.Conv2d(8, 5, 3, padding=1)
    x = torch.randn(2, 8, *hw)
    with torch.no_grad():
        ref = upsample_conv(x, conv)  # reference form: no sub-pixel kernels yet
        assert torch.equal(ref, conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")))
        prepare_subpixel(conv)
        # the 2×2 sub-pixel kernels are sums of the 3×3 taps: float32 reassociation (~1e-6)
        torch.testing.assert_close(upsample_conv(x, conv), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (6, 4)])
def test_subpixel_upsample_conv_keeps_channels_last_maps_channels_last(hw):
    """The channels-last form writes each sub-pixel map into its places of a channels-last
    output: the values of the NCHW form (other kernels, so float rounding: fan-in 32, 1e-5),
    the layout of the input (a 1×1 map is NCHW-contiguous too and takes the NCHW form)."""
    from upsr_core.nets.denoiser import channels_last, prepare_subpixel, upsample_conv

    conv = torch.nn.Conv2d(8, 5, 3, padding=1)
    x = torch.randn(2, 8, *hw)
    with torch.no_grad():
        prepare_subpixel(conv)
        ref = upsample_conv(x, conv)
        out = upsample_conv(x.contiguous(memory_format=torch.channels_last), conv)
    assert not channels_last(ref) and ref.is_contiguous()
    assert channels_last(out) == (hw != (1, 1)) and out.shape == ref.shape == (2, 5, 2 * hw[0], 2 * hw[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the conv's dtype, as in the NCHW form
        assert upsample_conv(x.contiguous(memory_format=torch.channels_last), conv).dtype == torch.bfloat16


def test_enable_fast_decides_the_cpu_layout(monkeypatch):
    """On the CPU the denoiser is channels-last unless NNPACK's Winograd convs (NCHW only) or
    the compile (its own layouts) run; asking for channels-last keeps Winograd's auto off."""
    from upsr_core.nets import winograd

    m = tiny_upsr()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # no Winograd by default
    fast = enable_fast(copy.deepcopy(m), device="cpu")
    assert fast.fast_options.channels_last and not fast.fast_options.winograd
    assert fast.denoiser.conv_hr.weight.is_contiguous(memory_format=torch.channels_last)
    assert not enable_fast(copy.deepcopy(m), device="cpu", compile=True).fast_options.channels_last
    assert not enable_fast(copy.deepcopy(m), device="cpu", channels_last=False).fast_options.channels_last
    if winograd.available():
        assert not enable_fast(copy.deepcopy(m), device="cpu", winograd=True).fast_options.channels_last
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # Winograd by default
        opts = enable_fast(copy.deepcopy(m), device="cpu").fast_options
        assert opts.winograd and not opts.channels_last
        opts = enable_fast(copy.deepcopy(m), device="cpu", channels_last=True).fast_options
        assert opts.channels_last and not opts.winograd


def test_cpu_channels_last_gives_the_nchw_result():
    """The CPU fast path channels-last (its default without Winograd) against NCHW on the same
    input and noise: float rounding only (full size, LR 64: 1.8e-6 from the reference against
    8e-7 in NCHW; 1e-5 here, where the tiny net's gain of 10 on conv_last spreads outputs over
    ±5); the ×4 head's convs see channels-last maps."""
    base = tiny_upsr()
    lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    seen = []
    with torch.no_grad():
        nchw = enable_fast(copy.deepcopy(base), device="cpu", winograd=False, channels_last=False)
        cl = enable_fast(copy.deepcopy(base), device="cpu", winograd=False, channels_last=True)
        cl.denoiser.conv_hr.register_forward_pre_hook(
            lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        a, b = nchw.upscale(lr, seed=4), cl.upscale(lr, seed=4)
    assert seen and all(seen)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    # the image comes back NCHW-contiguous as the reference path's (the channels-last x̂0 carried its
    # layout through the sampler's updates into the result), batched and tiled alike
    assert b.is_contiguous() and a.is_contiguous()
    with torch.no_grad():
        assert cl.upscale(lr.expand(2, -1, -1, -1), seed=4).is_contiguous()
        assert cl.upscale(torch.rand(1, 3, 24, 40), seed=4, tile=16, overlap=8).is_contiguous()


def test_fast_tensors_move_with_the_nets():
    """The precomputed masks, logit gains and step table follow a move that someone else makes
    (ComfyUI offloads the nets with Module.to): they left GPU memory only at the next UPSR run.
    The state dicts do not change, and a channels-last conversion leaves the masks contiguous."""
    from upsr_core.nets.attention import CarriesFastTensors

    def fast_tensors(m):
        out = []

        def walk(v):
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, tuple):
                for x in v:
                    walk(x)
        for mod in (*m.denoiser.modules(), *m.estimator.modules()):
            if isinstance(mod, CarriesFastTensors):
                for name in mod._fast_tensors:
                    walk(getattr(mod, name))
        return out

    base = tiny_upsr()
    keys = (list(base.denoiser.state_dict()), list(base.estimator.state_dict()))
    m = enable_fast(base, device="cpu", winograd=False, channels_last=True)
    tensors = fast_tensors(m)
    assert len(tensors) > 5 and all(t.is_contiguous() for t in tensors)
    assert (list(m.denoiser.state_dict()), list(m.estimator.state_dict())) == keys
    m.denoiser.to("meta")
    m.estimator.to("meta")
    assert all(t.device.type == "meta" for t in fast_tensors(m))


def test_enable_fast_turns_a_channels_last_denoiser_back_to_nchw():
    """A denoiser already channels-last (an earlier enable_fast, or made so by its owner) is
    turned back to NCHW when the fast path runs it NCHW: left channels-last, oneDNN would keep
    its maps channels-last and NNPACK's Winograd convs would hand every one of them on."""
    m = enable_fast(tiny_upsr(), device="cpu", winograd=False, channels_last=True)
    assert m.denoiser.conv_hr.weight.is_contiguous(memory_format=torch.channels_last)
    m = enable_fast(m, device="cpu", winograd=False, channels_last=False)
    assert all(p.is_contiguous() for p in m.denoiser.parameters())
    seen = []
    m.denoiser.conv_hr.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        m.upscale(torch.rand(1, 3, 8, 8), seed=0)
    assert seen and all(seen)


def test_bench_runs_on_cpu_and_separates_the_denoiser_difference(tmp_path, capsys):
    """The bench end to end on a tiny checkpoint: one table, the JSON rows, and the
    denoiser-only column: fast fp32 with the reference's ŷ and w equals the reference to
    float rounding (5e-5, the same bound as the fp32 equality tests above)."""
    import json

    out = tmp_path / "bench.json"
    args = bench_args(tmp_path, "--sizes", "16", "--dtypes", "fp32,bf16", "--reps", "1", "--json", str(out))
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "den max|d|" in text and "1st GiB" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["dtype"]) for r in rows] == [("reference", "fp32"), ("fast", "fp32"), ("fast", "bf16")]
    _, f32, b16 = rows
    assert f32["den_max_abs"] <= 5e-5 and f32["max_abs"] <= 5e-5
    assert 0 < b16["den_max_abs"] < 0.1  # bf16 rounding: present, and small
    assert all(r["finite"] and r["s_per_img"] > 0 for r in rows)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bench_cpu_default_dtypes_follow_the_cpus_bf16(fast_bf16, tmp_path, capsys, monkeypatch):
    """The CPU default is fp32 and bf16, but fp32 alone where bf16 has no fast kernels (a bf16
    row of the full-size nets would take ~20 min on an AVX2-only 2-core CPU): a comment line says why."""
    import json

    monkeypatch.setattr("upsr_core.bench.cpu_has_fast_bf16", lambda: fast_bf16)
    args = bench_args(tmp_path, "--sizes", "16", "--reps", "1", "--json", str(tmp_path / "b.json"))
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["dtype"] for r in rows if "dtype" in r] == ["fp32", "fp32"] + ["bf16"] * fast_bf16
    assert ("# no bf16 row: this CPU has no fast bf16 kernels" in capsys.readouterr().out) is not fast_bf16


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bench_compile_on_times_a_cpu_row(fast_bf16, tmp_path, monkeypatch):
    """``--compile on`` adds a fast+compile row on the CPU too (auto: CUDA only), at LR 64 unless
    --compile-sizes says otherwise (here 16), in fp32 where bf16 has no fast kernels, else bf16.
    A stand-in backend that runs the traced graphs eagerly (Inductor would compile for minutes):
    the fp32 row then equals the reference to fp32 rounding (5e-5)."""
    import json

    monkeypatch.setattr("upsr_core.bench.cpu_has_fast_bf16", lambda: fast_bf16)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic")))
    argv = ["--sizes", "16", "--dtypes", "fp32", "--reps", "1", "--json", str(tmp_path / "b.json")]
    for extra, want in (([], []), (["--compile", "on", "--compile-sizes", "16"],
                                   [("fast+compile", "bf16" if fast_bf16 else "fp32", "16")])):
        torch._dynamo.reset()
        args = bench_args(tmp_path, *argv, *extra)
        assert args.func(args) == 0
        rows = json.loads((tmp_path / "b.json").read_text())["rows"]
        got = [(r["path"], r["dtype"], r["lr"]) for r in rows if r.get("path") == "fast+compile"]
        assert got == want
        if want:
            row = rows[-1]
            assert row["compiled"] == "denoiser,estimator" and row["finite"]
            assert row["max_abs"] <= (0.1 if fast_bf16 else 5e-5)
    torch._dynamo.reset()


def test_a_failing_compile_row_is_a_finding_not_the_end_of_the_run(tmp_path, monkeypatch):
    """A compile row whose output is not finite (or that runs out of memory) ended the whole bench
    with a traceback, losing the rows after it: it is a comment and a JSON row, as in the main loop."""
    import inspect
    import json

    import upsr_core.bench as bench
    from upsr_core.errors import NonFiniteOutputError

    real_time = bench._time

    def fails_when_compiled(fn, dev, warmup, reps):
        if any(f.function == "_compile_rows" for f in inspect.stack()):
            raise NonFiniteOutputError("the output holds NaN")
        return real_time(fn, dev, warmup, reps)

    monkeypatch.setattr(bench, "_time", fails_when_compiled)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    args = bench_args(tmp_path, "--sizes", "16", "--dtypes", "fp32", "--reps", "1", "--json", str(tmp_path / "b.json"),
                      "--compile", "on", "--compile-sizes", "16,32", "--compile-dtype", "fp32")
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    failed = [r for r in rows if r.get("path") == "fast+compile"]
    assert [(r["lr"], r["finite"]) for r in failed] == [("16", False), ("32", False)]  # both sizes reached
    torch._dynamo.reset()


def test_bench_names_every_row_its_budget_leaves_out(tmp_path, capsys):
    """--budget-s 0: no row starts, and each one left out is a comment line and a JSON row (the
    fast rows of a size were dropped without a word, and no JSON was written when no row ran);
    a size padded to the nets' multiple says so; a --tiled-dtypes typo is refused without a tiled row."""
    import json

    from upsr_core.pipeline import padded_size

    m = tiny_upsr()
    out = tmp_path / "bench.json"
    args = bench_args(tmp_path, "--reps", "1", "--sizes", "16,24", "--dtypes", "fp32", "--budget-s", "0",
                      "--json", str(out), model=m)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "# budget reached: LR 16 batch 1 skipped" in text and "# budget reached: LR 24 batch 1 skipped" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["lr"], r["skipped"]) for r in rows] == [("16", "budget"), ("24", "budget")]
    args = bench_args(tmp_path, "--reps", "1", "--sizes", "13", "--dtypes", "fp32", "--json", str(out))
    assert args.func(args) == 0
    mult, hp = m.multiple_of, padded_size(13, 13, m.multiple_of)[0]
    assert hp != 13
    note = f"# LR 13 runs padded to {hp} (the nets' multiple of {mult}): its rows time that work"
    assert note in capsys.readouterr().out
    with pytest.raises(ValueError, match="bogus"):
        args = bench_args(tmp_path, "--reps", "1", "--sizes", "16", "--tiled-dtypes", "bogus")
        args.func(args)


def test_bench_checks_the_tiling_before_any_row(tmp_path, capsys):
    """A bad --tile/--overlap fails at once, not after the other rows have used device time."""
    import argparse

    from upsr_core.bench import add_parser

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["bench", "--device", "cpu", "--small", "--sizes", "64", "--tiled", "128",
                          "--tile", "64", "--overlap", "64"])
    with pytest.raises(ValueError, match=r"^--tile 64 / --overlap 64: .*overlap must be in"):
        args.func(args)  # the flags named (the library's message spoke of tile and overlap only)
    assert "reference" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_precision_probe_tool(which, tiny_model_file, capsys):
    """tools/precision_probe.py (the README's bf16 analysis): fp32 agrees to rounding, bf16 does not.
    On the tiny nets everywhere (10 s); on the demo model where the CPU has fast bf16 kernels."""
    from upsr_core.errors import cpu_has_fast_bf16

    from _support import load_tool

    if which == "demo" and not cpu_has_fast_bf16():
        pytest.skip("this CPU has no fast bf16 kernels (no AVX-512/AMX): the demo model's two bf16 rows take "
                    "~7 min here (2-core AVX2 EPYC, 2026-11-28); the tiny nets' run covers the tool")
    args = ["--crops", "1"] + (["--model", str(tiny_model_file), "--crop", "32"] if which == "tiny" else [])
    assert load_tool("precision_probe").main(args) == 0
    assert torch.is_grad_enabled()  # no global state left behind
    lines = capsys.readouterr().out.splitlines()[1:]
    rows = {line[:36].strip(): [float(v) for v in line[36:].split()] for line in lines}
    assert set(rows) == {"fast fp32", "fast bf16", "autocast bf16 (fp32 weights)", "ideal bf16 GEMM (operands)",
                         "ideal bf16 GEMM (operands+outputs)"}
    assert rows["fast fp32"][0] < 1e-5  # rounding only (3e-7 measured)
    assert all(1e-4 < rows[k][0] < 5e-2 for k in rows if "bf16" in k)  # 8-bit mantissa: 3e-3–6e-3 measured


def test_fp16_on_the_cpu_warns(small_nets, caplog, monkeypatch):
    """fp16 runs on the CPU, but without fast kernels (~190x slower than fp32): say so, never silently."""
    monkeypatch.setattr("upsr_core.model.cpu_has_fast_bf16", lambda: True)  # (bf16 here: see the next test)
    lr = torch.rand(1, 3, 8, 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        for dtype in (torch.float32, torch.bfloat16):
            UPSRModel(*(copy.deepcopy(n) for n in small_nets)).to(dtype=dtype).upscale(lr)
        assert not caplog.records
        half = UPSRModel(*(copy.deepcopy(n) for n in small_nets)).to(dtype=torch.float16)
        assert not caplog.records  # loading in fp16 on the CPU to run elsewhere (ComfyUI's way) is fine
        half.upscale(lr)
        est = half.estimate(lr)
        half.denoise(est, torch.ones(1, 1, *est.bicubic_pm.shape[-2:]))
        enable_fast(UPSRModel(*(copy.deepcopy(n) for n in small_nets)).to(dtype=torch.float16)).upscale(lr)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("fp16 on the CPU" in m for m in msgs)  # once per model


def test_bf16_on_a_cpu_without_fast_bf16_warns(small_nets, caplog, monkeypatch):
    """bf16 on a CPU without AVX-512/AMX (oneDNN's test): convolutions ~250x slower than fp32
    (AVX2-only EPYC, 2026-11-28), so say so once per model, from estimate or upscale; fp32 does not."""
    from upsr_core import errors

    monkeypatch.setattr("upsr_core.model.cpu_has_fast_bf16", lambda: False)
    lr = torch.rand(1, 3, 8, 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        UPSRModel(*(copy.deepcopy(n) for n in small_nets)).upscale(lr)
        assert not caplog.records
        m = UPSRModel(*(copy.deepcopy(n) for n in small_nets)).to(dtype=torch.bfloat16)
        m.estimate(lr)
        m.upscale(lr)
        enable_fast(UPSRModel(*(copy.deepcopy(n) for n in small_nets)).to(dtype=torch.bfloat16)).upscale(lr)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("bf16 on a CPU without fast bf16 kernels" in m and "use fp32" in m for m in msgs)
    assert isinstance(errors.cpu_has_fast_bf16(), bool)  # this machine's answer (cached): either is fine


def test_large_canvas_is_blended_on_the_host_with_the_same_result(fast32, monkeypatch):
    """Above CANVAS_DEVICE_MAX_BYTES the tiled canvas lives on the CPU (device memory bounded by the tile);
    the blend is the same IEEE float32 arithmetic there, so the result is identical."""
    from upsr_core import fast

    lr = torch.rand(2, 3, 40, 72)
    kw = dict(seed=4, tile=32, overlap=16, tile_batch=2)
    want = fast32.upscale(lr, **kw)
    monkeypatch.setattr(fast, "CANVAS_DEVICE_MAX_BYTES", 0)
    got = fast32.upscale(lr, **kw)
    assert got.device.type == "cpu" and torch.equal(got, want)


@pytest.mark.parametrize("same_noise", [False, True])
def test_a_batch_of_one_tile_images_runs_call_by_call(fast32, monkeypatch, same_noise):
    """Images that each fit one tile run a few per call (tile_batch · tile² pixels): each call's
    LR and ε go to the device alone and the ε is drawn per call — image i's from seed + i, the
    same numbers as the whole batch's field — and past CANVAS_DEVICE_MAX_BYTES the results are
    gathered on the CPU (120 video frames of LR 512 held ε, results and their concatenation on
    the GPU: ~17 GiB). The same bytes every way, also with a caller's ε."""
    from upsr_core import fast
    from upsr_core.pipeline import starting_noise

    m = fast32.multiple_of
    lr = torch.rand(3, 3, m - 3, m, generator=torch.Generator().manual_seed(1))  # padded to one m² tile
    kw = dict(seed=7, tile=m, overlap=0, same_noise=same_noise)
    # each image alone with its own seed: what a call of one image must give (a batched call
    # rounds differently: other GEMM blockings)
    whole = torch.cat([fast32.upscale(lr[i : i + 1], seed=7 if same_noise else 7 + i, tile=m, overlap=0)
                       for i in range(3)])
    calls, drawn = [], []
    real, real_noise = fast32._upscale_core, fast.starting_noise
    monkeypatch.setattr(fast32, "_upscale_core", lambda x, n, *a: calls.append(x.shape[0]) or real(x, n, *a))
    monkeypatch.setattr(fast, "starting_noise", lambda s, b, *a, **k: drawn.append((s, b)) or real_noise(s, b, *a, **k))
    parts = fast32.upscale(lr, tile_batch=1, **kw)  # one image per call
    assert calls == [1] * 3 and torch.equal(parts, whole)
    assert drawn == ([(7, 1)] * 3 if same_noise else [(7, 1), (8, 1), (9, 1)])  # not the batch's whole field
    monkeypatch.setattr(fast, "CANVAS_DEVICE_MAX_BYTES", 0)
    on_host = fast32.upscale(lr, tile_batch=1, **kw)
    assert on_host.device.type == "cpu" and torch.equal(on_host, whole)
    eps = starting_noise(7, 3, (m, m), same_noise=same_noise)
    given = fast32.upscale(lr, tile_batch=1, seed=0, tile=m, overlap=0, noise=eps)
    assert torch.equal(given, whole)


def test_bench_records_a_nan_row_and_goes_on(tmp_path, capsys, monkeypatch):
    """A precision whose output is NaN (fp16 overflowing with some weights) is a row of the table
    ("non-finite"), not the end of the benchmark run."""
    import json

    from upsr_core.errors import NonFiniteOutputError
    from upsr_core.fast import FastUPSRModel

    real = FastUPSRModel.upscale

    def upscale(self, *a, **k):
        if self.dtype == torch.bfloat16:
            raise NonFiniteOutputError("the denoiser (bfloat16) produced NaN in its (1, 3, 64, 64) output")
        return real(self, *a, **k)

    monkeypatch.setattr(FastUPSRModel, "upscale", upscale)
    out = tmp_path / "bench.json"
    args = bench_args(tmp_path, "--sizes", "16", "--dtypes", "bf16,fp32", "--reps", "1", "--json", str(out))
    assert args.func(args) == 0
    assert "fast bf16: the denoiser (bfloat16) produced NaN" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["dtype"], r["finite"]) for r in rows] == [
        ("reference", "fp32", True), ("fast", "bf16", False), ("fast", "fp32", True)]


# ----------------------------------------------------------------- group_norm_nhwc (nhwc_norm)
# Reference: F.group_norm in float64 on the same (rounded) input. float32: a Welford var_mean,
# so only summation-order rounding (observed 4e-6 on outputs up to ~9 with |mean| = 33 std;
# 2e-5 bound). 16-bit: the output's own rounding, r = 2^-8 (bf16) or 2^-11 (fp16) of max|y|,
# dominates; observed 0.6-0.9 r at mean 0 and up to 1.8 r at mean 100 in fp16 (the CPU's
# batch_norm forms x·α + β in the 16-bit type, so its rounding grows with |mean|/std;
# F.group_norm in fp16 reaches 1.3 r there). Bound 2.5 r.
@pytest.mark.parametrize("shape", [(1, 64, 16, 16), (3, 128, 8, 24)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mean", [0.0, 100.0])
def test_group_norm_nhwc_equals_group_norm(shape, dtype, mean):
    import torch.nn.functional as F

    from upsr_core.nets.denoiser import group_norm_nhwc

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + mean).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    exact = F.group_norm(x.contiguous().double(), 32, w.double(), b.double(), 1e-5)
    y = group_norm_nhwc(x, 32, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    err = (y.double() - exact).abs().max().item()
    if dtype in (torch.float32, torch.float64):
        assert err <= 2e-5
    else:
        r = (2**-8 if dtype == torch.bfloat16 else 2**-11) * exact.abs().max().item()
        assert err <= 2.5 * r


def test_groupnorm32_nhwc_only_for_channels_last_inputs_without_grad():
    """The NHWC path gives no gradient to its statistics, so a tensor that needs one (and a
    NCHW tensor, which it would copy) takes F.group_norm: identical values and gradients."""
    from upsr_core.nets.denoiser import GroupNorm32

    torch.manual_seed(0)
    norm, plain = GroupNorm32(64), GroupNorm32(64)
    plain.load_state_dict(norm.state_dict())
    norm.native = plain.native = True
    norm.nhwc = True
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = norm(xa), plain(xb)
    assert torch.equal(ya, yb)
    (ya * torch.arange(ya.numel()).view_as(ya)).sum().backward()
    (yb * torch.arange(yb.numel()).view_as(yb)).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    from upsr_core.nets.denoiser import group_norm_nhwc

    with pytest.raises(ValueError, match=r"multiple of num_groups=32, got shape \(2, 48, 8, 8\)"):
        group_norm_nhwc(torch.zeros(2, 48, 8, 8), 32, torch.ones(48), torch.zeros(48), 1e-5)
    with torch.no_grad():
        assert torch.equal(norm(x.contiguous()), plain(x.contiguous()))
        torch.testing.assert_close(norm(x), plain(x), atol=2e-5, rtol=0)  # the NHWC path itself


def test_fast_nhwc_norm_equals_reference(small_model, small_nets):
    """enable_fast(nhwc_norm=True) on the CPU (channels-last forced): same bound as the other
    fp32 fast-path tests; without channels-last the switch is refused."""
    den, atd = (copy.deepcopy(n) for n in small_nets)
    fast = enable_fast(UPSRModel(den, atd), channels_last=True, nhwc_norm=True)
    assert fast.fast_options.nhwc_norm
    lr = torch.rand(2, 3, 20, 44)
    torch.testing.assert_close(fast.upscale(lr, seed=3), small_model.upscale(lr, seed=3), atol=FP32_ATOL, rtol=0)
    den16, atd = (copy.deepcopy(n) for n in small_nets)  # as _fast: the estimator stays fp32
    half = enable_fast(UPSRModel(den16.to(dtype=torch.bfloat16), atd, dtype=torch.bfloat16),
                       channels_last=True, nhwc_norm=True)
    norms = [m for m in half.denoiser.modules() if isinstance(m, GroupNorm32)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # no cast per call
    d = (half.upscale(lr, seed=3).float() - small_model.upscale(lr, seed=3)).abs()
    assert d.max() <= HALF_BOUNDS[torch.bfloat16][0] and d.mean() <= HALF_BOUNDS[torch.bfloat16][1]
    with pytest.raises(ValueError, match="nhwc_norm=True needs channels_last"):
        enable_fast(UPSRModel(*(copy.deepcopy(n) for n in small_nets)), channels_last=False, nhwc_norm=True)


def test_bench_variants_add_labelled_rows(tmp_path, capsys):
    """--variants runs each named fast-path variant as its own row in the same table;
    an unknown name fails before any row runs."""
    import json

    out = tmp_path / "bench.json"
    base = ["--sizes", "16", "--dtypes", "fp32", "--reps", "1", "--json", str(out), "--channels-last", "on"]
    args = bench_args(tmp_path, *base, "--variants", "nchw,nhwc-norm")
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["reference", "fast", "fast/nchw", "fast/nhwc-norm"]
    assert all(r["max_abs"] <= FP32_ATOL for r in rows[1:])
    # how each fast row ran (the CPU: no graphs, no Triton kernels without the interpreter's say-so)
    assert [(r["layout"], r["norm"], r["cuda_graphs"]) for r in rows[1:]] == [
        ("channels_last", "native", False), ("nchw", "native", False), ("channels_last", "nhwc", False)]
    text = capsys.readouterr().out
    assert "fast/nhwc-norm" in text and "runs as fast does" not in text  # both differ from fast here
    # a variant whose switches resolve to the plain fast path on this device is called noise, not an effect
    args = bench_args(tmp_path, *base, "--variants", "no-graphs", "--budget-s", "0")
    assert args.func(args) == 0
    assert "# fast/no-graphs runs as fast does on cpu (fp32)" in capsys.readouterr().out
    args = bench_args(tmp_path, *base, "--variants", "nchw,turbo")
    with pytest.raises(ValueError, match="'turbo'"):
        args.func(args)
    assert "reference" not in capsys.readouterr().out


# ----------------------------------------------------------------- forward_step (folded step conditioning)
def _den64(cl: bool = False):
    den = copy.deepcopy(tiny_upsr().denoiser).double()
    for m in den.modules():
        if isinstance(m, GroupNorm32):
            m.native = True  # normalise in float64 (the reference norm computes in float32)
    return den.to(memory_format=torch.channels_last) if cl else den


@pytest.mark.parametrize("cl", [False, True])
def test_forward_step_equals_forward_in_float64(cl):
    """Folding the step's scale-shift into the norm's affine is the same math: γ(1+s)·n + β(1+s) + shift
    = (γn + β)(1+s) + shift. In float64 the two orders agree to ~1e-15 relative."""
    torch.manual_seed(1)
    den = _den64(cl)
    den.prepare_steps(5, torch.float64)
    x, lq = torch.randn(2, 48, 8, 12, dtype=torch.float64), torch.randn(2, 96, 8, 12, dtype=torch.float64)
    for t in range(5):
        want = den(x, torch.full((2,), t), lq)
        got = den.forward_step(x, torch.tensor([t]), lq)
        assert want.abs().max() > 1.0  # a real signal (denoiser_gain 10)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_forward_step_skips_the_embedding_ops():
    """The point of the fold, counted: no time-embedding MLP, no emb Linear, SiLU or scale-shift
    multiply per ResBlock — the only Linears left are attention's qkv and proj, the SiLUs the two
    before each ResBlock's convs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from upsr_core.nets.denoiser import ResBlock

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    den = copy.deepcopy(tiny_upsr().denoiser)
    for m in den.modules():
        if isinstance(m, SwinBlock):
            m.prepare_fast()
    den.prepare_steps(5, torch.float32)
    n_res = sum(isinstance(m, ResBlock) for m in den.modules())
    n_swin = sum(isinstance(m, SwinBlock) for m in den.modules())
    x, lq = torch.randn(1, 48, 8, 8), torch.randn(1, 96, 8, 8)
    with torch.no_grad(), Count() as ref:
        den(x, torch.tensor([2]), lq)
    with torch.no_grad(), Count() as step:
        den.forward_step(x, torch.tensor([2]), lq)
    assert step.ops.get("addmm", 0) == 2 * n_swin  # qkv, proj
    assert ref.ops["addmm"] == 2 * n_swin + n_res + 2  # + each ResBlock's emb Linear + time_embed's two
    assert step.ops["silu"] == 2 * n_res and step.ops.get("mul", 0) == 0
    assert step.ops["index_select"] == 1 + 2 * n_swin  # the step's row of the table; each block's window gathers
    assert "roll" not in step.ops  # the shifts are in those gathers


def test_forward_step_needs_prepare_steps():
    den = copy.deepcopy(tiny_upsr().denoiser)
    with pytest.raises(RuntimeError, match="prepare_steps"):
        den.forward_step(torch.zeros(1, 48, 8, 8), torch.tensor([0]), torch.zeros(1, 96, 8, 8))
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        den.prepare_steps(0, torch.float32)


def test_fast_path_table_follows_dtype_and_norm_layout():
    """The fast path keeps the table in the dtype its norms take the affine in: the net's own
    (native norms), float32 for the NHWC norm (its batch_norm affine is float32)."""
    m = enable_fast(copy.deepcopy(tiny_upsr()).to(dtype=torch.bfloat16))
    assert m.denoiser._step_table.dtype == torch.bfloat16 and m.denoiser._step_table.shape[0] == 5
    m = enable_fast(copy.deepcopy(tiny_upsr()).to(dtype=torch.bfloat16), channels_last=True, nhwc_norm=True)
    assert m.denoiser._step_table.dtype == torch.float32


def test_compiled_fast_path_traces_once_for_all_steps(monkeypatch):
    """compile=True compiles both nets; the denoiser takes the step as a (1,) tensor, so the 5
    steps share one graph (a Python-int step would be specialised: 5 compiles per shape).
    Two graphs in all: the estimator's and the denoiser's; a second image traces nothing."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # count traced graphs, run them eagerly (no inductor: seconds)
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, dynamic=kw.get("dynamic")))
    ref = tiny_upsr()
    fast = enable_fast(copy.deepcopy(tiny_upsr()), compile=True)
    assert fast.compiled == ("denoiser", "estimator")
    lr = torch.rand(1, 3, 8, 8)
    out = fast.upscale(lr, seed=1)
    assert len(graphs) == 2
    fast.upscale(torch.rand(1, 3, 8, 8), seed=2)
    assert len(graphs) == 2
    torch.testing.assert_close(out, ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("failing", ["denoiser", "estimator"])
def test_a_failing_compiled_net_falls_back_to_eager(monkeypatch, caplog, failing):
    """A compiler that fails (no C++ compiler, a backend bug) costs a warning, not the run: that
    net runs eagerly from then on, the other stays compiled, the result is the eager one."""
    def fake_compile(fn, **kw):
        def run(*a, **k):
            if fn_name(fn) == failing:
                raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
            return fn(*a, **k)
        return run

    def fn_name(fn):
        return "denoiser" if getattr(fn, "__name__", "") == "forward_step" else "estimator"

    monkeypatch.setattr(torch, "compile", fake_compile)
    fast = enable_fast(copy.deepcopy(tiny_upsr()), compile=True)
    lr = torch.rand(1, 3, 8, 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        out = fast.upscale(lr, seed=1)
    msg = f"torch.compile failed, using the eager {failing}: InductorError: no working C++ compiler found"
    assert msg in caplog.text
    assert fast.compiled == tuple(n for n in ("denoiser", "estimator") if n != failing)
    torch.testing.assert_close(out, tiny_upsr().upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)


def test_fast_atd_equals_reference_atd():
    """The fast ATD (precomputed masks and logit gains, inverse permutation by scatter, the branch
    sum's /√3 as add's alpha, InstanceNorm1d as one-group-per-token GroupNorm) against the
    reference on the same permutations (recorded, then replayed: ATD's category sort is unstable
    on near-ties, SPEC §8.3). fp32 rounding only: FP32_ATOL."""
    from upsr_core.nets.atd import official_sort

    ref = tiny_upsr(estimator_gain=5.0).estimator
    fast = copy.deepcopy(ref)
    fast.prepare_fast()
    x = torch.rand(2, 3, 24, 40)
    perms = []
    want = ref(x, sort_fn=lambda cat: perms.append(official_sort(cat)) or perms[-1])
    got = fast(x, sort_fn=iter(perms))
    assert len(perms) == 2 and want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    inverse = torch.empty_like(perms[0]).scatter_(1, perms[0], torch.arange(perms[0].shape[1]).expand_as(perms[0]))
    assert torch.equal(inverse, torch.argsort(perms[0], dim=-1))


@pytest.mark.parametrize("h,w,window,shift", [(8, 12, 4, 0), (8, 12, 4, 2), (16, 16, 8, 4), (4, 4, 4, 0)])
def test_window_index_is_roll_then_partition(h, w, window, shift):
    """One row gather = roll(−shift) + window_partition; the inverse gather undoes both (exact)."""
    from upsr_core.nets.attention import window_index, window_partition

    x = torch.randn(2, h, w, 5)
    idx, inv = window_index(h, w, window, shift, x.device)
    want = window_partition(torch.roll(x, (-shift, -shift), dims=(1, 2)) if shift else x, window)
    got = x.reshape(2, h * w, 5).index_select(1, idx).view(-1, window * window, 5)
    assert torch.equal(got, want)
    assert torch.equal(got.view(2, h * w, 5).index_select(1, inv), x.reshape(2, h * w, 5))
    assert window_index(h, w, window, shift, x.device)[0] is idx  # cached per size


def test_window_index_cache_is_bounded():
    from upsr_core.nets import attention

    for i in range(attention._WINDOW_INDEX_MAX + 5):
        attention.window_index(4, 4 * (i + 1), 4, 0, torch.device("cpu"))
    assert len(attention._WINDOW_INDEX) == attention._WINDOW_INDEX_MAX



def test_size_cache_survives_threads_evicting_each_others_keys():
    """The window-index cache is one per process, shared by every model: a lookup and its read
    were two steps, and another thread's eviction in between raised KeyError. A race, so the test is
    a stress run: without the lock it failed 5 of 5 runs on the 2-core VM (2026-11-27); it cannot
    fail spuriously with the lock."""
    import sys
    import threading

    from upsr_core.nets.attention import SizeCache

    cache, errors = SizeCache(2), []

    def hammer(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        keys = torch.randint(0, 6, (100000,), generator=g).tolist()
        try:
            for k in keys:
                assert cache.get((k,), lambda k=k: k) == k
        except (KeyError, AssertionError) as e:  # what the race raised; anything else fails the test itself
            errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == [] and len(cache) <= 2

def test_category_attention_gradients_equal_the_gather_formulation():
    """Training goes through the same row gather/scatter: values and gradients equal the official
    gather(perm) / gather(argsort(perm)) formulation (pure data movement: exact)."""
    from upsr_core.nets.atd import CategoryAttention

    torch.manual_seed(0)
    att = CategoryAttention(12, 2, 8)
    b, n = 3, 21  # 21 tokens in groups of 8: the padded last group runs too
    qkv = torch.randn(b, n, 36, requires_grad=True)
    perm = torch.stack([torch.randperm(n) for _ in range(b)])

    def official(qkv):
        c3, c = 36, 12
        s = torch.gather(qkv, 1, perm.unsqueeze(-1).expand(-1, -1, c3))
        s = torch.cat([s, torch.flip(s[:, n - 3 : n], dims=[1])], dim=1)  # pad 24 - 21 = 3
        q, k, v = s.reshape(b, 3, 8, 3, 2, 6).permute(3, 0, 1, 4, 2, 5)
        y = ((q @ k.transpose(-2, -1)) * att._scale()).softmax(-1) @ v
        y = y.permute(0, 1, 3, 2, 4).reshape(b, 24, c)[:, :n]
        return att.proj(torch.gather(y, 1, torch.argsort(perm, -1).unsqueeze(-1).expand(-1, -1, c)))

    want = official(qkv)
    (gw,) = torch.autograd.grad(want.square().sum(), qkv)
    got = att(qkv, perm)
    (gg,) = torch.autograd.grad(got.square().sum(), qkv)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(gg, gw, rtol=0, atol=1e-5)


def _has_cxx() -> bool:
    import shutil
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _has_cxx(), reason="Inductor's CPU backend needs a C++ compiler")
def test_cpu_compile_freezes_weights_and_recompiles_when_they_change(caplog):
    """On the CPU, compile=True compiles with Inductor's weight freezing (oneDNN-prepacked convs
    with fused epilogues; 11–15 % faster at full size on a 2-core AVX2 VM). Frozen code holds copies
    of the weights, so new values written in place must lead to a new compile, not to stale
    results: here conv_last ×2, then the result must equal the eager path's with the new weights.
    Real Inductor (no stand-in backend): ~2–3 min on 2 CPU cores, most of it compiling.
    Tolerance FP32_ATOL: fused epilogues and prepacked convs round differently from eager."""
    torch._dynamo.reset()
    ref = tiny_upsr()
    fast = enable_fast(copy.deepcopy(ref), compile=True)
    assert fast.compiled == ("denoiser", "estimator") and fast._frozen
    lr = torch.rand(1, 3, 8, 8)
    out = fast.upscale(lr, seed=1)
    torch.testing.assert_close(out, ref.upscale(lr, seed=1), atol=FP32_ATOL, rtol=0)
    with torch.no_grad():
        for m in (ref, fast):
            m.denoiser.conv_last.weight.mul_(2.0)
    with caplog.at_level("INFO", logger="upsr_core"):
        out2 = fast.upscale(lr, seed=1)
    want = ref.upscale(lr, seed=1)
    assert (want - out).abs().max() > 0.05  # the change matters: stale frozen weights would show
    torch.testing.assert_close(out2, want, atol=FP32_ATOL, rtol=0)
    assert "compiling the nets again (their weights changed or moved, and the CPU compile froze them)" in caplog.text
    assert fast.compiled == ("denoiser", "estimator")  # compiled again, not dropped to eager
    torch._dynamo.reset()


@pytest.mark.parametrize("shape,tile,block", [((2, 3, 8, 8), 512, 512), ((1, 3, 20, 36), 16, 8)])
def test_upscale_progress_counts_the_estimator_blocks_on_both_paths(shape, tile, block):
    """The bar of UPSR Upscale sat at 0 while the estimator ran (its blocks were not in the total);
    each block is now one unit, reported when it is done — on the fast path too, whole images (one
    call for the batch) or tiled (the same reports in the same order)."""
    from upsr_core.tiling import partition, plan_tiles

    ref = tiny_upsr()
    fast = enable_fast(UPSRModel(copy.deepcopy(ref.denoiser), copy.deepcopy(ref.estimator)))
    lr = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    hp, wp = padded_size(*shape[-2:], ref.multiple_of)
    blocks = len(partition(hp, wp, block))
    n = shape[0] * (5 * len(plan_tiles(hp, wp, tile, 8, ref.multiple_of)) + blocks)
    seen = {"ref": [], "fast": []}
    for name, model in (("ref", ref), ("fast", fast)):
        model.upscale(lr, seed=0, tile=tile, overlap=8, estimator_block=block,
                      progress=lambda d, t, name=name: seen[name].append((d, t)))
        assert seen[name][-1] == (n, n) and {t for _, t in seen[name]} == {n}
        assert [d for d, _ in seen[name]] == sorted(d for d, _ in seen[name])
    if tile == 512:  # a Cancel check, then the estimator's unit(s) before any denoiser step
        assert seen["ref"][:3] == [(0, n), (1, n), (2, n)]  # image by image: its block, then its steps
        assert seen["fast"][:3] == [(0, n), (2, n), (4, n)]  # one call: both estimates, then the steps
    else:
        assert blocks == 15 and seen["ref"] == seen["fast"]


@pytest.mark.parametrize("shape,tile,tile_batch,streamed", [((2, 3, 8, 8), 512, 1, False),
                                                              ((1, 3, 20, 36), 16, 2, False),
                                                              ((2, 3, 20, 36), 16, 1, True)])
def test_preview_shows_each_steps_estimate_on_both_paths(shape, tile, tile_batch, streamed):
    """``preview(x0)`` (ComfyUI's live view) gets each eager step's x̂0 just before the step's
    progress report: of the first image of a call, of the first tile of a tile batch, cut to the
    image, in [0, 1] on the model's device; on one tile the last step's x̂0 is the result, bit for
    bit. Reference and fast paths (whole-image batch, tiled, streamed) show the same pictures."""
    from upsr_core.tiling import batches, plan_tiles

    ref = tiny_upsr()
    fast = enable_fast(UPSRModel(copy.deepcopy(ref.denoiser), copy.deepcopy(ref.estimator)))
    lr = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    b, h, w = shape[0], *shape[-2:]
    hp, wp = padded_size(h, w, ref.multiple_of)
    tiles = plan_tiles(hp, wp, tile, 8, ref.multiple_of)
    shown = {}
    for name, model in (("ref", ref), ("fast", fast)):
        log = shown[name] = []
        out = model.upscale(lr, seed=0, tile=tile, overlap=8, tile_batch=tile_batch,
                            progress=lambda d, t, log=log: log.append(d),
                            preview=lambda x0, log=log: log.append(x0),
                            sink=(lambda *_: None) if streamed else None)
        pictures = [x for x in log if isinstance(x, torch.Tensor)]
        done = 0
        for i, x in enumerate(log):  # each picture right before the report of its step, which advances the count
            if isinstance(x, torch.Tensor):
                assert isinstance(log[i + 1], int) and log[i + 1] > done
                done = log[i + 1]
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" and 0 <= p.min() and p.max() <= 1
                   for p in pictures)
        if len(tiles) == 1:
            calls = 1 if name == "fast" else b  # the fast path runs small images as one batch
            assert len(pictures) == 5 * calls and {tuple(p.shape) for p in pictures} == {(3, 4 * h, 4 * w)}
            assert torch.equal(pictures[-1], out[-1 if name == "ref" else 0])
        else:
            firsts = [g[0] for g in batches(tiles, tile_batch)] * b
            assert [tuple(p.shape) for p in pictures] == [(3, *t.visible(4, 4 * h, 4 * w)) for t in firsts
                                                          for _ in range(5)]
    if len(tiles) > 1:
        for a, c in zip(*([x for x in shown[k] if isinstance(x, torch.Tensor)] for k in ("ref", "fast")), strict=True):
            torch.testing.assert_close(a, c, atol=FP32_ATOL, rtol=0)


def test_preview_must_be_callable_and_may_cancel():
    model = tiny_upsr()
    lr = torch.rand(1, 3, 8, 8)
    with pytest.raises(TypeError, match="preview must be a callable preview\\(x0\\) or None, got int"):
        model.upscale(lr, preview=3)

    class Cancelled(Exception):
        pass

    def stop(_x0):
        raise Cancelled

    for m in (model, enable_fast(UPSRModel(copy.deepcopy(model.denoiser), copy.deepcopy(model.estimator)))):
        with pytest.raises(Cancelled):
            m.upscale(lr, preview=stop)


def test_bench_compile_row_compares_with_the_untiled_reference_of_its_size(tmp_path, monkeypatch):
    """With --tiled equal to a compile size, the tiled reference replaced the untiled one the
    compiled row is compared with: its max|d| was the tiles' blend, 1.6e-2 (review, 2026-11-29)."""
    import json

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    args = bench_args(tmp_path, "--sizes", "16", "--dtypes", "fp32", "--reps", "1", "--tiled", "16", "--tile", "8",
                      "--overlap", "4", "--tiled-dtypes", "fp32", "--compile", "on", "--compile-sizes", "16",
                      "--compile-dtype", "fp32", "--json", str(tmp_path / "b.json"))
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    compiled = next(r for r in rows if r.get("path") == "fast+compile")
    assert compiled["max_abs"] <= 5e-5  # fp32 rounding
    # what it was compared with before: the tiled reference, which differs by the tiles' blend
    m, lr = tiny_upsr(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = starting_noise(0, 1, padded_size(16, 16, m.multiple_of))
    assert (m.upscale(lr, noise=noise, tile=8, overlap=4) - m.upscale(lr, noise=noise)).abs().max() > 1e-3
    torch._dynamo.reset()


def test_bench_refuses_flags_it_would_ignore_and_names_its_own(tmp_path, monkeypatch, capsys):
    """--estimator without --model ran random nets; --small with --model ignored --small; a --json
    path whose folder cannot be made said only '[Errno 17] File exists'; on a CPU without fast bf16
    the tiled row still ran in bf16 (~250x slower) though the table said 'no bf16 row'; tiled and
    compile settings without those rows did nothing silently."""
    import json

    from upsr_core.cli import main as cli_main

    def err(*argv):
        assert cli_main(["bench", "--device", "cpu", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "--estimator 'nothere.pth' goes with --model" in err("--small", "--estimator", "nothere.pth")
    args = bench_args(tmp_path, "--small")
    with pytest.raises(ValueError, match=r"--small and --model .*: --small makes random demo-size nets"):
        args.func(args)
    (tmp_path / "f").write_text("")
    args = bench_args(tmp_path, "--json", str(tmp_path / "f" / "b.json"))
    with pytest.raises(ValueError, match=r"--json: .*cannot be made: .*/f' is a file"):
        args.func(args)
    monkeypatch.setattr("upsr_core.bench.cpu_has_fast_bf16", lambda: False)
    args = bench_args(tmp_path, "--sizes", "16", "--reps", "1", "--tiled", "16", "--tile", "8", "--overlap", "4",
                      "--no-tiled-ref", "--json", str(tmp_path / "b.json"))
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["dtype"] for r in rows if "dtype" in r} == {"fp32"}
    assert "# no bf16 row" in capsys.readouterr().out
    args = bench_args(tmp_path, "--sizes", "16", "--dtypes", "fp32", "--reps", "1", "--tile", "8",
                      "--compile-dtype", "fp32")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "# --tile: settings of the tiled row, and there is none (--tiled N adds it)" in out
    assert "# --compile-dtype: settings of the fast+compile rows, and there are none (--compile auto on cpu" in out


def test_bench_makes_a_new_json_folder_and_notes_no_bf16_only_when_there_is_none(tmp_path, monkeypatch, capsys):
    """A --json in a folder yet to be made failed at the end ('.part' not found) after the check
    that replaced the mkdir; 'no bf16 row' was printed beside a bf16 row asked for."""
    import json

    monkeypatch.setattr("upsr_core.bench.cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "new" / "sub" / "b.json"
    args = bench_args(tmp_path, "--sizes", "16", "--dtypes", "fp32,bf16", "--reps", "1", "--json", str(out))
    assert args.func(args) == 0
    assert {r["dtype"] for r in json.loads(out.read_text())["rows"] if "dtype" in r} == {"fp32", "bf16"}
    assert "# no bf16 row" not in capsys.readouterr().out
