"""Shared test constants and helpers (a plain module: `from conftest import …` is ambiguous
when pytest collects tests/ and tests/e2e/, which has a conftest of its own)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


def tiny_upsr(denoiser_gain: float = 10.0, estimator_gain: float = 1.0) -> UPSRModel:
    """A random UPSR with the real architectures, small enough for CPU tests; multiple_of = 4.

    Two levels (one shifted-window Swin layer per level and in the middle), window 2. The
    ATD has window 8 (> 4), so its own symmetric padding path runs too, and two layers so
    a shifted ATD layer runs. ``denoiser_gain`` scales ``conv_last`` (10: outputs span well
    beyond [-1, 1], so clamping is exercised); ``estimator_gain`` scales ATD's last conv.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        den = UPSRDenoiser(DenoiserConfig(
            model_channels=32, channel_mult=(1, 1), num_res_blocks=(1, 1), swin_levels=(8, 4), image_size=8,
            swin_depth=2, swin_embed_dim=32, swin_num_heads=2, window_size=2, mlp_ratio=1, num_feat=8))
        atd = ATD(ATDConfig(embed_dim=16, depths=(2,), num_heads=(2,), window_size=8, category_size=16,
                            num_tokens=8, reducted_dim=4, convffn_kernel_size=3))
        den.conv_last.weight.data.mul_(denoiser_gain)
        atd.upsample[0].weight.data.mul_(estimator_gain)
    return UPSRModel(den.eval().requires_grad_(False), atd.eval().requires_grad_(False))


def bench_args(tmp_path: Path, *argv: str, model: UPSRModel | None = None):
    """``bench --device cpu --model <checkpoint> *argv`` parsed by bench's own parser (what
    ``python -m upsr_core bench`` runs): the checkpoint is ``model``, or :func:`tiny_upsr`'s
    nets, saved as ``tmp_path/tiny.safetensors`` (the tiny nets once per folder)."""
    import argparse

    from upsr_core.bench import add_parser
    from upsr_core.checkpoint import save_converted

    path = tmp_path / "tiny.safetensors"
    if model is not None or not path.exists():
        m = model if model is not None else tiny_upsr()
        save_converted(path, m.denoiser, m.estimator)
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["bench", "--device", "cpu", "--model", str(path), *argv])


def packed_crops(tmp_path: Path, n: int = 4, s: int = 48) -> Path:
    """A packed-crops training file (uint8 (n, 3, s, s), fixed random content) in ``tmp_path``."""
    p = tmp_path / "pack.npy"
    np.save(p, (np.random.default_rng(0).random((n, 3, s, s)) * 255).astype(np.uint8))
    return p


def load_tool(name: str):
    """The script ``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
