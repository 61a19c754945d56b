"""Our nets speak the official checkpoints' language (SPEC §1, §3, §5).

The full-size nets are built on the meta device (no memory, no init cost) and compared
key by key with ``full_manifest.json``, which was made by instantiating the official
classes. Configs are read back from state dicts (spandrel's hyperparameter round trip).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from upsr_core.config import (
    FULL_ATD,
    FULL_DENOISER,
    ATDConfig,
    DenoiserConfig,
    atd_config_from_state_dict,
    denoiser_config_from_state_dict,
)
from upsr_core.nets import ATD, UPSRDenoiser

from _support import atd_config_from_official, denoiser_config_from_official


@pytest.fixture(scope="module")
def full_nets() -> tuple[UPSRDenoiser, ATD]:
    with torch.device("meta"):
        return UPSRDenoiser(FULL_DENOISER), ATD(FULL_ATD)


def manifest_rows(net: torch.nn.Module) -> list[dict]:
    params = {k for k, _ in net.named_parameters()}
    return [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
         "kind": "param" if k in params else "buffer", "numel": v.numel()}
        for k, v in net.state_dict().items()
    ]


@pytest.mark.parametrize("which", ["denoiser", "atd"])
def test_full_state_dict_matches_manifest(full_manifest, full_nets, which):
    net = full_nets[0] if which == "denoiser" else full_nets[1]
    ref = full_manifest[which]
    ours = manifest_rows(net)
    assert [r["key"] for r in ours] == [r["key"] for r in ref["state_dict"]]  # order included
    assert ours == ref["state_dict"]
    assert len(ours) == ref["num_state_dict_entries"]
    assert sum(r["kind"] == "buffer" for r in ours) == ref["num_buffer_entries_in_state_dict"]


def test_full_parameter_counts(full_manifest, full_nets):
    den, atd = full_nets
    assert sum(p.numel() for p in den.parameters()) == 119_418_319 == full_manifest["denoiser"]["total_parameters"]
    assert sum(p.numel() for p in atd.parameters()) == 2_532_360 == full_manifest["atd"]["total_parameters"]


def test_full_configs_match_official_constructor_args(full_manifest):
    assert denoiser_config_from_official(full_manifest["denoiser"]["config"]) == FULL_DENOISER
    assert atd_config_from_official(full_manifest["atd"]["config"]) == FULL_ATD


def test_config_from_meta_state_dict(full_nets):
    den, atd = full_nets
    assert denoiser_config_from_state_dict(den.state_dict()) == FULL_DENOISER
    assert atd_config_from_state_dict(atd.state_dict()) == FULL_ATD


def test_config_from_oracle_weights(oracle, small_configs):
    """The float16-stored official small nets: configs read from shapes = the oracle's constructor args."""
    dcfg, acfg = small_configs
    assert denoiser_config_from_state_dict(oracle.net_state_dict("denoiser.")) == dcfg
    # category_size is in no tensor shape: it is passed in (or read from our file metadata)
    assert atd_config_from_state_dict(oracle.net_state_dict("atd."), category_size=48) == acfg


SMALL = DenoiserConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), swin_levels=(16, 8), image_size=16,
    swin_embed_dim=32, swin_num_heads=2, window_size=4, num_feat=16,
)
DENOISER_CONFIGS = {
    "mc32-2levels": SMALL,
    "mc64": replace(SMALL, model_channels=64),
    "mult-1-2-4": replace(SMALL, channel_mult=(1, 2, 4), num_res_blocks=(1, 2, 1), swin_levels=(16, 8, 4)),
    "resblocks-3-2": replace(SMALL, num_res_blocks=(3, 2)),
    "window2-heads4": replace(SMALL, window_size=2, swin_embed_dim=64, swin_num_heads=4),
    "window8-unshifted": replace(SMALL, window_size=8, image_size=8, swin_levels=(8, 4)),  # no attn_mask at all
    "depth3": replace(SMALL, swin_depth=3),
    "swin-top-only": replace(SMALL, swin_levels=(16,), middle_swin=False),
    "no-swin-top": replace(SMALL, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), swin_levels=(8, 4)),
    "mlp2-feat32-in12": replace(SMALL, mlp_ratio=2, num_feat=32, in_channels=12),
    "oracle-small": DenoiserConfig(
        model_channels=32, swin_levels=(16, 8, 4, 2), image_size=16, swin_embed_dim=64, swin_num_heads=4,
        window_size=2, num_feat=16,
    ),
}


@pytest.mark.parametrize("name", list(DENOISER_CONFIGS))
def test_denoiser_config_round_trip(name):
    cfg = DENOISER_CONFIGS[name]
    with torch.device("meta"):
        sd = UPSRDenoiser(cfg).state_dict()
    assert denoiser_config_from_state_dict(sd) == cfg


ATD_SMALL = ATDConfig(embed_dim=24, depths=(2, 2), num_heads=(2, 2), window_size=8, category_size=48,
                      num_tokens=16, reducted_dim=4)
ATD_CONFIGS = {
    "oracle-small": ATD_SMALL,
    "embed48-heads4": replace(ATD_SMALL, embed_dim=48, num_heads=(4, 4)),
    "depths-3-1-2": replace(ATD_SMALL, depths=(3, 1, 2), num_heads=(2, 4, 2)),
    "single-block": replace(ATD_SMALL, depths=(4,), num_heads=(3,)),
    "window4-tokens8": replace(ATD_SMALL, window_size=4, num_tokens=8, reducted_dim=6),
    "kernel5-mlp2": replace(ATD_SMALL, convffn_kernel_size=5, mlp_ratio=2),
    "x2": replace(ATD_SMALL, upscale=2),
}


@pytest.mark.parametrize("name", list(ATD_CONFIGS))
def test_atd_config_round_trip(name):
    cfg = ATD_CONFIGS[name]
    with torch.device("meta"):
        sd = ATD(cfg).state_dict()
    assert atd_config_from_state_dict(sd, category_size=cfg.category_size) == cfg


@pytest.mark.parametrize("name", ["mc32-2levels", "depth3"])
def test_denoiser_round_trip_loads_strictly(name):
    """config -> net -> state_dict -> config -> new net: the new net takes the weights strictly."""
    cfg = DENOISER_CONFIGS[name]
    sd = UPSRDenoiser(cfg).state_dict()
    twin = UPSRDenoiser(denoiser_config_from_state_dict(sd))
    twin.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in sd.items())


def test_depth1_state_dict_loads_into_inferred_config():
    """With swin_depth 1 no block is shifted, so no attn_mask records the nominal size; it is
    read from the one layer whose window shrank to its map (or any size, when none did)."""
    sd = UPSRDenoiser(replace(SMALL, swin_depth=1)).state_dict()
    twin = UPSRDenoiser(denoiser_config_from_state_dict(sd))
    twin.load_state_dict(sd, strict=True)
    assert [k for k in twin.state_dict()] == list(sd)
