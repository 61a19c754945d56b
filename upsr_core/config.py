"""Network configurations, and reading them back from a checkpoint's tensor shapes.

Every hyperparameter of both networks but one is recoverable from the official state_dict
keys and shapes (spandrel's detect/load split): nothing is hard-coded to the full-size
checkpoint, so the reduced oracle nets, the bundled demo model and the official
``upsr.pth`` / ``atd_real.pth`` all load through the same code. The exception is ATD's
``category_size`` (the AC-MSA group size), which no tensor shows: files we write store it
in their metadata; otherwise it is the official 128, or what the caller gives
(``load_upsr(..., category_size=48)`` for the oracle's reduced nets).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

from .errors import UnsupportedCheckpointError

__all__ = [
    "DenoiserConfig",
    "ATDConfig",
    "denoiser_config_from_state_dict",
    "atd_config_from_state_dict",
    "FULL_DENOISER",
    "FULL_ATD",
]


# Upper bounds of the settings (generous: several times the official nets' values). A file's
# metadata or tensor shapes are untrusted input; these keep a crafted config from building for
# minutes or asking for terabytes (the loader also caps the parameter count: checkpoint.MAX_NET_PARAMS).
_DENOISER_MAX = {"in_channels": 192, "lq_channels": 384, "model_channels": 1024, "out_channels": 16,
                 "channel_mult": 16, "num_res_blocks": 16, "swin_levels": 4096, "image_size": 4096,
                 "swin_depth": 32, "swin_embed_dim": 1024, "swin_num_heads": 64, "window_size": 64,
                 "mlp_ratio": 16, "num_feat": 1024, "levels": 8}
_ATD_MAX = {"in_chans": 16, "upscale": 8, "embed_dim": 1024, "depths": 64, "num_heads": 64, "window_size": 64,
            "category_size": 4096, "num_tokens": 1024, "reducted_dim": 1024, "convffn_kernel_size": 31,
            "mlp_ratio": 16, "levels": 32}


METADATA_CONFIG_ERRORS = (ValueError, TypeError, AttributeError, RecursionError, OverflowError)
"""What ``cls.from_dict(json.loads(text))`` raises for a file's config metadata that is not one
(``json.JSONDecodeError`` is a ValueError; nested or huge-number JSON RecursionError/OverflowError):
the loaders turn these into UnsupportedCheckpointError."""


def _is_count(v: object) -> bool:
    """An int >= 1 (not a bool): what every size and count setting of the nets must be."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_bounds(what: str, cfg: object, maxima: dict[str, int]) -> None:
    """ValueError naming every setting above its bound (tuples: each entry; ``levels``: their length)."""
    over = {}
    for k, top in maxima.items():
        if k == "levels":
            continue
        v = getattr(cfg, k)
        if (max(v, default=0) if isinstance(v, tuple) else v) > top:
            over[k] = v
    longest = max((len(v) for v in vars(cfg).values() if isinstance(v, tuple)), default=0)
    if longest > maxima["levels"]:
        over["levels"] = longest
    if over:
        raise ValueError(f"{what} settings above what this project builds: {over} (bounds: "
                         + ", ".join(f"{k} <= {maxima[k]}" for k in over) + ")")


@dataclass(frozen=True, kw_only=True)
class DenoiserConfig:
    """Hyperparameters of the Swin-UNet denoiser (official ``UNetModelSwin``).

    ``image_size`` is the *nominal* LR resolution of level 0: it only decides which
    Swin layers have a shifted second block (``ds > window_size``, SPEC §3.3/§8.10).
    ``swin_levels`` lists the nominal resolutions ``ds`` that carry a Swin layer
    (the official ``attention_resolutions``).
    """

    in_channels: int = 48
    lq_channels: int = 96
    model_channels: int = 160
    out_channels: int = 3
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    swin_levels: tuple[int, ...] = (64, 32, 16, 8)
    middle_swin: bool = True
    image_size: int = 64
    swin_depth: int = 2
    swin_embed_dim: int = 192
    swin_num_heads: int = 6
    window_size: int = 8
    mlp_ratio: int = 4
    num_feat: int = 128

    def __post_init__(self) -> None:
        tuples = ("channel_mult", "num_res_blocks", "swin_levels")
        ints = {k: v for k, v in asdict(self).items() if k not in tuples and k != "middle_swin"}
        bad = {k: v for k, v in ints.items() if not _is_count(v)}
        bad.update({k: getattr(self, k) for k in tuples
                    if not isinstance(getattr(self, k), tuple) or not all(map(_is_count, getattr(self, k)))})
        if not isinstance(self.middle_swin, bool):
            bad["middle_swin"] = self.middle_swin
        if bad:
            raise ValueError(f"denoiser settings must be integers >= 1 (tuples of them; middle_swin a bool), got {bad}")
        _check_bounds("denoiser", self, _DENOISER_MAX)
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level, got ()")
        if len(self.channel_mult) != len(self.num_res_blocks):
            raise ValueError(
                f"channel_mult {self.channel_mult} and num_res_blocks {self.num_res_blocks} "
                "must have one entry per level"
            )
        if self.model_channels % 32:
            raise ValueError(f"model_channels must be a multiple of 32 (GroupNorm32), got {self.model_channels}")
        if self.swin_embed_dim % 32 or self.swin_embed_dim % self.swin_num_heads:
            raise ValueError(
                f"swin_embed_dim {self.swin_embed_dim} must be a multiple of 32 and of swin_num_heads "
                f"{self.swin_num_heads}"
            )

    @property
    def multiple_of(self) -> int:
        """LR sides must be multiples of this: 2^(levels-1) downsamplings times the window."""
        return self.window_size * 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "DenoiserConfig":
        tuples = {"channel_mult", "num_res_blocks", "swin_levels"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


@dataclass(frozen=True, kw_only=True)
class ATDConfig:
    """Hyperparameters of the ATD "real" estimator g (official ``atd_real_arch.ATD``)."""

    in_chans: int = 3
    upscale: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (4, 4, 4, 4)
    window_size: int = 16
    category_size: int = 128
    num_tokens: int = 64
    reducted_dim: int = 8
    convffn_kernel_size: int = 7
    mlp_ratio: int = 1

    def __post_init__(self) -> None:
        ints = {k: v for k, v in asdict(self).items() if k not in ("depths", "num_heads")}
        bad = {k: v for k, v in ints.items() if not _is_count(v)}
        if bad:
            raise ValueError(f"ATD settings must be integers >= 1, got {bad}")
        if not self.depths or len(self.depths) != len(self.num_heads) or min(self.depths + self.num_heads) < 1:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have one entry >= 1 per "
                             "residual group")
        _check_bounds("ATD", self, _ATD_MAX)
        if any(self.embed_dim % h for h in self.num_heads):
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of every num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ATDConfig":
        tuples = {"depths", "num_heads"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


FULL_DENOISER = DenoiserConfig()
FULL_ATD = ATDConfig()


def _shape(sd: Mapping[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise UnsupportedCheckpointError(f"{what}: expected key {key!r} is missing", sd)
    return tuple(sd[key].shape)


def denoiser_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> DenoiserConfig:
    """Read a :class:`DenoiserConfig` from the keys and shapes of a denoiser state dict."""
    what = "UPSR denoiser (UNetModelSwin)"
    mc, cin_total = _shape(sd, "input_blocks.0.0.weight", what)[:2]
    temb = _shape(sd, "time_embed.0.weight", what)
    if temb != (4 * mc, mc):
        raise UnsupportedCheckpointError(f"{what}: time_embed.0.weight {temb} does not fit model_channels {mc}", sd)
    lq_channels = 96  # official: hard-coded for lq_size == image_size (Identity feature extractor)
    in_channels = cin_total - lq_channels
    if in_channels <= 0:
        raise UnsupportedCheckpointError(f"{what}: input conv takes {cin_total} channels, expected > 96", sd)
    # Walk the input blocks: ResBlocks grouped into levels separated by Downsample.
    idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    swin_first: list[bool] = []
    for i in idx[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
            continue
        cout = _shape(sd, f"input_blocks.{i}.0.in_layers.2.weight", what)[0]
        if not levels[-1]:
            swin_first.append(f"input_blocks.{i}.1.patch_embed.proj.weight" in sd)
        levels[-1].append(cout)
    if any(len(lv) == 0 for lv in levels):
        raise UnsupportedCheckpointError(f"{what}: a level without ResBlocks in input_blocks {idx}", sd)
    channel_mult = tuple(lv[0] // mc for lv in levels)
    num_res_blocks = tuple(len(lv) for lv in levels)
    # Swin geometry from the first Swin layer found.
    swin_keys = sorted(k for k in sd if k.endswith(".blocks.0.attn.relative_position_bias_table"))
    if not swin_keys:
        raise UnsupportedCheckpointError(f"{what}: no Swin layer found", sd)
    p = swin_keys[0][: -len("blocks.0.attn.relative_position_bias_table")]
    embed = _shape(sd, p + "patch_embed.proj.weight", what)[0]
    table, heads = _shape(sd, swin_keys[0], what)
    window = (int(math.isqrt(table)) + 1) // 2
    depth = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"blocks\.(\d+)\.", k))})
    hidden = _shape(sd, p + "blocks.0.mlp.fc1.weight", what)[0]
    # Nominal resolution: a shifted block stores attn_mask [nW, N, N] with nW = (ds/window)^2.
    image_size = None
    for lvl, has in enumerate(swin_first):
        first = sum(len(lv) + 1 for lv in levels[:lvl]) + 1
        mkey = f"input_blocks.{first}.1.blocks.1.attn_mask"
        if has and mkey in sd:
            ds = window * math.isqrt(sd[mkey].shape[0])
            image_size = ds * 2**lvl
            break
    if image_size is None:
        # No shifted block anywhere (e.g. swin_depth 1): the nominal size shows only where a
        # layer's window shrank to its map (ds < window); otherwise any size keeping every
        # Swin level at ds >= window builds the same net.
        wins = {}
        for lvl, has in enumerate(swin_first):
            if has:
                first = sum(len(lv) + 1 for lv in levels[:lvl]) + 1
                key = f"input_blocks.{first}.1.blocks.0.attn.relative_position_index"
                wins[lvl] = math.isqrt(_shape(sd, key, what)[0])
        if "middle_block.1.blocks.0.attn.relative_position_index" in sd:
            wins[len(levels) - 1] = min(wins.get(len(levels) - 1, 10**9), math.isqrt(
                sd["middle_block.1.blocks.0.attn.relative_position_index"].shape[0]))
        window = max(wins.values())
        shrunk = [(lvl, w) for lvl, w in sorted(wins.items()) if w < window]
        image_size = shrunk[0][1] * 2 ** shrunk[0][0] if shrunk else window * 2 ** max(wins)
    swin_levels = tuple(image_size // 2**lvl for lvl, h in enumerate(swin_first) if h)
    return DenoiserConfig(
        in_channels=in_channels,
        lq_channels=lq_channels,
        model_channels=mc,
        out_channels=_shape(sd, "conv_last.weight", what)[0],
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        swin_levels=swin_levels,
        middle_swin="middle_block.1.patch_embed.proj.weight" in sd,
        image_size=image_size,
        swin_depth=depth,
        swin_embed_dim=embed,
        swin_num_heads=heads,
        window_size=window,
        mlp_ratio=hidden // embed,
        num_feat=_shape(sd, "conv_before_upsample.0.weight", what)[0],
    )


def atd_config_from_state_dict(sd: Mapping[str, torch.Tensor], *, category_size: int = 128) -> ATDConfig:
    """Read an :class:`ATDConfig` from the keys and shapes of an ATD state dict.

    The AC-MSA group size ``category_size`` shows in no tensor shape: it comes from the
    file's metadata when we wrote it, else the official value 128.
    """
    what = "ATD estimator"
    embed, in_chans = _shape(sd, "conv_first.weight", what)[:2]
    n_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    layers: dict[int, set[int]] = {}  # one pass over the keys (a file with many groups: not groups × keys)
    for k in sd:
        if m := re.match(r"layers\.(\d+)\.residual_group\.layers\.(\d+)\.", k):
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    depths, heads = [], []
    for b in range(n_blocks):
        p = f"layers.{b}.residual_group.layers."
        depths.append(len(layers.get(b, ())))
        heads.append(_shape(sd, p + "0.attn_win.relative_position_bias_table", what)[1])
    table = _shape(sd, "layers.0.residual_group.layers.0.attn_win.relative_position_bias_table", what)[0]
    up_out = _shape(sd, "upsample.0.weight", what)[0]
    scale = math.isqrt(up_out // in_chans)
    p0 = "layers.0.residual_group."
    return ATDConfig(
        in_chans=in_chans,
        upscale=scale,
        embed_dim=embed,
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=(math.isqrt(table) + 1) // 2,
        category_size=category_size,
        num_tokens=_shape(sd, p0 + "td", what)[0],
        reducted_dim=_shape(sd, p0 + "layers.0.attn_atd.wq.weight", what)[0],
        convffn_kernel_size=_shape(sd, p0 + "layers.0.convffn.dwconv.depthwise_conv.0.weight", what)[-1],
        mlp_ratio=_shape(sd, p0 + "layers.0.convffn.fc1.weight", what)[0] // embed,
    )
