"""`upscale` over files and folders: streaming, resumable, sharded over torchrun ranks.

Every input file is its own image under the seed contract (its noise comes from
``seed``), so a file's result does not depend on the folder, the batch or the rank.
``--batch N`` runs up to N consecutive same-size images of one tile row in one ``upscale``
call (the fast path batches them on the device: more images per second on a GPU); the
reference path gives the same bytes as one by one, the fast path the same up to float rounding.
Existing outputs are skipped unless ``--overwrite``: an interrupted run resumes.
With ``torchrun --nproc-per-node N``, rank r takes files r, r+N, … (no process pool).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .cliargs import check_tiling_flags
from .colorfix import StreamedColorFix, bicubic_rows, wavelet_color_fix
from .imageio import (
    IMAGE_SUFFIXES,
    LoadedImage,
    PngStreamWriter,
    check_input_file,
    is_hidden,
    is_inside,
    log_unfollowed_links,
    read_image,
    same_place,
    write_png,
)
from .model import DEFAULT_OVERLAP, UPSRModel, load_upsr
from .pipeline import SCALE, padded_size, starting_noise
from .tiling import plan_tiles
from .uncertainty import check_weight_params

__all__ = ["run_upscale", "collect_inputs", "plan_outputs"]

log = logging.getLogger("upsr_core")


def collect_inputs(items: list[str], output: str | None = None) -> list[tuple[Path, Path]]:
    """Expand files and folders -> [(file, root)] in sorted order; root is the folder given.
    ``output``: the output folder; where it lies inside an input folder, the files under it
    (earlier results) are not inputs."""
    out: list[tuple[Path, Path]] = []
    skip = Path(output).resolve() if output else None
    by: dict[Path, tuple[int, str]] = {}  # each file (by the folder it is listed in) -> the argument that gave it
    for k, it in enumerate(items):
        p = Path(it)
        if p.is_dir():
            if skip is not None and same_place(skip, p):
                # the results (x.png beside x.jpg) would be inputs of the next run, so a resume failed
                raise ValueError(f"-o {output!r} is the input folder {it!r} itself: the next run would read the "
                                 f"results as inputs; write to another folder (e.g. {str(Path(it) / 'x4')!r})")
            inner = skip is not None and is_inside(skip, p)
            entries = list(p.rglob("*"))
            log_unfollowed_links(entries, it)
            found = [f for f in entries if f.is_file() and not (inner and is_inside(f, skip))]
            shown = [f for f in found if not is_hidden(f, p)]
            if len(shown) < len(found):
                log.info("%s: %d hidden file(s) skipped (names starting with '.', __MACOSX/)", it,
                         len(found) - len(shown))
                found = shown
            files = sorted(f for f in found if f.suffix.lower() in IMAGE_SUFFIXES)
            if inner:
                _warn_of_foreign_files(entries, files, p, skip, it, output)
            others = sorted({f.suffix.lower() or "(none)" for f in found} - IMAGE_SUFFIXES)
            if others:  # a .gif, say, is read when named, not from a folder: say so (also under -q)
                log.warning("%s: %d file(s) with other suffixes skipped (%s)", it, len(found) - len(files),
                            ", ".join(others))
            if not files:
                raise ValueError(f"folder {it!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            new = [(f, p) for f in files]
        else:
            check_input_file(p)  # missing, or a pipe, device or socket: named
            new = [(p, p.parent)]
        for f, _ in new:  # `upscale in in/sub`: in/sub/x.png would be upscaled twice, to two names
            j, first = by.setdefault(f.parent.resolve() / f.name, (k, it))
            if j != k:
                raise ValueError(f"input {str(f)!r} is given twice, through {first!r} and {it!r}: give it once")
        out += new
    return out


def _warn_of_foreign_files(entries: list[Path], files: list[Path], root: Path, out: Path, given: str,
                           output: str) -> None:
    """-o inside the input folder ``given``: the images under it are left out as earlier results.
    Those that are not what this run writes (OUT/<path below root>.png of an input) may be inputs
    put there: a warning names them (they were dropped without a word)."""
    ours = {(out / f.relative_to(root).with_suffix(".png")).resolve() for f in files}
    foreign = sorted(f for f in entries if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                     and is_inside(f, out) and not is_hidden(f, root) and f.resolve() not in ours)
    if foreign:
        log.warning("-o %r lies inside the input folder %r, so its images are not read: %d of them are not outputs "
                    "of this run and are left out too: %s", output, given, len(foreign),
                    ", ".join(str(f) for f in foreign[:3]) + (" …" if len(foreign) > 3 else ""))


def plan_outputs(inputs: list[tuple[Path, Path]], output: str, single: bool) -> list[Path]:
    """Output paths: OUT itself for one input file and OUT named .png, else OUT/<relative path>.png
    (OUT a folder: an existing one, or a name without .png). Refuses two inputs that would write
    the same file and an output that is its own input."""
    out = Path(output)
    is_folder = output.endswith(("/", "\\")) or out.is_dir() or out.suffix.lower() != ".png"
    if single and not is_folder:
        outs = [out]
    elif out.exists() and not out.is_dir():
        raise NotADirectoryError(f"-o {output!r} must be a folder when "
                                 + ("several images are given" if not single else
                                    f"it ends in a separator, and {str(out)!r} is a file"
                                    if output.endswith(("/", "\\")) else "it does not end in .png"))
    elif not single and not is_folder:
        given = f"{len(inputs)} images are given" if len(inputs) > 1 else "the input is a folder"
        raise ValueError(f"-o {output!r} names a .png file, but {given}: pass a folder")
    else:
        outs = [out / f.relative_to(root).with_suffix(".png") for f, root in inputs]
    seen: dict[Path, Path] = {}
    sources: dict[Path, Path] = {}
    for (src, _), dst in zip(inputs, outs):
        # by the folder it is listed in, not by what a link points to: two links to one file (a
        # git-annex or DVC folder, deduplicated frames) are two inputs; `in in/sub` is one file twice
        first = sources.setdefault(src.parent.resolve() / src.name, src)
        if first is not src:  # (collect_inputs refuses this naming the arguments; here for other callers)
            raise ValueError(f"input {str(src)!r} is given twice (as {str(first)!r} too: a file, or one inside a "
                             "folder given too): give it once")
        if dst.is_dir():
            raise ValueError(f"-o {output!r}: the output of {str(src)!r}, {str(dst)!r}, is an existing folder; "
                             "rename or move that folder, or write to another -o")
        key = dst.resolve()
        # samefile: another name for the same file (a hard link, or the other case of the name on
        # a case-insensitive file system: macOS, Windows), which resolve() does not show
        if key == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
            raise ValueError(f"-o {output!r}: the output of {str(src)!r} would overwrite the input itself; "
                             "write to another file or folder")
        if key in seen:
            raise ValueError(f"inputs {str(seen[key])!r} and {str(src)!r} would both write {str(dst)!r}; "
                             "upscale them into different folders")
        seen[key] = src
    holder = next((d for d in seen if any(p in seen for p in d.parents)), None)
    if holder is not None:  # a.png (from a.jpg) and a.png/b.png (from a folder named a.png): a file and a folder
        over = next(p for p in holder.parents if p in seen)
        raise ValueError(f"inputs {str(seen[over])!r} and {str(seen[holder])!r} would write {str(over)!r} and "
                         f"{str(holder)!r} inside it, a file and a folder of one name; rename one of them")
    _refuse_case_collisions(seen, output)
    return outs


def _refuse_case_collisions(seen: dict[Path, Path], output: str) -> None:
    """Two outputs whose names differ only in case (inputs ``A.jpg`` and ``a.png``) are one file
    on a case-insensitive file system (macOS, Windows): the second would overwrite the first, or
    be skipped as already done. Refused there (a probe file in the output folder tells); kept
    where case matters (Linux)."""
    by_fold: dict[str, Path] = {}
    for dst in seen:
        other = by_fold.setdefault(str(dst).casefold(), dst)
        if other != dst and _case_insensitive(dst.parent):
            raise ValueError(f"inputs {str(seen[other])!r} and {str(seen[dst])!r} would write {str(other)!r} and "
                             f"{str(dst)!r}, one file on this case-insensitive file system (-o {output!r}); "
                             "rename one input or upscale them into different folders")


def _case_insensitive(folder: Path) -> bool:
    """Whether the file system holding ``folder`` (or its nearest existing parent) ignores case:
    a probe file with a lower-case name is created there and looked up in upper case. A folder
    where no probe can be written is a ValueError saying so, as :func:`check_writable`'s."""
    where = folder.resolve()
    while not where.is_dir() and where != where.parent:
        where = where.parent
    try:
        fd, probe = tempfile.mkstemp(prefix="upsr-case-probe-", dir=where)
    except OSError as e:
        raise _unwritable("-o", where, e) from None
    os.close(fd)
    try:
        upper = os.path.join(os.path.dirname(probe), os.path.basename(probe).upper())
        return os.path.exists(upper)
    finally:
        os.unlink(probe)


def _shard(n: int) -> range:
    """This process's files of ``n``: ``range(RANK, n, WORLD_SIZE)`` under torchrun (which sets both
    variables), all of them where neither is set."""
    given = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    if given in ({"RANK": "0"}, {"WORLD_SIZE": "1"}):  # a single process's values, left by some launcher
        given = {}
    if len(given) == 1:  # a stray WORLD_SIZE in the shell would silently do a third of the files
        (k, v), = given.items()
        other = "WORLD_SIZE" if k == "RANK" else "RANK"
        raise ValueError(f"{k}={v!r} is set but {other} is not: torchrun sets both (unset {k} for a run of "
                         "one process)")
    try:
        rank, world = (int(given.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
    except ValueError:
        raise ValueError(f"RANK={given['RANK']!r} and WORLD_SIZE={given['WORLD_SIZE']!r} must be integers "
                         "(as torchrun sets them)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} must be in [0, WORLD_SIZE {world})")
    return range(rank, n, world)


def run_upscale(args: argparse.Namespace, device: torch.device, dtype_of: Callable, bar_cls: type) -> int:
    from .cli import default_model_path

    check_weight_params(args.b_u, args.psi_max)
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.overlap >= args.tile:  # before any model loads, in the flags' names
        raise ValueError(f"--overlap ({args.overlap}; default {DEFAULT_OVERLAP}) must be less than --tile "
                         f"({args.tile}): lower --overlap or raise --tile")
    if args.compile and not args.fast:
        raise ValueError("--compile compiles the fast path's nets: give --fast too")
    inputs = collect_inputs(args.inputs, args.output)  # not the results of an earlier run under -o
    single = len(inputs) == 1 and Path(args.inputs[0]).is_file() and len(args.inputs) == 1
    outputs = plan_outputs(inputs, args.output, single)
    mine = _shard(len(inputs))
    check_writable({outputs[i].parent for i in mine})  # not after the model and the first image
    if mine.step > 1:  # every rank must list the same files: the counts and the list's digest show it
        digest = hashlib.sha256("\n".join(str(f) for f, _ in inputs).encode()).hexdigest()[:12]
        log.info("rank %d of %d: %d of %d files (list %s)", mine.start, mine.step, len(mine), len(inputs), digest)
    # each output's size, None where it is not a file (a folder of that name is not done, nor an empty file)
    size = {i: outputs[i].stat().st_size if outputs[i].is_file() else None for i in mine}
    empty = [outputs[i] for i in mine if size[i] == 0]
    if empty and not args.overwrite:  # (this command writes whole files only: .part, then a rename)
        log.warning("%d output(s) are empty files, written by something else or cut short, and are made again: %s",
                    len(empty), ", ".join(str(p) for p in empty[:3]) + (" …" if len(empty) > 3 else ""))
    todo = [i for i in mine if args.overwrite or not size[i]]
    if len(todo) < len(mine):
        log.info("skipping %d image(s) whose output exists (use --overwrite to redo)", len(mine) - len(todo))
    if not todo:
        return 0  # a finished run, or a rank whose share is done: no model to load (or compile)
    model_path = args.model or default_model_path()
    if args.model is None and not Path(model_path).is_file():
        raise FileNotFoundError(f"the bundled demo model is missing ({model_path}); pass --model")
    model = load_upsr(model_path, args.estimator, device=device, dtype=dtype_of(args.dtype, device))
    if model.estimator is None:
        raise ValueError("no estimator: --model holds only the denoiser, so pass --estimator (atd_real.pth for "
                         "the official upsr.pth; for a denoiser.safetensors of `train`, the estimator.safetensors "
                         "its stage 2 was trained with)")
    # the nets' multiple is known now: checked before the first image, in the flags' names
    check_tiling_flags(args.tile, args.overlap, model.multiple_of)
    if args.fast:
        from .fast import enable_fast

        enable_fast(model, compile=args.compile)
    show = not args.quiet
    kw = dict(b_u=args.b_u, psi_max=args.psi_max, tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch,
              estimator_block=args.estimator_block)
    group: list[tuple[LoadedImage, Path, Path]] = []  # same-size one-tile-row images waiting for one call
    done = 0

    def flush() -> None:
        nonlocal done
        if group:
            _upscale_group(model, group, args, kw, bar_cls(1, _label(group, done, len(todo)), show))
            done += len(group)
            group.clear()

    for i in todo:
        src, dst = inputs[i][0], outputs[i]
        try:
            img = read_image(src)
        except (OSError, ValueError) as e:
            flush()  # the images read before the bad one are still upscaled and written
            if len(todo) > 1:  # a rerun would stop here again: say what lets it go on
                raise ValueError(f"{e} — the images before it are written; move or remove this file (or give "
                                 "the others) and run again: finished outputs are skipped") from e
            raise
        if _tile_rows(model, img.rgb[None], args.tile, args.overlap) > 1:
            flush()  # several tile rows: alone, rows streamed to the PNG (peak memory: one band, not 3 × HR)
            bar = bar_cls(1, _label([(img, src, dst)], done, len(todo)), show)
            _upscale_streamed(model, img, dst, args, kw, bar)
            done += 1
            continue
        if group and group[0][0].rgb.shape != img.rgb.shape:
            flush()
        group.append((img, src, dst))
        if len(group) == args.batch:
            flush()
    flush()
    return 0


def check_writable(folders: set[Path], flag: str = "-o") -> None:
    """Each output folder, or the nearest of its parents that exists (where it will be made), takes
    a file: a read-only or full ``flag`` folder fails before the model loads and the first image
    runs, not after. ValueError naming the flag, the folder and the system's reason."""
    for folder in sorted(folders):
        probe = folder
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise ValueError(f"{flag}: {str(folder)!r} cannot be made: {str(probe)!r} is a file")
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            raise _unwritable(flag, probe, e) from None


def _unwritable(flag: str, folder: Path, e: OSError) -> ValueError:
    """The error for an output folder where no file can be made (:func:`check_writable`, the case probe)."""
    return ValueError(f"{flag}: cannot write into {str(folder)!r} ({e.strerror or e})")


def _label(group: list, done: int, total: int) -> str:
    first = f"{done + 1}" if len(group) == 1 else f"{done + 1}-{done + len(group)}"
    return f"[{first}/{total}] {group[0][1].name}" + (" …" if len(group) > 1 else "")


def _bits(img: LoadedImage, args: argparse.Namespace) -> int:
    return img.bits if args.bits == "auto" else int(args.bits)


def _upscale_group(model: UPSRModel, group: list[tuple[LoadedImage, Path, Path]], args: argparse.Namespace,
                   kw: dict, bar) -> None:
    """Same-size images of one tile row in one ``upscale`` call, each with the noise of ``--seed``
    (the seed contract of a file), written each to its own PNG via a .part file."""
    lr = torch.stack([img.rgb for img, _, _ in group])
    hp, wp = padded_size(*lr.shape[-2:], model.multiple_of)
    noise = starting_noise(args.seed, 1, (hp, wp)).expand(len(group), -1, -1, -1).contiguous()
    sr = model.upscale(lr, noise=noise, progress=bar.update, **kw)
    bar.close()
    if args.color_fix:
        sr = wavelet_color_fix(sr, lr.to(sr.device), levels=args.color_fix)
    for (img, _, dst), out in zip(group, sr):
        alpha = None
        if img.alpha is not None:  # alpha is upscaled on its own, never fed to the model
            alpha = F.interpolate(img.alpha[None], scale_factor=4, mode="bicubic", align_corners=False)
            alpha = alpha[0].clamp(0, 1)
        write_png(dst, out, alpha, bits=_bits(img, args), gray=img.gray, icc=img.icc)  # via dst.part
        if not args.quiet:
            log.info("wrote %s (%dx%d)", dst, out.shape[-1], out.shape[-2])


def _upscale_streamed(model: UPSRModel, img: LoadedImage, dst: Path, args: argparse.Namespace, kw: dict,
                      bar) -> None:
    """One image of several tile rows, its finished rows written to the PNG as they come."""
    h4, w4 = SCALE * img.rgb.shape[-2], SCALE * img.rgb.shape[-1]
    with PngStreamWriter(dst, w4, h4, bits=_bits(img, args), gray=img.gray, alpha=img.alpha is not None,
                         icc=img.icc) as png:  # rows go to dst.part, renamed when all are written
        def write(y0: int, rows: torch.Tensor) -> None:
            a = None if img.alpha is None else bicubic_rows(img.alpha, y0, rows.shape[1])
            png.write_rows(rows, a)

        fix = StreamedColorFix(img.rgb, write, levels=args.color_fix) if args.color_fix else write
        model.upscale(img.rgb[None], seed=args.seed, sink=lambda _i, y0, rows: fix(y0, rows), progress=bar.update,
                      **kw)
        if args.color_fix:
            fix.close()
    bar.close()
    if not args.quiet:
        log.info("wrote %s (%dx%d)", dst, w4, h4)


def _tile_rows(model: UPSRModel, lr: torch.Tensor, tile: int, overlap: int) -> int:
    """How many tile rows ``upscale`` runs for lr (after padding to the net's multiple)."""
    m = model.multiple_of
    hp, wp = padded_size(*lr.shape[-2:], m)
    return len({t.y for t in plan_tiles(hp, wp, tile, overlap, m)})  # (tiling checked on entry: check_tiling_flags)
