"""``python -m upsr_core eval [--hr DIR] --lr DIR [--method …]``: metrics table and contact sheet.

Methods (all from the same LR, outputs rounded to 8 bits like a saved PNG; of a grayscale LR,
its luma, as ``upscale`` writes it):

* ``bicubic``  — bicubic ×4 of the LR as it is, clamped to [0,1] (the diffusion's centre y↑ is the
  bicubic of the padded LR: the two differ in the last 2 HR rows/columns of a padded size)
* ``estimator``— g(y), the SR estimate alone
* ``upsr_w1``  — UPSR with w ≡ 1 (no uncertainty weighting, b_u = 1), same ε
* ``upsr``     — UPSR with the model's uncertainty-weighted noise (b_u 0.4, ψ_max 0.05)
* ``upsr_cf``  — that same sample with the wavelet colour fix (:mod:`upsr_core.colorfix`, 5 levels;
  not in the official pipeline, so not in the default list)

``--b-u`` and ``--psi-max`` take comma lists: ``upsr`` then runs once per (b_u, ψ_max) pair of
the grid, each a row ``upsr b_u=… psi_max=…`` (the official pair keeps the name ``upsr``), all
from the same ε — a sweep of the weighting function (the paper set it by hand). ``--seeds N``
scores the UPSR methods on N samples (seeds ``--seed`` … ``--seed`` + N − 1) and reports each
image's mean over them: one sample is a draw.

Metrics: PSNR / SSIM on RGB and on Y (BT.601), NIQE with the official pristine model
(optional: see :mod:`upsr_core.niqe`), and — when ``pyiqa`` with its weights is installed —
``--pyiqa lpips,clipiqa,musiq,maniqa``. Writes ``OUT/results.json``, ``OUT/results.md`` and
``OUT/contact_sheet.png`` (rows: images; columns: LR, methods, HR). Beside the means, image by
image (:func:`paired`), every method against bicubic and UPSR against UPSR with w ≡ 1: the mean
difference, its standard error and the images where the method is better, so that a difference
can be told from the images' spread.
HR/LR pairs are matched by their path below ``--hr`` and ``--lr`` (searched recursively), then by
name without a scale tag (DIV2K ``x4``, DRealSR ``_x1``/``_x4``, RealSR V3 ``_HR``/``_LR4`` in one
folder given as both): :func:`pair_files`; ``--manifest``+``--group`` keep one split group.

Without ``--hr`` the run is no-reference, as the paper's RealSet65 column: every image of
``--lr`` is scored by NIQE and the no-reference pyiqa metrics only (``clipiqa``, ``musiq``,
``maniqa``); a full-reference metric (``lpips``) is then an error, not a silent blank.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .cliargs import SEED_ARG, int_min
from .colorfix import wavelet_color_fix
from .errors import is_int
from .imageio import (
    IMAGE_SUFFIXES,
    image_size,
    is_hidden,
    is_inside,
    log_unfollowed_links,
    luma,
    read_image,
    same_place,
    write_atomically,
    write_png,
    write_text,
)
from .metrics import SSIM_WINDOW, psnr, ssim, to_uint8_levels
from .niqe import NIQE_BLOCK, NIQEUnavailable, load_niqe_params, niqe
from .pipeline import _check_seed, bicubic_x4, crop_hr
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, PSI_MAX_LIMIT, check_weight_params

__all__ = ["add_parser", "evaluate", "METHODS", "ALL_METHODS", "pair_files",
           "lr_files", "manifest_ids", "upsr_label", "parse_grid",
           "method_folder", "unscored", "manifest_entries"]

log = logging.getLogger(__name__)
METHODS = ("bicubic", "estimator", "upsr_w1", "upsr")
"""The default ``--method`` list: the paper's comparison."""
ALL_METHODS = (*METHODS, "upsr_cf")
EVAL_MARK = ".upsr-eval"  # in an --out with saved images: skipped as input, as a folder of results is


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="PSNR/SSIM/NIQE (+pyiqa) of bicubic, g(y), UPSR w≡1 and UPSR on HR/LR pairs "
                                    "(or NIQE/pyiqa alone on LR images)")
    p.add_argument("--hr", default=None,
                   help="folder of HR images; leave out for a no-reference run (NIQE and pyiqa's no-reference "
                        "metrics of every image in --lr, as the paper's RealSet65 column)")
    p.add_argument("--lr", required=True,
                   help="folder of LR images, ×4 smaller, paired with --hr's by path and name (a scale tag such "
                        "as x4, _x4, _LR4 / _HR, _x1 aside; RealSR V3's one folder: give it as both)")
    p.add_argument("--model", default=None, help="converted .safetensors with both nets (default: the demo model)")
    p.add_argument("--estimator", default=None, help="ATD file when --model holds only the denoiser")
    p.add_argument("--method", default=",".join(METHODS),
                   help=f"comma list of {', '.join(ALL_METHODS)} (default: {','.join(METHODS)}); upsr_cf: "
                        "the upsr sample at the official b_u 0.4, psi_max 0.05 with the wavelet colour fix "
                        "(5 levels), whatever --b-u/--psi-max sweep")
    p.add_argument("--manifest", default=None, help="manifest.jsonl with 'id' and 'group' per image")
    p.add_argument("--group", default=None, help="keep only this manifest group (e.g. A_val)")
    p.add_argument("--limit", type=int_min(1), default=None, help="evaluate at most this many pairs")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--seed", type=SEED_ARG, default=0)
    p.add_argument("--seeds", type=int_min(1), default=1,
                   help="score the UPSR methods over this many samples (seeds --seed, --seed + 1, …) and report "
                        "each image's mean over them (bicubic and g(y) have no noise: run once); the sheet and the "
                        "saved images show the first; results.json keeps every sample's scores (per_seed)")
    p.add_argument("--b-u", default=None,
                   help=f"noise floor(s) of the upsr method, comma list (a sweep; default {DEFAULT_B_U})")
    p.add_argument("--psi-max", default=None,
                   help=f"ψ_max value(s) of the upsr method, comma list (default {DEFAULT_PSI_MAX})")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                   help="denoiser precision (fp32 = the faithful reference path, the default; auto = fp16 on "
                        "CUDA, else fp32), as upscale's")
    p.add_argument("--fast", action="store_true",
                   help="the fast path (fused attention, the loop on the device, CUDA graphs): same math, other "
                        "rounding; quicker on full-size test sets, recorded in results.json")
    p.add_argument("--crop-border", type=int_min(0), default=0,
                   help="pixels dropped at each side before PSNR, SSIM and NIQE (BasicSR's crop_border)")
    p.add_argument("--niqe-params", default=None,
                   help="niqe_pris_params.npz (default: $UPSR_NIQE_PARAMS, else the iqa-torch package's; "
                        "a file named either way must exist), or 'off' (also as $UPSR_NIQE_PARAMS) to skip NIQE "
                        "(it runs on the CPU, ~1 s per image and method)")
    p.add_argument("--pyiqa", default="", help="comma list of pyiqa metrics, e.g. lpips,clipiqa,musiq,maniqa "
                                               "(pyiqa's psnr, ssim or niqe: columns pyiqa_psnr, …, beside eval's own)")
    p.add_argument("--sheet", type=int_min(0), default=6, help="images on the contact sheet (0: none)")
    p.add_argument("--save-images", action="store_true",
                   help="also write every method's output, the 8-bit PNG scored, to OUT/images/<method>/<image>.png "
                        "(<image>: the HR image's path below --hr, its tag kept, so a result sits by the name of its "
                        "ground truth; images/upsr is the official b_u/psi_max pair of a sweep)")
    p.set_defaults(func=_cmd_eval)


def pair_files(hr_dir: str | Path, lr_dir: str | Path, ids: Collection[str] | None = None, *,
               exclude: str | Path | None = None, left_out: dict | None = None) -> list[tuple[Path, Path]]:
    """(hr, lr) image paths of two folders (searched recursively, as ``upscale`` reads a folder),
    sorted by the HR image's path. Paired by the path below each folder without the suffix; an
    image left over answers also to its name without a scale tag (HR: ``_HR``, ``_GT``, ``_x1``;
    LR: ``_LR``, ``_LR4``, ``_LRx4``, ``_x4`` or a bare ``x4``; the separator may be ``_``, ``-``
    or ``.``), and images answering to one name pair. That takes the usual benchmark layouts as
    they are: DIV2K (``0801.png`` / ``0801x4.png``), DRealSR (``_x1`` / ``_x4``) and RealSR V3,
    whose HR and LR images share one folder (``Canon_001_HR.png`` / ``Canon_001_LR4.png``: give
    that folder as both; ``_LR2``/``_LR3``, other scales, are not used). Names that link more
    than one image of a side pair none of them (a warning names them). ``ids`` keeps the images
    whose name (with or without its tag) is among them (as {id: hr_size}, :func:`manifest_entries`,
    only ids of a crop size found here are warned of as missing); ``exclude``: a folder whose files are
    never images of the set (eval's ``--out``); a folder holding an earlier eval's results.json
    and results.md is skipped too, as is the other folder where one lies inside the other.
    ValueError when nothing pairs, saying what each folder holds; warnings name the images
    (and ids) left out, and ``left_out``, a dict, receives them: ``hr`` and ``lr`` (paths below
    their folders without a partner) and ``ambiguous`` (lists of keys that pair none)."""
    hr_dir, lr_dir = Path(hr_dir), Path(lr_dir)
    same = same_place(hr_dir, lr_dir)
    skip = [] if exclude is None else [Path(exclude)]
    hrs = _image_files(hr_dir, ids, exclude=skip + ([] if same else [lr_dir]))
    lrs = _image_files(lr_dir, ids, exclude=skip + ([] if same else [hr_dir]))
    if same:  # RealSR V3: one folder, HR and LR told apart by their tags
        other = [k for k in hrs if _role(k) is None]
        hrs = {k: p for k, p in hrs.items() if _role(k) == "hr"}
        lrs = {k: p for k, p in lrs.items() if _role(k) == "lr"}
        if other:
            log.info("%d image(s) in %r carry neither an HR nor a ×4 LR tag and are not used (the model is ×4; "
                     "_LR2, _LR3 are other scales): %s", len(other), str(hr_dir), _first_names(other))
        if not hrs or not lrs:
            raise ValueError(f"--hr and --lr are one folder, {str(hr_dir)!r}: its HR and LR images are told apart by "
                             f"a tag at the end of the name (HR: _HR, _GT, _x1; LR: _LR, _LR4, _x4), and it holds "
                             f"{len(hrs)} HR and {len(lrs)} ×4 LR image(s) so tagged"
                             + (f" among the {len(ids)} selected ids" if ids is not None else ""))
        matched, ambiguous = _match_tagged(list(hrs), list(lrs))
        pairs = {k: (hrs[k], lrs[m]) for k, m in matched.items()}
    else:
        pairs = {k: (p, lrs[k]) for k, p in hrs.items() if k in lrs}
        matched, ambiguous = _match_tagged([k for k in hrs if k not in pairs], [k for k in lrs if k not in hrs])
        pairs |= {k: (hrs[k], lrs[m]) for k, m in matched.items()}
    for names in ambiguous:
        log.warning("not paired, as each of these names matches more than one image: %s", ", ".join(names))
    if not pairs:
        if ids is not None:  # what each folder holds in all, beside what the ids kept
            held = [_holds(kept, _image_files(d, exclude=skip + ([] if same else [other]), unique=False))
                    for kept, d, other in ((hrs, hr_dir, lr_dir), (lrs, lr_dir, hr_dir))]
        else:
            held = [_holds(hrs), _holds(lrs)]
        raise ValueError(
            f"no HR/LR pairs in {str(hr_dir)!r} ({held[0]}) and {str(lr_dir)!r} ({held[1]})"
            + (f" among the {len(ids)} selected ids" if ids is not None else "")
            + (f", {len(ambiguous)} name(s) ambiguous (see above)" if ambiguous else "")
            + ": images pair by their path below each folder without the suffix, or without a scale tag "
              "(x4, _x4, _LR4 / _HR, _GT, _x1)")
    paired_lr = {lp for _, lp in pairs.values()}
    alone = [str(p.relative_to(hr_dir)) for k, p in hrs.items() if k not in pairs]
    if alone:  # the table's mean is over the pairs found: say which images it leaves out
        log.warning("%d HR image(s) in %r have no LR image of the same name in %r and are left out: %s",
                    len(alone), str(hr_dir), str(lr_dir), _first_names(alone))
    extra = [str(p.relative_to(lr_dir)) for p in lrs.values() if p not in paired_lr]
    if extra:
        log.warning("%d LR image(s) in %r have no HR image of the same name in %r and are left out: %s",
                    len(extra), str(lr_dir), str(hr_dir), _first_names(extra))
    if left_out is not None:
        left_out.update(hr=alone, lr=extra, ambiguous=ambiguous)
    if ids is not None:
        _warn_missing_ids(ids, pairs)
    return [pairs[k] for k in sorted(pairs)]


_TAG = re.compile(r"^(?P<base>.+?)(?:[_\-.](?P<tag>hr|gt|x1|lr|lr4|lrx4|x4)|(?P<bare>x4))$", re.IGNORECASE)
_HR_TAGS, _LR_TAGS = {"hr", "gt", "x1"}, {"lr", "lr4", "lrx4", "x4"}


def _untag(key: str) -> tuple[str, str | None]:
    """``sub/Canon_001_LR4`` -> (``sub/Canon_001``, ``lr4``); ``0801x4`` -> (``0801``, ``x4``); a
    name without a scale tag -> (key, None). HR tags and LR tags but the bare ``x4`` need a
    separator (``cathr`` is a cat's name, not a cat's HR)."""
    folder, _, name = key.rpartition("/")
    m = _TAG.match(name)
    if m is None:
        return key, None
    return (f"{folder}/" if folder else "") + m["base"], (m["tag"] or m["bare"]).lower()


def _role(key: str) -> str | None:
    tag = _untag(key)[1]
    return "hr" if tag in _HR_TAGS else "lr" if tag in _LR_TAGS else None


def _match_tagged(hr_keys: list[str], lr_keys: list[str]) -> tuple[dict[str, str], list[list[str]]]:
    """HR key -> LR key for images that answer to one name, each answering to its key and, where it
    carries a scale tag of its side's kind (an HR tag on the HR side, an LR tag on the LR side),
    its key without it (``night_gt`` and ``night_gt_x4`` share ``night_gt``; ``0801`` and
    ``0801x4`` share ``0801``). Images linked through shared names pair only as one HR and one LR:
    a group with more (``a``, ``a_HR`` and ``a_x4``) pairs none and comes back as a list of keys,
    for a warning."""
    def names(key: str, role: str) -> set[str]:
        return {key, _untag(key)[0]} if _role(key) == role else {key}

    nodes = [("hr", k) for k in hr_keys] + [("lr", k) for k in lr_keys]
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, (side, key) in enumerate(nodes):
        for n in names(key, side):
            if n in owner:
                parent[find(i)] = find(owner[n])
            else:
                owner[n] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(nodes)):
        groups.setdefault(find(i), []).append(i)
    matched: dict[str, str] = {}
    ambiguous: list[list[str]] = []
    for members in groups.values():
        sides = [nodes[i][0] for i in members]
        if "hr" not in sides or "lr" not in sides:
            continue
        if len(members) == 2:
            (_, h), (_, lo) = sorted(nodes[i] for i in members)
            matched[h] = lo
        else:
            ambiguous.append(sorted(nodes[i][1] for i in members))
    return matched, sorted(ambiguous)


def _holds(files: dict[str, Path], every: dict[str, Path] | None = None) -> str:
    """What a folder holds: ``files``, or, where ids selected them, ``files`` of ``every`` image."""
    if every is not None:
        if not every:
            return "no images"
        some = f", e.g. {next(iter(files))!r}" if files else f", none of the selected ids, e.g. {next(iter(every))!r}"
        return f"{len(files)} of its {len(every)} image(s) selected{some}"
    if not files:
        return "no images"
    return f"{len(files)} image(s), e.g. {next(iter(files))!r}"


def _warn_missing_ids(ids: Collection[str] | Mapping[str, int | None], pairs: dict[str, object]) -> None:
    """Warn of ``ids`` without an image in ``pairs``; with sizes ({id: hr_size}, a manifest's),
    only of those of a size found here (a folder of 256-px crops lacks the 512-px ids by design)."""
    found = {k for k in pairs} | {_untag(k)[0] for k in pairs}
    sizes = ids if isinstance(ids, Mapping) else dict.fromkeys(ids)
    here = {sizes[i] for i in sizes if i in found}
    missing = sorted(i for i in sizes if i not in found and (sizes[i] in here or not here))
    other = sorted({sizes[i] for i in sizes if i not in found and sizes[i] not in here and here}, key=str)
    if other:
        log.info("ids of HR size %s are not in this folder (its images are of size %s)",
                 ", ".join(map(str, other)), ", ".join(sorted(map(str, here))))
    if missing:
        log.warning("%d of the %d selected ids have no image here: %s", len(missing),
                    sum(1 for i in sizes if sizes[i] in here or not here), _first_names(missing))


def _first_names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" …" if len(names) > n else "")


def _image_files(folder: str | Path, ids: Collection[str] | None = None, *,
                 exclude: list[str | Path] | None = None, unique: bool = True) -> dict[str, Path]:
    """The images below ``folder`` (recursively; by suffix; hidden files such as macOS's ``._x.png``
    skipped, and the files under each ``exclude`` folder that lies inside ``folder``, and under a
    folder holding an earlier eval's results.json and results.md, or its ``.upsr-eval`` mark: one
    stopped before its results, with saved images), keyed by their path below
    ``folder`` without the suffix (``/``-separated), in sorted order; ``ids`` keeps only the keys
    (with or without a scale tag) among them. Two images of one key are a ValueError, or with
    ``unique`` False the first is kept (to count what a folder holds)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} " + ("is a file, not a folder" if folder.exists()
                                                                    else "does not exist"))
    root = folder.resolve()
    skip = [r for r in (Path(e).resolve() for e in exclude or ()) if r != root and r.is_relative_to(root)]
    results = sorted({p.parent for p in folder.rglob("results.json") if (p.parent / "results.md").is_file()}
                     | {p.parent for p in folder.rglob(EVAL_MARK)})
    results = [r for r in results if r.resolve() != root]
    if results:
        log.info("%s: skipped %d folder(s) of earlier eval results: %s", folder, len(results),
                 _first_names([str(r.relative_to(folder)) for r in results]))
        skip += [r.resolve() for r in results]
    seen: dict[str, Path] = {}
    entries = sorted(folder.rglob("*"))
    log_unfollowed_links(entries, folder)
    for p in entries:
        if (p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file() or is_hidden(p, folder)
                or any(p.resolve().is_relative_to(s) for s in skip)):
            continue
        key = p.relative_to(folder).with_suffix("").as_posix()
        if ids is not None and key not in ids and _untag(key)[0] not in ids:
            continue
        if key in seen and not unique:  # (counting what a folder holds, for a message)
            continue
        if key in seen:  # images are paired by name: two with one name would count one image twice
            raise ValueError(f"{str(folder)!r} holds {str(seen[key].relative_to(folder))!r} and "
                             f"{str(p.relative_to(folder))!r}: images are paired by name without the suffix, "
                             "so keep one of them")
        seen[key] = p
    return dict(sorted(seen.items()))


def _full_reference(metrics: dict | None) -> list[str]:
    """The names of the pyiqa metrics among ``metrics`` that compare with an HR image."""
    return [n for n, m in (metrics or {}).items() if getattr(m, "metric_mode", "") == "FR"]


def lr_files(lr_dir: str | Path, ids: Collection[str] | None = None, *,
             exclude: str | Path | None = None) -> list[tuple[None, Path]]:
    """(None, lr) for every image below ``lr_dir`` (recursively; a no-reference run), sorted;
    ``ids`` keeps only those names (with or without a scale tag); ``exclude``: a folder skipped
    (as a folder of earlier eval results is)."""
    files = _image_files(lr_dir, ids, exclude=None if exclude is None else [exclude])
    if not files:
        why = (f" for the {len(ids)} selected ids" if ids is not None
               else f" (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        raise ValueError(f"no images in {str(Path(lr_dir))!r}{why}")
    if ids is not None:
        _warn_missing_ids(ids, files)
    return [(None, p) for p in files.values()]


def manifest_ids(path: str | Path, group: str, hr_size: int | None = None, *, label: str = "manifest") -> list[str]:
    """The ids of ``group`` (and, when given, of HR size ``hr_size``) in a make_pairs.py
    ``manifest.jsonl``, in file order. ValueError for a line that is not a JSON object with
    'id' and 'group' (and 'hr_size' when asked for), or for no match; ``label`` names the file
    in the message (the CLI's flag)."""
    entries = _read_manifest(path, group, label, need_size=hr_size is not None)
    ids = [i for i, size in entries.items() if hr_size is None or size == hr_size]
    if not ids:
        size = f" at HR {hr_size}" if hr_size is not None else ""
        raise ValueError(f"no entries of group {group!r}{size} in {label} {str(path)!r}")
    return ids


def manifest_entries(path: str | Path, group: str, *, label: str = "manifest",
                     need_size: bool = False) -> dict[str, int | None]:
    """{id: its 'hr_size' (None where the line has none)} of ``group`` in a make_pairs.py
    ``manifest.jsonl``, in file order; errors as :func:`manifest_ids`. As ``ids`` of
    :func:`pair_files`/:func:`lr_files`, the sizes say which ids belong in a folder of one crop
    size: only ids of a size found there are reported missing."""
    ids = _read_manifest(path, group, label, need_size)
    if not ids:
        raise ValueError(f"no entries of group {group!r} in {label} {str(path)!r}")
    return ids


def _read_manifest(path: str | Path, group: str, label: str, need_size: bool) -> dict[str, int | None]:
    ids: dict[str, int | None] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    if d["group"] == group:
                        if not isinstance(d["id"], str):  # an int 5 would never match the image 5.png
                            raise ValueError(f"{label} {str(path)!r} line {n}: 'id' must be a string (the image's "
                                             f"name without its suffix), got {type(d['id']).__name__} {d['id']!r}")
                        ids[d["id"]] = d["hr_size"] if need_size else d.get("hr_size")
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    want = "'id', 'group' and 'hr_size'" if need_size else "'id' and 'group'"
                    raise ValueError(f"{label} {str(path)!r} line {n}: expected a JSON object with {want} "
                                     f"({type(e).__name__}: {e})") from None
    return ids


def _pyiqa_metrics(names: list[str], device: torch.device) -> dict:
    if not names:
        return {}
    try:
        import pyiqa  # type: ignore[import-not-found]
    except ImportError as e:
        if e.name != "pyiqa":  # installed, but something it imports is missing or broken
            raise ValueError(f"--pyiqa {','.join(names)}: the pyiqa package is installed but does not import "
                             f"({type(e).__name__}: {e}); install what it names") from None
        raise ValueError(f"--pyiqa {','.join(names)} needs the pyiqa package (pip install pyiqa; it downloads "
                         "each metric's weights on first use)") from None
    out = {}
    for n in names:
        try:
            metric = pyiqa.create_metric(n, device=device)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"--pyiqa metric {n!r} unavailable: {e}") from None
        # pyiqa's psnr/ssim/niqe differ from eval's own (BasicSR's; iqa-torch's NIQE): a column of its own
        out[f"pyiqa_{n}" if n in BUILTIN_COLUMNS else n] = metric
    return out


def upsr_label(b_u: float, psi_max: float) -> str:
    """The row name of UPSR with (b_u, ψ_max): ``upsr`` for the official pair."""
    if (b_u, psi_max) == (DEFAULT_B_U, DEFAULT_PSI_MAX):
        return "upsr"
    return f"upsr {_grid_name(b_u, psi_max)}"


def method_folder(label: str) -> str:
    """The folder ``eval --save-images`` writes a method's outputs to: its row name without spaces
    (``upsr b_u=0.2 psi_max=0.05`` -> ``upsr_b_u=0.2_psi_max=0.05``)."""
    return label.replace(" ", "_")


def parse_grid(b_u: str, psi_max: str) -> list[tuple[float, float]]:
    """Comma lists '0.2,0.4' and '0.05' -> every (b_u, ψ_max) pair, b_u outer; checked as weight_noise does."""
    def values(name: str, text: str) -> list[float]:
        try:
            out = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--{name.replace('_', '-')} must be a comma list of numbers, got {text!r}") from None
        if not out:
            raise ValueError(f"--{name.replace('_', '-')} is empty: give at least one value")
        return out

    grid = [(b, m) for b in values("b_u", b_u) for m in values("psi_max", psi_max)]
    for b, m in grid:
        try:
            check_weight_params(b, m)
        except ValueError as e:
            raise ValueError(f"--b-u / --psi-max: {e}") from None
        if m > PSI_MAX_LIMIT:  # as upscale's --psi-max: a computed ψ never reaches more, so w would never be 1
            raise ValueError(f"--psi-max must be in (0, {PSI_MAX_LIMIT}] (a computed ψ never exceeds "
                             f"{PSI_MAX_LIMIT}), got {m}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"--b-u {b_u!r} / --psi-max {psi_max!r} repeat a value")
    # each pair is a row named by its values at 6 significant digits: two pairs of one name would be
    # one row (one dropped), and a pair named as the official one but not it would pass for it
    named: dict[str, tuple[float, float]] = {_grid_name(DEFAULT_B_U, DEFAULT_PSI_MAX): (DEFAULT_B_U, DEFAULT_PSI_MAX)}
    for g in grid:
        other = named.setdefault(_grid_name(*g), g)
        if other != g:
            raise ValueError(f"--b-u / --psi-max: the pairs {other} and {g} would both be named "
                             f"'{_grid_name(*g)}'; give values that differ in their first 6 significant digits")
    return grid


def _grid_name(b_u: float, psi_max: float) -> str:
    return f"b_u={b_u:g} psi_max={psi_max:g}"


NOISY_METHODS = ("upsr_w1", "upsr", "upsr_cf")
"""The methods whose result depends on the seed (``--seeds`` samples them)."""
BUILTIN_COLUMNS = ("psnr", "psnr_y", "ssim", "ssim_y", "niqe")
"""eval's own metric columns; a ``--pyiqa`` metric of one of these names gets the column ``pyiqa_<name>``."""


def _pyiqa_name(column: str) -> str:
    """The --pyiqa name of a metric column (``pyiqa_ssim`` -> ``ssim``)."""
    bare = column.removeprefix("pyiqa_")
    return bare if bare != column and bare in BUILTIN_COLUMNS else column


@torch.no_grad()
def run_methods(model, lr: torch.Tensor, methods: list[str], seed: int,
                grid: list[tuple[float, float]] | None = None, *, gray: bool = False) -> dict[str, torch.Tensor]:
    """lr (1,3,h,w) [0,1] -> {method: sr (1,3,4h,4w) in [0,1], 8-bit levels}.

    ``grid``: the (b_u, ψ_max) pairs of the ``upsr`` method (default: the official one); each
    is a key :func:`upsr_label` names, in grid order where ``upsr`` stands in ``methods``.
    ``gray``: a grayscale source; each output is its luma in 3 equal channels, the grayscale
    PNG that ``upscale`` writes for it (the networks' output has colour).
    """
    from .pipeline import default_weight

    grid = grid or [(DEFAULT_B_U, DEFAULT_PSI_MAX)]
    out = {}
    if "bicubic" in methods:
        out["bicubic"] = bicubic_x4(lr.float() * 2 - 1) * 0.5 + 0.5
    if any(m != "bicubic" for m in methods):
        est = model.estimate(lr)
        if "estimator" in methods:
            out["estimator"] = crop_hr(est.sr_estimate, est.size)
        if "upsr_w1" in methods:
            out["upsr_w1"] = model.denoise(est, torch.ones_like(est.bicubic_pm), seed=seed)
        if "upsr" in methods:
            for b_u, psi_max in grid:
                out[upsr_label(b_u, psi_max)] = model.denoise(est, default_weight(est, b_u, psi_max), seed=seed)
        if "upsr_cf" in methods:  # the official pair's sample (drawn here if the grid or the list lacks it)
            sr = out["upsr"] if "upsr" in out else model.denoise(est, default_weight(est), seed=seed)
            out["upsr_cf"] = wavelet_color_fix(sr.float().clamp(0, 1), lr.to(sr.device))
    keys = [k for m in methods for k in ([upsr_label(*g) for g in grid] if m == "upsr" else [m])]
    def levels(x: torch.Tensor) -> torch.Tensor:
        x = x.cpu().float().clamp(0, 1)
        if gray:  # the luma write_png takes, then its rounding
            x = luma(x).expand(-1, 3, -1, -1)
        return to_uint8_levels(x)

    return {k: levels(out[k]) for k in keys}


def mod_crop(hr: torch.Tensor, lr_size: tuple[int, int], name: str, paired_with: str | None = None) -> torch.Tensor:
    """HR (B,3,H,W) cut to ×4 of ``lr_size`` (h, w) at the top left where H, W are 4h..4h+3 and
    4w..4w+3 (LR made from an HR whose sides are not multiples of 4, as BasicSR's and UPSR's
    test sets: the same crop, logged); any other size is a ValueError naming both sizes, and
    ``paired_with`` (the LR image's name), so that a wrong pairing shows."""
    h, w = check_x4(tuple(hr.shape[-2:]), lr_size, name, paired_with)
    if hr.shape[-2:] != (h, w):
        log.info("%s: HR %s cropped to %s (×4 of the LR), at the top left", name, tuple(hr.shape[-2:]), (h, w))
    return hr[..., :h, :w]


def check_x4(hr_size: tuple[int, int], lr_size: tuple[int, int], name: str,
             paired_with: str | None = None) -> tuple[int, int]:
    """``(4h, 4w)`` for an LR of ``lr_size`` (h, w) when the HR's ``hr_size`` is 4h..4h+3 by
    4w..4w+3 (what :func:`mod_crop` cuts it to); any other size is the ValueError mod_crop names."""
    h, w = (4 * s for s in lr_size)
    if not (h <= hr_size[0] < h + 4 and w <= hr_size[1] < w + 4):
        lr_name = f" ({paired_with})" if paired_with else ""
        raise ValueError(f"{name}: HR {tuple(hr_size)} is not ×4 of LR {tuple(lr_size)}{lr_name} (or up to 3 px "
                         "more)" + (": is that its LR image? (the model is ×4 only)" if paired_with else ""))
    return h, w


def check_pairs(pairs: list[tuple[Path | None, Path]], crop_border: int = 0) -> None:
    """Every pair's sizes from the files' headers (:func:`~upsr_core.imageio.image_size`), before
    any image is scored: an HR that is not ×4 of its LR (:func:`check_x4`), an unreadable header,
    or an HR too small for SSIM's 11-px window after ``crop_border``, found at image 900 of 1000,
    would stop the run there. A ValueError naming the first such file."""
    for hp, lp in pairs:
        lr_size = image_size(lp)
        if hp is None:
            continue
        h, w = check_x4(image_size(hp), lr_size, str(hp), paired_with=str(lp))
        if min(h, w) - 2 * crop_border < SSIM_WINDOW:
            raise ValueError(f"{hp}: {h}×{w} px (×4 of its LR) is " + (f"{h - 2 * crop_border}×{w - 2 * crop_border} "
                             f"after --crop-border {crop_border}; " if crop_border else "")
                             + f"SSIM needs at least {SSIM_WINDOW}×{SSIM_WINDOW}")


def evaluate(model, pairs: list[tuple[Path | None, Path]], methods: list[str], *, seed: int = 0, seeds: int = 1,
             crop_border: int = 0, niqe_params=None, extra: dict | None = None, keep: int = 0,
             grid: list[tuple[float, float]] | None = None, save_dir: str | Path | None = None,
             root: str | Path | None = None) -> tuple[dict, list]:
    """Metrics per image and method -> ({method: {metric: mean}}, per-image rows); also returns
    the first ``keep`` images' outputs inside the rows (key 'images') for the contact sheet.

    A value that is not finite (PSNR is ∞ where an output equals its HR; NIQE is NaN on an image
    under 96 px or without a textured 96-px block, e.g. a flat one) stays in its row, and that image is left out
    of that metric's mean for every method, so the means compare the same images
    (:func:`unscored`; logged as a warning). A metric with no finite value left has mean NaN.

    ``seeds``: each UPSR method (:data:`NOISY_METHODS`: the ones with noise) is scored on this
    many samples, seeds ``seed`` … ``seed + seeds − 1``, and its row holds each metric's mean over
    them (a value not finite for any sample makes the mean not finite) and, under ``per_seed``,
    every sample's scores; the kept images are the first sample's.

    ``pairs``: (hr, lr) paths (:func:`pair_files`), or all (None, lr) for a no-reference run
    (:func:`lr_files`): then only NIQE and the no-reference ``extra`` metrics are computed.
    ``save_dir``: each method's output is also written there as the 8-bit PNG that was scored,
    ``save_dir/<method>/<image>.png`` (:func:`method_folder`; ``<image>`` the row's name), for
    other scoring tools or a side-by-side look. ``root``: the folder the row names are paths
    below (eval: ``--hr``, else ``--lr``), so a subset's rows are named as in the whole set;
    default: the folder the images share.

    Every pair's sizes are checked from the files' headers first (:func:`check_pairs`). An error
    part-way (an image that cannot be decoded or scored) is raised as it is, with the scores of the
    images done before it as its ``partial_results`` attribute, ``(means, rows)``; Ctrl-C or SIGTERM
    after some images is :class:`EvalInterrupted`, carrying the same.
    """
    if not pairs:
        raise ValueError("pairs is empty: give at least one (hr, lr) or (None, lr) pair")
    if not is_int(seeds) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    _check_seed(seed, seeds)  # seed … seed + seeds − 1 must all be seeds, as for a batch of that many images
    no_ref = pairs[0][0] is None
    odd = next(((hp, lp) for hp, lp in pairs if (hp is None) != no_ref), None)
    if odd is not None:
        raise ValueError(f"pairs must all have an HR image or all have none (a no-reference run): the first pair "
                         f"has {'none' if no_ref else pairs[0][0]}, the pair of {odd[1]} has "
                         f"{'none' if odd[0] is None else odd[0]}")
    full_ref = _full_reference(extra)
    if no_ref:
        if full_ref:
            raise ValueError(f"metric(s) {full_ref} are full-reference: they need HR images")
        if niqe_params is None and not extra:
            raise ValueError("a no-reference run has nothing to measure: give NIQE's parameters or "
                             "no-reference pyiqa metrics")
    check_pairs(pairs, crop_border)
    rows: list = []
    try:
        _score_pairs(model, pairs, methods, (seed, seeds), crop_border, niqe_params, extra, full_ref, keep, grid, rows,
                     None if save_dir is None else Path(save_dir), root)
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, SIGTERM (the CLI's handler): keep what is done
        if not rows:
            raise
        code = 130 if isinstance(e, KeyboardInterrupt) else e.code
        raise EvalInterrupted(_means(rows), rows, code if isinstance(code, int) else 130) from None
    except Exception as e:  # an image that cannot be read or scored, after others were: theirs travel with it
        if rows:
            e.partial_results = (_means(rows), rows)
        raise
    return _means(rows), rows


def unscored(rows: list) -> dict[str, list[str]]:
    """{metric: names of the images left out of its means}: those where any method's value of
    that metric is not finite (see :func:`evaluate`); metrics without such an image are absent."""
    out: dict[str, list[str]] = {}
    for r in rows:
        for k in dict.fromkeys(k for v in r["metrics"].values() for k in v):
            if not all(math.isfinite(v[k]) for v in r["metrics"].values() if k in v):
                out.setdefault(k, []).append(r["image"])
    return out


class EvalInterrupted(KeyboardInterrupt):
    """:func:`evaluate` stopped by Ctrl-C or SIGTERM after some images: ``means`` and ``rows`` of
    those (as evaluate returns them), ``code`` the exit code the signal asks for (130, 143)."""

    def __init__(self, means: dict, rows: list, code: int):
        super().__init__(f"interrupted after {len(rows)} image(s)")
        self.means, self.rows, self.code = means, rows, code


def _means(rows: list) -> dict:
    """{method: {metric: mean over the images with finite values of it for every method}}, logging
    the images left out (:func:`unscored`)."""
    left = unscored(rows)
    for k, names in left.items():
        log.warning("%s is not finite for %d image(s) (%s%s): left out of its means for every method (%s)",
                    k, len(names), ", ".join(names[:3]), ", …" if len(names) > 3 else "",
                    f"NIQE: smaller than {NIQE_BLOCK} px or no textured {NIQE_BLOCK}-px block" if k == "niqe"
                    else "PSNR: an output equal to its HR" if k.startswith("psnr") else "see results.json")

    def mean(m: str, k: str) -> float:
        vals = [r["metrics"][m][k] for r in rows if r["image"] not in left.get(k, ())]
        return statistics.fmean(vals) if vals else math.nan

    return {m: {k: mean(m, k) for k in rows[0]["metrics"][m]} for m in rows[0]["metrics"]}


LOWER_IS_BETTER = frozenset({"niqe"})
"""The built-in metrics where lower is better (PSNR and SSIM: higher); pyiqa's metrics say it
themselves (``lower_better``)."""


def paired(rows: list, reference: str = "bicubic", lower_better: Collection[str] = LOWER_IS_BETTER) -> dict:
    """Every other method against ``reference``, image by image: {method: {metric: {"diff": mean of
    (method − reference), "se": the standard error of that mean (NaN for one image), "better":
    images where the method is better (``lower_better`` metrics: lower), "n": images}}}, over the
    images each metric's mean is taken over (:func:`unscored` left out). A mean difference of
    0.3 dB with a standard error of 0.2 is within the spread of the images; the table's means
    alone cannot say that. {} if ``reference`` is not among the methods."""
    if not rows or reference not in rows[0]["metrics"]:
        return {}
    left = unscored(rows)
    out: dict = {}
    for m in rows[0]["metrics"]:
        if m == reference:
            continue
        out[m] = {}
        for k in rows[0]["metrics"][m]:
            d = [r["metrics"][m][k] - r["metrics"][reference][k] for r in rows if r["image"] not in left.get(k, ())]
            sign = -1.0 if k in lower_better else 1.0
            out[m][k] = {"diff": statistics.fmean(d) if d else math.nan,
                         "se": statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan,
                         "better": sum(sign * x > 0 for x in d), "n": len(d)}
    return out


def paired_table(cmp: dict, reference: str = "bicubic") -> str:
    """Markdown table of :func:`paired`: "+0.270 ± 0.051 (25/32)" = mean difference ± its
    standard error (images better / images); "" if there is nothing to compare."""
    if not cmp:
        return ""
    keys = list(next(iter(cmp.values())))
    lines = [f"| against {reference} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, r in cmp.items():
        cells = []
        for k in keys:
            c = r[k]
            f = ".4f" if "ssim" in k else ".3f"
            cells.append("–" if not math.isfinite(c["diff"]) else
                         f"{c['diff']:+{f}}" + ("" if not math.isfinite(c["se"]) else f" ± {c['se']:{f}}")
                         + f" ({c['better']}/{c['n']})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite_or_none(obj):
    """``obj`` with every non-finite float as None, for strict JSON (no NaN/Infinity tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _score_pairs(model, pairs, methods, seeds: tuple[int, int], crop_border, niqe_params, extra, full_ref, keep, grid,
                 rows: list, save_dir: Path | None, root: str | Path | None) -> None:
    """The loop of :func:`evaluate`: appends one row per pair to ``rows`` as it finishes.
    ``seeds``: (first seed, number of samples of the methods with noise)."""
    seed, n_seeds = seeds
    noisy = [m for m in methods if m in NOISY_METHODS]
    names = _row_names(pairs, root)
    for i, (hp, lp) in enumerate(pairs):
        lr_img = read_image(lp)
        lr = lr_img.rgb[None]
        hr = None
        if hp is not None:
            hr_img = read_image(hp)
            if hr_img.gray != lr_img.gray:  # the colour image is scored against grey: PSNR means little
                log.warning("%s: the HR image is %s but the LR image is %s", hp,
                            *(("grayscale", "colour") if hr_img.gray else ("colour", "grayscale")))
            hr = mod_crop(hr_img.rgb[None], lr.shape[-2:], str(hp), paired_with=str(lp))
        for img, path in ((lr_img, lp), *(((hr_img, hp),) if hp is not None else ())):
            if img.alpha is not None and bool((img.alpha < 1).any()):  # scored: the colour under it too
                log.warning("%s: has transparent pixels; the scores count their hidden colour too (composite the "
                            "pairs over one background first to score what is seen)", path)
        outs = run_methods(model, lr, methods, seed, grid, gray=lr_img.gray)
        row = {"image": names[i], "metrics": {}}
        for m, sr in outs.items() if save_dir is not None else ():
            write_png(save_dir / method_folder(m) / f"{names[i]}.png", sr[0], gray=lr_img.gray)
        samples = [outs] + [run_methods(model, lr, noisy, seed + k, grid, gray=lr_img.gray)
                            for k in range(1, n_seeds if noisy else 1)]
        per_seed: dict[str, list[dict[str, float]]] = {}
        for sample in samples:
            for m, sr in sample.items():
                try:
                    per_seed.setdefault(m, []).append(_scores(sr, hr, crop_border, niqe_params, extra, full_ref))
                except ValueError as e:  # e.g. SSIM's 11-px window on a small image after --crop-border
                    raise ValueError(f"{row['image']}: {e}"
                                     + (f" (after --crop-border {crop_border})" if crop_border else "")) from None
        row["metrics"] = {m: {k: statistics.fmean(s[k] for s in v) for k in v[0]} for m, v in per_seed.items()}
        if n_seeds > 1 and noisy:
            row["per_seed"] = {m: v for m, v in per_seed.items() if len(v) > 1}
        if i < keep:
            row["images"] = {"lr": lr, **outs} | ({} if hr is None else {"hr": hr})
        rows.append(row)
        log.info("%d/%d %s  %s", i + 1, len(pairs), row["image"],
                 "  ".join(f"{m} {_label(row['metrics'][m])}" for m in outs))


def _row_names(pairs: list[tuple[Path | None, Path]], root: str | Path | None = None) -> list[str]:
    """The name each pair goes by in the table, the log, the sheet and ``save_dir``: the HR image's
    (else the LR image's) path below ``root`` (default: the folder all of them share) without the
    suffix; a flat folder: the stem."""
    paths = [Path(os.path.abspath(lp if hp is None else hp)) for hp, lp in pairs]
    base = Path(os.path.commonpath([p.parent for p in paths])) if root is None else Path(os.path.abspath(root))
    bad = next((p for p in paths if not p.is_relative_to(base)), None)
    if bad is not None:
        raise ValueError(f"root {str(root)!r}: the image {str(bad)!r} is not below it")
    return [p.relative_to(base).with_suffix("").as_posix() for p in paths]


def _scores(sr: torch.Tensor, hr: torch.Tensor | None, crop_border: int, niqe_params, extra: dict | None,
            full_ref: list[str]) -> dict[str, float]:
    """The metrics of one result ``sr`` (1,3,H,W) in [0,1] against ``hr`` (or none: no-reference),
    each on the image less ``crop_border`` px on every side. NIQE is NaN (left out of the means, as
    for an image without a textured block) where a side is under NIQE's 96-px block."""
    r = {}
    if hr is not None:
        r = {"psnr": float(psnr(sr, hr, crop_border=crop_border)[0]),
             "psnr_y": float(psnr(sr, hr, crop_border=crop_border, y_channel=True)[0]),
             "ssim": float(ssim(sr, hr, crop_border=crop_border)[0]),
             "ssim_y": float(ssim(sr, hr, crop_border=crop_border, y_channel=True)[0])}
    if niqe_params is not None:
        small = min(sr.shape[-2:]) - 2 * crop_border < NIQE_BLOCK
        r["niqe"] = math.nan if small else float(niqe(sr, niqe_params, crop_border=crop_border)[0])
    if extra and crop_border:
        sr, hr = (None if x is None else x[..., crop_border:-crop_border, crop_border:-crop_border] for x in (sr, hr))
    for name, metric in (extra or {}).items():
        dev = getattr(metric, "device", "cpu")
        r[name] = float(metric(sr.to(dev), hr.to(dev)) if name in full_ref else metric(sr.to(dev)))
    return r


def table(means: dict) -> str:
    """Markdown table: one row per method, one column per metric."""
    keys = list(next(iter(means.values())))
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, r in means.items():
        lines.append(f"| {m} | " + " | ".join("–" if not math.isfinite(r[k]) else f"{r[k]:.4f}" if "ssim" in k
                                              else f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


# column titles of the contact sheet (ASCII: PIL's default font); sweep labels pass through
SHEET_TITLES = {"lr": "LR (nearest x4)", "bicubic": "bicubic", "estimator": "g(y) (estimator)",
                "upsr_w1": "UPSR, w = 1", "upsr": "UPSR", "upsr_cf": "UPSR + colour fix", "hr": "HR"}


def _label(metrics: dict[str, float]) -> str:
    """A method's headline number: RGB PSNR, else NIQE, else its first metric."""
    if "psnr" in metrics:
        return f"PSNR {metrics['psnr']:.2f} dB"
    key = "niqe" if "niqe" in metrics else next(iter(metrics))
    return f"{key.upper() if key == 'niqe' else key} {metrics[key]:.3f}"


def sheet_view(size: tuple[int, int], tile: int) -> tuple[int, int, int, int, int]:
    """Which part of a ×4 output of ``size`` (H, W) a contact-sheet tile shows, and how large:
    ``(top, left, height, width, zoom)`` — the centre region that fits ``tile`` at ``zoom``
    (an integer: 1 unless the whole image fits the tile twice or more), its corners on multiples
    of 4 so that the LR's region is whole pixels (top/4 … (top + height)/4)."""
    h, w = size
    zoom = max(1, tile // max(h, w))
    rh, rw = (min(n, tile // zoom) // 4 * 4 for n in (h, w))
    return (h - rh) // 8 * 4, (w - rw) // 8 * 4, rh, rw, zoom


def _sheet_tile(x: torch.Tensor, view: tuple[int, int, int, int, int], scale: int, tile: int) -> Image.Image:
    """(3, H, W) in [0, 1] at ``1/scale`` of the output's resolution (4 for the LR, 1 for the
    others): the :func:`sheet_view` region, nearest-neighbour enlarged by ``scale`` × zoom (pixels
    shown as they are, not resampled), centred on a white tile."""
    top, left, h, w, zoom = view
    x = x[:, top // scale:(top + h) // scale, left // scale:(left + w) // scale].clamp(0, 1)
    a = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    if scale * zoom > 1:
        im = im.resize((im.width * scale * zoom, im.height * scale * zoom), Image.NEAREST)
    out = Image.new("RGB", (tile, tile), (255, 255, 255))
    out.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return out


def _row_name(name: str, tile: int) -> str:
    """An image's name for its row of the sheet: ASCII (PIL's default font), the end of it where it
    is longer than the tile holds (~6 px a character)."""
    text = name.encode("ascii", "replace").decode()
    room = max(4, (tile - 14) // 6)
    return text if len(text) <= room else "..." + text[-(room - 3):]


def contact_sheet(rows: list, methods: list[str], path: Path, tile: int = 192) -> None:
    """PNG grid: a row per image, columns LR (nearest ×4), methods, HR (when there is one). Every
    tile of a row shows the same centre region pixel for pixel (:func:`sheet_view`: a crop of a
    large image, an integer nearest-neighbour zoom of a small one; no resampling, which would blur
    the texture the methods differ in); each method's tile carries its RGB PSNR (NIQE in a
    no-reference run) on a dark box (readable on light and dark images) — of the sample shown
    (the first seed) where ``--seeds`` scored more — and the LR tile the image's name."""
    rows = [r for r in rows if "images" in r]
    if not rows:
        return
    cols = ["lr", *methods] + (["hr"] if "hr" in rows[0]["images"] else [])
    head = 16
    sheet = Image.new("RGB", (tile * len(cols), head + tile * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        draw.text((j * tile + 4, 2), SHEET_TITLES.get(c, c), fill=(0, 0, 0))
    for i, r in enumerate(rows):
        view = sheet_view(tuple(r["images"][methods[0]].shape[-2:]), tile)
        shown = {m: v[0] for m, v in r.get("per_seed", {}).items()}  # the first seed's sample is the one kept
        for j, c in enumerate(cols):
            im = _sheet_tile(r["images"][c][0], view, 4 if c == "lr" else 1, tile)
            sheet.paste(im, (j * tile, head + i * tile))
            # the LR tile carries the image's name (its end, where names differ), the others their score
            label = (_row_name(r.get("image", ""), tile) if c == "lr"
                     else _label(shown.get(c, r["metrics"][c])) if c in r["metrics"] else "")
            if label:
                xy = (j * tile + 4, head + i * tile + 4)
                left, top, right, bottom = draw.textbbox(xy, label)
                draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=(0, 0, 0))
                draw.text(xy, label, fill=(255, 255, 255))
    with write_atomically(path) as f:
        sheet.save(f, format="PNG")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .batch import check_writable
    from .cli import _device, _dtype, default_model_path
    from .model import load_upsr

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise ValueError(f"--method: {f'unknown {bad}' if bad else f'empty ({args.method!r})'}; choose from "
                         f"{', '.join(ALL_METHODS)}")
    if (args.manifest is None) != (args.group is None):
        raise ValueError("--manifest and --group go together")
    grid = parse_grid(str(DEFAULT_B_U) if args.b_u is None else args.b_u,
                      str(DEFAULT_PSI_MAX) if args.psi_max is None else args.psi_max)
    given = [f for f, v in (("--b-u", args.b_u), ("--psi-max", args.psi_max)) if v is not None]
    if given and "upsr" not in methods:  # (upsr_cf keeps the official pair whatever the sweep)
        raise ValueError(f"{' and '.join(given)} set the upsr method's weighting, and --method {args.method!r} "
                         "has no upsr")
    if methods == ["bicubic"]:  # no model runs: say so (results.json records none)
        unused = [f for f, v in (("--model", args.model), ("--estimator", args.estimator), ("--fast", args.fast),
                                 ("--dtype", args.dtype != "fp32")) if v]
        if unused:
            log.warning("%s: settings of the model, and --method 'bicubic' runs none (not used)", ", ".join(unused))
    if args.seeds > 1 and not any(m in NOISY_METHODS for m in methods):
        raise ValueError(f"--seeds {args.seeds}: none of --method {args.method!r} draws noise (only "
                         f"{', '.join(NOISY_METHODS)} do); bicubic and g(y) run once")
    if args.seed + args.seeds - 1 > 2**63 - 1:
        raise ValueError(f"--seed {args.seed} with --seeds {args.seeds}: the last seed, {args.seed + args.seeds - 1}, "
                         "is past 2**63 − 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file; expected a folder for the results")
    for flag, folder in (("--hr", args.hr), ("--lr", args.lr)):
        if folder is None:
            continue
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{flag} {folder!r} " + ("is a file, not a folder" if Path(folder).exists()
                                                             else "does not exist"))
        if is_inside(Path(folder), out):
            raise ValueError(f"--out {args.out!r} is, or holds, the {flag} folder {folder!r}: the results would be "
                             "read as images of the set next time; give a folder of their own (default runs/eval)")
    check_writable({out / "images" if args.save_images else out}, flag="--out")  # not after hours of scoring
    ids = manifest_entries(args.manifest, args.group, label="--manifest") if args.manifest else None
    unpaired: dict = {}  # recorded in results.json: two runs over different coverage must not look alike
    pairs = (pair_files(args.hr, args.lr, ids, exclude=out, left_out=unpaired) if args.hr is not None
             else lr_files(args.lr, ids, exclude=out))[: args.limit]
    pyiqa_names = [n.strip() for n in args.pyiqa.split(",") if n.strip()]
    no_ref = args.hr is None
    params = None
    # --niqe-params, else $UPSR_NIQE_PARAMS: a file either names is not optional; "off" in either skips NIQE
    named, choice = (("--niqe-params", args.niqe_params) if args.niqe_params is not None
                     else ("$UPSR_NIQE_PARAMS", os.environ.get("UPSR_NIQE_PARAMS") or None))
    if no_ref and choice == "off" and not pyiqa_names:
        raise ValueError(f"a no-reference run (no --hr) with {named} off measures nothing: "
                         "give --pyiqa clipiqa,musiq,maniqa or NIQE")
    if choice == "off":
        log.info("NIQE off (%s off)", named)
    else:
        try:
            params = load_niqe_params(choice)
        except NIQEUnavailable as e:
            if choice is not None:
                raise ValueError(f"{named} {choice!r}: {e}") from None
            if no_ref and not pyiqa_names:  # NIQE is all a no-reference run would measure
                raise ValueError(f"a no-reference run (no --hr) needs NIQE or --pyiqa metrics, and NIQE is "
                                 f"unavailable: {e}") from None
            log.warning("NIQE skipped: %s", e)
    dev = _device(args.device)
    extra = _pyiqa_metrics(pyiqa_names, dev)
    full_ref = _full_reference(extra)
    if no_ref and full_ref:
        raise ValueError(f"--pyiqa {','.join(map(_pyiqa_name, full_ref))}: full-reference, needs --hr; a "
                         "no-reference run takes "
                         "clipiqa, musiq, maniqa, niqe …")
    model_path = args.model or default_model_path()
    dtype = _dtype(args.dtype, dev)
    model = load_upsr(model_path, args.estimator, device=dev, dtype=dtype) if methods != ["bicubic"] else None
    if model is not None and args.fast:
        from .fast import enable_fast

        enable_fast(model)
    if args.save_images:  # a run stopped before its results (kill -9) still marks its images as no set's
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / EVAL_MARK, "upsr_core eval output: the images below are results, not a test set\n")
    stopped = failed = None
    try:
        means, rows = evaluate(model, pairs, methods, seed=args.seed, seeds=args.seeds, crop_border=args.crop_border,
                               niqe_params=params, extra=extra, keep=args.sheet, grid=grid,
                               save_dir=out / "images" if args.save_images else None,
                               root=args.lr if args.hr is None else args.hr)
    except EvalInterrupted as e:  # hours into a large set: the images done are written, marked partial
        means, rows, stopped = e.means, e.rows, e.code
    except Exception as e:  # an image that cannot be decoded or scored: the ones before it are written, then e
        if not hasattr(e, "partial_results"):
            raise
        (means, rows), failed = e.partial_results, e
    out.mkdir(parents=True, exist_ok=True)
    md = table(means)
    lower = LOWER_IS_BETTER | {k for k, v in (extra or {}).items() if getattr(v, "lower_better", False)}
    # every method against bicubic; UPSR (each weighting of a sweep) against UPSR without weighting
    cmp = {ref: {m: c for m, c in paired(rows, ref, lower).items() if wanted(m)}
           for ref, wanted in (("bicubic", lambda m: True), ("upsr_w1", lambda m: m.startswith("upsr")))}
    cmp = {ref: c for ref, c in cmp.items() if c}
    cmp_md = "\n\n".join(paired_table(c, ref) for ref, c in cmp.items())
    if cmp_md:
        low = sorted(k for k in next(iter(means.values())) if k in lower)
        cmp_md += ("\n\nImage by image: the mean difference ± its standard error (images where the method is "
                   f"better / images; {'lower is better for ' + ', '.join(low) if low else 'higher is better'}).\n")
    left = unscored(rows)  # (evaluate logged them)
    info = {"model": str(model_path) if model is not None else None, "pairs": len(pairs),
            "hr": args.hr and str(args.hr), "lr": str(args.lr), "manifest": args.manifest and str(args.manifest),
            "unpaired": unpaired or None,
            "group": args.group, "limit": args.limit, "seed": args.seed, "seeds": args.seeds,
            "crop_border": args.crop_border,
            "niqe": params is not None,
            "niqe_luma": "gray" if params is not None else None,
            "path": ("fast" if args.fast else "reference") if model is not None else None,
            "dtype": str(dtype).removeprefix("torch.") if model is not None else None,
            "b_u_psi_max": grid if "upsr" in methods else None,
            "images": str(out / "images") if args.save_images else None,
            "partial": (f"interrupted after {len(rows)} of {len(pairs)}" if stopped is not None else
                        f"stopped by an error after {len(rows)} of {len(pairs)}: {failed}" if failed is not None
                        else None),
            "left_out_of_means": left}  # {metric: images}; their values are null (not finite)
    doc = {"info": info, "mean": means, "paired": cmp,
           "per_image": [{k: v for k, v in r.items() if k != "images"} for r in rows]}
    write_text(out / "results.json", json.dumps(_finite_or_none(doc), indent=1, allow_nan=False) + "\n")
    what = f"{len(pairs)} pairs" if args.hr is not None else f"{len(pairs)} images, no reference"
    if stopped is not None or failed is not None:
        what = f"PARTIAL: the first {len(rows)} of {what} ({'interrupted' if failed is None else f'error: {failed}'})"
    left_md = "".join(f"\n{k}: left out of the means (not finite for some method): {', '.join(v)}\n"
                      for k, v in left.items())
    by = f", model {model_path}" if model is not None else ""
    write_text(out / "results.md", f"{what}{by}\n\n{md}\n{left_md}" + (f"\n{cmp_md}" if cmp_md else ""))
    if args.sheet:
        contact_sheet(rows, list(means), out / "contact_sheet.png")
    print(md)
    if cmp_md:
        print("\n" + cmp_md, end="")
    if stopped is not None or failed is not None:
        print(f"{'interrupted' if failed is None else 'stopped by an error'} after {len(rows)} of {len(pairs)} "
              f"images: the means above are theirs, written to {out / 'results.json'} (marked partial)",
              file=sys.stderr)
    if failed is not None:
        raise failed
    return stopped or 0
