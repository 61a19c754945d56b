"""Training code on CPU with tiny nets: forward process, losses, EMA, loop, resume, CLI."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from upsr_core.cli import main
from upsr_core.config import denoiser_config_from_state_dict
from upsr_core.model import load_upsr
from upsr_core.sampler import prior_sample
from upsr_core.schedule import make_schedule
from upsr_core.train.denoiser import DenoiserTask, build_denoiser_net
from upsr_core.train.ema import EMA
from upsr_core.train.estimator import EstimatorTask, build_estimator_net
from upsr_core.train.feed import PackedFeed, PairPool, default_pool_size, make_lr
from upsr_core.train.loop import LoopConfig, Trainer
from upsr_core.train.losses import make_inputs, q_sample
from upsr_core.train.presets import get_preset

from _support import REPO, packed_crops

TINY = get_preset("tiny")


class FixedFeed:
    """Always the same HR batch (for loss-decrease tests)."""

    def __init__(self, hr):
        self.hr = hr

    def next(self, batch, generator):
        return self.hr[:batch]


def _hr(b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(b, 3, s // 8, s // 8, generator=g), size=(s, s), mode="bilinear")
    return (base + 0.05 * torch.rand(b, 3, s, s, generator=g)).clamp(0, 1)


def test_q_sample_last_step_is_the_prior():
    sch = make_schedule()
    g = torch.Generator().manual_seed(0)
    y, x0, eps = (torch.randn(2, 48, 4, 4, generator=g) for _ in range(3))
    w = 0.4 + 0.6 * torch.rand(2, 48, 4, 4, generator=g)
    t = torch.full((2,), sch.num_steps - 1)
    # x0 == y: exactly the sampler's prior x_T = y + κ√η_T w ε
    torch.testing.assert_close(q_sample(y, y, w, eps, t, sch), prior_sample(y, w, eps, sch))
    # otherwise the mean is x0 + η_T (y − x0): the prior up to (1 − η_T)(x0 − y)
    diff = q_sample(x0, y, w, eps, t, sch) - prior_sample(y, w, eps, sch)
    # float32 cancellation: the difference of two ~N(0, 1.6²) states computed apart, each to ~1e-7
    torch.testing.assert_close(diff, (1 - float(sch.etas[-1])) * (x0 - y), rtol=1e-4, atol=1e-5)


def test_ddim_step_of_exact_x0_follows_the_forward_process():
    sch = make_schedule()
    co = sch.f32()
    g = torch.Generator().manual_seed(1)
    y, x0, eps = (torch.randn(1, 48, 4, 4, generator=g) for _ in range(3))
    w = torch.ones_like(y)
    for t in range(1, sch.num_steps):
        xt = q_sample(x0, y, w, eps, torch.tensor([t]), sch)
        prev = co["k"][t] * x0 + co["m"][t] * xt + co["c"][t] * y
        # exact in real numbers; float32 coefficients (k, m, c rounded from float64) times states of
        # magnitude ~5 (κ√η ε): a few 1e-6, well under 1e-4 — a wrong k/m/c is off by > 1e-2
        torch.testing.assert_close(prev, q_sample(x0, y, w, eps, torch.tensor([t - 1]), sch), rtol=1e-4, atol=1e-4)


def test_make_inputs_shapes_and_scaling():
    sch = make_schedule()
    hr = _hr()
    lr = F.avg_pool2d(hr, 4)
    g = torch.Generator().manual_seed(0)
    inp = make_inputs(hr, lr, lambda x: F.interpolate(x, scale_factor=4, mode="nearest"), sch, g)
    assert inp.x_in.shape == (2, 48, 8, 8) and inp.lq.shape == (2, 96, 8, 8)
    assert inp.target.shape == hr.shape and inp.t.dtype == torch.int64
    assert float(inp.weight.min()) >= 0.4 - 1e-6 and float(inp.weight.max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="must be ×4"):
        make_inputs(hr, hr, lambda x: x, sch, g)


def test_make_inputs_values_are_what_inference_feeds_the_denoiser():
    """By value (only shapes and w's range were tested; a 2026-11-29 mutation review found these
    survived: ψ not halved, lq as [y↑, ŷ] instead of [ŷ, y↑], x_t not scaled by std_t, t never 0).
    lq and w come from the inference pipeline's own Estimate; x_in from the forward process by hand."""
    from upsr_core.pipeline import default_weight, estimate
    from upsr_core.sampler import scale_input
    from upsr_core.train.losses import make_inputs

    sch = make_schedule()
    hr = _hr(s=32)
    lr = F.avg_pool2d(hr, 4)

    def g(x):  # a sharp ×4 guess, so that ψ crosses ψ_max in places and w is not constant
        return (F.interpolate(x, scale_factor=4, mode="nearest") * 1.3 - 0.15).clamp(0, 1)

    t = torch.tensor([0, 3])
    eps = torch.randn(2, 48, 8, 8, generator=torch.Generator().manual_seed(5))
    inp = make_inputs(hr, lr, g, sch, t=t, eps=eps)
    est = estimate(g, lr, 8)  # 8×8 LR: no padding
    w = default_weight(est)
    assert float(w.min()) < 0.41 and float(w.max()) == 1.0  # ψ on both sides of ψ_max
    assert torch.equal(inp.weight, w)
    assert torch.equal(inp.lq, F.pixel_unshuffle(torch.cat([est.sr_estimate_pm, est.bicubic_pm], 1), 4))
    x0, y, wu = (F.pixel_unshuffle(z, 4) for z in (hr * 2 - 1, est.bicubic_pm, w))
    co = sch.f32()
    for i, step in enumerate(t.tolist()):
        eta = float(sch.etas[step])
        x_t = x0[i] + eta * (y[i] - x0[i]) + sch.kappa * math.sqrt(eta) * wu[i] * eps[i]
        # float32 rounding of the float64 constants and of the operation order: ~1e-6 of values ~1
        torch.testing.assert_close(inp.x_in[i], scale_input(x_t, step, co), rtol=0, atol=2e-6)
    torch.testing.assert_close(inp.target, hr * 2 - 1, rtol=0, atol=0)
    drawn = make_inputs(_hr(b=64, s=8), F.avg_pool2d(_hr(b=64, s=8), 4), g, sch, torch.Generator().manual_seed(0)).t
    assert sorted(set(drawn.tolist())) == list(range(sch.num_steps))  # every step, 0 included (64 draws)


def test_degradation_and_estimator_run_in_float32_inside_the_step_s_autocast():
    """The training step runs under bf16 autocast; the LR it degrades and the frozen estimator's
    ŷ and w must be the float32 ones (inference and the official training run g in fp32; bf16
    convolutions/DCTs had moved the LR by 11 levels on average, ŷ by up to 0.029)."""
    sch = make_schedule()
    hr = _hr(s=64)
    est = build_estimator_net(TINY.estimator).eval()

    def inputs():
        lr = make_lr(hr, torch.Generator().manual_seed(1))
        return lr, make_inputs(hr, lr, est, sch, torch.Generator().manual_seed(0))

    lr32, ref = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lr16, got = inputs()
    assert lr16.dtype == torch.float32 and torch.equal(lr16, lr32)
    assert torch.equal(got.lq, ref.lq) and torch.equal(got.weight, ref.weight)
    assert torch.equal(got.x_in, ref.x_in)


def _loss_with(task, model, seed=5):
    with torch.no_grad():
        return float(task.loss(model, torch.Generator().manual_seed(seed))[0])


def _train(task, steps, lr):
    tr = Trainer(task, LoopConfig(steps=steps, batch=2, lr=lr, amp="off", ema_decay=0.5, progress=False,
                                  grad_clip=None))
    for _ in range(steps):
        tr.train_step()
    return tr


def test_estimator_training_reduces_l1():
    torch.manual_seed(0)
    task = EstimatorTask(build_estimator_net(TINY.estimator), FixedFeed(_hr()), 2, "bicubic")
    before = _loss_with(task, task.model)
    _train(task, 8, 5e-3)
    assert _loss_with(task, task.model) < 0.8 * before


def test_denoiser_training_reduces_mse():
    torch.manual_seed(0)
    est = build_estimator_net(TINY.estimator)
    task = DenoiserTask(build_denoiser_net(TINY.denoiser), est, FixedFeed(_hr()), 2, "bicubic")
    before = _loss_with(task, task.model)
    _train(task, 8, 3e-3)
    assert _loss_with(task, task.model) < 0.8 * before


def test_denoiser_task_runs_the_frozen_estimator_fast():
    """Stage 2 runs its frozen estimator on the inference fast path, prepared on the first step:
    the loss equals the one with the reference estimator to fp32 rounding (same draws)."""
    torch.manual_seed(0)
    est = build_estimator_net(TINY.estimator)
    est.upsample[0].weight.data.mul_(5)  # an estimate that differs from bicubic, so ψ and w matter
    den = build_denoiser_net(TINY.denoiser)
    task = DenoiserTask(den, est, FixedFeed(_hr()), 2, "bicubic")
    assert not est.fast
    fast_loss = _loss_with(task, den, seed=3)
    assert est.fast
    reference = DenoiserTask(den, copy.deepcopy(est), FixedFeed(_hr()), 2, "bicubic")
    reference._prepare_estimator = lambda: None  # keep this one on the reference path
    reference.estimator.fast = False
    for layer in reference.estimator.modules():
        if hasattr(layer, "fast_scale"):
            layer.fast_scale = None
        if hasattr(layer, "fast_gain"):
            layer.fast_gain = None
    assert fast_loss == pytest.approx(_loss_with(reference, den, seed=3), rel=1e-5)


def test_ema_update_and_warmup():
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, decay=0.9, warmup=False)
    old = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.shadow["weight"], old + 0.1)
    assert EMA(lin, 0.999).current_decay() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay"):
        EMA(lin, 1.5)
    # the warm-up's n-th update (n = 0, 1, 2) uses decay (1 + n)/(10 + n) — the count moves after the
    # update (counting first made the first decay 2/11; a 2026-11-29 mutation review found it untested)
    ema, x = EMA(lin, 0.999), lin.weight.detach().clone().double()
    for n, step in enumerate((1.0, -2.0, 0.5)):
        with torch.no_grad():
            lin.weight.add_(step)
        d = (1 + n) / (10 + n)
        x = d * x + (1 - d) * lin.weight.detach().double()
        ema.update(lin)
        torch.testing.assert_close(ema.shadow["weight"].double(), x, rtol=0, atol=1e-6)  # float32 lerp
    assert ema.num_updates == 3 and ema.current_decay() == pytest.approx(4 / 13)


class _ScaledTask:
    """loss = gain · Σw: with gain 1e35 the fp16 scaler's 65536 × gradient is inf in float32."""

    def __init__(self):
        self.model, self.gain = torch.nn.Linear(2, 1, bias=False), 1.0

    def loss(self, model, generator):
        loss = self.gain * model.weight.sum()
        return loss, {}


def test_fp16_skipped_steps_leave_the_weights_and_the_ema_alone():
    task = _ScaledTask()
    tr = Trainer(task, LoopConfig(steps=3, batch=1, lr=0.1, amp="fp16", ema_decay=0.5, ema_warmup=False,
                                  grad_clip=None, progress=False))
    w0, ema0 = task.model.weight.detach().clone(), tr.ema.shadow["weight"].clone()
    task.gain = 1e35  # finite loss (≈1e35), inf scaled gradients: the scaler skips the optimiser step
    logs = tr.train_step()
    assert logs["fp16_skipped"] == 1.0 and tr.fp16_skipped == 1 and tr.step == 1
    assert torch.equal(task.model.weight, w0)
    assert torch.equal(tr.ema.shadow["weight"], ema0) and tr.ema.num_updates == 0
    task.gain = 1.0  # a normal step moves both
    logs = tr.train_step()
    assert "fp16_skipped" not in logs and tr.ema.num_updates == 1
    assert not torch.equal(task.model.weight, w0)
    torch.testing.assert_close(tr.ema.shadow["weight"], 0.5 * ema0 + 0.5 * task.model.weight.detach())



class _NaNGradientTask:
    """A finite loss with NaN gradients, as a NaN LPIPS value counted as 0 gives (0 · NaN in the
    backward): ``nan`` switches it on."""

    def __init__(self):
        self.model, self.nan = torch.nn.Linear(2, 1, bias=False), False

    def loss(self, model, generator):
        loss = model.weight.sum()
        if self.nan:
            bad = (model.weight * 0).sum() / (model.weight * 0).sum()  # NaN, and NaN in its gradient
            loss = loss + torch.where(torch.isnan(bad), torch.zeros_like(bad), bad)
        return loss, {}


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_nan_gradients_with_a_finite_loss_skip_the_step_without_a_scaler(amp):
    """Under bf16 or off (no GradScaler) AdamW wrote the NaN gradients into every weight and the EMA
    copied them, and the run went on; now the step is skipped as the fp16 scaler skips it, and ten
    in a row stop the run."""
    task = _NaNGradientTask()
    tr = Trainer(task, LoopConfig(steps=20, batch=1, lr=0.1, amp=amp, ema_decay=0.5, ema_warmup=False,
                                  grad_clip=None, progress=False))
    w0, ema0 = task.model.weight.detach().clone(), tr.ema.shadow["weight"].clone()
    task.nan = True
    logs = tr.train_step()
    assert math.isfinite(logs["loss"]) and logs["nonfinite_skipped"] == 1.0 and tr.step == 1
    assert torch.equal(task.model.weight, w0) and torch.equal(tr.ema.shadow["weight"], ema0)
    task.nan = False
    logs = tr.train_step()
    assert "nonfinite_skipped" not in logs and not torch.equal(task.model.weight, w0)
    assert torch.isfinite(task.model.weight).all() and tr.ema.num_updates == 1
    task.nan = True
    for _ in range(Trainer.MAX_NONFINITE_RUN - 1):
        tr.train_step()
    with pytest.raises(FloatingPointError, match=r"gradients were inf/NaN in 10 steps in a row \(up to step 12\)"
                       r": lower --lr(, use --amp off)?$"):  # no LPIPS in this task: no '--lpips off' advice
        tr.train_step()


def test_a_bf16_checkpoint_resumes_under_fp16(tmp_path):
    """A disabled scaler saves {}: an fp16 resume raised "The source state dict is empty"."""
    task = _ScaledTask()
    a = Trainer(task, LoopConfig(steps=1, batch=1, amp="off", progress=False, checkpoint=str(tmp_path / "a.ckpt")))
    a.fit()
    b = Trainer(_ScaledTask(), LoopConfig(steps=2, batch=1, amp="fp16", progress=False))
    b.load(tmp_path / "a.ckpt")
    assert b.step == 1 and b.scaler.is_enabled() and b.scaler.get_scale() == 65536.0  # a fresh scaler


def test_a_planted_checkpoint_tmp_link_is_not_written_through(tmp_path):
    """a.ckpt.part -> victim in a shared run folder: the checkpoint overwrote the victim (security
    review 2026-11-28, then named .tmp); the link is removed and the write does not follow links."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "a.ckpt.part").symlink_to(victim)
    a = Trainer(_ScaledTask(), LoopConfig(steps=1, batch=1, amp="off", progress=False,
                                          checkpoint=str(tmp_path / "a.ckpt")))
    a.fit()
    assert victim.read_text() == "precious" and (tmp_path / "a.ckpt").is_file()
    assert not (tmp_path / "a.ckpt").is_symlink() and not (tmp_path / "a.ckpt.part").exists()


def test_a_resumed_run_keeps_its_own_ema_warmup():
    """--ema-warmup of the resumed run counts, as --ema-decay does (the checkpoint's overrode it,
    while the run's log recorded the flag)."""
    model = torch.nn.Linear(2, 1)
    sd = EMA(model, 0.9, warmup=True).state_dict()
    ema = EMA(model, 0.9, warmup=False)
    ema.load_state_dict(sd)
    assert ema.warmup is False


def test_folder_feed_without_workers_draws_other_crops_on_each_rank(tmp_path):
    """Every torchrun rank seeds the global RNG alike (same initial weights), and without workers the
    crops and flips came from it: on a one-image folder the ranks trained on identical batches."""
    from PIL import Image

    from upsr_core.train.feed import make_feed

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    batches = []
    for rank in (0, 1):
        torch.manual_seed(0)
        feed = make_feed(folder, 32, torch.device("cpu"), 2, shard=(rank, 2), workers=0, seed=0)
        batches.append(torch.cat([feed.next(2, None) for _ in range(3)]))
    assert not torch.equal(batches[0], batches[1])
    torch.manual_seed(5)  # and the feed leaves the global RNG alone
    want = torch.rand(3)
    torch.manual_seed(5)
    make_feed(folder, 32, torch.device("cpu"), 2, workers=0, seed=0).next(2, None)
    assert torch.equal(torch.rand(3), want)

def _trainer(pack, ckpt, pool=0):
    torch.manual_seed(0)
    est = build_estimator_net(TINY.estimator)
    feed = PackedFeed(pack, 32, torch.device("cpu"))
    task = DenoiserTask(build_denoiser_net(TINY.denoiser), est, feed, 2, "bicubic",
                        pool=PairPool(pool) if pool else None)
    cfg = LoopConfig(steps=4, batch=2, lr=1e-3, amp="off", progress=False, checkpoint=str(ckpt), ckpt_every=100)
    return Trainer(task, cfg)


@pytest.mark.parametrize("pool", [0, 4], ids=["no-pool", "pair-pool"])
def test_resume_gives_the_same_weights(tmp_path, pool):
    """Also with the pair pool: it is full after 2 steps, so the resumed steps draw from the
    pool the checkpoint holds."""
    pack = packed_crops(tmp_path)
    a = _trainer(pack, tmp_path / "a.ckpt", pool)
    a.fit()
    b = _trainer(pack, tmp_path / "b.ckpt", pool)
    b.cfg.steps = 2
    b.fit()
    c = _trainer(pack, tmp_path / "b.ckpt", pool)
    c.load(tmp_path / "b.ckpt")
    assert c.step == 2
    c.fit()
    assert c.step == 4
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(c.model.state_dict()[k], v, rtol=0, atol=0)
    for k, v in a.ema.shadow.items():
        torch.testing.assert_close(c.ema.shadow[k], v, rtol=0, atol=0)


def test_a_cuda_checkpoint_resumes_on_the_cpu_with_reseeded_streams(tmp_path, caplog):
    """A CUDA run's generator state (16 bytes) does not fit a CPU generator (5056): set_state's raw
    RuntimeError ended the resume. The streams are reseeded (as other ranks are, by step), with a
    warning; the weights, optimiser and step continue."""
    pack = packed_crops(tmp_path)
    a = _trainer(pack, tmp_path / "a.ckpt")
    a.cfg.steps = 2
    a.fit()
    sd = torch.load(tmp_path / "a.ckpt", weights_only=True)
    sd["generator"] = torch.zeros(16, dtype=torch.uint8)  # what torch.Generator("cuda").get_state() holds
    torch.save(sd, tmp_path / "a.ckpt")
    b = _trainer(pack, tmp_path / "a.ckpt")
    with caplog.at_level(logging.WARNING, logger="upsr_core.train.loop"):
        b.load(tmp_path / "a.ckpt")
    assert b.step == 2 and "trainer's random stream was written on another kind of device" in caplog.text
    want = torch.Generator().manual_seed(b.cfg.seed + 1_000_003 * 2)
    assert torch.equal(b.generator.get_state(), want.get_state())
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v)
    b.fit()
    assert b.step == 4


class _Payload:
    """Pickles as a call to os.system: what a hostile 'checkpoint' would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_s_pickle_never_runs(tmp_path):
    """Resuming reads tensors, numbers and containers only (weights_only): a .ckpt whose pickle
    would run a command is refused naming the file, and the command never runs."""
    pack = packed_crops(tmp_path)
    t = _trainer(pack, tmp_path / "a.ckpt", False)
    t.cfg.steps = 1
    t.fit()
    sd = torch.load(tmp_path / "a.ckpt", weights_only=True)  # the real one loads so
    sd["meta"] = {"note": _Payload(tmp_path / "ran")}
    torch.save(sd, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"evil.ckpt' is not a readable training checkpoint \(refused "
                                         r"to load .*\(nothing was executed\): .*GLOBAL posix.system.*\): "
                                         r"start over with --fresh"):
        _trainer(pack, tmp_path / "b.ckpt", False).load(tmp_path / "evil.ckpt")
    assert not (tmp_path / "ran").exists()


def test_a_truncated_or_foreign_checkpoint_is_one_error_naming_fresh(tmp_path):
    """A .ckpt cut short (an old crash), empty, or a text file: one ValueError naming the file,
    why, and --fresh (error audit 2026-11-28: a RuntimeError/EOFError traceback, or "holds objects
    a training checkpoint never has" with torch's advice to load it unsafely)."""
    pack = packed_crops(tmp_path)
    t = _trainer(pack, tmp_path / "a.ckpt", False)
    t.cfg.steps = 1
    t.fit()
    whole = (tmp_path / "a.ckpt").read_bytes()
    for name, data, why in [("cut.ckpt", whole[:1000], "truncated or corrupted"),
                            ("empty.ckpt", b"", "the file is empty"),
                            ("text.ckpt", b"garbage\n", "starts with b'garbage\\n'")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            _trainer(pack, tmp_path / "b.ckpt", False).load(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{str(tmp_path / name)!r} is not a readable training checkpoint (not ")
        assert why in msg
        assert msg.endswith("start over with --fresh (which keeps this file as <name>.before-fresh), or give "
                            "another --out") and "weights_only" not in msg


def test_time_budget_counts_the_minutes_of_earlier_runs(tmp_path, caplog):
    """--max-minutes is a budget of the whole training, as --steps: a resumed training whose
    earlier runs used it up trains no step (and says how to go on); the cosine schedule, which
    follows the same total clock, can no longer sit at its floor for a whole new budget."""
    pack = packed_crops(tmp_path)
    a = _trainer(pack, tmp_path / "a.ckpt")
    a.cfg.steps = 1
    a.fit()
    b = _trainer(pack, tmp_path / "a.ckpt")
    b.load(tmp_path / "a.ckpt")
    # the earlier run's time comes back from the checkpoint (it was only set by hand below, so a
    # load that dropped it went unseen: 2026-11-29 mutation review)
    assert b.elapsed_before == a.elapsed_before > 0 and b.step == a.step == 1
    b.cfg.steps, b.cfg.max_minutes = 4, 1.0
    b.elapsed_before = 60.0  # as if the first run had trained for the whole minute
    with caplog.at_level(logging.WARNING):
        b.fit()
    assert b.step == 1 and "raise --max-minutes to train on" in caplog.text
    b.cfg.max_minutes = 10.0
    b.fit()
    assert b.step == 4


def test_grad_clip_defaults_to_the_preset_s_and_can_be_turned_off(tmp_path):
    """The official training clips nothing (full: off); the small/tiny recipes clip at 1.0."""
    from upsr_core.cli import build_parser
    from upsr_core.train.cli import _loop_config
    from upsr_core.train.loop import DistInfo

    def clip(*flags, config="tiny"):
        args = build_parser().parse_args(["train", "estimator", "--data", str(tmp_path), "--config", config, *flags])
        return _loop_config(args, get_preset(config), DistInfo(), tmp_path).grad_clip

    assert clip() == 1.0 and clip(config="small") == 1.0 and clip(config="full") is None
    assert clip("--grad-clip", "off") is None and clip("--grad-clip", "0.5") == 0.5
    assert clip("--grad-clip", "2", config="full") == 2.0


def test_packed_feed_crops_and_augments(tmp_path):
    feed = PackedFeed(packed_crops(tmp_path), 32, torch.device("cpu"))
    x = feed.next(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    with pytest.raises(ValueError, match="larger than the packed"):
        PackedFeed(packed_crops(tmp_path), 64, torch.device("cpu"))


def test_small_preset_fits_the_budget():
    p = get_preset("small")
    den = build_denoiser_net(p.denoiser)
    est = build_estimator_net(p.estimator)
    n = sum(t.numel() for t in den.parameters()) + sum(t.numel() for t in est.parameters())
    assert n * 4 <= 40e6
    assert den.multiple_of == 64
    assert denoiser_config_from_state_dict(den.state_dict()) == p.denoiser
    with pytest.raises(ValueError, match="unknown config"):
        get_preset("huge")


def test_cli_two_stages_export_and_resume(tmp_path):
    pack = packed_crops(tmp_path)
    out = tmp_path / "run"
    common = ["--data", str(pack), "--config", "tiny", "--out", str(out), "--log-every", "1", "--degradation",
              "bicubic"]
    assert main(["train", "estimator", *common, "--steps", "2"]) == 0
    est = out / "estimator.safetensors"
    assert est.is_file()
    demo = tmp_path / "demo.safetensors"
    assert main(["train", "denoiser", *common, "--steps", "2", "--estimator", str(est), "--export", str(demo)]) == 0
    assert main(["train", "denoiser", *common, "--steps", "3", "--estimator", str(est)]) == 0  # resumes at 2
    log = json.loads((out / "denoiser_log.json").read_text())
    assert log["summary"]["steps"] == 3 and log["summary"]["steps_this_run"] == 1
    m = load_upsr(demo)
    meta = json.loads(m.metadata["training"])
    assert meta["stage"] == "denoiser" and meta["b_u"] == 0.4 and "hardware" in meta
    assert m.upscale(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    assert main(["train", "denoiser", *common, "--estimator", str(tmp_path / "missing.safetensors")]) == 2


# ----------------------------------------------------------------------------- --init (fine-tuning)
def _tiny_export(tmp_path, name="demo.safetensors", seed=0):
    """A tiny two-net fp16 export made by the CLI (like the bundled demo file) -> (path, run folder)."""
    pack = packed_crops(tmp_path)
    out = tmp_path / f"src{seed}"
    common = ["--data", str(pack), "--config", "tiny", "--out", str(out), "--degradation", "bicubic", "--steps", "1",
              "--seed", str(seed)]
    assert main(["train", "estimator", *common]) == 0
    demo = tmp_path / name
    assert main(["train", "denoiser", *common, "--estimator", str(out / "estimator.safetensors"), "--export",
                 str(demo), "--export-dtype", "fp16"]) == 0
    return demo, out


def _file_net(path, prefix):
    from upsr_core.checkpoint import read_checkpoint

    sd, _ = read_checkpoint(path)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd


def test_init_gives_the_file_weights_at_step_0(tmp_path):
    from upsr_core.train.cli import read_init

    demo, src = _tiny_export(tmp_path)
    for stage, path, prefix in [("estimator", demo, "estimator."), ("denoiser", demo, "denoiser."),
                                ("estimator", src / "estimator.safetensors", "")]:
        net, rec = read_init(path, stage)
        assert net.training and all(p.requires_grad for p in net.parameters())
        want = _file_net(path, prefix)
        if stage == "estimator":
            task = EstimatorTask(net, FixedFeed(_hr()), 2, "bicubic")
        else:
            task = DenoiserTask(net, build_estimator_net(TINY.estimator), FixedFeed(_hr()), 2, "bicubic")
        tr = Trainer(task, LoopConfig(steps=1, batch=2, amp="off", progress=False, ema_warmup=False))
        assert tr.step == 0 and not tr.opt.state  # fresh optimiser
        for k, v in want.items():  # fp16 in the demo file, fp32 in the net and its EMA, same values
            assert tr.model.state_dict()[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype)
            torch.testing.assert_close(tr.model.state_dict()[k], v.float() if v.is_floating_point() else v,
                                       rtol=0, atol=0)
            if k in tr.ema.shadow:
                torch.testing.assert_close(tr.ema.shadow[k], v.float(), rtol=0, atol=0)
        assert rec["name"] == path.name and len(rec["sha256"]) == 64
        assert rec["stored_dtype"] == ("float16" if path == demo else "float32")
        assert rec["config_from"] == "metadata" and rec["training"]["stage"] == stage


def test_init_config_mismatch_and_wrong_net_error(tmp_path, capsys):
    demo, src = _tiny_export(tmp_path)
    common = ["--data", str(packed_crops(tmp_path)), "--out", str(tmp_path / "ft"), "--degradation", "bicubic",
              "--steps", "1"]
    assert main(["train", "estimator", *common, "--init", str(demo), "--config", "small"]) == 2
    err = capsys.readouterr().err
    assert str(demo) in err and "--config 'small'" in err and "embed_dim: 16 vs 48" in err
    assert main(["train", "denoiser", *common, "--init", str(src / "estimator.safetensors"), "--estimator",
                 str(demo)]) == 2
    err = capsys.readouterr().err
    assert "estimator.safetensors" in err and "holds no UPSR denoiser weights (it holds: estimator)" in err
    assert main(["train", "estimator", *common, "--init", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    # the matching preset, given or not, is accepted (the file's net decides)
    assert main(["train", "estimator", *common, "--init", str(demo), "--config", "tiny", "--fresh"]) == 0
    assert main(["train", "estimator", *common, "--init", str(demo), "--fresh"]) == 0
    assert json.loads((tmp_path / "ft" / "estimator_log.json").read_text())["config"] == "tiny"


def test_checkpoint_wins_over_init_unless_fresh(tmp_path, caplog):
    a, _ = _tiny_export(tmp_path, "a.safetensors", seed=0)
    b, _ = _tiny_export(tmp_path, "b.safetensors", seed=1)
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    out = tmp_path / "ft"
    common = ["--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out", str(out), "--degradation", "bicubic"]
    log_of = lambda: json.loads((out / "estimator_log.json").read_text())  # noqa: E731
    assert main(["train", "estimator", *common, "--init", str(a), "--steps", "2"]) == 0
    rec = log_of()
    assert rec["init"]["sha256"] == sha[a] and rec["resumed"] is None and rec["loop"]["ema_warmup"] is False
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["train", "estimator", *common, "--init", str(b), "--steps", "3"]) == 0
    rec = log_of()
    assert rec["summary"]["steps"] == 3 and rec["summary"]["steps_this_run"] == 1
    assert rec["init"]["sha256"] == sha[a] and rec["resumed"].endswith("estimator.ckpt")  # the run descends from a
    assert any(f"--init {b} not used" in r.getMessage() and "a.safetensors" in r.getMessage() for r in caplog.records)
    old_ckpt = (out / "estimator.ckpt").read_bytes()
    assert main(["train", "estimator", *common, "--init", str(b), "--steps", "1", "--fresh"]) == 0
    rec = log_of()
    assert rec["summary"]["steps"] == 1 and rec["init"]["sha256"] == sha[b] and rec["resumed"] is None
    # --fresh set the old checkpoint aside before training (a run killed before its first save leaves none to resume)
    assert (out / "estimator.ckpt.before-fresh").read_bytes() == old_ckpt
    second = (out / "estimator.ckpt").read_bytes()
    # a second --fresh overwrote the first one's .before-fresh
    assert main(["train", "estimator", *common, "--steps", "1", "--fresh"]) == 0
    assert (out / "estimator.ckpt.before-fresh").read_bytes() == old_ckpt
    assert (out / "estimator.ckpt.before-fresh.1").read_bytes() == second


def test_init_record_in_log_and_export_metadata(tmp_path):
    demo, _ = _tiny_export(tmp_path)
    demo_meta = load_upsr(demo).metadata
    out = tmp_path / "ft"
    common = ["--data", str(packed_crops(tmp_path)), "--out", str(out), "--degradation", "bicubic", "--steps", "1"]
    assert main(["train", "estimator", *common, "--init", str(demo)]) == 0
    est = out / "estimator.safetensors"
    export = tmp_path / "ft.safetensors"
    assert main(["train", "denoiser", *common, "--init", str(demo), "--estimator", str(est), "--export",
                 str(export)]) == 0
    sha = hashlib.sha256(demo.read_bytes()).hexdigest()
    meta = load_upsr(export).metadata
    den, est_rec = json.loads(meta["training"]), json.loads(meta["estimator_training"])
    assert den["init"]["name"] == "demo.safetensors" and den["init"]["sha256"] == sha
    assert den["init"]["training"] == json.loads(demo_meta["training"])  # the demo's own denoiser record
    assert est_rec["init"]["sha256"] == sha
    assert est_rec["init"]["training"] == json.loads(demo_meta["estimator_training"])
    log = json.loads((out / "denoiser_log.json").read_text())
    assert log["init"] == den["init"] and log["loop"]["ema_warmup"] is False
    with safe_open(str(out / "denoiser.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["training"])["init"]["sha256"] == sha


def test_folder_feed_min_texture_prefers_textured_crops(tmp_path):
    from PIL import Image

    from upsr_core.train.data import ImageFolderDataset, _texture

    a = np.full((64, 256, 3), 128, np.uint8)  # left half flat, right half noise
    a[:, 128:] = (np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "half.png")
    torch.manual_seed(0)
    plain = ImageFolderDataset(tmp_path, 32)
    picky = ImageFolderDataset(tmp_path, 32, min_texture=20.0, tries=20)
    tex = lambda x: _texture((x.permute(1, 2, 0).numpy() * 255).round(), 255)  # noqa: E731
    assert min(tex(picky[0]) for _ in range(40)) >= 20
    assert min(tex(plain[0]) for _ in range(40)) < 1  # some crops fall in the flat half
    with pytest.raises(ValueError, match="min_texture"):
        ImageFolderDataset(tmp_path, 32, min_texture=float("nan"))


def _half_flat_folder(tmp_path):
    from PIL import Image

    a = np.full((64, 256, 3), 128, np.uint8)  # left half flat, right half noise
    a[:, 128:] = (np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "half.png")
    Image.fromarray(a[:40, 130:180]).save(tmp_path / "small.png")  # noise, smaller than the crop: reflect-padded
    return tmp_path


def test_photo_feed_crops_texture_and_resumable_stream(tmp_path):
    from upsr_core.train.data import _texture
    from upsr_core.train.feed import PhotoFeed, make_feed

    folder = _half_flat_folder(tmp_path)
    tex = lambda x: _texture((x.permute(1, 2, 0).numpy() * 255).round(), 255)  # noqa: E731
    feed = PhotoFeed(folder, 48, torch.device("cpu"), min_texture=20.0, tries=30)
    assert len(feed) == 2 and feed.images[1].shape == (3, 48, 50)
    g = torch.Generator().manual_seed(3)
    idx = torch.tensor([0, 0, 0, 1])
    y, x = torch.tensor([0, 5, 16, 0]), torch.tensor([0, 100, 208, 2])
    want = [_texture(feed.images[i][:, a:a + 48, b:b + 48].permute(1, 2, 0).numpy(), 255)
            for i, a, b in zip(idx.tolist(), y.tolist(), x.tolist())]
    torch.testing.assert_close(feed.texture(idx, y, x), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    state = g.get_state()
    a = feed.next(6, g)
    assert a.shape == (6, 3, 48, 48) and a.dtype == torch.float32 and 0 <= float(a.min()) <= float(a.max()) <= 1
    g.set_state(state)
    torch.testing.assert_close(feed.next(6, g), a, rtol=0, atol=0)  # the stream is the generator's
    assert min(tex(x) for x in feed.next(40, g)) >= 20  # no crop lands in the flat half of half.png
    plain = make_feed(folder, 48, torch.device("cpu"), 4, feed="device")
    assert isinstance(plain, PhotoFeed) and plain.tries == 1
    assert min(tex(x) for x in plain.next(40, torch.Generator().manual_seed(0))) < 1  # some crops are flat
    with pytest.raises(ValueError, match="feed must be"):
        make_feed(folder, 48, torch.device("cpu"), 4, feed="gpu")


def test_workers_where_no_dataloader_runs_are_named(tmp_path, caplog):
    # --workers used to be dropped silently with --feed device and with packed crops.
    from upsr_core.train.feed import make_feed

    folder = _half_flat_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="upsr_core.train.feed"):
        make_feed(folder, 48, torch.device("cpu"), 4, feed="device")
        assert "ignored" not in caplog.text  # not given: nothing to say
        make_feed(folder, 48, torch.device("cpu"), 4, feed="device", workers=8)
    assert "--workers 8 ignored: --feed device" in caplog.text


def test_cli_trains_on_a_photo_folder_with_the_device_feed(tmp_path):
    (tmp_path / "photos").mkdir()
    folder = _half_flat_folder(tmp_path / "photos")
    out = tmp_path / "run"
    assert main(["train", "estimator", "--data", str(folder), "--config", "tiny", "--out", str(out), "--steps", "2",
                 "--degradation", "bicubic", "--feed", "device", "--min-texture", "3"]) == 0
    rec = json.loads((out / "estimator_log.json").read_text())
    assert rec["feed"] == "PhotoFeed" and rec["min_texture"] == 3 and rec["summary"]["steps"] == 2
    # packed crops ignore it (filtered when packed): the record said 3 all the same (2026-11-29 review)
    assert main(["train", "estimator", "--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out",
                 str(tmp_path / "packed"), "--steps", "1", "--degradation", "bicubic", "--min-texture", "3"]) == 0
    rec = json.loads((tmp_path / "packed" / "estimator_log.json").read_text())
    assert rec["feed"] == "PackedFeed" and rec["min_texture"] == 0.0


def test_export_with_the_estimator_of_a_two_net_file_records_its_estimator_training(tmp_path):
    demo, _ = _tiny_export(tmp_path)
    export = tmp_path / "ft.safetensors"
    assert main(["train", "denoiser", "--data", str(packed_crops(tmp_path)), "--out", str(tmp_path / "ft"),
                 "--steps", "1", "--degradation", "bicubic", "--init", str(demo), "--estimator", str(demo), "--export",
                 str(export)]) == 0
    demo_meta, meta = load_upsr(demo).metadata, load_upsr(export).metadata
    assert json.loads(meta["estimator_training"])["stage"] == "estimator"
    assert meta["estimator_training"] == demo_meta["estimator_training"]


@pytest.mark.parametrize("kw, match", [
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, "lr must be"),
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ({"grad_clip": 0.0}, r"grad_clip must be a finite number > 0 or None \(off\), got 0.0"),
])
def test_loop_config_refuses_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LoopConfig(**({"steps": 1, "batch": 1, "amp": "off"} | kw))


def test_cli_explicit_zero_is_not_the_preset_default(tmp_path, capsys):
    """--lr 0 / --steps 0 used to fall back to the preset's value through `or`; now they are refused."""
    from upsr_core.cli import main

    for flag, msg in ((["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
                      (["--steps", "0"], "argument --steps: must be >= 1, got 0")):
        rc = main(["train", "estimator", "--data", str(tmp_path), "--config", "tiny", "--out", str(tmp_path / "o"),
                   "--device", "cpu", *flag])
        assert rc == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    # the small denoiser's LR side must be a multiple of 64: an HR crop of 128 crashed in window_partition's reshape
    (["denoiser", "--config", "small", "--crop", "128"], "--crop 128 does not fit the denoiser stage: the HR crop "
                                                         "side must be a positive multiple of 256"),
    (["denoiser", "--config", "tiny", "--crop", "48"], "positive multiple of 32"),
    (["estimator", "--config", "tiny", "--crop", "30"], "--crop 30 does not fit the estimator stage: the HR crop "
                                                        "side must be a positive multiple of 4"),
    (["estimator", "--config", "tiny", "--crop", "0"], "argument --crop: must be >= 1, got 0"),
    (["bench", "--config", "small", "--crop", "128"], "--crop 128 does not fit the denoiser stage"),
])
def test_cli_crop_the_nets_cannot_take_is_an_error_line(tmp_path, capsys, argv, msg):
    est = tmp_path / "missing_estimator.safetensors"  # never read: the crop is checked before the estimator loads
    stage_args = [] if argv[0] == "bench" else ["--data", str(tmp_path), "--out", str(tmp_path / "o")]
    extra = ["--estimator", str(est)] if argv[0] == "denoiser" else []
    assert main(["train", *argv, *stage_args, *extra, "--device", "cpu"]) == 2
    assert msg in capsys.readouterr().err


def test_denoiser_refuses_sides_off_its_multiple():
    den = build_denoiser_net(get_preset("tiny").denoiser)  # multiple_of 8
    c = den.config
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x \(1, 48, 12, 16\) and lq \(1, 96, 12, 16\) must share H×W, a multiple "
                                         r"of 8"):
        den(torch.zeros(1, c.in_channels, 12, 16), t, torch.zeros(1, 96, 12, 16))
    with pytest.raises(ValueError, match="must share H×W"):
        den(torch.zeros(1, c.in_channels, 16, 16), t, torch.zeros(1, 96, 8, 16))


def test_channels_last_trains_the_same_net(tmp_path):
    """--channels-last changes the memory layout only: same losses and weights up to conv rounding."""
    pack = packed_crops(tmp_path)
    common = ["--data", str(pack), "--config", "tiny", "--log-every", "1", "--degradation", "bicubic", "--steps", "3"]
    assert main(["train", "estimator", *common, "--out", str(tmp_path / "e")]) == 0
    est = str(tmp_path / "e" / "estimator.safetensors")
    runs = {}
    for flag in ([], ["--channels-last"]):
        out = tmp_path / ("cl" if flag else "plain")
        assert main(["train", "denoiser", *common, "--out", str(out), "--estimator", est, *flag]) == 0
        log = json.loads((out / "denoiser_log.json").read_text())
        # native norms on the CPU (no Triton there unless TRITON_INTERPRET=1, which only test_triton_norm's
        # tests set): this failed in the whole suite while that module set it at import for every test
        assert log["channels_last"] == bool(flag) and log["triton_norm"] is False
        runs[bool(flag)] = ([h["loss"] for h in log["history"]], load_upsr(out / "denoiser.safetensors", est))
    (loss_a, m_a), (loss_b, m_b) = runs[False], runs[True]
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-4)  # fp32 on the CPU: NHWC kernels round differently
    # AdamW's first steps move each weight by about ±lr whatever the gradient's size, so a near-zero gradient
    # whose sign the rounding flips moves it the other way: at most 2 × lr (tiny: 1e-3) per step, 3 steps
    worst = max((a - b).abs().max().item() for a, b in zip(m_a.denoiser.state_dict().values(),
                                                            m_b.denoiser.state_dict().values()))
    assert worst <= 3 * 2 * 1e-3  # measured 2.7e-5 (CPU, 2026-11-26)


def test_train_bench_runs_on_cpu_with_channels_last():
    import argparse

    from upsr_core.train.bench import add_bench_parser, run_bench

    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers())
    for flag in ([], ["--channels-last"]):
        res = run_bench(ap.parse_args(["bench", "--config", "tiny", "--batch", "2", "--crop", "64", "--amp", "off",
                                       "--warmup", "1", "--iters", "2", "--device", "cpu", *flag]))
        assert res["channels_last"] == bool(flag) and res["s_per_iter_median"] > 0 and res["iters"] == 2
        # no allocator statistics on the CPU: an explicit None, and the process RSS peak (Linux) as an upper bound
        assert res["peak_mem_gib"] is None and (res["peak_rss_gib"] is None or res["peak_rss_gib"] > 0)


def test_train_bench_takes_trains_amp_and_warns_of_slow_cpu_half_precision(monkeypatch, caplog):
    """train bench's --amp default is train's (bf16 on CUDA, off on the CPU: it was bf16 everywhere,
    and bf16 convolutions on an AVX2-only CPU run ~250x slower than fp32); an --amp the CPU has no
    fast kernels for runs, with a warning (train warns the same, from the same function)."""
    import argparse

    from upsr_core.train.bench import add_bench_parser, run_bench
    from upsr_core.train.cli import training_amp

    monkeypatch.setattr("upsr_core.train.cli.cpu_has_fast_bf16", lambda: False)
    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers())
    common = ["bench", "--config", "tiny", "--batch", "1", "--crop", "64", "--warmup", "0", "--iters", "1",
              "--device", "cpu"]
    with caplog.at_level("WARNING"):
        assert run_bench(ap.parse_args(common))["amp"] == "off"
        assert not caplog.records
        assert run_bench(ap.parse_args([*common, "--amp", "bf16"]))["amp"] == "bf16"
        assert training_amp("fp16", torch.device("cpu"), "train") == "fp16"
        assert training_amp("bf16", torch.device("meta"), "train") == "bf16"  # not a CPU: nothing to say
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert msgs[0].startswith("train bench: --amp bf16 on a CPU without fast bf16 kernels") and "--amp off" in msgs[0]
    assert msgs[1].startswith("train: --amp fp16 on the CPU has no fast kernels")


def test_train_bench_profile_names_the_step_ops(capsys):
    """--profile N: one more step under torch.profiler after the timing, its N costliest ops
    printed and kept in the result (where the GPU step's time goes)."""
    import argparse

    from upsr_core.train.bench import add_bench_parser, run_bench

    ap = argparse.ArgumentParser()
    add_bench_parser(ap.add_subparsers())
    res = run_bench(ap.parse_args(["bench", "--config", "tiny", "--batch", "2", "--crop", "64", "--amp", "off",
                                   "--warmup", "1", "--iters", "1", "--device", "cpu", "--profile", "5"]))
    printed = capsys.readouterr().out
    assert "aten::" in res["profile"] and "#   " in printed and "Self CPU" in printed
    assert res["iters"] == 1 and res["s_per_iter_median"] > 0


@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pool+cpu-degradations"])
def test_compile_failure_falls_back_to_eager_with_the_same_steps(monkeypatch, caplog, pooled):
    """train --compile: a compiler failure (here at the second step, as a recompile would) redoes
    that step eagerly: the run continues with exactly the eager run's losses and weights. Also
    with a pair pool and a CPU degradation generator, which the failed try had advanced (the
    pool, filling at that step, would hold the batch twice and be full one step early)."""
    import torch._dynamo.exc

    def run(compile_fails_at):
        torch.manual_seed(0)
        est = build_estimator_net(TINY.estimator)
        extra = {"deg_generator": torch.Generator().manual_seed(1), "pool": PairPool(4)} if pooled else {}
        task = DenoiserTask(build_denoiser_net(TINY.denoiser), est, FixedFeed(_hr()), 2,
                            "realesrgan" if pooled else "bicubic", **extra)
        tr = Trainer(task, LoopConfig(steps=3, batch=2, lr=1e-3, amp="off", progress=False))
        if compile_fails_at is not None:
            calls = []

            def fake_compile(net, mode=None):  # a "compiled" net that fails on its second forward
                def fwd(*a, **k):
                    calls.append(1)
                    if len(calls) == compile_fails_at:
                        raise torch._dynamo.exc.TorchDynamoException("inductor: codegen failed")
                    return net(*a, **k)
                return fwd

            monkeypatch.setattr(torch, "compile", fake_compile)
            tr.compile()
            assert tr.compiled
        losses = [tr.train_step()["loss"] for _ in range(3)]
        return losses, tr

    eager_losses, eager = run(None)
    with caplog.at_level("WARNING", logger="upsr_core"):
        losses, tr = run(2)
    assert not tr.compiled and "torch.compile failed at step 1" in caplog.text
    assert losses == eager_losses
    for a, b in zip(tr.model.state_dict().values(), eager.model.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_compile_flag_compiles_the_trained_net_and_records_it(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, mode: compiled.append(mode) or net)  # real ones take minutes
    pack = packed_crops(tmp_path)
    common = ["--data", str(pack), "--config", "tiny", "--degradation", "bicubic", "--steps", "1", "--device", "cpu"]
    assert main(["train", "estimator", *common, "--out", str(tmp_path / "e"), "--compile"]) == 0
    log_ = json.loads((tmp_path / "e" / "estimator_log.json").read_text())
    assert compiled == ["default"] and log_["compile"] is True and log_["compile_mode"] == "default"
    assert main(["train", "estimator", *common, "--out", str(tmp_path / "r"), "--compile",
                 "--compile-mode", "reduce-overhead"]) == 0
    assert compiled[-1] == "reduce-overhead"
    log_ = json.loads((tmp_path / "r" / "estimator_log.json").read_text())
    assert log_["compile_mode"] == "reduce-overhead" and log_["triton_norm"] is False
    with pytest.raises(ValueError, match="compile mode 'fast' is not one of default, reduce-overhead"):
        Trainer(EstimatorTask(build_estimator_net(TINY.estimator), FixedFeed(_hr()), 2, "bicubic"),
                LoopConfig(steps=1, batch=2, progress=False)).compile("fast")


def test_compiled_denoiser_traces_once_for_a_fixed_shape():
    """The reference SwinBlock caches its shift masks per size; under torch.compile the mask is built
    in the graph instead, so the second step does not fail a guard on the cache and recompile the
    whole net (measured before the fix, full config on this CPU: 234 s compile, then 130 s again)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # count traced graphs, run them eagerly (no inductor: seconds)
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    net = build_denoiser_net(TINY.denoiser)
    fn = torch.compile(net, backend=backend)
    ch = TINY.denoiser.in_channels
    x, lq = torch.randn(2, ch, 32, 32), torch.randn(2, TINY.denoiser.lq_channels, 32, 32)
    for t in (torch.tensor([0, 3]), torch.tensor([4, 1])):
        out = fn(x, t, lq)
        loss = out.square().mean()
        loss.backward()
    assert len(graphs) == 1
    torch.testing.assert_close(fn(x, t, lq), net(x, t, lq))
    torch._dynamo.reset()


def test_cli_diverging_training_is_an_error_line_not_a_traceback(tmp_path, capsys):
    pack = packed_crops(tmp_path)
    rc = main(["train", "estimator", "--data", str(pack), "--config", "tiny", "--out", str(tmp_path / "run"),
               "--degradation", "bicubic", "--steps", "20", "--amp", "off", "--lr", "1e30", "--warmup", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: loss became" in err and "lower --lr" in err and "Traceback" not in err
    assert "--amp off" not in err  # it is off already


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_feed_resumed_at_a_step_draws_new_batches_not_the_first_run_s(tmp_path, workers):
    """A DataLoader feed has its own generator (shuffle, and the workers' RNG seeds), which the
    checkpoint does not hold: without resume_at a resumed run would replay the first run's crops.
    With it, the resumed stream differs from the first run's and is the same for the same step."""
    from PIL import Image

    from upsr_core.train.feed import FolderFeed

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")

    def first_batch(step=None):
        feed = FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=workers, seed=3)
        if step is not None:
            feed.resume_at(step)
        x = torch.cat([feed.next(2, None), feed.next(2, None)])  # 4 crops: a chance match is 1 in 6**4
        with pytest.raises(RuntimeError, match="before the first batch"):
            feed.resume_at(1)
        return x

    fresh = first_batch()
    assert torch.equal(fresh, first_batch())  # deterministic
    resumed = first_batch(step=500)
    assert not torch.equal(resumed, fresh)
    assert torch.equal(resumed, first_batch(step=500))


def test_folder_feed_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    """Each crop's position and flips come from a seed the sampler gives in the main process: the
    same batches with 0, 1 or 2 DataLoader workers (before, each worker seeded the global RNG its
    own way, so --workers changed the training data), and without workers the process's global
    RNG is not drawn from (the training's noise stream does not depend on the feed)."""
    from PIL import Image

    from upsr_core.train.feed import FolderFeed

    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray((rng.random((80, 72, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")

    def batches(workers):
        feed = FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=workers, seed=11)
        torch.manual_seed(123)
        state = torch.get_rng_state()
        x = torch.cat([feed.next(2, None) for _ in range(3)])
        assert torch.equal(torch.get_rng_state(), state)
        return x

    zero = batches(0)
    assert torch.equal(zero, batches(1)) and torch.equal(zero, batches(2))
    assert len({tuple(c.flatten()[:8].tolist()) for c in zero}) == 6  # 6 different crops


def test_seeded_dataset_keys_give_the_same_item_for_the_same_seed(tmp_path):
    from PIL import Image

    from upsr_core.train.data import ImageFolderDataset, PackedCropsDataset, SeededSampler

    Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    folder = ImageFolderDataset(tmp_path, 16)
    packed = PackedCropsDataset(packed_crops(tmp_path), 8)
    for ds in (folder, packed):
        assert torch.equal(ds[(0, 42)], ds[(0, 42)])
        assert not all(torch.equal(ds[(0, 42)], ds[(0, s)]) for s in range(1, 6))
        with pytest.raises(IndexError, match="index 99 out of range"):
            ds[(99, 1)]
        with pytest.raises(ValueError, match=r"expected an index or \(index, seed\)"):
            ds[(0, 1, 2)]
    a, b = SeededSampler(5, seed=1), SeededSampler(5, seed=1)
    first = list(a)
    assert first == list(b) and sorted(i for i, _ in first) == list(range(5))
    assert list(a) != first  # the next epoch continues the stream
    a.reseed(1)
    assert list(a) == first
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        SeededSampler(0)


def test_cli_resume_with_a_folder_feed(tmp_path, monkeypatch):
    """The CLI reseeds a DataLoader feed when it resumes (FolderFeed.resume_at at the checkpoint's step)."""
    from PIL import Image

    from upsr_core.train.feed import FolderFeed

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
    calls = []
    real = FolderFeed.resume_at
    monkeypatch.setattr(FolderFeed, "resume_at", lambda self, step: (calls.append(step), real(self, step))[1])
    common = ["--data", str(photos), "--config", "tiny", "--out", str(tmp_path / "run"), "--degradation", "bicubic",
              "--workers", "0", "--amp", "off"]
    assert main(["train", "estimator", *common, "--steps", "2"]) == 0 and calls == []
    assert main(["train", "estimator", *common, "--steps", "3"]) == 0 and calls == [2]


def test_cli_resume_with_the_cpu_degradation_stream_and_the_pool_is_exact(tmp_path):
    """--degrade-rng cpu: its generator is in the checkpoint, as the pair pool (4 pairs: full after
    the first run's 2 steps, so the resumed steps draw from the stored pool), so 2 steps + a
    resume to 4 give the weights of 4 straight steps."""
    from safetensors.torch import load_file

    common = ["--data", str(packed_crops(tmp_path)), "--config", "tiny", "--degrade-rng", "cpu", "--amp", "off",
              "--seed", "3", "--log-every", "1", "--pool", "4"]
    assert main(["train", "estimator", *common, "--out", str(tmp_path / "a"), "--steps", "4"]) == 0
    assert main(["train", "estimator", *common, "--out", str(tmp_path / "b"), "--steps", "2"]) == 0
    assert main(["train", "estimator", *common, "--out", str(tmp_path / "b"), "--steps", "4"]) == 0
    log = json.loads((tmp_path / "b" / "estimator_log.json").read_text())
    assert log["pool"] == 4 and log["resumed"]
    a, b = (load_file(str(tmp_path / d / "estimator.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reseeds_a_cpu_degradation_stream_the_checkpoint_lacks(tmp_path, monkeypatch):
    """A checkpoint without the generator's state (an older version; ranks > 0 take the same
    branch): the CPU stream is seeded from the step it resumes at, so it does not replay the
    first run's degradations."""
    import upsr_core.train.cli as train_cli
    from upsr_core.train.loop import Trainer

    real_state = Trainer.state_dict
    monkeypatch.setattr(Trainer, "state_dict", lambda self: {**real_state(self), "task": {}})  # as before
    seeds = []
    real = train_cli.EstimatorTask

    def spy(*args, **kw):
        task = real(*args, **kw)
        seeds.append(lambda: task.deg_generator.initial_seed())  # read once the CLI has (re)seeded it
        return task

    monkeypatch.setattr(train_cli, "EstimatorTask", spy)
    common = ["--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out", str(tmp_path / "run"),
              "--degrade-rng", "cpu", "--amp", "off", "--seed", "3"]
    assert main(["train", "estimator", *common, "--steps", "2"]) == 0
    assert main(["train", "estimator", *common, "--steps", "3"]) == 0
    assert [s() for s in seeds] == [3 + 17, 3 + 17 + 1_000_003 * 2]


def test_lpips_pyiqa_is_the_official_call(monkeypatch):
    """--lpips pyiqa builds 'lpips-vgg' (the official metric, not pyiqa's AlexNet 'lpips') and
    hands it the clamped prediction and the target in [-1, 1] as the official step does; a NaN
    value counts 0, an inf stays (for the loop's non-finite check)."""
    import sys
    import types

    from upsr_core.train.losses import LPIPSHook, denoiser_loss

    made, seen = [], []

    def create_metric(name, as_loss, device):
        made.append((name, as_loss))

        def metric(a, b):
            seen.append((a.clone(), b.clone()))
            return torch.tensor([float("nan"), 0.5])

        return metric

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    hook = LPIPSHook.from_name("pyiqa")
    assert made == [("lpips-vgg", True)]
    pred = torch.tensor([-3.0, -0.5, 0.25, 2.0]).reshape(1, 1, 2, 2).expand(2, 3, 2, 2)
    target = torch.zeros(2, 3, 2, 2)
    loss, logs = denoiser_loss(pred, target, hook, lpips_weight=0.5)
    a, b = seen[0]
    assert float(a.min()) == -1.0 and float(a.max()) == 1.0 and torch.equal(b, target)
    mse = float(F.mse_loss(pred, target))
    assert logs["lpips"] == pytest.approx(0.25) and float(loss) == pytest.approx(mse + 0.5 * 0.25)
    inf = LPIPSHook(lambda a, b: torch.tensor([float("inf"), 0.5]))
    assert not math.isfinite(float(denoiser_loss(pred, target, inf)[0]))


def test_pair_pool_mixes_batches_and_keeps_pairs_together():
    """While filling, batches pass through (and are kept); once full, a call returns b stored
    pairs (each HR still with its own LR) and stores the new batch in their place: what the full
    pool returned plus what it holds is every pair it was given."""
    pool = PairPool(6)
    g = torch.Generator().manual_seed(0)
    seen = []
    for i in range(6):
        hr = torch.arange(i * 2, i * 2 + 2, dtype=torch.float32).reshape(2, 1, 1, 1).expand(2, 3, 8, 8).clone()
        lr = hr[..., :2, :2] * 10  # the pair's LR: 10 × its HR value
        out_hr, out_lr = pool(hr, lr, g)
        assert torch.equal(out_lr, out_hr[..., :2, :2] * 10)
        if i < 3:
            assert torch.equal(out_hr, hr)  # filling
        seen += out_hr[:, 0, 0, 0].tolist()
    assert seen[:6] == [0, 1, 2, 3, 4, 5] and seen[6:] != [6, 7, 8, 9, 10, 11]
    held = pool.hr[:, 0, 0, 0].tolist()
    assert sorted(seen[6:] + held) == list(range(12))
    with pytest.raises(ValueError, match="pair pool size 6 must be a multiple of the batch 4"):
        pool(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 2, 2), g)


def test_pair_pool_state_round_trip():
    a, g = PairPool(4), torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 2, 2)) for _ in range(5)]
    for hr, lr in batches[:3]:
        a(hr, lr, g)
    b = PairPool(4)
    b.load_state_dict(a.state_dict(), torch.device("cpu"))
    g2 = torch.Generator().manual_seed(0)
    g2.set_state(g.get_state())
    for hr, lr in batches[3:]:
        x, y = a(hr, lr, g), b(hr, lr, g2)
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])



def test_a_pair_pool_resumed_with_another_batch_keeps_what_fits_and_fills_on(caplog):
    """A resume with another --batch (whose default pool size follows it) said "the run goes on with
    the new ones", then stopped at its first step: "holds 6 pairs, not a multiple of the batch 4" or
    "the checkpoint's pair pool holds 160 pairs, this run's 159" (2026-11-29 review)."""
    g = torch.Generator().manual_seed(1)

    def batch(start: int, b: int):
        hr = torch.arange(start, start + b, dtype=torch.float32).reshape(b, 1, 1, 1).expand(b, 3, 8, 8).clone()
        return hr, hr[..., :2, :2] * 10

    a = PairPool(6)
    for k in range(3):  # filled 6 of 6 with batches of 2 (pairs 0-5)
        a(*batch(2 * k, 2), g)
    b = PairPool(8)  # resumed with batch 4: the default size follows it
    with caplog.at_level(logging.INFO):
        b.load_state_dict(a.state_dict(), torch.device("cpu"))
    assert "pair pool: the checkpoint's held 6 of 6 pairs, this run's holds 8: 6 kept, filling on" in caplog.text
    out = b(*batch(100, 4), g)  # two of the new pairs fill the pool, the batch passes through
    assert b.filled == 8 and out[0][:, 0, 0, 0].tolist() == [100, 101, 102, 103]
    assert sorted(b.hr[:, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4, 5, 100, 101]
    out = b(*batch(200, 4), g)  # full: four stored pairs out, the new ones in, pairs kept together
    assert torch.equal(out[1], out[0][..., :2, :2] * 10)
    assert sorted(out[0][:, 0, 0, 0].tolist() + b.hr[:, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4, 5, 100, 101, 200, 201,
                                                                                202, 203]
    c = PairPool(3)  # resumed with batch 3 and --pool 3: the first 3 stored pairs kept
    c.load_state_dict(a.state_dict(), torch.device("cpu"))
    assert c.filled == 3 and c.hr[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_pool_defaults_and_cli_check(tmp_path, capsys):
    assert default_pool_size(32, "realesrgan") == 160 and default_pool_size(6, "realesrgan") == 156
    assert default_pool_size(2, "bicubic") == 0 and default_pool_size(200, "realesrgan") == 0
    rc = main(["train", "estimator", "--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out",
               str(tmp_path / "o"), "--device", "cpu", "--steps", "1", "--pool", "3"])
    assert rc != 0 and "--pool 3 must be a multiple of the micro-batch 2" in capsys.readouterr().err


def test_cli_degradation_recipe_reaches_the_task(tmp_path, monkeypatch):
    """--kernels / --jpeg build the task's degradation config and are recorded in the log."""
    import upsr_core.train.cli as train_cli
    from upsr_core.train.degradations import RealESRGANDegradation

    seen = []
    real = train_cli.EstimatorTask
    monkeypatch.setattr(train_cli, "EstimatorTask", lambda *a, **kw: (seen.append(a), real(*a, **kw))[1])
    out = tmp_path / "run"
    assert main(["train", "estimator", "--data", str(packed_crops(tmp_path)), "--config", "tiny", "--out", str(out),
                 "--steps", "1", "--amp", "off", "--kernels", "realesrgan", "--jpeg", "diffjpeg", "--pool", "0"]) == 0
    assert seen[0][-1] == RealESRGANDegradation.recipe("realesrgan", "diffjpeg")
    log = json.loads((out / "estimator_log.json").read_text())
    assert log["kernels"] == "realesrgan" and log["jpeg"] == "diffjpeg" and log["pool"] == 0



def test_pair_pool_checkpoint_is_compact_and_exact():
    """Pairs on 8-bit levels are stored as uint8 (4× smaller) and come back bit-identical; others
    keep their float values. A filling pool resumed with another batch fills on (the new batch's
    first pairs complete it)."""
    pool, g = PairPool(4), torch.Generator().manual_seed(0)
    hr = torch.randint(0, 256, (2, 3, 8, 8), generator=g).float() / 255
    lr = torch.rand(2, 3, 2, 2, generator=g)  # not on 8-bit levels
    pool(hr, lr, g)
    sd = pool.state_dict()
    assert sd["hr"].dtype == torch.uint8 and sd["lr"].dtype == torch.float32
    back = PairPool(4)
    back.load_state_dict(sd, torch.device("cpu"))
    assert torch.equal(back.hr[:2], hr) and torch.equal(back.lr[:2], lr) and back.filled == 2
    back(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 2, 2), g)
    assert back.filled == 4 and torch.equal(back.hr[:2], hr) and not back.hr[2:].any()


def test_task_snapshot_undoes_a_step_s_pool_and_degradation_draws():
    """The compile fallback redoes a step: restore() puts back the pool (filling or full) and the
    separate degradation generator, so the redone step stores and draws the same."""
    feed = FixedFeed(_hr(s=32))
    task = EstimatorTask(build_estimator_net(TINY.estimator), feed, 2, "realesrgan",
                         torch.Generator().manual_seed(1), PairPool(4))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # filling, then full
        snap, gs = task.snapshot(), g.get_state()
        first = task.degraded_pair(g)
        task.restore(snap)
        g.set_state(gs)
        again = task.degraded_pair(g)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert task.pool.filled == 4


@torch.no_grad()
def test_fresh_nets_start_as_the_official_ones():
    """ATD: Linear weights N(0, 0.02) truncated with zero bias, LayerNorm 1/0, bias tables
    N(0, 0.02), token scale 0.5; denoiser: ResBlocks' last conv zero, Swin bias tables N(0, 0.02)."""
    torch.manual_seed(0)
    est = build_estimator_net(get_preset("small").estimator)
    lin = [m for m in est.modules() if isinstance(m, torch.nn.Linear)]
    w = torch.cat([m.weight.flatten() for m in lin])
    assert abs(float(w.std()) - 0.02) < 0.001 and float(w.abs().max()) <= 2.0  # trunc_normal_'s bounds are ±2
    assert all(m.bias is None or not m.bias.any() for m in lin)
    norms = [m for m in est.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(bool((m.weight == 1).all()) and not m.bias.any() for m in norms)
    for net in (est, build_denoiser_net(get_preset("small").denoiser)):
        tables = [p for n, p in net.named_parameters() if n.endswith("relative_position_bias_table")]
        t = torch.cat([p.flatten() for p in tables])
        assert tables and abs(float(t.std()) - 0.02) < 0.002
    scales = [p for n, p in est.named_parameters() if n.endswith(".scale")]
    assert scales and all(bool((p == 0.5).all()) for p in scales)
    den = build_denoiser_net(get_preset("small").denoiser)
    zero = [m for n, m in den.named_modules() if n.endswith("out_layers.3")]
    assert zero and all(not m.weight.any() and not m.bias.any() for m in zero)


def test_folder_feed_scales_its_epoch_and_cache_to_the_folder(tmp_path, monkeypatch):
    """A few photos: listed many times per epoch and kept decoded; a folder above the limits
    (ImageNet: 1.28 M images) is listed once (a 1000× shuffle list took tens of GB) and decoded
    per crop (a cache would grow with every image)."""
    from PIL import Image

    from upsr_core.train.feed import FolderFeed

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    small = FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=0)
    assert small.dataset.repeat == 100_000 // 3 and small.dataset._cache is not None
    monkeypatch.setattr(FolderFeed, "EPOCH_SAMPLES", 2)
    monkeypatch.setattr(FolderFeed, "CACHE_MAX_BYTES", 3 * 40 * 40 * 3 * 2 - 1)  # 2 workers' copies: just over
    assert FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=1).dataset._cache is not None
    big = FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=2)
    assert big.dataset.repeat == 1 and big.dataset._cache is None
    assert big.next(2, torch.Generator()).shape == (2, 3, 32, 32)


def test_ema_warmup_flag(tmp_path):
    """auto: on for fresh nets, off with --init; on/off force it (the official training: off)."""
    from upsr_core.cli import build_parser
    from upsr_core.train.cli import _loop_config
    from upsr_core.train.loop import DistInfo

    def warm(*flags):
        args = build_parser().parse_args(["train", "estimator", "--data", str(tmp_path), "--config", "tiny", *flags])
        return _loop_config(args, get_preset("tiny"), DistInfo(), tmp_path).ema_warmup

    assert warm() is True and warm("--init", "x.safetensors") is False
    assert warm("--ema-warmup", "off") is False and warm("--init", "x.safetensors", "--ema-warmup", "on") is True


def test_fused_attention_switches_only_the_trained_nets_and_keeps_their_gradients():
    """set_fused turns SDPA on in the given nets' attention modules only (a net built elsewhere in
    the process, and the class defaults the reference path relies on, stay off), and on the CPU
    (auto: on there since 2026-11-27) the fused gradients equal the math path's to float32
    rounding: 2e-5 of the largest gradient, SDPA's kernel sums the softmax in another order."""
    from upsr_core.nets.atd import ATD
    from upsr_core.nets.attention import WindowAttention
    from upsr_core.train.cli import set_fused

    p = get_preset("tiny")
    torch.manual_seed(0)
    est, den, other = build_estimator_net(p.estimator), build_denoiser_net(p.denoiser), build_estimator_net(p.estimator)
    assert not set_fused("auto", torch.device("mps"), est, den)
    assert set_fused("auto", torch.device("cpu")) and not ATD.fused and not WindowAttention.fused
    x, xt, lq = torch.rand(2, 3, 32, 32), torch.randn(2, 48, 16, 16), torch.randn(2, 96, 16, 16)
    t = torch.tensor([0, 3])

    def grads(mode):
        assert set_fused(mode, torch.device("cpu"), est, den) == (mode != "off")
        est.zero_grad()
        den.zero_grad()
        (est(x).square().mean() + den(xt, t, lq).square().mean()).backward()
        return [q.grad.clone() for q in (*est.parameters(), *den.parameters()) if q.grad is not None]

    slow, fast = grads("off"), grads("auto")
    assert len(slow) == len(fast) > 0
    scale = max(float(a.abs().max()) for a in slow)  # some tensors' gradients are ~1e-10: judged on the whole
    for a, b in zip(slow, fast):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5 * scale)
    assert all(m.fused for m in (*est.modules(), *den.modules()) if isinstance(m, (ATD, WindowAttention)))
    assert not ATD.fused and not WindowAttention.fused and not other.fused


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM to the own process")
@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"),
                                   RuntimeError("DataLoader worker (pid 7) exited unexpectedly")],
                         ids=["reset", "worker-exited"])
def test_a_stop_whose_signal_also_ended_the_loader_workers_still_saves(tmp_path, error):
    """A signal to the process group reaches the DataLoader workers as well; when the step under way
    then fails to get its batch, the run saves what it has and leaves as the signal asks (it was an
    'error: Connection reset by peer' with exit code 2 and no checkpoint: a flaky CI run, 2026-11-27)."""
    tr = _trainer(packed_crops(tmp_path), tmp_path / "a.ckpt")
    tr.cfg.steps = 10
    real = tr.train_step

    def step(*a):
        if tr.step == 2:  # SIGTERM arrives, and the loader is gone
            os.kill(os.getpid(), signal.SIGTERM)
            raise error
        return real(*a)

    tr.train_step = step
    with pytest.raises(SystemExit) as exit_:
        tr.fit()
    assert exit_.value.code == 143
    assert torch.load(tmp_path / "a.ckpt", weights_only=False)["step"] == 2
    tr.train_step = lambda *a: (_ for _ in ()).throw(error)  # without a stop request it is an error
    with pytest.raises(type(error)):
        tr.fit()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups and SIGTERM")
@pytest.mark.parametrize("sig, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_process_group_saves_the_checkpoint(tmp_path, sig, rc):
    """Ctrl-C in a terminal, timeout(1) and job schedulers signal the whole process group, the
    DataLoader workers included. Before 2026-11-27 nothing since the last periodic checkpoint
    was saved (a short run left an empty folder), and SIGTERM ended in torch's "DataLoader worker
    is killed by signal" traceback with exit code 1. Now the step under way finishes, the
    checkpoint is written, and the exit code is the signal's."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "upsr_core", "train", "estimator", "--data", str(photos),
                             "--config", "tiny", "--out", str(out), "--steps", "1000000", "--workers", "1",
                             "--degradation", "bicubic", "--amp", "off", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("estimator stage:" in ln for ln in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "".join(lines)
    time.sleep(3)  # some steps, with the worker feeding them
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == rc, err
    assert "Traceback" not in err, err
    m = re.search(r"stopped at step (\d+) by (SIG\w+): checkpoint (\S+) saved", err)
    assert m and m.group(2) == sig.name, err
    ckpt = torch.load(out / "estimator.ckpt", weights_only=True)
    assert ckpt["step"] == int(m.group(1)) >= 1


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_process_with_live_loader_workers_still_exits(tmp_path):
    """The main process's exit ends the DataLoader workers with SIGTERM (multiprocessing's atexit);
    workers that ignored SIGTERM made it wait for ever (CI hung after its last test, 2026-11-27)."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(photos / "a.png")
    code = ("import torch\nfrom upsr_core.train.feed import FolderFeed\n"
            f"f = FolderFeed({str(photos)!r}, 32, torch.device('cpu'), 2, workers=1)\n"
            "print(tuple(f.next(2, torch.Generator()).shape))\n")  # exits with the workers alive
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "(2, 3, 32, 32)" in done.stdout, done.stderr


def test_an_image_cut_short_is_skipped_with_a_warning_not_the_end_of_the_run(tmp_path, caplog):
    """The start reads headers only: a truncated file was found hours in and stopped the run (and
    every resume). Its crops are drawn from other images instead, the same way on every run."""
    from PIL import Image

    from upsr_core.train.data import ImageFolderDataset

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(tmp_path, 32)
    with caplog.at_level("WARNING"):
        a, b = ds[(1, 7)], ds[(1, 7)]
        ds[(2, 8)]
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert caplog.text.count("1.png") == 1 and "training goes on without it" in caplog.text
    for i in (0, 2):
        (tmp_path / f"{i}.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot decode the image .*and 20 other images drawn after it"):
        ImageFolderDataset(tmp_path, 32)[(0, 1)]


def test_the_device_feed_refuses_a_folder_that_does_not_fit_before_decoding_it(tmp_path, monkeypatch):
    from PIL import Image

    import upsr_core.train.feed as feed

    for i in range(2):
        Image.new("RGB", (100, 80), (i, 2, 3)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(feed, "_free_bytes", lambda device: 100 * 80 * 2 * (3 + 16))  # exactly: over 90 %
    monkeypatch.setattr(feed, "load_image_array", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ValueError, match=r"--feed device: the 2 images .* need about 0\.0 GiB on cpu with the texture "
                                         r"tables of --min-texture, and 0\.0 GiB is free: use --feed loader"):
        feed.PhotoFeed(tmp_path, 64, torch.device("cpu"), min_texture=3)


def test_the_device_feed_texture_tables_are_the_summed_areas_of_each_image(tmp_path):
    """Written image by image into one buffer: each image's box sums equal a direct sum."""
    from PIL import Image

    from upsr_core.train.data import LUMA
    from upsr_core.train.feed import PhotoFeed

    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate(((70, 50), (48, 90))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    f = PhotoFeed(tmp_path, 32, torch.device("cpu"), min_texture=1)
    for i, img in enumerate(f.images):
        y = (img.double() * torch.tensor(LUMA, dtype=torch.float64)[:, None, None]).sum(0)
        for y0, x0 in ((0, 0), (5, 9), (img.shape[1] - 32, img.shape[2] - 32)):
            c = y[y0:y0 + 32, x0:x0 + 32]
            want = ((c[1:] - c[:-1]).abs().sum() + (c[:, 1:] - c[:, :-1]).abs().sum()) / (2 * 32 * 31)
            got = f.texture(torch.tensor([i]), torch.tensor([y0]), torch.tensor([x0]))
            assert torch.allclose(got, want.reshape(1), rtol=1e-5), (i, y0, x0)


def test_pack_crops_tells_files_of_one_name_in_two_folders_apart(tmp_path):
    from PIL import Image

    from upsr_core.train.data import pack_crops

    rng = np.random.default_rng(2)
    for d in ("day1", "day2"):
        (tmp_path / "in" / d).mkdir(parents=True)
        Image.fromarray((rng.random((90, 90, 3)) * 255).astype(np.uint8)).save(tmp_path / "in" / d / "IMG_1.png")
    info = pack_crops(tmp_path / "in", tmp_path / "p.npy", crop=32, per_image=3, seed=0)
    files = [it["file"] for it in info["items"]]
    assert files == ["day1/IMG_1.png"] * 3 + ["day2/IMG_1.png"] * 3
    pos = [(it["y"], it["x"]) for it in info["items"]]
    assert pos[:3] != pos[3:]
    with pytest.raises(ValueError, match=r"files \['IMG_1\.png'\] are given more than once by name"):
        pack_crops(None, tmp_path / "q.npy", crop=32, per_image=3, seed=0,
                   files=[tmp_path / "in" / d / "IMG_1.png" for d in ("day1", "day2")])


# ------------------------------------------------------------------ 2026-11-29 (session 34)
def test_a_training_start_reads_each_image_header_once(tmp_path, monkeypatch, caplog):
    """Both feeds read every header twice at the start (the small-image check, then the memory
    count): minutes on an ImageNet-size folder. One scan now serves both, and the dataset."""
    from PIL import Image

    import upsr_core.train.data as data
    from upsr_core.train.feed import FolderFeed, PhotoFeed

    for i in range(3):
        Image.new("RGB", (40 + i, 36), (i, 2, 3)).save(tmp_path / f"{i}.png")
    (tmp_path / "z.jpg").write_text("<html>not found</html>")
    opened = []
    real = data.open_image
    monkeypatch.setattr(data, "open_image", lambda p: opened.append(os.path.basename(p)) or real(p))
    with caplog.at_level(logging.WARNING):
        f = FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=0)
    assert sorted(opened) == ["0.png", "1.png", "2.png", "z.jpg"]  # headers only: nothing decoded yet
    assert [p.name for p in f.dataset.files] == ["0.png", "1.png", "2.png"]
    assert caplog.text.count("z.jpg") == 1 and "goes on without it" in caplog.text
    opened.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        p = PhotoFeed(tmp_path, 32, torch.device("cpu"))
    # one header each, then one decode of each readable image
    assert sorted(opened) == ["0.png", "0.png", "1.png", "1.png", "2.png", "2.png", "z.jpg"]
    assert len(p) == 3 and caplog.text.count("z.jpg") == 1


def test_a_folder_feed_with_no_images_says_so_before_anything_else(tmp_path, caplog):
    """It logged "folder feed: images kept decoded (0.0 GiB …)" and only then "no images"."""
    from upsr_core.train.feed import FolderFeed

    (tmp_path / "z.jpg").write_text("<html>not found</html>")
    with caplog.at_level(logging.INFO), pytest.raises(
            ValueError, match=r"no readable images in .*1 unreadable file\(s\), named in the warnings above"):
        FolderFeed(tmp_path, 32, torch.device("cpu"), 2, workers=0)
    assert "folder feed" not in caplog.text and "z.jpg: not a readable image" in caplog.text


def test_the_dataset_takes_a_header_scan_only_made_with_its_prescale(tmp_path):
    from PIL import Image

    from upsr_core.train.data import ImageFolderDataset, scan_headers

    Image.new("RGB", (100, 60)).save(tmp_path / "a.png")
    headers = scan_headers([tmp_path / "a.png"], prescale=2)
    assert [(h.width, h.height, h.factor) for h in headers] == [(50, 30, 2)]
    assert ImageFolderDataset(None, 24, headers=headers, prescale=2).files == [tmp_path / "a.png"]
    with pytest.raises(ValueError, match=r"headers were scanned with prescale 2, the dataset's is 1"):
        ImageFolderDataset(None, 24, headers=headers)
    with pytest.raises(ValueError, match="give files or headers, not both"):
        ImageFolderDataset(None, 24, headers=headers, files=[tmp_path / "a.png"], prescale=2)
    # 'skip' keeps only what is large enough after the prescale, from the same scan
    with pytest.raises(ValueError, match=r"no images of at least 32 px on the short side among the files given"):
        ImageFolderDataset(None, 32, headers=headers, prescale=2, small="skip")
