"""NIQE (Mittal et al. 2013, "Making a completely blind image quality analyzer"), in torch.

Follows the official MATLAB release (``computequality.m``) on the luma of pyiqa's YIQ and
``iqa-torch``'s default, which the UPSR paper's numbers come from: 0.299 R + 0.587 G + 0.114 B,
computed in float32 as they do (``luma="y"`` as iqa-torch: pyiqa's and BasicSR's Y order the
float32 operations otherwise, ~5 in 1e6 pixels apart) and rounded to 0-255 (MATLAB's ``rgb2gray`` weighs
0.298936/0.587043/0.114021 in float64, which moves a score by up to ~0.07; a float64 sum of the
pyiqa weights rounds ~0.03 % of 8-bit pixels' exact .5 ties the other way, ~1e-2 on a score;
BasicSR's YCbCr Y, 16-235, is ``luma="y"``: it compresses the range and moves scores by ~0.2 on
average), 96×96 blocks without overlap,
two scales (the second by MATLAB-style bicubic ``imresize(·, 0.5)`` with antialiasing and
symmetric borders), MSCN with the 7×7 Gaussian window of the parameter file, 18 AGGD
features per block and scale, and the Mahalanobis-like distance to the pristine model:
sqrt((μp − μ)ᵀ pinv((Σp + Σ)/2) (μp − μ)).

The pristine model (μp (1,36), Σp (36,36), window (7,7)) is the official one as shipped in
``niqe_pris_params.npz`` by the PyPI package ``iqa-torch`` (module ``iqa``). It is looked up,
in order, at ``$UPSR_NIQE_PARAMS``, inside an installed ``iqa`` package (found without
importing it), or at a path given to :func:`load_niqe_params`. Without it NIQE is
unavailable (:class:`NIQEUnavailable`, a ValueError with the install hint).
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pipeline import check_unit_range

__all__ = ["NIQE_BLOCK", "NIQEParams", "NIQEUnavailable", "load_niqe_params", "niqe", "find_niqe_params",
           "matlab_resize_half"]

_HINT = ("NIQE needs the official pristine parameters 'niqe_pris_params.npz': `pip install --no-deps iqa-torch` "
         "(only that file is read, the package is never imported; --no-deps keeps pip from installing "
         "torchvision, which can pull in another torch build), or set $UPSR_NIQE_PARAMS to the file")


class NIQEUnavailable(ValueError):
    """The NIQE parameter file is missing."""


@dataclass(frozen=True)
class NIQEParams:
    mu: torch.Tensor  # (36,) float64
    cov: torch.Tensor  # (36, 36) float64
    window: torch.Tensor  # (7, 7) float64


def find_niqe_params() -> Path | None:
    """Path of niqe_pris_params.npz from $UPSR_NIQE_PARAMS or an installed ``iqa`` package, else None
    (also for ``UPSR_NIQE_PARAMS=off``)."""
    env = os.environ.get("UPSR_NIQE_PARAMS")
    if env == "off":
        return None
    if env:
        return Path(env)
    spec = importlib.util.find_spec("iqa")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "niqe" / "niqe_pris_params.npz"
            if p.is_file():
                return p
    return None


def load_niqe_params(path: str | os.PathLike | None = None) -> NIQEParams:
    """Read the pristine model; raises NIQEUnavailable (with the install hint) if not found."""
    p = Path(path) if path is not None else find_niqe_params()
    if p is None or not p.is_file():
        raise NIQEUnavailable(f"{_HINT}; looked at {str(p) if p else '$UPSR_NIQE_PARAMS and the iqa package'}")
    what = (f"{str(p)!r} is not a NIQE parameter file (.npz with mu_pris_param, cov_pris_param, gaussian_window; "
            "niqe_pris_params.npz of the iqa-torch package)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x93":  # an .npz is a zip archive, an .npy starts \x93NUMPY
        raise NIQEUnavailable(f"{what}: it starts with {magic!r}")  # numpy would say "pickled data ... allow_pickle"
    try:
        d = np.load(p)
    except (OSError, ValueError, EOFError) as e:  # cut short, or object arrays (never unpickled)
        raise NIQEUnavailable(f"{what}: {str(e).splitlines()[0]}") from None
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise NIQEUnavailable(f"{str(p)!r} holds one array, not a NIQE parameter file (.npz with mu_pris_param, "
                              "cov_pris_param, gaussian_window)")
    with d:
        missing = {"mu_pris_param", "cov_pris_param", "gaussian_window"} - set(d.files)
        if missing:
            raise NIQEUnavailable(f"{str(p)!r} lacks {sorted(missing)}: not a NIQE parameter file")
        mu = torch.from_numpy(np.asarray(d["mu_pris_param"], np.float64).reshape(-1))
        cov = torch.from_numpy(np.asarray(d["cov_pris_param"], np.float64))
        win = torch.from_numpy(np.asarray(d["gaussian_window"], np.float64))
    return NIQEParams(mu, cov, win)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    ax = x.abs()
    ax2, ax3 = ax**2, ax**3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _resize_matrix(n: int, scale: float) -> torch.Tensor:
    """(ceil(n·scale), n) matrix of MATLAB imresize (bicubic, antialias, symmetric border)."""
    out = math.ceil(n * scale)
    width = 4.0 / scale
    i = torch.arange(1, out + 1, dtype=torch.float64)
    u = i / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    w = scale * _cubic(scale * (u[:, None] - idx))
    w = w / w.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(n), torch.arange(n - 1, -1, -1)])
    cols = mirror[((idx - 1).long()) % (2 * n)]
    m = torch.zeros(out, n, dtype=torch.float64)
    m.scatter_add_(1, cols, w)
    return m


def matlab_resize_half(img: torch.Tensor) -> torch.Tensor:
    """(H, W) float64 -> (ceil(H/2), ceil(W/2)) as MATLAB ``imresize(img, 0.5)`` (bicubic)."""
    rh = _resize_matrix(img.shape[0], 0.5).to(img.device)
    rw = _resize_matrix(img.shape[1], 0.5).to(img.device)
    return rh @ img @ rw.T


_GAM = torch.arange(9801, dtype=torch.float64) * 0.001 + 0.2
_R_GAM = torch.exp(2 * torch.lgamma(2 / _GAM) - torch.lgamma(1 / _GAM) - torch.lgamma(3 / _GAM))


def _aggd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AGGD fit per row of x (n, N) -> alpha, beta_l, beta_r, each (n,)."""
    neg, pos = (x < 0).double(), (x > 0).double()
    left = torch.sqrt((x**2 * neg).sum(1) / neg.sum(1))
    right = torch.sqrt((x**2 * pos).sum(1) / pos.sum(1))
    g = left / right
    rhat = x.abs().mean(1) ** 2 / (x**2).mean(1)
    rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    pos_i = torch.argmin((_R_GAM.to(x.device)[None] - rnorm[:, None]) ** 2, dim=1)
    alpha = _GAM.to(x.device)[pos_i]
    k = torch.sqrt(torch.exp(torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)))
    return alpha, left * k, right * k


def _features(blocks: torch.Tensor) -> torch.Tensor:
    """(n, b, b) MSCN blocks -> (n, 18) features."""
    n = blocks.shape[0]
    a, bl, br = _aggd(blocks.reshape(n, -1))
    feats = [a, (bl + br) / 2]
    for sh in ((0, 1), (1, 0), (1, 1), (1, -1)):
        pair = blocks * torch.roll(blocks, sh, dims=(1, 2))
        a, bl, br = _aggd(pair.reshape(n, -1))
        mean = (br - bl) * torch.exp(torch.lgamma(2 / a) - torch.lgamma(1 / a))
        feats += [a, mean, bl, br]
    return torch.stack(feats, dim=1)


NIQE_BLOCK = 96
"""NIQE's block side in pixels (the official release's): images need sides of at least this."""


def _niqe_y(y: torch.Tensor, params: NIQEParams, block: int = NIQE_BLOCK) -> float:
    """NIQE of one luma image (H, W) float64 in [0, 255]."""
    h, w = y.shape
    nh, nw = h // block, w // block
    if nh < 1 or nw < 1:
        raise ValueError(f"NIQE needs images of at least {block}×{block} pixels, got {h}×{w}")
    img = y[: nh * block, : nw * block]
    win = params.window.to(y)[None, None]
    pad = win.shape[-1] // 2
    feats = []
    for scale in (1, 2):
        x = img[None, None]
        mu = F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), win)
        var = F.conv2d(F.pad(x * x, (pad,) * 4, mode="replicate"), win) - mu**2
        mscn = ((x - mu) / (var.abs().sqrt() + 1))[0, 0]
        b = block // scale
        blocks = mscn[: nh * b, : nw * b].reshape(nh, b, nw, b).permute(0, 2, 1, 3).reshape(-1, b, b)
        feats.append(_features(blocks))
        if scale == 1:
            img = matlab_resize_half(img / 255.0) * 255.0
    f = torch.cat(feats, dim=1)
    mu_d = torch.nanmean(f, dim=0)
    ok = f[~torch.isnan(f).any(1)]
    cov_d = torch.cov(ok.T) if ok.shape[0] > 1 else torch.zeros(f.shape[1], f.shape[1], dtype=f.dtype)
    d = (params.mu.to(f) - mu_d)[None]
    q = d @ torch.linalg.pinv((params.cov.to(f) + cov_d) / 2) @ d.T
    return float(torch.sqrt(q.clamp_min(0))[0, 0])


_GRAY = (0.299, 0.587, 0.114)  # pyiqa's YIQ Y, iqa-torch's rgb2gray (BT.601 luma, full range)
_Y = (65.481, 128.553, 24.966)  # BT.601 YCbCr Y: these / 255 (in float32) + 16/255, so 16-235


def niqe(img: torch.Tensor, params: NIQEParams | None = None, *, crop_border: int = 0,
         luma: str = "gray") -> torch.Tensor:
    """NIQE per image (lower is better) of RGB (B,3,H,W) or (3,H,W) in [0,1] -> (B,) float64.

    ``luma``: ``"gray"`` (0.299/0.587/0.114 on 0-255 in float32, rounded: pyiqa's YIQ Y and
    iqa-torch's default) or ``"y"`` (BT.601 YCbCr Y, 16-235, rounded: BasicSR's ``convert_to='y'``).
    Images need sides >= 96 px after ``crop_border``.
    """
    if luma not in ("gray", "y"):
        raise ValueError(f"luma must be 'gray' or 'y', got {luma!r}")
    x = img if img.ndim == 4 else img.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"niqe expects RGB images (B, 3, H, W), got {tuple(img.shape)}")
    check_unit_range(x, "niqe")
    params = params or load_niqe_params()
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    # float32, in iqa-torch's order of operations: which way an exact .5 rounds (module docstring)
    x = x.float().clamp(0, 1)
    weights, bias = (x.new_tensor(_GRAY), 0.0) if luma == "gray" else (x.new_tensor(_Y) / 255.0, 16.0 / 255.0)
    y = torch.einsum("bchw,c->bhw", x, weights) + bias
    y = torch.round(y.clamp(0, 1) * 255.0).double()
    return torch.tensor([_niqe_y(yi, params) for yi in y], dtype=torch.float64)
