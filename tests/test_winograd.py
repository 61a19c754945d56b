"""NNPACK's Winograd 3x3 convolutions in the CPU fast path (upsr_core.nets.winograd)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upsr_core.fast import FastUPSRModel, enable_fast
from upsr_core.nets import winograd
from upsr_core.nets.winograd import WinogradConv2d, set_winograd, winograd_conv3x3

from _support import bench_args, tiny_upsr

needs_nnpack = pytest.mark.skipif(not winograd.available(), reason="this PyTorch build has no NNPACK that runs on "
                                  "this CPU (the fast path then keeps oneDNN's convolutions)")

EPS32 = torch.finfo(torch.float32).eps


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-output bound for a float32 Winograd conv's error: 256 · eps · Σ|x||w| over the
    window. Measured (2026-11-29, AVX2 VM): up to ~46 · eps · Σ|x||w| for F(6×6, 3×3) (1.2e-4 on
    outputs of magnitude 5 at fan-in 1152); a direct conv's ~1e-5 is far inside. 256 leaves 5×
    room, while a wrong halo row or a dropped bias is off by O(|x||w|) and fails it at once."""
    return 256 * EPS32 * F.conv2d(x.double().abs(), w.double().abs(), padding=1) + 1e-30


@needs_nnpack
@pytest.mark.parametrize("shape, band_bytes, nnpack_calls", [
    ((1, 16, 64, 64), 32 << 20, 1),   # one call (the whole map fits a band)
    ((1, 16, 70, 66), 16 * 66 * 4 * 9, 12),  # bands of 6 rows + halos, a last band of 4 rows
    ((3, 8, 64, 72), 32 << 20, 3),    # a batch: one call per image
    ((2, 8, 97, 64), 8 * 64 * 4 * 20, 12),  # a batch and bands (18 rows) with a short last band
])
def test_winograd_conv_matches_a_direct_conv(shape, band_bytes, nnpack_calls, monkeypatch):
    monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(12, shape[1], 3, 3, generator=g) / (9 * shape[1]) ** 0.5
    b = torch.randn(12, generator=g)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    with torch.no_grad():
        y = winograd_conv3x3(x, w, b)
        assert len(calls) == nnpack_calls
        assert torch.equal(y, winograd_conv3x3(x, w, b))  # deterministic: same input, same bits
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    err = (y.double() - ref).abs()
    assert (err <= _bound(x, w)).all(), f"max error {err.max().item():.2e}"
    y0 = winograd_conv3x3(x, w, None)  # no bias: NNPACK's zeros
    assert ((y0.double() - (ref - b.double()[:, None, None])).abs() <= _bound(x, w)).all()


@needs_nnpack
def test_winograd_conv2d_runs_nnpack_only_where_it_applies(monkeypatch):
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    plain = copy.deepcopy(conv)
    assert set_winograd(conv, True) == 1 and type(conv) is WinogradConv2d
    big, small = torch.randn(1, 8, 64, 64), torch.randn(1, 8, 32, 64)  # 4096 and 2048 pixels
    with torch.no_grad():
        assert not torch.equal(conv(big), plain(big)) and len(calls) == 1
        # a small map, bf16, channels-last: PyTorch's own convolution, bit for bit
        assert torch.equal(conv(small), plain(small))
        assert torch.equal(conv.bfloat16()(big.bfloat16()), plain.bfloat16()(big.bfloat16()))
        conv.float(), plain.float()
        cl = big.contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv(cl), plain(cl))
    assert len(calls) == 1
    # recording gradients (training): PyTorch's convolution, which has a backward
    y = conv(big.requires_grad_())
    y.sum().backward()
    assert len(calls) == 1 and big.grad is not None
    assert torch.equal(y.detach(), plain(big).detach())
    big = big.detach()
    conv.weight.requires_grad_(False)  # only the bias trains: still recorded, still PyTorch's conv
    assert torch.equal(conv(big), plain(big)) and len(calls) == 1
    conv.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: its bf16 conv, as nn.Conv2d gives
        y = conv(big)
        assert y.dtype == torch.bfloat16 and torch.equal(y, plain(big))
    with torch.backends.nnpack.flags(enabled=False):  # NNPACK switched off for the process
        assert torch.equal(conv(big), plain(big))
    assert len(calls) == 1
    assert not torch.equal(conv(big), plain(big)) and len(calls) == 2  # and back on


@needs_nnpack
def test_a_failing_nnpack_falls_back_once_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(winograd, "_FAILED", [])
    tries = []

    def broken(*a):
        tries.append(1)
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", broken)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    plain = copy.deepcopy(conv)
    set_winograd(conv, True)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad(), caplog.at_level("WARNING", logger="upsr_core"):
        assert torch.equal(conv(x), plain(x))
        assert torch.equal(conv(x), plain(x))  # not tried again
    assert len(tries) == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "NNPACK SpatialConvolution_updateOutput failed" in msgs[0]
    assert "PyTorch's convolution from now on" in msgs[0]


@needs_nnpack
def test_out_of_memory_and_wrong_inputs_are_not_nnpack_failures(monkeypatch, caplog):
    monkeypatch.setattr(winograd, "_FAILED", [])

    def no_memory(*a):
        raise RuntimeError("posix_memalign failed:Cannot allocate memory (12)")  # the wrapper's workspace

    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", no_memory)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    set_winograd(conv, True)
    with torch.no_grad(), caplog.at_level("WARNING", logger="upsr_core"):
        with pytest.raises(RuntimeError, match="Cannot allocate memory"):  # raised: the caller shrinks the tiles
            conv(torch.randn(1, 4, 64, 64))
        monkeypatch.setattr(torch, "_nnpack_spatial_convolution", real)
        with pytest.raises(RuntimeError, match=r"expected input\[1, 8, 64, 64\] to have 4 channels"):
            conv(torch.randn(1, 8, 64, 64))  # PyTorch's own error, not blamed on NNPACK
    assert not winograd._FAILED and not caplog.records


def test_set_winograd_switches_the_3x3_stride_1_convs_and_back():
    den = tiny_upsr().denoiser
    keys = list(den.state_dict())
    eligible = [n for n, m in den.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3)
                and m.stride == (1, 1) and m.padding == (1, 1)]
    others = [n for n, m in den.named_modules() if isinstance(m, nn.Conv2d) and n not in eligible]
    assert eligible and others  # the 1x1 convs and the stride-2 Downsample stay as they are
    assert set_winograd(den, True) == len(eligible)
    mods = dict(den.named_modules())
    assert all(type(mods[n]) is WinogradConv2d for n in eligible)
    assert all(type(mods[n]) is nn.Conv2d for n in others)
    assert list(den.state_dict()) == keys
    assert set_winograd(den, False) == len(eligible)
    assert all(type(m) is not WinogradConv2d for m in den.modules())


@needs_nnpack
def test_fast_path_with_winograd_agrees_with_oneDNN(monkeypatch):
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[0].shape) or real(*a))
    base = tiny_upsr()
    lr = torch.rand(1, 3, 64, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        off = enable_fast(copy.deepcopy(base), device="cpu", winograd=False).upscale(lr, seed=3)
        assert not calls
        on_model = enable_fast(copy.deepcopy(base), device="cpu", winograd=True)
        on = on_model.upscale(lr, seed=3)
    assert {c[-2:] for c in calls} == {(64, 72), (256, 288)}  # the body's 64×72 maps and the ×4 head
    assert not any(isinstance(m, WinogradConv2d) for m in on_model.estimator.modules())  # ATD keeps oneDNN
    # measured 1.4e-5 (the fast path without it against the reference: 1.5e-6; AVX2 VM,
    # 2026-11-29); 1e-4 is 1/40 of an 8-bit level and 7× the measurement
    assert (on - off).abs().max() < 1e-4
    assert (on - off).abs().max() > 0


@needs_nnpack
def test_enable_fast_decides_winograd_for_the_cpu(monkeypatch):
    m = tiny_upsr()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert enable_fast(copy.deepcopy(m), device="cpu").fast_options.winograd
    assert not enable_fast(copy.deepcopy(m), device="cpu", compile=True).fast_options.winograd
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    fast = enable_fast(copy.deepcopy(m), device="cpu")
    assert not fast.fast_options.winograd
    assert not any(isinstance(c, WinogradConv2d) for c in fast.denoiser.modules())
    assert enable_fast(copy.deepcopy(m), device="cpu", winograd=True).fast_options.winograd
    with pytest.raises(ValueError, match=r"winograd=True runs eagerly.*compile=True"):
        enable_fast(copy.deepcopy(m), device="cpu", winograd=True, compile=True)
    with pytest.raises(ValueError, match=r"winograd=True needs the CPU.*model is for cuda"):
        enable_fast(copy.deepcopy(m), device="cuda", winograd=True)
    with pytest.raises(ValueError, match=r"winograd must be True, False or 'auto', got 'on'"):
        enable_fast(copy.deepcopy(m), device="cpu", winograd="on")


@needs_nnpack
@pytest.mark.parametrize("norm", ["nhwc_norm", "triton_norm"])
def test_winograd_auto_gives_way_to_a_channels_last_norm(monkeypatch, norm):
    """On an AVX2 CPU Winograd's auto is on, but a norm of channels-last maps asked for by name
    keeps it off (and the denoiser channels-last) instead of failing on the layout it left."""
    import upsr_core.fast as fast_mod

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    if norm == "triton_norm":  # as under TRITON_INTERPRET=1: the kernels run on the CPU
        monkeypatch.setattr(fast_mod, "triton_norm_runs", lambda dev: True)
    opts = enable_fast(tiny_upsr(), device="cpu", **{norm: True}).fast_options
    assert getattr(opts, norm) and opts.channels_last and not opts.winograd


@needs_nnpack
def test_enable_fast_refuses_winograd_with_channels_last():
    """NNPACK takes NCHW maps only: with both asked for, every Winograd conv would quietly
    hand its channels-last map to oneDNN, so the pair is refused, naming both keywords."""
    from upsr_core.errors import FastOptionError

    m = tiny_upsr()
    with pytest.raises(FastOptionError, match=r"^winograd=True takes NCHW maps .*channels_last=True$") as e:
        enable_fast(copy.deepcopy(m), device="cpu", winograd=True, channels_last=True)
    assert e.value.options == ("winograd", "channels_last")
    assert not isinstance(m, FastUPSRModel)  # refused before the model was switched
    with pytest.raises(FastOptionError) as e:
        enable_fast(copy.deepcopy(m), device="cpu", winograd=True, compile=True)
    assert e.value.options == ("winograd", "compile")


@needs_nnpack
def test_moving_a_winograd_model_off_the_cpu_restores_plain_convs(monkeypatch):
    m = enable_fast(tiny_upsr(), device="cpu", winograd=True)
    assert any(isinstance(c, WinogradConv2d) for c in m.denoiser.modules())
    monkeypatch.setattr(type(m), "device", property(lambda self: torch.device("meta")))
    m._prepare()  # what a move to another device runs (the placement changed)
    assert not any(isinstance(c, WinogradConv2d) for c in m.denoiser.modules())
    monkeypatch.undo()
    m.denoiser.to(torch.float64).to(torch.float32)  # moved by someone else (ComfyUI), back on the CPU
    m._follow()
    assert any(isinstance(c, WinogradConv2d) for c in m.denoiser.modules())


def test_set_winograd_refuses_where_nnpack_does_not_run(monkeypatch):
    monkeypatch.setattr(winograd, "_READY", [False])
    with pytest.raises(ValueError, match="set_winograd.*needs NNPACK"):
        set_winograd(nn.Conv2d(4, 4, 3, padding=1), True)
    assert set_winograd(nn.Conv2d(4, 4, 3, padding=1), False) == 1


def _bench_args(tmp_path, *extra):
    return bench_args(tmp_path, "--reps", "1", "--dtypes", "fp32", "--json", str(tmp_path / "b.json"), *extra)


@needs_nnpack
def test_bench_rows_say_where_winograd_ran(tmp_path):
    import json

    args = _bench_args(tmp_path, "--sizes", "64", "--winograd", "on", "--variants", "no-winograd")
    assert args.func(args) == 0
    rows = [r for r in json.loads((tmp_path / "b.json").read_text())["rows"] if "dtype" in r]
    assert [(r["path"], r.get("winograd")) for r in rows] == [
        ("reference", None), ("fast", True), ("fast/no-winograd", False)]
    assert all(r["max_abs"] < 1e-4 for r in rows[1:])  # the bound of the fast-path test above


def test_bench_winograd_on_without_nnpack_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(winograd, "_READY", [False])
    args = _bench_args(tmp_path, "--sizes", "16", "--winograd", "on")
    with pytest.raises(ValueError, match=r"^--winograd on: winograd=True needs the CPU and a PyTorch build whose "
                                         r"NNPACK runs on it"):
        args.func(args)


@needs_nnpack
@pytest.mark.parametrize(("extra", "named"), [
    (("--winograd", "on", "--channels-last", "on"), "--winograd on --channels-last on"),
    (("--winograd", "on", "--variants", "native-norm"), "--variants native-norm --winograd on"),
    (("--channels-last", "on", "--variants", "winograd"), "--variants winograd --channels-last on"),
])
def test_bench_names_the_flags_that_conflict(tmp_path, extra, named):
    """bench names its own flags from the keywords the FastOptionError carries: the ones set on
    the command line, and the variant whose overrides took part (not the flags it overrode)."""
    args = _bench_args(tmp_path, "--sizes", "16", *extra)
    with pytest.raises(ValueError, match=rf"^{named}: winograd=True takes NCHW maps"):
        args.func(args)
