"""Image files <-> tensors for the CLI: PNG/JPEG/WebP/BMP/TIFF, grayscale, RGBA, 16-bit, CMYK.

``read_image(path)`` -> :class:`LoadedImage` with ``rgb`` (3, h, w) float32 in [0, 1],
``alpha`` (1, h, w) or None, ``bits`` (8 or 16), ``gray`` (True for L/LA/I;16 sources) and
``icc``, the source's ICC colour profile, which the writers embed again (the pixels are not
colour-converted, so the profile still describes them).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .cpu_memory import available_bytes

__all__ = ["LoadedImage", "read_image", "image_size", "write_png", "PngStreamWriter", "IMAGE_SUFFIXES", "is_hidden",
           "same_place", "is_inside", "log_unfollowed_links", "open_image", "check_input_file",
           "write_atomically",
           "write_text"]

log = logging.getLogger("upsr_core")

_CONVERTED_MODES = ("CMYK", "YCbCr", "LAB", "HSV")
"""Modes whose pixels read_image converts to RGB (Pillow's plain conversion): a profile of the
source's colour space would not describe the result, so it is not carried over."""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff"}
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF")
"""The decoders Pillow may use, whatever a file is named (MPO: a phone's multi-picture JPEG): a file
of another format named .png — EPS, which runs Ghostscript, or a rarely used decoder — is refused
instead of decoded. Use :func:`image_formats` (the ones this Pillow has)."""


def image_formats() -> tuple[str, ...]:
    """:data:`IMAGE_FORMATS` that this Pillow build can open (its plugins loaded: ``Image.open``
    with ``formats=`` loads only the five basic ones itself, MPO/WebP/TIFF not among them)."""
    Image.init()  # idempotent, cheap after the first call
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def is_hidden(path: Path, root: Path) -> bool:
    """True for a file that a folder listing skips: its name, or a folder between ``root`` and it,
    starts with '.' or is ``__MACOSX``. macOS writes an AppleDouble companion ``._x.jpg`` beside
    each file on non-Apple disks, and zips made on a Mac carry them in ``__MACOSX/``: they have
    image suffixes but are not images (read as one, they stopped a whole run)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def log_unfollowed_links(entries: list[Path], root: str | os.PathLike) -> None:
    """Log the symbolic links among a recursive listing's ``entries`` (``Path.rglob``) that it did
    not take: links to folders (not followed, so a link loop cannot run forever) and broken links.
    Their images would otherwise be missing from a run without a word."""
    links = [str(p) for p in entries if p.is_symlink() and (p.is_dir() or not p.exists())]
    if links:
        log.warning("%s: %d symbolic link(s) to folders or to nothing not followed (their images are not "
                    "included; give such a folder as its own input): %s%s", root, len(links), ", ".join(links[:3]),
                    ", …" if len(links) > 3 else "")


def same_place(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file or folder: by resolved path, or — on a case-insensitive file
    system (macOS, Windows: ``Photos`` is ``photos``) or through a link — by identity, where both exist."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def is_inside(child: Path, folder: Path) -> bool:
    """``child`` is ``folder`` or lies below it (see :func:`same_place` for what counts as the same)."""
    if child.resolve().is_relative_to(folder.resolve()):
        return True
    return folder.exists() and any(same_place(a, folder) for a in (child, *child.resolve().parents) if a.exists())


DECODE_BYTES_PER_PX = 36
"""Peak memory :func:`read_image` takes per pixel while decoding (Pillow's image, the array, the
float32 RGB; measured 2026-11-29: 35 B/px for an 8-bit RGB PNG, 18 for 1-bit and 8-bit gray)."""

MAX_PIXELS = 40_000 * 40_000
"""The largest image :func:`read_image` opens (width × height): a bound on decompression bombs and
corrupt headers that still allows large photos. Pillow's process-wide limit is left as it is."""

_limit_lock = threading.RLock()


@contextlib.contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; None: none) for the
    ``Image.open`` calls inside, restored afterwards: a setting made on import would hold for the
    whole process, whichever module opens an image."""
    with _limit_lock:
        was, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = was


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open`` of a file among :func:`image_formats`, without Pillow's decompression-bomb
    limit (callers keep their own bound), closed on leaving. Opened from a file object, which
    keeps Pillow from memory-mapping the pixels: Pillow 13 maps an uncompressed TIFF with EXIF
    orientation 5-8 at its turned size over its unturned rows (a scrambled picture, no error)."""
    with open(path, "rb") as f:
        with pixel_limit(None):
            opened = Image.open(f, formats=image_formats())
        with opened as im:
            yield im


class _Refused(ValueError):
    """An image read_image decoded and refuses (its own message); Pillow's errors are wrapped."""


# what Pillow's decoders raise on corrupt or hostile files besides OSError (TIFF's "Missing
# dimensions" TypeError, a corrupt BMP header's OverflowError)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, TypeError, ValueError, EOFError, OverflowError,
                  struct.error, zlib.error)


@dataclass
class LoadedImage:
    rgb: torch.Tensor
    alpha: torch.Tensor | None
    bits: int
    gray: bool
    icc: bytes | None = None


def _to_float(a: np.ndarray, maxval: float) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32) / maxval)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def check_input_file(path: Path) -> None:
    """FileNotFoundError unless ``path`` exists; ValueError unless it is a regular file (or a link
    to one): a pipe (``<(curl …)``), a device or a socket cannot be read twice or seeked."""
    if path.is_file():
        return
    if not path.exists():
        raise FileNotFoundError(f"input not found: {str(path)!r}")
    what = "a folder" if path.is_dir() else "not a regular file (a pipe, device or socket)"
    raise ValueError(f"{str(path)!r} is {what}; expected an image file (save a stream to a file first)")


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read one still image; raises ValueError with the reason for anything unreadable, naming the
    path as given (in a folder run, ``a/x.png`` and ``b/x.png`` are told apart)."""
    path = Path(path)
    name = str(path)
    check_input_file(path)
    size = None
    try:
        # MAX_PIXELS below instead of Pillow's limit: its check warns up to twice it
        with open_image(path) as im:
            size = im.size
            _refuse_header(im, name)
            _check_room(im, name)
            im.load()
            icc = im.info.get("icc_profile") or None
            if icc is not None and im.mode in _CONVERTED_MODES:
                log.info("%s: its %s colour profile is not carried over (the pixels are converted to RGB)",
                         name, im.mode)
                icc = None
            im = ImageOps.exif_transpose(im)
            loaded = _decode(im, name)
            # an ICC header ('acsp' at 36) names its colour space at 16: 'GRAY', 'RGB ', ...
            if icc is not None and icc[36:40] == b"acsp" and (icc[16:20] == b"GRAY") != loaded.gray:
                # a PNG's iCCP must match its colour type (libpng drops it, with a warning)
                log.info("%s: its %s colour profile does not fit a %s image: not carried over", name,
                         icc[16:20].decode("latin-1").strip() or "unknown", "gray" if loaded.gray else "colour")
                icc = None
            loaded.icc = icc
            return loaded
    except _Refused:
        raise
    except MemoryError:  # within MAX_PIXELS: a real image larger than this machine's free memory
        what = f"its {size[0]}x{size[1]} px" if size else "it"
        raise ValueError(f"{name}: out of memory while decoding {what}") from None
    except _DECODE_ERRORS as e:
        raise _unreadable(name, e) from None


def _refuse_header(im: Image.Image, name: str) -> None:
    """The refusals an opened image's header decides (a :class:`_Refused`): too many pixels,
    several frames, 16-bit colour that Pillow would read at 8 bits."""
    if im.width * im.height > MAX_PIXELS:
        raise _Refused(f"{name}: image too large ({im.width}x{im.height} px, more than {MAX_PIXELS} px)")
    # an MPO (the JPEG of many cameras and phones: a primary photo plus previews, a depth or
    # gain map) opens at its primary image; other formats' frames are images of equal standing
    if im.format != "MPO" and getattr(im, "n_frames", 1) > 1:
        raise _Refused(f"{name}: has {im.n_frames} frames; extract the frames first (one image per file)")
    if raw := _colour_16bit(im):
        what, fix = (("16-bit gray with alpha", "8-bit gray + alpha, or 16-bit grayscale without alpha")
                     if raw.startswith("LA") else ("16-bit colour", "8-bit colour or 16-bit grayscale"))
        raise _Refused(f"{name}: {what}, which Pillow can only read at 8 bits; save it as {fix}")


def _check_room(im: Image.Image, name: str) -> None:
    """Refuse (a :class:`_Refused`) an image whose decoding would not fit the memory available:
    a small file can declare up to MAX_PIXELS (a 200 KB PNG, 40000² px of one colour), and the
    out-of-memory killer would end the process without a word, which no MemoryError reports."""
    need, free = im.width * im.height * DECODE_BYTES_PER_PX, available_bytes()
    if free is not None and need > free:
        raise _Refused(f"{name}: decoding its {im.width}x{im.height} px needs about {need / 2**30:.1f} GiB of "
                       f"memory and {free / 2**30:.1f} GiB is available")


def _unreadable(name: str, e: Exception) -> ValueError:
    """The error for a file Pillow could not open or decode (one of ``_DECODE_ERRORS``)."""
    if isinstance(e, UnidentifiedImageError):
        return ValueError(f"{name}: not a readable image: corrupt, or in a format not read here (read: "
                          f"{', '.join(image_formats())}, whatever the file name says)")
    return ValueError(f"{name}: not a readable image ({type(e).__name__}: {e})")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of the image :func:`read_image` would return for ``path`` (EXIF
    orientation applied), from the file's header: no pixels are decoded, so a whole set's sizes
    can be checked before hours of work. What read_image refuses from the header (too many pixels,
    several frames, 16-bit colour) and an unreadable header are the ValueErrors read_image gives."""
    path = Path(path)
    check_input_file(path)
    try:
        with open_image(path) as im:
            _refuse_header(im, str(path))
            w, h = _stored_size(im)
            # orientations 5-8 turn the picture by 90°, as ImageOps.exif_transpose does in read_image
            return (w, h) if _orientation(im, path) in (5, 6, 7, 8) else (h, w)
    except _Refused:
        raise
    except _DECODE_ERRORS as e:
        raise _unreadable(str(path), e) from None


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels as stored, before any EXIF turn: Pillow (13) reports a TIFF of
    orientation 5-8 at its turned size from the moment it is opened, every other format as stored."""
    if im.format == "TIFF" and 256 in im.tag_v2 and 257 in im.tag_v2:  # ImageWidth, ImageLength
        return im.tag_v2[256], im.tag_v2[257]
    return im.size


_PNG_ORIENTATION_TEXT = (b"XML:com.adobe.xmp", b"Raw profile type exif", b"Raw profile type APP1")
"""Keywords of PNG text chunks that can carry an orientation (XMP's tiff:Orientation, raw EXIF),
which Pillow's getexif reads as well as an eXIf chunk."""


def _orientation(im: Image.Image, path: Path) -> int:
    """The EXIF orientation (1-8) of an opened image, as :func:`ImageOps.exif_transpose` will
    find it after decoding. Pillow reads a PNG's chunks up to the pixels at open, and an eXIf or
    an orientation-carrying text chunk after them only when it decodes them: such a file (found
    by walking the chunk headers) is decoded for it; any other is answered from what Pillow read
    at open (``Image.getexif`` of the base class, which a PNG's own does not load pixels for)."""
    if im.format == "PNG" and "exif" not in im.info:
        if _png_orientation_after_pixels(path):
            return im.getexif().get(ExifTags.Base.Orientation, 1)
        return Image.Image.getexif(im).get(ExifTags.Base.Orientation, 1)
    return im.getexif().get(ExifTags.Base.Orientation, 1)


def _png_orientation_after_pixels(path: Path) -> bool:
    """Whether a PNG has an eXIf chunk, or a text chunk of :data:`_PNG_ORIENTATION_TEXT`, after
    its first IDAT (chunk headers and text keywords read, nothing else)."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature Pillow has checked
        seen_pixels = False
        while len(head := f.read(8)) == 8:
            length, tag = struct.unpack(">I4s", head)
            if tag == b"IDAT":
                seen_pixels = True
            elif tag == b"IEND":
                break
            elif seen_pixels and tag == b"eXIf":
                return True
            elif seen_pixels and tag in (b"tEXt", b"zTXt", b"iTXt"):
                keyword = f.read(min(length, 80)).split(b"\x00", 1)[0]
                if keyword in _PNG_ORIENTATION_TEXT:
                    return True
                f.seek(length - min(length, 80) + 4, os.SEEK_CUR)
                continue
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return False


def _colour_16bit(im: Image.Image) -> str:
    """The decoder's raw mode ('RGB;16B', 'RGBA;16L', 'LA;16B', …) when Pillow would decode 16-bit
    colour (or gray + alpha) samples to 8 bits (the image mode is an 8-bit one), else "". Only
    16-bit grayscale (modes 'I;16*', 'I') keeps its 16 bits."""
    if im.mode.startswith("I") or im.mode == "F":
        return ""
    for t in im.tile:
        args = t[3]
        raw = args if isinstance(args, str) else next((a for a in args or () if isinstance(a, str)), "")
        if ";16" in raw:
            return raw
    return ""


def _check_range(a: np.ndarray, lo: float, hi: float, name: str, kind: str) -> None:
    """Refuse (never clip) sample values outside [lo, hi]: the image's scale is unknown then."""
    if a.size and (a.min() < lo or a.max() > hi):
        raise _Refused(f"{name}: {kind} image values must be in [{lo:g}, {hi:g}], found "
                         f"[{a.min():g}, {a.max():g}]; rescale it first")


def _decode(im: Image.Image, name: str) -> LoadedImage:
    mode = im.mode
    keyed = "transparency" in im.info  # P's transparent entries, or a tRNS colour key of L / I;16 / RGB / 1
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        _check_range(a, 0, 65535, name, "integer")  # 32-bit "I" images can hold anything
        maxv = 65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        g = _to_float(a, maxv)
        key = im.info.get("transparency") if keyed else None  # a 16-bit gray PNG's key, in its sample units
        alpha = torch.from_numpy((a != key).astype(np.float32))[None] if isinstance(key, int) else None
        return LoadedImage(g.expand(3, -1, -1).clone(), alpha, 16 if maxv > 255 else 8, True)
    if mode == "F":
        a = np.array(im, dtype=np.float32)  # a writable copy: torch warns on read-only arrays
        if not np.isfinite(a).all():
            raise _Refused(f"{name}: the float image holds NaN or Inf values")
        _check_range(a, 0, 1, name, "float")
        g = torch.from_numpy(a).unsqueeze(0)
        return LoadedImage(g.expand(3, -1, -1).clone(), None, 16, True)
    if mode in ("L", "1") and not keyed:
        g = _to_float(np.asarray(im.convert("L")), 255.0)
        return LoadedImage(g.expand(3, -1, -1).clone(), None, 8, True)
    if mode == "LA" or mode in ("L", "1") and keyed:
        a = _to_float(np.asarray(im.convert("LA")), 255.0)
        return LoadedImage(a[:1].expand(3, -1, -1).clone(), a[1:].contiguous(), 8, True)
    if mode in ("RGB;16", "RGBA;16"):
        raise _Refused(f"{name}: unsupported 16-bit colour layout {mode}")
    if mode in ("P", "RGB") and keyed or mode in ("RGBA", "PA", "La", "RGBa"):
        a = _to_float(np.asarray(im.convert("RGBA")), 255.0)
        return LoadedImage(a[:3].contiguous(), a[3:].contiguous(), 8, False)
    if mode not in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        raise _Refused(f"{name}: unsupported image mode {mode!r}")
    a = _to_float(np.asarray(im.convert("RGB")), 255.0)
    if mode == "P" and torch.equal(a[0], a[1]) and torch.equal(a[1], a[2]):  # a gray palette (GIF, PNG-8)
        return LoadedImage(a, None, 8, True)
    return LoadedImage(a, None, 8, False)


def write_png(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None,
              *, bits: int = 8, gray: bool = False, icc: bytes | None = None) -> None:
    """Write rgb (3, H, W) in [0, 1] (+ alpha (1, H, W)) as PNG, 8- or 16-bit; values are
    clamped to [0, 1] and rounded (as the official ``tensor2img``); ``icc``: an ICC profile to
    embed (iCCP). All or nothing (:func:`write_atomically`): an interrupted or failed write
    leaves ``path`` as it was, never a truncated PNG; a link at ``path`` is refused.

    Converted in bands of rows: besides the output integers, no full-size float copy is
    made (a 24000 × 16000 result would need 4.6 GB per float32 copy).
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ValueError(f"expected rgb (3, H, W), got {tuple(rgb.shape)}")
    if alpha is not None and (alpha.ndim != 3 or alpha.shape[0] != 1 or alpha.shape[1:] != rgb.shape[1:]):
        raise ValueError(f"expected alpha (1, {rgb.shape[1]}, {rgb.shape[2]}) to match rgb, got {tuple(alpha.shape)}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    for name, x in (("rgb", rgb), ("alpha", alpha)):
        if x is not None and not x.is_floating_point():  # uint8 200 would clamp to 1.0: white
            raise TypeError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")
        if x is not None and not torch.isfinite(x).all():  # NaN would be written as black
            raise ValueError(f"{name} contains NaN or Inf values")
    h, w = rgb.shape[1:]
    a = np.empty((h, w, (1 if gray else 3) + (alpha is not None)), dtype=np.uint8 if bits == 8 else np.uint16)
    for y in range(0, h, _BAND):
        a[y : y + _BAND] = _to_ints(rgb[:, y : y + _BAND], None if alpha is None else alpha[:, y : y + _BAND],
                                    bits, gray)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_atomically(path) as f:
        if bits == 16:
            _write_png16(f, a, icc)
        else:
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(f, format="PNG",
                                                                       **({"icc_profile": icc} if icc else {}))


_BAND = 256  # rows converted at a time by write_png

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # (Windows has none: links there need privileges to make)


def _link_refused(path: str | os.PathLike) -> OSError:
    return OSError(errno.ELOOP, f"{os.fspath(path)!r} is a symbolic link; outputs are not written through "
                                "links: write to the file it points at, or remove the link")


@contextlib.contextmanager
def write_atomically(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose bytes become ``path`` only if the ``with`` block ends without an
    exception: they go to ``<path>.part`` (created new, not through a link), which is fsynced and
    then renamed to ``path``, so that after a crash or power loss an output that exists is
    complete and a resumed run, which skips existing outputs, never keeps a truncated one. On any
    exception (disk full, Ctrl-C, …) the .part is removed and ``path`` is as it was.
    The .part is held under an exclusive lock (``flock``; on Windows an open file cannot be
    removed) until it is renamed: one left by a writer that is gone (kill -9, power loss) or a
    link planted there is removed, never followed, but one that another process is writing (two
    runs writing one output folder at once) is an OSError saying so, and a .part that is no longer
    this writer's file when it is done is neither renamed nor removed (an OSError too): ``path``
    never gets another writer's unfinished bytes, nor a mix of two writers'. A link at ``path`` is
    refused (an OSError naming it); an OSError that names no file (ENOSPC from a write) is raised
    again naming ``path``. The file is closed by this function, not by the ``with`` block (a file
    closed there is a ValueError and nothing is written: its lock went with it). Every output of
    the project is written so: images, model files, checkpoints, results."""
    path = Path(path)
    if path.is_symlink():
        raise _link_refused(path)
    tmp = path.with_name(path.name + ".part")
    mine = None
    try:
        _remove_stale(tmp, path)
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0), 0o666)
            except FileExistsError:  # created by another writer since _remove_stale looked
                raise _InUse(tmp, path) from None
            with open(fd, "wb") as f:
                mine = os.fstat(fd)
                if _lock(fd) is False:  # (a stale check of another writer holds it for an instant)
                    raise _InUse(tmp, path)
                yield f
                if f.closed:  # its bytes could not be fsynced through the handle the lock is on
                    raise ValueError(f"the file for {os.fspath(path)!r} was closed inside write_atomically's "
                                     "with block: leave closing it to write_atomically")
                f.flush()
                os.fsync(f.fileno())
                if os.name != "nt":  # renamed under the lock
                    _replace_if_mine(tmp, path, mine)
            if os.name == "nt":  # (Windows cannot rename an open file)
                _replace_if_mine(tmp, path, mine)
        except BaseException:
            if mine is not None and _is_file(tmp, mine):  # never another writer's .part
                tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        if (e.filename is None and e.errno is not None and e.errno != errno.ELOOP
                and not isinstance(e, _InUse)):
            raise OSError(e.errno, f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from e
        raise


class _InUse(OSError):
    """Another process writes the same output now (its .part is locked, or it replaced ours)."""

    def __init__(self, tmp: Path, path: Path, replaced: bool = False):
        what = "was removed or replaced by another process while this one wrote it" if replaced else \
            "is being written by another process"
        super().__init__(errno.EBUSY, f"{os.fspath(tmp)!r} {what}, so {os.fspath(path)!r} was not written: is a "
                                      f"second run writing into {os.fspath(path.parent)!r} at the same time? (Run "
                                      "one; a rerun skips finished outputs.)")


def _lock(fd: int) -> bool | None:
    """An exclusive, non-blocking ``flock`` on ``fd``: True taken, False held by another process,
    None where there is no such lock (Windows; a file system without locks)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
        return None


def _remove_stale(tmp: Path, path: Path) -> None:
    """Remove a link at ``tmp``, or a file there that no live writer holds (see write_atomically)."""
    if tmp.is_symlink():
        tmp.unlink()
        return
    try:
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        locked = _lock(fd)
        if locked is False:
            raise _InUse(tmp, path)
        if locked:
            tmp.unlink(missing_ok=True)  # under our lock: no writer holds it
    finally:
        os.close(fd)
    if locked is None:  # no locks: Windows refuses to remove a file another process has open
        try:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            raise _InUse(tmp, path) from None


def _replace_if_mine(tmp: Path, path: Path, mine: os.stat_result) -> None:
    if not _is_file(tmp, mine):
        raise _InUse(tmp, path, replaced=True)
    os.replace(tmp, path)


def _is_file(path: Path, st: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``st`` was taken of (not removed, not replaced)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`write_atomically` (all or nothing; a link
    at ``path`` is refused, not followed): the JSON and Markdown results, logs and records."""
    with write_atomically(path) as f:
        f.write(text.encode("utf-8"))


def luma(rgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """The gray a grayscale PNG gets from RGB in [0, 1] (0.299 R + 0.587 G + 0.114 B), the colour
    axis ``dim`` kept with size 1: what :func:`write_png` writes for ``gray`` sources."""
    r, g, b = rgb.unbind(dim)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(dim)


def _to_ints(rgb: torch.Tensor, alpha: torch.Tensor | None, bits: int, gray: bool) -> np.ndarray:
    """rgb (3, n, W) (+ alpha (1, n, W)) in [0, 1] -> (n, W, C) uint8/uint16: clamp, *maxval, round."""
    maxv, dtype = (255.0, np.uint8) if bits == 8 else (65535.0, np.uint16)
    x = rgb.detach().float().cpu().clamp(0, 1)
    if gray:
        x = luma(x, 0)
    if alpha is not None:
        x = torch.cat([x, alpha.detach().float().cpu().clamp(0, 1)])
    return (x * maxv).round().permute(1, 2, 0).numpy().astype(dtype)


def to_pil(rgb: torch.Tensor, max_side: int | None = None) -> Image.Image:
    """rgb (3, H, W) in [0, 1] (clamped), on any device -> an 8-bit RGB PIL image, rounded as
    :func:`write_png` writes 8 bits (e.g. a sampling preview for ComfyUI). ``max_side``: a larger
    image is first shrunk (antialiased bilinear, on its device: only the small copy crosses to
    the CPU) so that its longer side is ``max_side`` px."""
    if not isinstance(rgb, torch.Tensor) or rgb.ndim != 3 or rgb.shape[0] != 3 or not rgb.is_floating_point():
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"to_pil needs a float (3, H, W) image in [0, 1], got {shape}")
    if max_side is not None and not (isinstance(max_side, int) and max_side >= 1):
        raise ValueError(f"max_side must be an integer >= 1 or None, got {max_side!r}")
    h, w = rgb.shape[-2:]
    if max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        x = rgb.float() if rgb.device.type != "mps" else rgb.float().cpu()  # (antialias: not on every MPS torch)
        rgb = F.interpolate(x[None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return Image.fromarray(_to_ints(rgb, None, 8, False))  # (H, W, 3) uint8: RGB


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


class PngStreamWriter:
    """Write a PNG (8/16-bit, gray/gray+alpha/RGB/RGBA) from bands of rows as they come.

    ``write_rows(rgb, alpha)`` takes rgb (3, n, W) in [0, 1] (+ alpha (1, n, W)), converted
    exactly as :func:`write_png` (clamp to [0, 1], × maxval, round; ``gray`` takes the same
    luma), top to bottom; ``close()`` checks that ``height`` rows came and ends the file.
    Filter type 2 (Up) per row, stdlib zlib; compressed data goes out in IDAT chunks of about
    1 MiB, so memory is one band. The pixels equal write_png's (the bytes may differ: Pillow
    filters rows adaptively; with type 0, the streamed files came out 1.3-2.4× larger). Use as a
    context manager. All or nothing, as :func:`write_png`: the rows go to ``<path>.part``, which
    becomes ``path`` when ``close()`` finds every row written; on an exception (or a short image)
    the .part is removed and ``path`` is as it was.
    """

    _IDAT = 1 << 20

    def __init__(self, path: str | os.PathLike, width: int, height: int, *, bits: int = 8, gray: bool = False,
                 alpha: bool = False, icc: bytes | None = None):
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {bits}")
        if width < 1 or height < 1:
            raise ValueError(f"PNG size must be positive, got {width}x{height}")
        self.width, self.height, self.bits, self.gray, self.alpha = width, height, bits, gray, alpha
        self.rows = 0
        channels = (1 if gray else 3) + alpha
        color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = write_atomically(path)
        self._f = self._file.__enter__()
        self._done = False
        self._comp = zlib.compressobj(6)
        self._above = np.zeros(width * channels * bits // 8, np.uint8)  # the row above the first: zeros
        self._pending: list[bytes] = []
        self._size = 0
        ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
        self._f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _iccp(icc))

    def write_rows(self, rgb: torch.Tensor, alpha: torch.Tensor | None = None) -> None:
        if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.shape[2] != self.width:
            raise ValueError(f"expected rgb (3, n, {self.width}), got {tuple(rgb.shape)}")
        if (alpha is not None) != self.alpha or alpha is not None and alpha.shape != (1, *rgb.shape[1:]):
            raise ValueError(f"expected alpha {(1, *rgb.shape[1:]) if self.alpha else None}, got "
                             f"{None if alpha is None else tuple(alpha.shape)}")
        n = rgb.shape[1]
        if self.rows + n > self.height:
            raise ValueError(f"too many rows: {self.rows + n} > height {self.height}")
        for y in range(0, n, _BAND):
            band_alpha = None if alpha is None else alpha[:, y : y + _BAND]
            a = _to_ints(rgb[:, y : y + _BAND], band_alpha, self.bits, self.gray)
            if self.bits == 16:
                a = a.astype(">u2")
            raw = np.ascontiguousarray(a).reshape(a.shape[0], -1).view(np.uint8)
            rows = np.empty((raw.shape[0], 1 + raw.shape[1]), dtype=np.uint8)
            rows[:, 0] = 2  # filter type 2 (Up): each byte less the one above (uint8 wraps, as PNG's mod 256)
            rows[:, 1:] = raw
            rows[0, 1:] -= self._above
            rows[1:, 1:] -= raw[:-1]
            self._above = raw[-1].copy()  # the next band's first row is filtered against it
            self._push(self._comp.compress(rows.tobytes()))
        self.rows += n

    def _push(self, data: bytes) -> None:
        if data:
            self._pending.append(data)
            self._size += len(data)
        if self._size >= self._IDAT:
            self._f.write(_chunk(b"IDAT", b"".join(self._pending)))
            self._pending, self._size = [], 0

    def close(self) -> None:
        """End the PNG and put it in place; a ValueError (and no file) if rows are missing."""
        if self._done:
            return
        try:
            if self.rows != self.height:
                raise ValueError(f"PNG got {self.rows} of {self.height} rows")
            self._pending.append(self._comp.flush())
            self._f.write(_chunk(b"IDAT", b"".join(self._pending)) + _chunk(b"IEND", b""))
        except BaseException as e:
            self._done = True
            if not self._file.__exit__(type(e), e, e.__traceback__):  # the .part goes (an OSError: named)
                raise
        self._done = True
        self._file.__exit__(None, None, None)

    def __enter__(self) -> "PngStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._done:
            self._file.__exit__(exc_type, exc, tb)
            self._done = True


def _iccp(icc: bytes | None) -> bytes:
    """The iCCP chunk for an ICC profile (before any IDAT), or nothing."""
    return _chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)) if icc else b""


def _write_png16(f: BinaryIO, a: np.ndarray, icc: bytes | None = None) -> None:
    """Minimal 16-bit PNG writer (Pillow cannot write 16-bit colour): a (H, W, C) uint16, C in 1..4,
    to the open binary file ``f``."""
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    comp = zlib.compressobj(6)
    idat = b"".join(comp.compress(b"\x00" + a[i].astype(">u2").tobytes()) for i in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _iccp(icc) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
