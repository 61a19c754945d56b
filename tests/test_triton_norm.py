"""The Triton GroupNorm(+SiLU) of the fast path (upsr_core.nets.triton_norm), on the CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels with NumPy, so their math is
checked here; their speed only a GPU can say (``bench --variants triton-norm``). Without
Triton installed (the ``[test]`` extra brings it on Linux x86-64 only) the kernel tests are
skipped, and only the switches and the error for asking for them are tested.

Tolerances: against ``F.group_norm`` in float64 on the same (rounded) input, fp32 output is
within 2e-5 (input rounding × |weight| / std dominates), bf16/fp16 within 2.5 roundings of
the output's magnitude (one for the input, one for the output, and the float32 statistics).
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from upsr_core.fast import enable_fast

from _support import load_tool, tiny_upsr

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton); "
                                                            "its interpreter runs the kernels on the CPU")


# The interpreter needs TRITON_INTERPRET=1 both when triton is imported (its standard library, tl.sum
# and the like, is decorated then) and when the kernels are first built; collection imports this
# module before any test runs, so import triton under it here, then take it back: set for the whole
# run, it made other modules' channels-last training run its GroupNorm through the interpreter —
# 73 s a test instead of 1, and another path than the same test run alone (found 2026-11-28).
_INTERPRET = "TRITON_INTERPRET" not in os.environ
if HAS_TRITON and _INTERPRET:
    with pytest.MonkeyPatch.context() as _mp:
        _mp.setenv("TRITON_INTERPRET", "1")
        import triton.language  # noqa: F401


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """TRITON_INTERPRET=1 for this module's tests only (where the caller has not set it)."""
    with pytest.MonkeyPatch.context() as mp:
        if HAS_TRITON and _INTERPRET:
            mp.setenv("TRITON_INTERPRET", "1")
        yield


ULP = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.fixture(params=["one-kernel", "three-kernel"])
def norm_path(request, monkeypatch):
    """Both forward paths of the Triton norm on the same shapes: a whole group per program
    (small maps, the default up to SMALL_GROUP values) and the split statistics (large maps)."""
    if HAS_TRITON:
        from upsr_core.nets import triton_norm

        monkeypatch.setattr(triton_norm, "SMALL_GROUP", 1 << 30 if request.param == "one-kernel" else 0)
    return request.param


@needs_triton
@pytest.mark.parametrize("shape,dtype,mean,silu", [
    ((1, 64, 8, 8), torch.float32, 0.0, False),
    ((2, 160, 12, 10), torch.float32, 33.0, True),  # |mean| = 16 std: the shifted sums keep var exact
    ((1, 320, 8, 8), torch.bfloat16, 0.0, True),
    ((3, 96, 5, 7), torch.float16, 5.0, False),  # C not a multiple of the 128-channel block, odd H·W
    ((2, 64, 40, 25), torch.float32, 3.0, True),  # the three-kernel path's statistics in 4 row shares
])
def test_triton_group_norm_equals_group_norm(shape, dtype, mean, silu, norm_path):
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton

    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + mean).to(dtype)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    want = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5)
    if silu:
        want = F.silu(want)
    y = group_norm_nhwc_triton(x.contiguous(memory_format=torch.channels_last), 32, w, b, 1e-5, silu=silu)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    tol = 2e-5 if dtype == torch.float32 else 2.5 * ULP[dtype] * want.abs().max().item()
    assert (y.double() - want).abs().max().item() <= tol


@needs_triton
def test_triton_group_norm_rejects_what_it_cannot_read():
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton

    w = torch.ones(64)
    with pytest.raises(ValueError, match="channels-last"):
        group_norm_nhwc_triton(torch.zeros(1, 64, 4, 4), 32, w, w, 1e-5)
    with pytest.raises(ValueError, match="multiple of num_groups=32, got shape"):
        group_norm_nhwc_triton(torch.zeros(1, 48, 4, 4).contiguous(memory_format=torch.channels_last), 32, w, w, 1e-5)


@needs_triton
def test_fast_path_with_triton_norm_equals_reference():
    """The whole fast path with every denoiser norm (and the ResBlocks' SiLUs) in Triton, and
    the conv biases they touch folded into the kernels (the ResBlocks' first conv into the
    second norm, their second and skip convs into the residual pass, the Swin MLP's fc1 into
    its GELU and fc2 into its residual): the reference path's result to fp32 rounding; the
    kernels really ran (none failed)."""
    from upsr_core.nets import denoiser, triton_norm

    calls, epilogues = [], []
    real, real_epi = triton_norm.group_norm_nhwc_triton, triton_norm.bias_epilogue_nhwc_triton

    def counted(*a, **k):
        calls.append(k.get("silu", a[5] if len(a) > 5 else False))
        if k.get("x_bias") is not None:
            calls.append("x_bias")
        return real(*a, **k)

    def counted_epi(x, bias, **k):
        epilogues.append(("gelu" if k.get("gelu") else "") + ("skip" if k.get("skip") is not None else "")
                         + ("+bias2" if k.get("bias2") is not None else ""))
        return real_epi(x, bias, **k)

    ref = tiny_upsr()
    # subpixel off, as on CUDA: the CPU's sub-pixel upsampling interleaves into NCHW, which the
    # norm after it would then take natively
    fast = enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=True, subpixel=False)
    lr = torch.rand(1, 3, 8, 8)
    mp = pytest.MonkeyPatch()
    mp.setattr(triton_norm, "group_norm_nhwc_triton", counted)
    mp.setattr(triton_norm, "bias_epilogue_nhwc_triton", counted_epi)
    try:
        out = fast.upscale(lr, seed=1)
    finally:
        mp.undo()
    assert not denoiser._TRITON_NORM_FAILED
    n_norms = sum(isinstance(m, denoiser.GroupNorm32) for m in fast.denoiser.modules())
    res = [m for m in fast.denoiser.modules() if isinstance(m, denoiser.ResBlock)]
    n_swin = sum(isinstance(m, denoiser.SwinBlock) for m in fast.denoiser.modules())
    flags = [c for c in calls if c != "x_bias"]
    assert len(flags) == 5 * n_norms and sum(flags) == 5 * 2 * len(res)  # SiLU fused into the ResBlock norms
    assert calls.count("x_bias") == 5 * len(res)  # each ResBlock's first conv bias in its second norm
    n_skip_conv = sum(isinstance(r.skip_connection, torch.nn.Conv2d) for r in res)
    assert n_skip_conv > 0 and sorted(epilogues) == sorted(
        5 * (["skip+bias2"] * n_skip_conv + ["skip"] * (len(res) - n_skip_conv + n_swin) + ["gelu"] * n_swin))
    torch.testing.assert_close(out, ref.upscale(lr, seed=1), atol=5e-5, rtol=0)


@needs_triton
def test_a_failing_triton_norm_falls_back_once(monkeypatch, caplog):
    from upsr_core.nets import denoiser, triton_norm

    def broken(*a, **k):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: unsupported\nmore")

    monkeypatch.setattr(triton_norm, "group_norm_nhwc_triton", broken)
    monkeypatch.setattr(denoiser, "_TRITON_NORM_FAILED", [])
    fast = enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=True)
    lr = torch.rand(1, 3, 8, 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        out = fast.upscale(lr, seed=1)
    assert caplog.text.count("Triton GroupNorm failed, using the native norm from now on: RuntimeError: "
                             "triton.compiler.errors.CompilationError: at 12:4: unsupported") == 1
    torch.testing.assert_close(out, tiny_upsr().upscale(lr, seed=1), atol=5e-5, rtol=0)


def test_triton_norm_needs_channels_last_triton_and_a_device_for_it(monkeypatch):
    from upsr_core import fast as fast_mod

    monkeypatch.setattr(fast_mod, "triton_norm_runs", lambda dev: True)  # as under TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="triton_norm=True needs channels_last"):
        enable_fast(copy.deepcopy(tiny_upsr()), channels_last=False, triton_norm=True)
    with pytest.raises(ValueError, match="nhwc_norm and triton_norm are two implementations"):
        enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=True, nhwc_norm=True)
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU without the interpreter
    with pytest.raises(ValueError, match="triton_norm=True needs Triton and a CUDA device .* the model is for cpu"):
        enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=True)
    # asked for where it cannot run (no Triton, or an old GPU): that is the error, whatever
    # channels_last resolves to
    monkeypatch.setattr(fast_mod, "triton_norm_runs", lambda dev: False)
    with pytest.raises(ValueError, match="triton_norm=True needs Triton .* the model is for cuda"):
        enable_fast(copy.deepcopy(tiny_upsr()), device="cuda", triton_norm=True)


def test_triton_norm_available_needs_a_capable_cuda_device(monkeypatch):
    from upsr_core.nets import triton_norm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_norm.importlib.util, "find_spec", lambda name: object())  # Triton "installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for cap, ok in (((6, 1), False), ((7, 0), True), ((9, 0), True)):  # Pascal, Volta, Hopper
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None, cap=cap: cap)
        assert triton_norm.available(torch.device("cuda")) is ok, cap
    assert not triton_norm.available(torch.device("cpu")) and not triton_norm.available(torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not triton_norm.available(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_norm.available(torch.device("cpu"))


def test_enable_fast_names_a_bad_device():
    with pytest.raises(ValueError, match="device must be a torch.device or a name .* got 'gpu0'"):
        enable_fast(copy.deepcopy(tiny_upsr()), device="gpu0")


def test_cudnn_benchmark_is_set_on_cuda_unless_the_host_says_no(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    enable_fast(copy.deepcopy(tiny_upsr()), device="cuda", cudnn_benchmark=False)  # ComfyUI's nodes
    assert torch.backends.cudnn.benchmark is False
    enable_fast(copy.deepcopy(tiny_upsr()))  # the CPU
    assert torch.backends.cudnn.benchmark is False
    enable_fast(copy.deepcopy(tiny_upsr()), device="cuda")  # auto: as the official test script
    assert torch.backends.cudnn.benchmark is True


def test_triton_norm_auto_is_for_cuda_with_channels_last_and_triton(monkeypatch):
    """auto (the default): on for a CUDA device with channels-last when the kernels can run there,
    decided for the ``device`` given (ComfyUI's nodes switch nets that are still on the CPU); the
    norms use the kernels only where they can run, so the same model on the CPU runs natively."""
    from upsr_core import fast as fast_mod
    from upsr_core.nets import denoiser

    monkeypatch.setattr(fast_mod, "triton_norm_runs", lambda dev: torch.device(dev).type == "cuda")
    assert not enable_fast(copy.deepcopy(tiny_upsr())).fast_options.triton_norm  # the CPU
    m = enable_fast(copy.deepcopy(tiny_upsr()), device="cuda")
    assert m.fast_options.triton_norm and m.fast_options.channels_last
    norms = [g for g in m.denoiser.modules() if isinstance(g, denoiser.GroupNorm32)]
    assert norms and not any(g.triton for g in norms)  # the nets are still on the CPU
    for kw in ({"channels_last": False}, {"nhwc_norm": True}, {"triton_norm": False}):
        assert not enable_fast(copy.deepcopy(tiny_upsr()), device="cuda", **kw).fast_options.triton_norm, kw
    # channels-last only with a norm that reads it in place (PyTorch's copies to NCHW and back)
    opts = enable_fast(copy.deepcopy(tiny_upsr()), device="cuda", triton_norm=False).fast_options
    assert not opts.channels_last and not opts.triton_norm
    opts = enable_fast(copy.deepcopy(tiny_upsr()), device="cuda", nhwc_norm=True).fast_options
    assert opts.channels_last and opts.nhwc_norm
    opts = enable_fast(copy.deepcopy(tiny_upsr()), device="cuda", channels_last=True, triton_norm=False).fast_options
    assert opts.channels_last and not opts.triton_norm
    monkeypatch.setattr(fast_mod, "triton_norm_runs", lambda dev: False)  # no Triton
    opts = enable_fast(copy.deepcopy(tiny_upsr()), device="cuda").fast_options
    assert not opts.triton_norm and not opts.channels_last and opts.cuda_graphs
    monkeypatch.setattr(fast_mod, "triton_norm_runs", lambda dev: True)  # e.g. TRITON_INTERPRET=1
    m = enable_fast(copy.deepcopy(tiny_upsr()), device="cuda")
    assert all(g.triton for g in m.denoiser.modules() if isinstance(g, denoiser.GroupNorm32))


# ---------------------------------------------------------------- with a backward (training)

@needs_triton
@pytest.mark.parametrize("shape,dtype,batched,silu", [
    ((2, 64, 8, 8), torch.float32, False, False),
    ((2, 160, 12, 10), torch.float32, True, True),  # C/32 = 5 channels per group, odd rows
    ((3, 96, 5, 7), torch.float32, True, False),  # C not a multiple of the 128-channel block
    ((1, 320, 8, 8), torch.bfloat16, False, True),
    ((2, 96, 40, 25), torch.float32, True, True),  # 3 channels per group; 4 row shares forward and backward
])
def test_triton_group_norm_autograd_equals_float64(shape, dtype, batched, silu, norm_path):
    """Output and all three gradients against float64 autograd through F.group_norm, affine and
    SiLU on the same (rounded) input and output gradient. Tolerances relative to the largest
    value: fp32 4e-6 (float32 sums over a group of up to 600 values), bf16 output and dx two
    roundings of bf16 (2**-8 each); dγ/dβ are float32 sums of the same products, so 4e-6
    there too."""
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton_autograd

    torch.manual_seed(0)
    b, c = shape[:2]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    dz = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn((b, c) if batched else (c,)), torch.randn((b, c) if batched else (c,))
    x.requires_grad_()
    w, bb = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    y = group_norm_nhwc_triton_autograd(x, 32, w, bb, 1e-5, silu=silu)
    y.backward(dz)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w0, b0))
    view = (lambda t: t[..., None, None]) if batched else (lambda t: t[None, :, None, None])
    yr = F.group_norm(xr, 32, None, None, 1e-5) * view(wr) + view(br)
    yr = F.silu(yr) if silu else yr
    yr.backward(dz.double())
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.dtype == dtype and x.grad.is_contiguous(memory_format=torch.channels_last)
    assert w.grad.shape == w0.shape and bb.grad.dtype == torch.float32
    tol = 4e-6 if dtype == torch.float32 else 2 * 2**-8
    for got, want, t in [(y, yr, tol), (x.grad, xr.grad, tol), (w.grad, wr.grad, 4e-6), (bb.grad, br.grad, 4e-6)]:
        assert (got.double() - want).abs().max().item() <= t * want.abs().max().item()


@needs_triton
def test_one_affine_for_a_batch_is_read_per_image(norm_path):
    """A (1, C) affine (one timestep for the whole batch) was refused by the kernel's shape check,
    and that refusal counted as a kernel failure: Triton was off for every norm of the process."""
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton_autograd

    torch.manual_seed(0)
    x = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(1, 64, requires_grad=True), torch.randn(1, 64, requires_grad=True)
    w2, b2 = (t.detach().expand(2, -1).clone().requires_grad_() for t in (w1, b1))
    y1 = group_norm_nhwc_triton_autograd(x, 32, w1, b1, 1e-5, silu=True)
    y2 = group_norm_nhwc_triton_autograd(x, 32, w2, b2, 1e-5, silu=True)
    assert torch.equal(y1, y2)
    dz = torch.randn_like(y1)
    y1.backward(dz)
    y2.backward(dz)
    torch.testing.assert_close(w1.grad, w2.grad.sum(0, keepdim=True), rtol=1e-6, atol=1e-6)  # float32 sums
    torch.testing.assert_close(b1.grad, b2.grad.sum(0, keepdim=True), rtol=1e-6, atol=1e-6)

@needs_triton
def test_triton_group_norm_autograd_is_deterministic_and_needs_its_shapes(norm_path):
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton_autograd

    torch.manual_seed(1)
    x = torch.randn(2, 64, 9, 7).contiguous(memory_format=torch.channels_last)
    grads = []
    for _ in range(2):
        xx = x.clone().requires_grad_()
        w = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        group_norm_nhwc_triton_autograd(xx, 32, w, torch.zeros(2, 64), 1e-5, silu=True).square().sum().backward()
        grads.append((xx.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match=r"weight and bias must both be one of \[\(64,\), \(2, 64\)\], got \(3, 64\)"):
        group_norm_nhwc_triton_autograd(x, 32, torch.ones(3, 64), torch.ones(3, 64), 1e-5)


def _tiny_denoiser_train_step(triton: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from upsr_core.nets.denoiser import set_triton_train_norm

    den = copy.deepcopy(tiny_upsr().denoiser).train().requires_grad_(True).to(memory_format=torch.channels_last)
    assert set_triton_train_norm(den, triton) == 36  # 8 ResBlocks × 2, 10 Swin blocks × 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 48, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    lq = torch.randn(2, 96, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    out = den(x, torch.tensor([0, 3]), lq)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in den.named_parameters()}


@needs_triton
def test_denoiser_training_step_with_triton_norm_equals_native():
    """A forward and backward of a channels-last denoiser (all 36 norms: ResBlocks with their
    scale-shift and SiLU folded into the kernel, Swin blocks plain) against the native norms:
    fp32 rounding apart (the fused scale-shift is one rounding fewer). Each norm really ran
    the kernels, forward and backward."""
    from upsr_core.nets import denoiser, triton_norm

    calls = []
    real = triton_norm.group_norm_nhwc_triton_autograd

    def counted(x, g, w, b, eps, silu=False):
        calls.append((tuple(w.shape), silu))
        return real(x, g, w, b, eps, silu)

    backwards = []
    real_bwd = triton_norm._GroupNormFn._backward

    def counted_bwd(*a):
        backwards.append(1)
        return real_bwd(*a)

    mp = pytest.MonkeyPatch()
    mp.setattr(triton_norm, "group_norm_nhwc_triton_autograd", counted)
    mp.setattr(triton_norm._GroupNormFn, "_backward", staticmethod(counted_bwd))
    try:
        out, grads = _tiny_denoiser_train_step(True)
    finally:
        mp.undo()
    assert not denoiser._TRITON_NORM_FAILED and not triton_norm._BACKWARD_FAILED
    assert len(calls) == 36 and sum(silu for _, silu in calls) == 16 and len(backwards) == 36
    assert sum(len(shape) == 2 for shape, _ in calls) == 8  # the ResBlocks' second norm, per image
    ref_out, ref_grads = _tiny_denoiser_train_step(False)
    torch.testing.assert_close(out, ref_out, atol=1e-5 * ref_out.abs().max().item(), rtol=0)
    for name, g in ref_grads.items():
        assert grads[name] is not None, name
        # + 1e-8: the in_layers conv biases feed a GroupNorm of one channel per group (32 channels
        # here), which removes them; their gradient is rounding noise (~1e-9) on both paths
        torch.testing.assert_close(grads[name], g, atol=1e-4 * g.abs().max().item() + 1e-8, rtol=0, msg=name)


def test_set_triton_norm_auto_needs_channels_last_and_a_device(monkeypatch):
    from upsr_core.nets import triton_norm
    from upsr_core.nets.denoiser import GroupNorm32
    from upsr_core.train.cli import set_triton_norm

    den = copy.deepcopy(tiny_upsr().denoiser)
    norms = [m for m in den.modules() if isinstance(m, GroupNorm32)]
    monkeypatch.setattr(triton_norm, "available", lambda dev: True)
    assert set_triton_norm("auto", torch.device("cuda"), den, channels_last=True)
    assert all(m.triton_train for m in norms)
    assert not set_triton_norm("auto", torch.device("cuda"), den, channels_last=False)
    assert not any(m.triton_train for m in norms)
    assert not set_triton_norm("off", torch.device("cuda"), den, channels_last=True)
    with pytest.raises(ValueError, match="--triton-norm on needs --channels-last .* channels-last False"):
        set_triton_norm("on", torch.device("cuda"), den, channels_last=False)
    monkeypatch.setattr(triton_norm, "available", lambda dev: False)
    assert not set_triton_norm("auto", torch.device("cpu"), den, channels_last=True)
    with pytest.raises(ValueError, match="got device cpu, channels-last True, Triton runs there: False"):
        set_triton_norm("on", torch.device("cpu"), den, channels_last=True)


# ---------------------------------------------------------------- conv biases folded into the kernels

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_group_norm_of_x_plus_its_conv_bias(dtype, norm_path):
    """x_bias: the norm of x + bias without materialising it; a large bias (|bias| up to 15
    std) checks that the shifted statistics include it. Tolerance as the plain norm's."""
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton

    torch.manual_seed(0)
    x = (torch.randn(2, 160, 12, 10, dtype=torch.float64) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    xb, w, b = (torch.randn(160) * 10).to(dtype), torch.randn(160), torch.randn(160)
    want = F.silu(F.group_norm(x.double() + xb.double()[:, None, None], 32, w.double(), b.double(), 1e-5))
    y = group_norm_nhwc_triton(x, 32, w, b, 1e-5, silu=True, x_bias=xb)
    tol = 2e-5 if dtype == torch.float32 else 2.5 * ULP[dtype] * want.abs().max().item()
    assert (y.double() - want).abs().max().item() <= tol
    with pytest.raises(ValueError, match=r"x_bias must be \(160,\), got \(32,\)"):
        group_norm_nhwc_triton(x, 32, w, b, 1e-5, x_bias=torch.zeros(32))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["skip", "skip+bias2", "gelu", "bias"])
def test_bias_epilogue_equals_its_ops(dtype, kind):
    """GELU?(x + bias (+ bias2)) (+ skip) in one pass, written into x, against the float64 ops
    on the same rounded inputs: float16 within one rounding of the output (computed in float32,
    rounded once); float32 within 4 float32 ulps of the largest value (up to three float32
    additions and the GELU, each rounding)."""
    from upsr_core.nets.triton_norm import bias_epilogue_nhwc_triton

    torch.manual_seed(1)
    cl = torch.channels_last
    x = (torch.randn(3, 96, 5, 7) * 3).to(dtype).contiguous(memory_format=cl)  # C not a multiple of 128
    bias, bias2 = torch.randn(96).to(dtype), torch.randn(96).to(dtype)
    skip = torch.randn(3, 96, 5, 7).to(dtype).contiguous(memory_format=cl)
    kw = {"skip": skip} if kind.startswith("skip") else {}
    kw |= {"bias2": bias2} if kind.endswith("bias2") else {}
    kw |= {"gelu": True} if kind == "gelu" else {}
    want = x.double() + bias.double()[:, None, None] + (bias2.double()[:, None, None] if "bias2" in kw else 0)
    want = F.gelu(want) if kind == "gelu" else want
    want = want + skip.double() if "skip" in kw else want
    x_in = x.clone()
    y = bias_epilogue_nhwc_triton(x_in, bias, **kw)
    assert y.data_ptr() == x_in.data_ptr() and y.dtype == dtype and y.is_contiguous(memory_format=cl)
    tol = 4 * 2**-24 if dtype == torch.float32 else ULP[dtype]
    assert (y.double() - want).abs().max().item() <= tol * want.abs().max().item()


@needs_triton
def test_bias_epilogue_rejects_what_it_cannot_read():
    from upsr_core.nets.triton_norm import bias_epilogue_nhwc_triton

    x = torch.zeros(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="needs a channels-last contiguous"):
        bias_epilogue_nhwc_triton(torch.zeros(1, 8, 4, 4), torch.zeros(8))
    with pytest.raises(ValueError, match=r"bias2 must be \(8,\), got \(4,\)"):
        bias_epilogue_nhwc_triton(x, torch.zeros(8), bias2=torch.zeros(4))
    with pytest.raises(ValueError, match=r"skip must be channels-last contiguous of x's shape \(1, 8, 4, 4\), "
                                         r"got \(1, 8, 4, 4\) \(channels-last: False\)"):
        bias_epilogue_nhwc_triton(x, torch.zeros(8), skip=torch.zeros(1, 8, 4, 4) + torch.ones(1, 1, 1, 1))


@needs_triton
def test_a_failing_conv_epilogue_falls_back_once(monkeypatch, caplog):
    """The conv epilogue fails to build: one warning, and from then on PyTorch's ops for it and
    the norms alike; the image is the reference's."""
    from upsr_core.nets import denoiser, triton_norm

    def broken(*a, **k):
        raise RuntimeError("triton.runtime.errors.OutOfResources: shared memory")

    monkeypatch.setattr(triton_norm, "bias_epilogue_nhwc_triton", broken)
    monkeypatch.setattr(denoiser, "_TRITON_NORM_FAILED", [])
    fast = enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=True, subpixel=False)
    lr = torch.rand(1, 3, 8, 8)
    with caplog.at_level("WARNING", logger="upsr_core"):
        out = fast.upscale(lr, seed=1)
    assert caplog.text.count("Triton conv epilogue failed, using PyTorch's ops from now on: RuntimeError: "
                             "triton.runtime.errors.OutOfResources: shared memory") == 1
    assert "GroupNorm failed" not in caplog.text
    torch.testing.assert_close(out, tiny_upsr().upscale(lr, seed=1), atol=5e-5, rtol=0)


@needs_triton
def test_conv_epilogue_switch():
    """conv_epilogue=False: the Triton norms without the folded biases (the bench's
    ``no-epilogue`` row), same image; True without the Triton norm is refused."""
    from upsr_core.nets import triton_norm

    calls = []
    real = triton_norm.bias_epilogue_nhwc_triton
    mp = pytest.MonkeyPatch()
    mp.setattr(triton_norm, "bias_epilogue_nhwc_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        fast = enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=True, subpixel=False,
                           conv_epilogue=False)
        assert fast.fast_options.conv_epilogue is False
        lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        out = fast.upscale(lr, seed=1)
    finally:
        mp.undo()
    assert calls == []
    torch.testing.assert_close(out, tiny_upsr().upscale(lr, seed=1), atol=5e-5, rtol=0)
    with pytest.raises(ValueError, match="conv_epilogue=True needs triton_norm"):
        enable_fast(copy.deepcopy(tiny_upsr()), channels_last=True, triton_norm=False, conv_epilogue=True)


@needs_triton
def test_small_maps_take_one_kernel_and_large_ones_three(monkeypatch):
    """The default routing by SMALL_GROUP: an 8×8 map with 20 channels per group is one launch,
    a 64×72 one three (counted), and both equal F.group_norm."""
    from upsr_core.nets import triton_norm

    kernels = triton_norm._kernels()
    launched = []

    class Counting:
        def __init__(self, k, name):
            self.k, self.name = k, name

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.k[grid]

    wrapped = kernels._replace(**{n: Counting(getattr(kernels, n), n) for n in kernels._fields if n != "triton"})
    monkeypatch.setattr(triton_norm, "_kernels", lambda: wrapped)
    torch.manual_seed(0)
    for shape, want in [((1, 640, 8, 8), ["small"]), ((1, 64, 64, 72), ["stats", "finalize", "apply"])]:
        launched.clear()
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        y = triton_norm.group_norm_nhwc_triton(x, 32, w, b, 1e-5)
        assert launched == want
        torch.testing.assert_close(y, F.group_norm(x, 32, w, b, 1e-5), atol=2e-5, rtol=0)


@needs_triton
def test_a_failing_backward_falls_back_to_pytorch_once(monkeypatch, caplog):
    """The backward kernels fail (as a compile error on some GPU would): one warning, and this
    and every later backward is PyTorch's, from the saved input: the same gradients."""
    from upsr_core.nets import triton_norm

    def broken(*a):
        raise RuntimeError("triton.compiler.errors.CompilationError: out of registers")

    monkeypatch.setattr(triton_norm._GroupNormFn, "_backward", staticmethod(broken))
    monkeypatch.setattr(triton_norm, "_BACKWARD_FAILED", [])
    torch.manual_seed(0)
    x0 = torch.randn(2, 64, 6, 5).contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn(2, 64), torch.randn(2, 64)
    grads = []
    with caplog.at_level("WARNING", logger="upsr_core"):
        for _ in range(2):
            x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
            triton_norm.group_norm_nhwc_triton_autograd(x, 32, w, b, 1e-5, silu=True).square().sum().backward()
            grads.append((x.grad, w.grad, b.grad))
    assert caplog.text.count("Triton GroupNorm backward failed, computing it with PyTorch's ops from now on: "
                             "RuntimeError: triton.compiler.errors.CompilationError: out of registers") == 1
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    F.silu(F.group_norm(x, 32, None, None, 1e-5) * w[..., None, None] + b[..., None, None]).square().sum().backward()
    for got in grads:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        for g, want in zip(got, (x.grad, w.grad, b.grad)):
            torch.testing.assert_close(g, want, atol=1e-5 * want.abs().max().item(), rtol=0)


@needs_triton
def test_kernels_read_non_contiguous_affines():
    """A strided (C,) weight view or an expanded (B, C) one: made dense before the kernels
    index them (they read weight[b·WS + c])."""
    from upsr_core.nets.triton_norm import group_norm_nhwc_triton, group_norm_nhwc_triton_autograd

    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    w_full = torch.randn(128)
    w, b = w_full[::2], torch.zeros(64)
    want = F.group_norm(x, 32, w.contiguous(), b, 1e-5)
    torch.testing.assert_close(group_norm_nhwc_triton(x, 32, w, b, 1e-5), want, atol=2e-5, rtol=0)
    wb = w.contiguous()[None].expand(2, 64)
    torch.testing.assert_close(group_norm_nhwc_triton_autograd(x, 32, wb, b[None].expand(2, 64), 1e-5), want,
                               atol=2e-5, rtol=0)


def test_inference_kernels_stay_out_of_autograd(monkeypatch):
    """With gradients on and weights that want them, the fast path's norm kernel (no backward)
    is not used: the norm goes native. The conv-bias folding (written in place, out of
    autograd's sight) only with grad mode off."""
    from upsr_core.nets import denoiser

    monkeypatch.setattr(denoiser, "_TRITON_NORM_FAILED", [])
    n = denoiser.GroupNorm32(64)
    n.triton = n.fuse_bias = True
    x = torch.randn(1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    assert not n.fuses(x)
    assert n.normalize(x, n.weight, n.bias).grad_fn is not None  # native, differentiable
    n.requires_grad_(False)
    assert not n.fuses(x)  # grad mode on: a trainable conv next to it could still be recorded
    with torch.no_grad():
        assert n.fuses(x.clone().requires_grad_())


@needs_triton
def test_fast_resblock_in_grad_mode_keeps_every_gradient(monkeypatch):
    """A fast-path ResBlock (Triton norm and bias folding switched on) with frozen norms and
    trainable convs, run with gradients on: the folding stands aside, so the convs' bias and
    weight gradients equal those of the same block without the kernels (a review found the
    second conv's bias gradient missing when the in-place epilogue ran here)."""
    from upsr_core.nets import denoiser

    monkeypatch.setattr(denoiser, "_TRITON_NORM_FAILED", [])
    torch.manual_seed(0)
    blocks = []
    for fast in (True, False):
        torch.manual_seed(0)
        blk = denoiser.ResBlock(64, 96, 32).to(memory_format=torch.channels_last)
        for nm in (blk.in_layers[0], blk.out_layers[0]):
            nm.requires_grad_(False)
            nm.triton = nm.fuse_bias = fast
        blocks.append(blk)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    affine = torch.stack([torch.rand(96) + 0.5, torch.randn(96)])
    outs = []
    for blk in blocks:
        out = blk.forward_folded(x, affine)
        out.square().sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for (name, p), q in zip(blocks[0].named_parameters(), blocks[1].parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4 * q.grad.abs().max().item(), rtol=0, msg=name)


def test_triton_norm_on_needs_norms_and_compile_mode_needs_compile():
    from upsr_core.nets.atd import ATD
    from upsr_core.train.cli import check_compile_mode, set_triton_norm

    atd = copy.deepcopy(tiny_upsr().estimator)
    assert isinstance(atd, ATD)
    mp = pytest.MonkeyPatch()
    from upsr_core.nets import triton_norm

    mp.setattr(triton_norm, "available", lambda dev: True)
    try:
        with pytest.raises(ValueError, match="--triton-norm on: the ATD has no GroupNorm"):
            set_triton_norm("on", torch.device("cuda"), atd, channels_last=True)
    finally:
        mp.undo()
    import argparse

    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs --compile"):
        check_compile_mode(argparse.Namespace(compile=False, compile_mode="reduce-overhead"))
    check_compile_mode(argparse.Namespace(compile=True, compile_mode="reduce-overhead"))


@needs_triton
def test_denoiser_training_step_under_bf16_autocast():
    """The training default (bf16 autocast): the Triton path's output and gradients are no
    further from the fp32 step than the native norms' (measured: output 7.4e-3 against 1.0e-2
    relative, the worst parameter's gradient 0.35 against 0.41 of its largest value — bf16
    gradients of small parameters are that rough either way; bound 1.5× the native's, since
    the interpreter rounds to bf16 by truncation where a GPU rounds to nearest)."""
    def rel(a, b):
        return (a.float() - b).abs().max().item() / b.abs().max().item()

    with torch.autocast("cpu", torch.bfloat16):
        out_t, grads_t = _tiny_denoiser_train_step(True)
    with torch.autocast("cpu", torch.bfloat16):
        out_n, grads_n = _tiny_denoiser_train_step(False)
    out_32, grads_32 = _tiny_denoiser_train_step(False)
    assert out_t.dtype == torch.bfloat16
    assert rel(out_t, out_32) <= 1.5 * rel(out_n, out_32)
    big = [n for n, g in grads_32.items() if g.abs().max().item() > 1e-6]
    assert max(rel(grads_t[n], grads_32[n]) for n in big) <= 1.5 * max(rel(grads_n[n], grads_32[n]) for n in big)


@needs_triton
def test_launch_count_tool_counts_what_the_fusions_remove():
    """tools/launch_count.py on the tiny nets: session 12's default launches three Triton kernels
    per norm per pass and one bias pass per biased conv; today's default folds exactly the
    biases of the ResBlocks' convs and the Swin MLPs' (5 passes), and launches fewer kernels."""
    from upsr_core.nets import denoiser

    lc = load_tool("launch_count")
    m = tiny_upsr()
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with lc.small_group("session-12"):
        old = lc.count(lc.build("session-12", m.denoiser, m.estimator), lr)
    new = lc.count(lc.build("default", m.denoiser, m.estimator), lr)
    mods = list(m.denoiser.modules())
    n_norms = sum(isinstance(x, denoiser.GroupNorm32) for x in mods)
    res = [x for x in mods if isinstance(x, denoiser.ResBlock)]
    n_swin = sum(isinstance(x, denoiser.SwinBlock) for x in mods)
    folded = 2 * len(res) + sum(isinstance(r.skip_connection, torch.nn.Conv2d) for r in res) + 2 * n_swin
    assert old["triton"] == {"stats": 5 * n_norms, "finalize": 5 * n_norms, "apply": 5 * n_norms}
    assert old["conv_bias_adds"] - new["conv_bias_adds"] == 5 * folded
    assert new["triton"]["epilogue"] == 5 * (len(res) + 2 * n_swin)
    assert new["total"] < old["total"]
