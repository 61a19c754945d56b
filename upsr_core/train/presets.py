"""Training presets: network sizes and optimiser settings, ``small`` and ``full``.

``full`` is the paper's model (denoiser 119.4M params, ATD 2.53M) with the official
training options (``options/000_UPSR_RealSR_x4.yml``): AdamW lr 1e-4, weight decay 0,
EMA 0.999, no gradient clipping, batch 16 per GPU, HR crops 256² (LR 64²), 5000 warm-up
iterations, 200k iterations. The official run used 2 GPUs (global batch 32): on one GPU,
``--accum 2`` gives the same global batch. Two ``train`` defaults are not the official run's
and apply to ``full`` too: the EMA warm-up of fresh nets (``--ema-warmup off``) and libjpeg's
JPEG (``--jpeg diffjpeg``); docs/TRAINING.md gives the whole parity command.

``small`` is the bundled demo model: trainable in a few minutes on one H100 and still
runnable on a CPU. Denoiser 9.56M params (model_channels 64, channel_mult (1,2,2,2),
num_res_blocks (2,2,2,1), Swin embed 64 / 2 heads, window 8 at 4 levels so LR sides stay
multiples of 64, like the official net); ATD 0.29M (embed 48, depths (4,4)). Both nets in
float32 take 39.4 MB. Its optimiser settings are tuned for a short run: a higher learning
rate, short warm-up, a faster EMA so that the average is useful after ~1-3k steps, and the
gradient norm clipped at 1.0 (the demo was trained so).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ATDConfig, DenoiserConfig

__all__ = ["TrainPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class TrainPreset:
    """Network configs plus the optimisation defaults of one training recipe."""

    name: str
    denoiser: DenoiserConfig
    estimator: ATDConfig
    hr_size: int = 256  # HR crop side; LR = hr_size / 4
    batch: int = 16
    lr: float = 1e-4
    estimator_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 5000
    ema_decay: float = 0.999
    total_steps: int = 200_000
    grad_clip: float | None = None  # max gradient norm; None: off


FULL = TrainPreset(
    name="full",
    denoiser=DenoiserConfig(),
    estimator=ATDConfig(),
)

SMALL = TrainPreset(
    name="small",
    denoiser=DenoiserConfig(
        model_channels=64,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=(2, 2, 2, 1),
        swin_embed_dim=64,
        swin_num_heads=2,
        num_feat=64,
    ),
    estimator=ATDConfig(
        embed_dim=48,
        depths=(4, 4),
        num_heads=(3, 3),
        num_tokens=32,
    ),
    batch=32,
    lr=4e-4,
    estimator_lr=5e-4,
    warmup=200,
    ema_decay=0.995,
    total_steps=4000,
    grad_clip=1.0,
)

# Tiny nets for tests and CPU smoke runs (seconds per step on a laptop CPU).
TINY = TrainPreset(
    name="tiny",
    denoiser=DenoiserConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        swin_levels=(16, 8),
        image_size=16,
        swin_embed_dim=32,
        swin_num_heads=1,
        window_size=4,
        num_feat=16,
    ),
    estimator=ATDConfig(
        embed_dim=16,
        depths=(1,),
        num_heads=(2,),
        window_size=4,
        category_size=16,
        num_tokens=8,
        reducted_dim=4,
        convffn_kernel_size=3,
    ),
    hr_size=32,
    batch=2,
    lr=1e-3,
    estimator_lr=1e-3,
    warmup=0,
    ema_decay=0.9,
    total_steps=10,
    grad_clip=1.0,
)

PRESETS = {p.name: p for p in (SMALL, FULL, TINY)}


def get_preset(name: str) -> TrainPreset:
    """The preset called ``name`` ('small', 'full', 'tiny'); change fields with
    ``dataclasses.replace`` (a misspelt field is then a TypeError naming it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]  # frozen: shared safely
