"""Sampler invariants with toy denoisers (SPEC §4): no network needed."""
from __future__ import annotations

import pytest
import torch

from upsr_core.pipeline import Estimate, denoise_estimate, starting_noise
from upsr_core.sampler import prior_sample, sample
from upsr_core.schedule import make_schedule

SHAPE = (2, 48, 4, 6)  # (B, 48, h, w): the unshuffled layout of a (2, 3, 16, 24) HR image


@pytest.fixture
def tensors():
    x0 = torch.rand(SHAPE) * 2 - 1
    y = (x0 + 0.3 * torch.randn(SHAPE)).clamp(-1.2, 1.2)
    w = 0.4 + 0.6 * torch.rand(SHAPE)
    eps = torch.randn(SHAPE)
    return x0, y, w, eps


def test_oracle_denoiser_returns_x0_exactly(tensors):
    """A denoiser that knows x0 gives x0 back bit for bit: at t = 0, k = 1 and m = c = 0 exactly."""
    x0, y, w, eps = tensors
    s = make_schedule()
    out = sample(lambda x_in, t: x0, y, prior_sample(y, w, eps, s), s)
    assert torch.equal(out, x0)


def test_ddim_with_oracle_denoiser_follows_the_forward_marginals(tensors):
    """DDIM (η = 0) with the true x0 maps x_t = x0 + η_t(y − x0) + κ√η_t ε to the same
    expression at t − 1 with the same ε (ResShift eq. 2 marginals)."""
    x0, y, _, eps = tensors
    s = make_schedule()

    def marginal(t: int) -> torch.Tensor:
        return (x0 + s.etas[t] * (y - x0) + s.kappa * s.sqrt_etas[t] * eps).float()

    states: list[torch.Tensor] = []
    sample(lambda x_in, t: x0, y, marginal(4), s, callback=lambda i, x, x0_hat: states.append(x))
    for i, x in enumerate(states[:-1]):
        # float32 coefficients and states (|x| < 12): ~1e-6 rounding per step, 5 steps
        torch.testing.assert_close(x, marginal(3 - i), rtol=0, atol=2e-5)
    assert torch.equal(states[-1], x0)


def test_final_sample_is_last_x0_and_callback_runs_once_per_step(tensors):
    _, y, w, eps = tensors
    s = make_schedule()
    std = s.f32()["std"]
    seen_t, seen_in, x0s, cb = [], [], [], []

    def toy(x_in: torch.Tensor, t: int) -> torch.Tensor:
        seen_t.append(t)
        seen_in.append(x_in)
        x0s.append(torch.tanh(x_in) * (0.5 + 0.1 * t))
        return x0s[-1]

    x_T = prior_sample(y, w, eps, s)
    out = sample(toy, y, x_T, s, callback=lambda i, x, x0_hat: cb.append((i, x, x0_hat)))
    assert seen_t == [4, 3, 2, 1, 0]
    assert [i for i, _, _ in cb] == list(range(s.num_steps))
    assert torch.equal(out, x0s[-1])
    assert torch.equal(cb[-1][1], out)
    assert all(torch.equal(x0_hat, x0s[i]) for i, _, x0_hat in cb)
    # the network input is the current state divided by std_t (ResShift eq. 7, SPEC §8.5)
    states = [x_T] + [x for _, x, _ in cb[:-1]]
    for t, x_in, x_t in zip(seen_t, seen_in, states):
        assert torch.equal(x_in, x_t / std[t])


def test_prior_sample_scales_noise_by_kappa_sqrt_eta_T_and_weight(tensors):
    # x_T = y + κ·√η_T·w·ε with the official float32 κ·√η_T = float32(2.475) (oracle_small.json
    # "float32_prior_coef"), in that order of operations: bit for bit, with a non-uniform w
    _, y, w, eps = tensors
    s = make_schedule()
    coef = torch.tensor(2.475, dtype=torch.float32)
    assert torch.equal(prior_sample(y, w, eps, s), y + coef * w * eps)
    assert torch.equal(prior_sample(torch.zeros(SHAPE), torch.ones(SHAPE), eps, s), eps * coef)
    assert torch.equal(prior_sample(y, torch.zeros(SHAPE), eps, s), y)


def test_denoise_estimate_callback_and_output(tensors):
    """Through the pipeline stage: T callbacks, and the [0,1] output is the last x̂0 cropped/clamped."""
    b, hp, wp = 1, 4, 4
    bic = torch.rand(b, 3, 4 * hp, 4 * wp) * 2 - 1
    est = Estimate(torch.zeros(b, 3, hp, wp), bic, bic * 0.9, (3, 2))
    last = []

    def toy(x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        assert lq.shape == (b, 96, hp, wp) and t.shape == (b,)
        last[:] = [torch.nn.functional.pixel_shuffle(x, 4) * 1.5]
        return last[0]

    calls = []
    sr = denoise_estimate(toy, est, torch.ones(b, 1, 4 * hp, 4 * wp), torch.randn(b, 48, hp, wp),
                          callback=lambda i, x, x0: calls.append(i))
    assert calls == [0, 1, 2, 3, 4]
    assert sr.shape == (b, 3, 12, 8)
    assert torch.equal(sr, last[0][..., :12, :8].clamp(-1, 1) * 0.5 + 0.5)


def test_denoise_estimate_rejects_mismatched_noise():
    est = Estimate(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), (4, 4))
    with pytest.raises(ValueError, match="noise"):
        denoise_estimate(lambda x, t, lq: x, est, torch.ones(1, 3, 16, 16), torch.zeros(1, 48, 4, 5))
    with pytest.raises(ValueError, match="noise weight"):
        denoise_estimate(lambda x, t, lq: x, est, torch.ones(1, 3, 16, 12), torch.zeros(1, 48, 4, 4))


def test_starting_noise_seed_contract():
    """Image i of a batch draws from seed + i: the noise does not depend on the batch size."""
    batch = starting_noise(7, 3, (4, 6))
    assert batch.shape == (3, 48, 4, 6) and batch.dtype == torch.float32
    for i in range(3):
        assert torch.equal(batch[i : i + 1], starting_noise(7 + i, 1, (4, 6)))
    expected = torch.randn((1, 48, 4, 6), generator=torch.Generator("cpu").manual_seed(9))
    assert torch.equal(batch[2:3], expected)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), (2**63, ValueError)])
def test_starting_noise_rejects_bad_seeds(seed, error):
    with pytest.raises(error, match="seed"):
        starting_noise(seed, 1, (4, 4))
