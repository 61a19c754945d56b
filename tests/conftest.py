"""Shared fixtures: the official oracle (SPEC §9), the small nets built from it, seeding.

The oracle lives in ``shared/`` beside the clone (``$UPSR_SHARED`` overrides): it holds
the reduced official nets' weights (float16-exact) and every intermediate tensor of four
official runs. Tests that need it are skipped, with the path in the reason, when absent.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from upsr_core.config import ATDConfig, DenoiserConfig
from upsr_core.model import UPSRModel
from upsr_core.nets import ATD, UPSRDenoiser

from _support import *  # noqa: F401,F403
from _support import ORACLE_DIR, SHARED, Oracle, atd_config_from_official, denoiser_config_from_official  # noqa: F401


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state (thread count is left as configured)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    st, js = ORACLE_DIR / "oracle_small.safetensors", ORACLE_DIR / "oracle_small.json"
    if not (st.is_file() and js.is_file()):
        pytest.skip(f"official oracle not found in {ORACLE_DIR} (set UPSR_SHARED to the shared/ folder)")
    return Oracle(load_file(str(st)), json.loads(js.read_text()))


@pytest.fixture(scope="session")
def full_manifest() -> dict:
    p = ORACLE_DIR / "full_manifest.json"
    if not p.is_file():
        pytest.skip(f"full_manifest.json not found in {ORACLE_DIR} (set UPSR_SHARED to the shared/ folder)")
    return json.loads(p.read_text())


@pytest.fixture(scope="session")
def small_configs(oracle: Oracle) -> tuple[DenoiserConfig, ATDConfig]:
    cfg = oracle.meta["configs"]
    return denoiser_config_from_official(cfg["denoiser_UNetModelSwin"]), atd_config_from_official(cfg["atd_ATD"])


@pytest.fixture(scope="session")
def small_nets(oracle: Oracle, small_configs) -> tuple[UPSRDenoiser, ATD]:
    """The oracle's reduced denoiser and ATD (category_size 48), float32, eval mode.

    Shared by the whole session: tests must not move them or change their dtype.
    ``load_state_dict`` up-casts the float16-stored parameters (exact).
    """
    dcfg, acfg = small_configs
    den = UPSRDenoiser(dcfg)
    den.load_state_dict(oracle.net_state_dict("denoiser."), strict=True)
    atd = ATD(acfg)
    atd.load_state_dict(oracle.net_state_dict("atd."), strict=True)
    return den.eval().requires_grad_(False), atd.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def small_model(small_nets) -> UPSRModel:
    den, atd = small_nets
    return UPSRModel(den, atd)


@pytest.fixture(scope="session")
def small_model_file(small_nets, tmp_path_factory) -> Path:
    """A converted .safetensors (both small nets + configs), as ``python -m upsr_core convert`` writes."""
    from upsr_core.checkpoint import save_converted

    path = tmp_path_factory.mktemp("ckpt") / "upsr_small.safetensors"
    save_converted(path, *small_nets)
    return path


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """A converted .safetensors of random nets of the ``tiny`` training preset (no oracle needed)."""
    from upsr_core.checkpoint import save_converted
    from upsr_core.train.presets import TINY

    with torch.random.fork_rng():
        torch.manual_seed(0)
        den, atd = UPSRDenoiser(TINY.denoiser).eval(), ATD(TINY.estimator).eval()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_converted(path, den, atd)
    return path
