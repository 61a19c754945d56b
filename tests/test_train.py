"""Training code on CPU with tiny nets: forward process, losses, EMA, loop, resume, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from upsr_core.cli import main
from upsr_core.config import denoiser_config_from_state_dict
from upsr_core.model import load_upsr
from upsr_core.sampler import prior_sample
from upsr_core.schedule import make_schedule
from upsr_core.train.denoiser import DenoiserTask, build_denoiser_net
from upsr_core.train.ema import EMA
from upsr_core.train.estimator import EstimatorTask, build_estimator_net
from upsr_core.train.feed import PackedFeed
from upsr_core.train.loop import LoopConfig, Trainer
from upsr_core.train.losses import make_inputs, q_sample
from upsr_core.train.presets import get_preset

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


def _pack(tmp_path, n=4, s=48):
    a = (np.random.default_rng(0).random((n, 3, s, s)) * 255).astype(np.uint8)
    p = tmp_path / "pack.npy"
    np.save(p, a)
    return p


def _trainer(pack, ckpt):
    torch.manual_seed(0)
    est = build_estimator_net(TINY.estimator)
    feed = PackedFeed(pack, 32, torch.device("cpu"))
    task = DenoiserTask(build_denoiser_net(TINY.denoiser), est, feed, 2, "bicubic")
    cfg = LoopConfig(steps=4, batch=2, lr=1e-3, amp="off", progress=False, checkpoint=str(ckpt), ckpt_every=100)
    return Trainer(task, cfg)


def test_resume_gives_the_same_weights(tmp_path):
    pack = _pack(tmp_path)
    a = _trainer(pack, tmp_path / "a.ckpt")
    a.fit()
    b = _trainer(pack, tmp_path / "b.ckpt")
    b.cfg.steps = 2
    b.fit()
    c = _trainer(pack, tmp_path / "b.ckpt")
    c.load(tmp_path / "b.ckpt")
    assert c.step == 2
    c.fit()
    assert c.step == 4
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(c.model.state_dict()[k], v, rtol=0, atol=0)
    for k, v in a.ema.shadow.items():
        torch.testing.assert_close(c.ema.shadow[k], v, rtol=0, atol=0)


def test_packed_feed_crops_and_augments(tmp_path):
    feed = PackedFeed(_pack(tmp_path), 32, torch.device("cpu"))
    x = feed.next(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    with pytest.raises(ValueError, match="larger than the packed"):
        PackedFeed(_pack(tmp_path), 64, torch.device("cpu"))


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
    pack = _pack(tmp_path)
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
