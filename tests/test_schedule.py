"""The ResShift schedule (SPEC §4) against the official values.

Two sources: the SPEC table (float64 printed to 10 decimals) and the oracle json (the
official NumPy float64 arrays at full precision, and the float32 coefficients the
official sampler multiplies with, which must match bit for bit).
"""
from __future__ import annotations

import pytest
import torch

from upsr_core.schedule import VAR_UN, make_schedule

# SPEC §4 table, t = 0..4 (float64 rounded to 10 decimals).
SPEC_TABLE = {
    "sqrt_etas": [0.0316227766, 0.4300109561, 0.6339077497, 0.8166021305, 0.9900000000],
    "etas": [0.0010000000, 0.1849094224, 0.4018390351, 0.6668390396, 0.9801000000],
    "etas_prev": [0, 0.0010000000, 0.1849094224, 0.4018390351, 0.6668390396],
    "alpha": [0.0010000000, 0.1839094224, 0.2169296127, 0.2650000045, 0.3132609604],
    "std": [0.5018714975, 0.7724669358, 1.0017226117, 1.2248768098, 1.4448832133],
    "m": [0, 0.0735394672, 0.6783494228, 0.7762749152, 0.8248506369],
    "k": [1, 0.9390586732, 0.4093284323, 0.3395364686, 0.3167464327],
    "c": [0, -0.0125981404, -0.0876778551, -0.1158113839, -0.1415970696],
    "kappa_sqrt_eta": [0.0790569415, 1.0750273902, 1.5847693741, 2.0415053263, 2.4750000000],
    "posterior_variance": [0, 0.0062161997, 0.6238867724, 0.9980608118, 1.3321002830],
    "posterior_mean_coef1": [0, 0.0054080532, 0.4601579394, 0.6026027440, 0.6803785732],
    "posterior_mean_coef2": [1, 0.9945919468, 0.5398420606, 0.3973972560, 0.3196214268],
}
TABLE_ATOL = 5.1e-11  # half a unit of the table's 10th decimal (plus float64 noise)

F64_FIELDS = ["sqrt_etas", "etas", "etas_prev", "alpha", "posterior_variance",
              "posterior_mean_coef1", "posterior_mean_coef2"]


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def derived_f64(s) -> dict[str, torch.Tensor]:
    """std, m, k, c and κ√η written out in float64 from the SPEC §4 formulas."""
    eta, eta_prev = s.etas, s.etas_prev
    m = torch.sqrt(eta_prev / eta)
    return {
        "std": torch.sqrt(eta * s.kappa**2 * VAR_UN + 0.25),
        "m": m,
        "k": 1 - eta_prev - (1 - eta) * m,
        "c": eta_prev - torch.sqrt(eta * eta_prev),
        "kappa_sqrt_eta": s.kappa * s.sqrt_etas,
    }


def test_schedule_is_float64_and_official_shape():
    s = make_schedule()
    assert s.num_steps == 5 and s.kappa == 2.5
    for name in F64_FIELDS:
        assert getattr(s, name).dtype == torch.float64 and getattr(s, name).shape == (5,)


@pytest.mark.parametrize("name", F64_FIELDS)
def test_float64_schedule_vs_spec_table(name):
    torch.testing.assert_close(getattr(make_schedule(), name), f64(SPEC_TABLE[name]), rtol=0, atol=TABLE_ATOL)


@pytest.mark.parametrize("name", ["std", "m", "k", "c", "kappa_sqrt_eta"])
def test_derived_coefficients_vs_spec_table(name):
    torch.testing.assert_close(derived_f64(make_schedule())[name], f64(SPEC_TABLE[name]), rtol=0, atol=TABLE_ATOL)


@pytest.mark.parametrize("name", F64_FIELDS)
def test_float64_schedule_vs_official_numpy(oracle, name):
    # NumPy's and PyTorch's float64 pow round differently by a few ulp (seen: 1.6e-15 on
    # posterior_variance ≈ 1.33, ~5 ulp); 4e-15 relative is ~18 ulp, far below float32 resolution.
    ref = f64(oracle.meta["schedule"][name])
    torch.testing.assert_close(getattr(make_schedule(), name), ref, rtol=4e-15, atol=0)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("std", "float32_scale_input_std"),
        ("m", "float32_ddim_m_t (coef of x_t)"),
        ("k", "float32_ddim_k_t (coef of x0_pred)"),
        ("c", "float32_ddim_c_t (coef of y_bicubic)"),
    ],
)
def test_float32_coefficients_bit_exact(oracle, ours, theirs):
    co = make_schedule().f32()
    assert co[ours].dtype == torch.float32
    assert torch.equal(co[ours], torch.tensor(oracle.meta["schedule"][theirs], dtype=torch.float32))


def test_float32_prior_coefficient_bit_exact(oracle):
    co = make_schedule().f32()
    assert co["prior"].dtype == torch.float32
    assert co["prior"].item() == oracle.meta["schedule"]["float32_prior_coef sqrt_etas[T-1]*kappa"]


def test_last_step_is_exactly_x0():
    """t = 0: m = c = 0 and k = 1 exactly in float32, so the final sample is the last x̂0 (SPEC §8.7)."""
    co = make_schedule().f32()
    assert (co["m"][0].item(), co["k"][0].item(), co["c"][0].item()) == (0.0, 1.0, 0.0)


def test_start_is_sqrt_0001_whatever_min_noise_level():
    """SPEC §8.6: √0.001 wins the min() for the official constants."""
    a = make_schedule(min_noise_level=0.2, kappa=2.5)
    b = make_schedule(min_noise_level=0.9, kappa=1.0)
    assert torch.equal(a.sqrt_etas, b.sqrt_etas)
    assert a.sqrt_etas[0].item() == 0.001**0.5
    assert a.sqrt_etas[-1].item() == pytest.approx(0.99, rel=1e-15)  # etas_end is the final √η


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 1}, "num_steps"),
        ({"kappa": 0.0}, "kappa"),
        ({"etas_end": 1.0}, "etas_end"),
        ({"etas_end": 0.0}, "etas_end"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


# The float32 coefficients the sampler multiplies with, as the official code rounds them
# (oracle_small.json "float32_*", whose repr of each float32 value is exact): bit for bit, so a
# change in how they are rounded (sqrt(a/b) vs sqrt(a)/sqrt(b): 1 ulp) fails in CI too, where
# the oracle is absent and test_float32_coefficients_bit_exact skips.
F32_TABLE = {
    "std": [0.5018715262413025, 0.7724669575691223, 1.0017226934432983, 1.224876880645752, 1.4448832273483276],
    "m": [0.0, 0.07353947311639786, 0.6783493757247925, 0.7762748599052429, 0.8248506784439087],
    "k": [1.0, 0.9390586614608765, 0.4093284606933594, 0.33953651785850525, 0.31674638390541077],
    "c": [0.0, -0.01259814016520977, -0.08767788112163544, -0.11581137776374817, -0.14159703254699707],
    "prior": [2.4749999046325684],  # κ·√η_T = 2.5 · 0.99 in float32
}


@pytest.mark.parametrize("name", sorted(F32_TABLE))
def test_float32_coefficients_equal_the_official_bits(name):
    co = make_schedule().f32()
    want = torch.tensor(F32_TABLE[name], dtype=torch.float32)
    assert co[name].dtype == torch.float32 and torch.equal(co[name].reshape(-1), want)
