"""Training data: random HR crops from image folders, and a compact "packed crops" file.

* ``ImageFolderDataset``: any folder of png/jpg/jpeg/webp/bmp (recursive), random square
  crops with random flips and 90° rotations, ``float32 (3, crop, crop)`` in [0, 1].
* ``pack_crops`` / ``PackedCropsDataset``: crops cut once, stored as one ``uint8
  (N, 3, crop, crop)`` array (``.npy`` or ``.safetensors``) plus a JSON side file naming the
  source of every crop: a training set that travels to a remote GPU machine as one file.
* ``photos_of_group``: the photos of a split group (``A_train``, ``A_val``) from the
  ``SOURCES.tsv`` written by ``get_photos.py``.

Randomness in the datasets: an item asked for as ``(index, seed)`` — what :class:`SeededSampler`
yields, as ``FolderFeed`` does — draws its crop position and flips from a generator seeded with
``seed``, so a batch is the same with any number of DataLoader workers (and the process's global
RNG is not touched); an item asked for by a plain index draws from torch's global RNG.
Pixel reading: EXIF orientation applied; gray → 3 equal channels;
alpha (also a tRNS colour key) composited over white; 16-bit gray scaled by 1/65535, float gray
([0, 1]) taken to 16 bits; Pillow reads 16-bit colour PNGs as 8-bit, so their extra precision is
lost (a warning names such a file). Run ``python -m upsr_core.train.data --help``.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from ..cliargs import OneLineParser, UsageError, float_range, int_min, writable_file
from ..imageio import (
    _DECODE_ERRORS,
    _colour_16bit,
    _unreadable,
    is_hidden,
    log_unfollowed_links,
    open_image,
    write_atomically,
    write_text,
)

__all__ = [
    "IMAGE_SUFFIXES", "ImageFolderDataset", "ImageHeader", "PackedCropsDataset", "SeededSampler", "augment_dihedral",
    "check_small_images", "decoded_bytes", "list_images", "load_image_array", "pack_crops", "photos_of_group",
    "scan_headers",
]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp")
Prescale = int | Literal["auto"]
Small = Literal["pad", "skip"]


# ----------------------------------------------------------------------------- files
def list_images(root: str | Path) -> list[Path]:
    """All images under ``root`` (recursive, suffix in ``IMAGE_SUFFIXES``, any case; hidden files
    and folders, such as macOS's ``._x.jpg`` and ``__MACOSX/``, skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    entries = list(root.rglob("*"))
    log_unfollowed_links(entries, root)
    return sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p, root))


def photos_of_group(photos_dir: str | Path, group: str) -> list[Path]:
    """Photos of one split group listed in ``photos_dir/SOURCES.tsv`` (column ``group``), sorted."""
    tsv = Path(photos_dir) / "SOURCES.tsv"
    if not tsv.is_file():
        raise FileNotFoundError(f"{str(tsv)!r} not found: the project's ../shared/data/get_photos.py --out "
                                f"{photos_dir} writes it beside the photos; or pack the whole folder (no group)")
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and ("group" not in rows[0] or "file" not in rows[0]):
        raise ValueError(f"{str(tsv)!r} has no 'file'/'group' columns, got {list(rows[0])}")
    groups = sorted({r["group"] for r in rows})
    if group not in groups:
        raise ValueError(f"group {group!r} not in {str(tsv)!r}; expected one of {groups}")
    return sorted(Path(photos_dir) / r["file"] for r in rows if r["group"] == group)


# ----------------------------------------------------------------------------- pixels
def _prescale_factor(size: tuple[int, int], prescale: Prescale) -> int:
    """'auto': reduce by floor(short/1024) when that is >= 2 (as the eval pairs do)."""
    if prescale == "auto":
        return max(1, min(size) // 1024)
    if isinstance(prescale, int) and prescale >= 1:
        return prescale
    raise ValueError(f"prescale must be 'auto' or an int >= 1, got {prescale!r}")


def load_image_array(path: str | Path, prescale: Prescale = 1) -> tuple[np.ndarray, int]:
    """Read an image as ``(H, W, 3)`` uint8 or uint16 and its full-scale value (255 or 65535).

    ``prescale``: integer reduction factor (Lanczos) or 'auto' (see ``_prescale_factor``).
    An image that cannot be decoded is an OSError naming the file.
    """
    try:
        return _load_image_array(path, prescale)
    except OSError as e:  # Pillow's "image file is truncated" and the like do not say which file
        if str(path) in str(e):
            raise
        raise OSError(f"{str(path)!r}: cannot decode the image ({e})") from None


def _load_image_array(path: str | Path, prescale: Prescale) -> tuple[np.ndarray, int]:
    with open_image(path) as opened:
        if _colour_16bit(opened):
            log.warning("%s: 16-bit colour, which Pillow reads at 8 bits: trained on its high bytes", path)
        im = ImageOps.exif_transpose(opened)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit gray; a 32-bit "I" image holding only 8-bit values is 8-bit (as read_image decides)
            values = np.asarray(im)
            peak = int(values.max(initial=0))
            if peak > 65535 or int(values.min(initial=0)) < 0:
                raise ValueError(f"{str(path)!r}: integer image values must be in [0, 65535]")
            maxval = 65535 if peak > 255 or im.mode.startswith("I;16") else 255
            im = im.convert("I")
        elif im.mode == "F":  # float gray in [0, 1], as read_image takes it: to 16 bits
            a = np.asarray(im, dtype=np.float64)
            if not (np.isfinite(a).all() and (a.size == 0 or (a.min() >= 0 and a.max() <= 1))):
                raise ValueError(f"{str(path)!r}: float image values must be finite and in [0, 1]")
            im, maxval = Image.fromarray(np.round(a * 65535).astype(np.int32)), 65535
        elif im.mode in ("1", "L") and "transparency" not in im.info:
            im, maxval = im.convert("L"), 255
        elif im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:  # incl. a tRNS colour key
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im, maxval = Image.alpha_composite(white, rgba).convert("RGB"), 255
        elif im.mode == "RGB":
            maxval = 255
        else:  # P, CMYK, YCbCr, LAB, HSV, ...
            im, maxval = im.convert("RGB"), 255
        f = _prescale_factor(im.size, prescale)
        if f > 1:
            im = im.resize((im.width // f, im.height // f), Image.LANCZOS)
        a = np.asarray(im)
    if maxval == 65535:
        a = np.clip(a, 0, 65535).astype(np.uint16)
    elif a.dtype != np.uint8:  # a 32-bit "I" image of 8-bit values
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a), maxval


def to_uint8(a: np.ndarray, maxval: int) -> np.ndarray:
    """An array from :func:`load_image_array` in 8-bit units: uint8 as it is, uint16 rounded."""
    if maxval == 255:
        return a
    return np.round(a.astype(np.float64) * (255.0 / maxval)).astype(np.uint8)


def _pad_to(a: np.ndarray, crop: int) -> np.ndarray:
    """Reflect-pad (H, W, C) symmetrically so that both sides are at least ``crop``."""
    ph, pw = max(0, crop - a.shape[0]), max(0, crop - a.shape[1])
    if not ph and not pw:
        return a
    return np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")


def augment_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip, vertical flip and 90° rotation (each p = ½): the 8 symmetries
    of the square, equally likely. ``x``: ``(..., H, W)`` with H == W. Returns the same shape."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected a square crop, got {tuple(x.shape[-2:])}")
    h, v, r = torch.randint(0, 2, (3,), generator=generator).tolist()
    if h:
        x = x.flip(-1)
    if v:
        x = x.flip(-2)
    if r:
        x = x.rot90(1, (-2, -1))
    return x


def _crop_tensor(a: np.ndarray | torch.Tensor, y: int, x: int, crop: int, maxval: int) -> torch.Tensor:
    """(H, W, 3) integer array → float32 (3, crop, crop) in [0, 1]."""
    c = torch.as_tensor(np.ascontiguousarray(a[y:y + crop, x:x + crop]).astype(np.float32))
    return c.permute(2, 0, 1).contiguous() / float(maxval)


def _check_crop(crop: int) -> None:
    if not isinstance(crop, int) or crop < 1:
        raise ValueError(f"crop must be a positive int, got {crop!r}")


def _check_small(small: str) -> None:
    if small not in ("pad", "skip"):
        raise ValueError(f"small must be 'pad' or 'skip', got {small!r}")


@dataclass(frozen=True)
class ImageHeader:
    """One image file's size from its header: ``width`` × ``height`` after the reduction by
    ``factor`` that the setting ``prescale`` gives it (EXIF rotation does not change the short
    side)."""

    path: Path
    width: int
    height: int
    factor: int
    prescale: Prescale


def scan_headers(files: Sequence[str | Path], prescale: Prescale = 1) -> list[ImageHeader]:
    """Read the header of every file once (no pixels). A file whose header cannot be read (an HTML
    page saved as .jpg, an empty file) is left out with one warning naming it: training goes on
    without it. The checks below (:func:`decoded_bytes`, :func:`check_small_images`) and the
    datasets take this list, so that a training start reads each header once."""
    found = []
    for p in map(Path, files):
        try:
            with open_image(p) as im:
                w, h = im.size
        except _DECODE_ERRORS as e:
            log.warning("%s; training goes on without it", _unreadable(str(p), e))
            continue
        f = _prescale_factor((w, h), prescale)
        found.append(ImageHeader(p, w // f, h // f, f, prescale))
    return found


def decoded_bytes(headers: Sequence[ImageHeader], crop: int) -> int:
    """Bytes the images take decoded as 8-bit RGB, each reflect-padded to ``crop`` (16-bit
    grayscale takes twice that), from their headers: what a cache of the folder holds."""
    return sum(max(h.width, crop) * max(h.height, crop) * 3 for h in headers)


def _keep_large_enough(headers: Sequence[ImageHeader], crop: int) -> list[ImageHeader]:
    kept = []
    for h in headers:
        if min(h.width, h.height) >= crop:
            kept.append(h)
        else:
            log.info("skipping %s: %dx%d (after /%d) is smaller than crop %d", h.path, h.width, h.height, h.factor,
                     crop)
    return kept


def check_small_images(headers: Sequence[ImageHeader], crop: int) -> int:
    """How many of the images have a side below ``crop`` and will be reflect-padded: a warning
    names them; a ValueError if every one of them is (a crop larger than the photos trains on
    mirrored borders)."""
    small = [h for h in headers if min(h.width, h.height) < crop]
    if small and len(small) == len(headers):
        biggest = max(small, key=lambda h: min(h.width, h.height))
        raise ValueError(f"--crop {crop} is larger than every image ({len(headers)}; the largest short side is "
                         f"{min(biggest.width, biggest.height)} px, {biggest.path.name} {biggest.width}x"
                         f"{biggest.height}): give a smaller --crop")
    if small:
        log.warning("%d of %d images have a side below the crop %d and are reflect-padded to it: %s", len(small),
                    len(headers), crop, ", ".join(f"{h.path.name} {h.width}x{h.height}" for h in small[:5])
                    + (" …" if len(small) > 5 else ""))
    return len(small)


def no_images(root: str | Path | None, min_side: int | None = None, unreadable: int = 0) -> str:
    """The message for a folder (or list, ``root`` None) with no usable image; ``unreadable``:
    how many files were left out for a header that could not be read (warned about)."""
    where = f"in {str(root)!r}" if root is not None else "among the files given"
    size = f" of at least {min_side} px on the short side" if min_side else ""
    why = f"; {unreadable} unreadable file(s), named in the warnings above" if unreadable else ""
    return (f"no {'readable ' if unreadable else ''}images{size} {where} (suffixes {' '.join(IMAGE_SUFFIXES)}; "
            f"TIFF is not read: convert it to PNG{why})")


# ----------------------------------------------------------------------------- datasets
class ImageFolderDataset(Dataset):
    """Random square crops of the images in a folder (or of an explicit file list).

    ``root``: folder searched recursively (ignored when ``files`` or ``headers`` is given);
    ``headers``: a :func:`scan_headers` list made with the same ``prescale``, so that the
    header of each file is read once. ``crop``: side in pixels. ``small``: images with a side
    below ``crop`` are reflect-padded ('pad') or left out ('skip', decided at construction from
    the file headers); a file whose header cannot be read is left out with a warning.
    ``augment``: random flips/rotations.
    ``random_crop``: False takes the centre crop. ``prescale``: see ``load_image_array``.
    ``repeat``: the dataset lists every image ``repeat`` times (longer epochs).
    ``cache``: keep decoded images in memory (per worker process). An image that cannot be
    decoded when an item needs it is skipped with a warning (another is drawn in its place,
    from the item's generator), up to ``UNREADABLE_MAX`` in a row.
    ``min_texture``: a random crop whose texture (mean luma gradient in 8-bit units, as
    ``pack_crops`` and the evaluation pairs measure it) is below this is re-drawn, up to
    ``tries`` draws in all, keeping the most textured one (0: every crop is kept).
    Items: float32 ``(3, crop, crop)`` in [0, 1]; the key is an index, or ``(index, seed)``
    (see :class:`SeededSampler`).
    """

    def __init__(
        self, root: str | Path | None, crop: int = 256, *, files: Sequence[str | Path] | None = None,
        small: Small = "pad", augment: bool = True, random_crop: bool = True, prescale: Prescale = 1,
        repeat: int = 1, cache: bool = False, min_texture: float = 0.0, tries: int = 10,
        headers: Sequence[ImageHeader] | None = None,
    ) -> None:
        _check_crop(crop)
        _check_small(small)
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        check_texture_filter(min_texture, tries)
        if files is not None and headers is not None:
            raise ValueError("give files or headers, not both")
        if headers is not None:
            other = sorted({repr(h.prescale) for h in headers} - {repr(prescale)})
            if other:
                raise ValueError(f"headers were scanned with prescale {', '.join(other)}, the dataset's is "
                                 f"{prescale!r}: scan them with scan_headers(files, {prescale!r})")
        listed = None
        if headers is None:
            listed = files if files is not None else list_images(root or ".")
            headers = scan_headers(listed, prescale)
        unreadable = len(listed) - len(headers) if listed is not None else 0
        if small == "skip":
            headers = _keep_large_enough(headers, crop)
        elif headers:
            check_small_images(headers, crop)
        if not headers:
            raise ValueError(no_images(root, crop if small == "skip" else None, unreadable))
        paths = [h.path for h in headers]
        self.files, self.crop, self.augment, self.random_crop = paths, crop, augment, random_crop
        self.prescale, self.repeat = prescale, repeat
        self.min_texture, self.tries = float(min_texture), tries
        self._cache: dict[int, tuple[np.ndarray, int]] | None = {} if cache else None
        self._unreadable: set[int] = set()  # warned about (per worker process)

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def _array(self, i: int) -> tuple[np.ndarray, int]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        a, maxval = load_image_array(self.files[i], self.prescale)
        a = _pad_to(a, self.crop)
        if self._cache is not None:
            self._cache[i] = (a, maxval)
        return a, maxval

    UNREADABLE_MAX = 20
    """An item whose image cannot be decoded draws another image (from the item's own generator:
    the same one on every run); after this many in a row the error stands."""

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, g = _item_key(key, len(self))
        i = index % len(self.files)
        for attempt in range(self.UNREADABLE_MAX + 1):
            try:
                a, maxval = self._array(i)
                break
            except (OSError, ValueError) as e:
                # the start read only headers: a file cut short is found here, hours in; one bad
                # file in a large folder should cost its crops, not the run (nor every resume)
                if attempt == self.UNREADABLE_MAX:
                    raise ValueError(f"{e} (and {self.UNREADABLE_MAX} other images drawn after it could not be "
                                     "decoded either)") from None
                if i not in self._unreadable:
                    self._unreadable.add(i)
                    log.warning("%s; training goes on without it (another image is drawn in its place)", e)
                i = int(torch.randint(0, len(self.files), (), generator=g))
        h, w = a.shape[:2]
        if self.random_crop:
            y, x = textured_position(a, maxval, self.crop, self.min_texture, self.tries, lambda: (
                int(torch.randint(0, h - self.crop + 1, (), generator=g)),
                int(torch.randint(0, w - self.crop + 1, (), generator=g))))
        else:
            y, x = (h - self.crop) // 2, (w - self.crop) // 2
        t = _crop_tensor(a, y, x, self.crop, maxval)
        return augment_dihedral(t, g) if self.augment else t


class PackedCropsDataset(Dataset):
    """Crops from a ``pack_crops`` file, optionally re-cropped smaller, with the same augmentations.

    ``path``: ``.npy`` or ``.safetensors`` holding uint8 ``(N, 3, S, S)``. ``crop``: output side
    (default S; a smaller value takes a random, or with ``random_crop=False`` central, window).
    Items: float32 ``(3, crop, crop)`` in [0, 1]; the key is an index, or ``(index, seed)``.
    """

    def __init__(
        self, path: str | Path, crop: int | None = None, *, augment: bool = True, random_crop: bool = True,
        repeat: int = 1,
    ) -> None:
        self.data = read_packed(path)
        size = self.data.shape[-1]
        self.crop = size if crop is None else crop
        _check_crop(self.crop)
        if self.crop > size:
            raise ValueError(f"crop {self.crop} is larger than the packed crops ({size}) in {str(path)!r}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.augment, self.random_crop, self.repeat = augment, random_crop, repeat

    def __len__(self) -> int:
        return self.data.shape[0] * self.repeat

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, g = _item_key(key, len(self))
        c = self.data[index % self.data.shape[0]]
        room = c.shape[-1] - self.crop
        if room and self.random_crop:
            y, x = torch.randint(0, room + 1, (2,), generator=g).tolist()
        else:
            y = x = room // 2
        t = c[:, y:y + self.crop, x:x + self.crop].float() / 255.0
        return augment_dihedral(t, g) if self.augment else t


class SeededSampler(Sampler):
    """A shuffled order of ``n`` items, each yielded as ``(index, seed)``: the dataset draws that
    item's random crop and flips from a generator seeded with ``seed``. Order and seeds come from
    this sampler's own generator, in the main process, so the batches of a ``DataLoader`` do not
    depend on its number of workers (with plain indices they did: each worker seeds the global RNG
    its own way) and two samplers with the same seed give the same items. ``reseed`` restarts the
    stream (a resumed run); each epoch (``iter``) continues it."""

    def __init__(self, n: int, seed: int = 0) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator).tolist()
        return iter(zip(order, seeds))


def _item_key(key: int | tuple[int, int], n: int) -> tuple[int, torch.Generator | None]:
    """A dataset key → (index in range, the item's generator or None for the global RNG)."""
    index, g = key, None
    if isinstance(key, tuple):
        if len(key) != 2:
            raise ValueError(f"expected an index or (index, seed), got {key!r}")
        index, g = key[0], torch.Generator().manual_seed(int(key[1]))
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} items")
    return index, g


# ----------------------------------------------------------------------------- packing
def read_packed(path: str | Path) -> torch.Tensor:
    """Load a packed-crops file (:func:`pack_crops`): uint8 ``(N, 3, S, S)`` tensor (CPU). A file
    that is not one is a ValueError naming it, what it is not, and the command that makes one."""
    path = Path(path)
    what = (f"{str(path)!r} is not a packed-crops file (a .npy of uint8 (N, 3, S, S), or a .safetensors with "
            "a 'crops' tensor of them; make one with python -m upsr_core.train.data --photos DIR --out FILE)")
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise ValueError(f"{what}: it starts with {magic!r}, not a .npy file's b'\\x93NUMPY'")
        try:
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:  # cut short, or an object array (which would need a pickle)
            raise ValueError(f"{what}: {str(e).splitlines()[0]}") from None
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..checkpoint import check_safetensors_header

        check_safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{what}: {e}") from None
        if "crops" not in tensors:
            raise ValueError(f"{what}: it holds no 'crops' tensor, only {sorted(tensors)[:5]}")
        data = tensors["crops"]
    else:
        raise ValueError(f"packed crops must be .npy or .safetensors, got {str(path)!r}")
    if data.dtype != torch.uint8 or data.ndim != 4 or data.shape[1] != 3 or data.shape[2] != data.shape[3]:
        raise ValueError(f"{what}: it holds {data.dtype} {tuple(data.shape)}")
    return data


LUMA = (0.299, 0.587, 0.114)  # luma weights of the texture measure


def _texture(c: np.ndarray, maxval: int) -> float:
    """Mean |gradient| of luma in 8-bit units (the eval pairs' texture measure)."""
    y = c.astype(np.float32) @ np.array(LUMA, np.float32) * (255.0 / maxval)
    return float((np.abs(np.diff(y, axis=0)).mean() + np.abs(np.diff(y, axis=1)).mean()) / 2)


def check_texture_filter(min_texture: float, tries: int) -> None:
    """Raise ValueError unless min_texture >= 0 (not NaN) and tries >= 1."""
    if not min_texture >= 0.0:  # also refuses NaN
        raise ValueError(f"min_texture must be >= 0, got {min_texture!r}")
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")


def textured_position(a: np.ndarray, maxval: int, crop: int, min_texture: float, tries: int,
                      draw: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """A crop position (y, x) from ``draw()``, re-drawn up to ``tries`` draws in all until the
    crop's texture reaches ``min_texture`` (else the most textured draw); min_texture <= 0: the
    first draw, its texture not computed."""
    if min_texture <= 0:
        return draw()
    best: tuple[float, int, int] | None = None
    for _ in range(tries):
        y, x = draw()
        t = _texture(a[y:y + crop, x:x + crop], maxval)
        if best is None or t > best[0]:
            best = (t, y, x)
        if t >= min_texture:
            break
    return best[1], best[2]


def _cut(a: np.ndarray, maxval: int, crop: int, n: int, rng: np.random.Generator, min_texture: float,
         tries: int = 10) -> list[tuple[int, int, np.ndarray]]:
    """``n`` random crops (y, x, uint8 (crop, crop, 3)), see :func:`textured_position`."""
    h, w = a.shape[:2]
    out = []
    for _ in range(n):
        y, x = textured_position(a, maxval, crop, min_texture, tries,
                                 lambda: (int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))))
        out.append((y, x, to_uint8(a[y:y + crop, x:x + crop], maxval)))
    return out


def pack_crops(
    root: str | Path | None, out_path: str | Path, crop: int = 256, per_image: int = 12, seed: int = 0, *,
    files: Sequence[str | Path] | None = None, prescale: Prescale = "auto", small: Small = "skip",
    min_texture: float = 0.0,
) -> dict:
    """Cut ``per_image`` random crops of every image and store them in one file.

    Images come from ``files`` or, if None, ``list_images(root)``. Crop positions depend only on
    ``seed`` and the file name (not on the list order). ``small``: images below ``crop`` are
    reflect-padded or skipped. ``min_texture``: re-draw flat crops (see ``_cut``).
    Writes ``out_path`` (``.npy`` or ``.safetensors``; uint8 ``(N, 3, crop, crop)``, 16-bit
    sources rounded to 8 bits) and ``out_path`` with suffix ``.json`` (settings and, per crop,
    source file, y, x, prescale factor). Returns that JSON content.
    """
    _check_crop(crop)
    _check_small(small)
    out_path = Path(out_path)
    if out_path.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"out_path must end in .npy or .safetensors, got {str(out_path)!r}")
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    paths = [Path(p) for p in files] if files is not None else list_images(root or ".")
    if small == "skip":  # (with 'pad', an unreadable image is an error naming it, when it is read)
        paths = [h.path for h in _keep_large_enough(scan_headers(paths, prescale), crop)]
    if not paths:
        raise ValueError(f"no usable images to pack (root={root!r}, crop={crop})")
    crops, items = [], []
    # each file by its path below ``root`` (a flat folder: its name), so that day1/IMG_0001.JPG and
    # day2/IMG_0001.JPG get crops of their own and are told apart in the JSON; a list of files by
    # its name (as before: a group's crops stay the same), and two of one name are refused
    rels = [p.relative_to(root).as_posix() if files is None else p.name for p in paths]
    twice = sorted({r for r in rels if rels.count(r) > 1})
    if twice:
        raise ValueError(f"files {twice} are given more than once by name (from different folders): their crops "
                         "and the JSON would not tell them apart; pack their folder instead (root)")
    for p, rel in zip(paths, rels):
        a, maxval = load_image_array(p, prescale)
        with open_image(p) as im:
            factor = _prescale_factor(im.size, prescale)
        a = _pad_to(a, crop)
        rng = np.random.default_rng([seed, zlib.crc32(rel.encode())])
        for y, x, c in _cut(a, maxval, crop, per_image, rng, min_texture):
            crops.append(c.transpose(2, 0, 1))
            items.append({"file": rel, "y": y, "x": x, "prescale": factor})
        log.info("packed %d crops of %s", per_image, rel)
    data = np.ascontiguousarray(np.stack(crops))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".npy":
        with write_atomically(out_path) as f:
            np.save(f, data)
    else:
        from ..checkpoint import write_safetensors

        write_safetensors({"crops": torch.from_numpy(data)}, out_path)
    info = {"format": "upsr-packed-crops-1", "count": len(items), "crop": crop, "per_image": per_image, "seed": seed,
                "prescale": prescale, "min_texture": min_texture, "small": small, "items": items}
    write_text(out_path.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: pack the crops of a folder or of a SOURCES.tsv group into one file. Returns the exit
    code: 0, or 2 with one ``error:`` line for a bad value, a missing folder, an unreadable image."""
    try:
        _pack_main(argv)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _pack_main(argv: Sequence[str] | None) -> None:
    ap = OneLineParser(prog="python -m upsr_core.train.data",
                       description="Pack random HR crops into one uint8 file for training.")
    ap.add_argument("--photos", required=True, help="image folder (with SOURCES.tsv when --group is used)")
    ap.add_argument("--group", default=None, help="SOURCES.tsv group to pack, e.g. A_train (default: all images)")
    ap.add_argument("--out", required=True, type=writable_file((".npy", ".safetensors"), exact=True),
                    help="output .npy or .safetensors (a .json is written beside it)")
    ap.add_argument("--crop", type=int_min(1), default=256)
    ap.add_argument("--per-image", type=int_min(1), default=12)
    ap.add_argument("--seed", type=int_min(0), default=0)
    ap.add_argument("--prescale", default="auto", help="'auto' or an integer reduction factor")
    ap.add_argument("--min-texture", type=float_range(0.0), default=0.0)
    ap.add_argument("--small", choices=("pad", "skip"), default="skip")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = photos_of_group(a.photos, a.group) if a.group else None
    try:
        prescale: Prescale = "auto" if a.prescale == "auto" else int(a.prescale)
    except ValueError:
        raise ValueError(f"--prescale must be 'auto' or an integer >= 1, got {a.prescale!r}") from None
    info = pack_crops(a.photos, a.out, a.crop, a.per_image, a.seed, files=files, prescale=prescale,
                      small=a.small, min_texture=a.min_texture)
    size = Path(a.out).stat().st_size
    print(f"{info['count']} crops of {a.crop}px from {len({i['file'] for i in info['items']})} images "
          f"-> {a.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
