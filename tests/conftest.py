"""Shared fixtures: the official oracle (SPEC §9), the small nets built from it, seeding.

The oracle lives in ``shared/`` beside the clone (``$UPSR_SHARED`` overrides): it holds
the reduced official nets' weights (float16-exact) and every intermediate tensor of four
official runs. Tests that need it are skipped, with the path in the reason, when absent.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from upsr_core.config import ATDConfig, DenoiserConfig
from upsr_core.model import UPSRModel
from upsr_core.nets import ATD, UPSRDenoiser

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UPSR_SHARED", REPO.parent / "shared"))
ORACLE_DIR = SHARED / "oracle"

# Max abs difference allowed against the official tensors: the official code itself
# varies by up to 1.4e-5 between 1 and 2 threads (oracle_small.json observed_tolerances).
ORACLE_ATOL = 1e-4


@dataclass(frozen=True)
class Oracle:
    tensors: dict[str, torch.Tensor]
    meta: dict

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def net_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored weights of one net ('denoiser.' or 'atd.'), dtypes as stored."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def case(self, name: str) -> dict:
        return next(c for c in self.meta["cases"] if c["name"] == f"case_{name}")

    def sort_indices(self, prefix: str) -> list[torch.Tensor]:
        """The recorded AC-MSA permutations of one ATD run, in call order."""
        n = sum(self.meta["configs"]["atd_ATD"]["depths"])
        return [self.tensors[f"{prefix}.atd_sort{i}.idx"] for i in range(n)]


def denoiser_config_from_official(c: dict) -> DenoiserConfig:
    """Our config from the official ``UNetModelSwin`` constructor arguments."""
    levels = len(c["channel_mult"])
    return DenoiserConfig(
        in_channels=c["in_channels"],
        model_channels=c["model_channels"],
        out_channels=c["out_channels"],
        channel_mult=tuple(c["channel_mult"]),
        num_res_blocks=tuple(c["num_res_blocks"]),
        swin_levels=tuple(c["attention_resolutions"]),
        middle_swin=c["image_size"] // 2 ** (levels - 1) in c["attention_resolutions"],
        image_size=c["image_size"],
        swin_depth=c["swin_depth"],
        swin_embed_dim=c["swin_embed_dim"],
        swin_num_heads=c["swin_embed_dim"] // c["num_head_channels"],
        window_size=c["window_size"],
        mlp_ratio=c["mlp_ratio"],
        num_feat=c["num_feat"],
    )


def atd_config_from_official(c: dict) -> ATDConfig:
    """Our config from the official ``ATD`` constructor arguments."""
    return ATDConfig(
        in_chans=c["in_chans"],
        upscale=c["upscale"],
        embed_dim=c["embed_dim"],
        depths=tuple(c["depths"]),
        num_heads=tuple(c["num_heads"]),
        window_size=c["window_size"],
        category_size=c["category_size"],
        num_tokens=c["num_tokens"],
        reducted_dim=c["reducted_dim"],
        convffn_kernel_size=c["convffn_kernel_size"],
        mlp_ratio=c["mlp_ratio"],
    )


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
