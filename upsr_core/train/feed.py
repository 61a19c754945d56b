"""HR batches for training, produced on the training device.

* :class:`PackedFeed` keeps a packed-crops file (uint8 (N,3,S,S), see ``data.read_packed``)
  on the device and draws random crops with random flips/rotations per image from a
  ``torch.Generator`` living on that device: no worker processes, no host copies, and an
  exactly resumable stream (the generator state is checkpointed).
* :class:`PhotoFeed` decodes the images of a folder once, keeps them (uint8) on the device
  and cuts a fresh random crop of a whole image per batch item, with the same flips/rotations
  and an optional texture filter evaluated in O(1) per candidate from summed-area tables: like
  PackedFeed no workers (no shared memory), exactly resumable; for folders that fit the device
  (the 41 training photos: 100 Mpx, 0.3 GB, + 1.6 GB of tables with the filter on; a folder
  that would not fit the free memory is refused before any image is decoded).
* :class:`FolderFeed` wraps ``data.ImageFolderDataset`` in a DataLoader (CPU workers), good for
  large folders; its order and every crop's seed come from a ``data.SeededSampler``, so the
  batches are the same with any ``--workers``. Not bit-resumable (the stream restarts at the
  step, it does not continue mid-epoch): a resumed run calls :meth:`FolderFeed.resume_at` so its
  shuffle and crops are new ones, not the first run's again.

Both return float32 (B, 3, crop, crop) in [0, 1] on the device; LR images are then made on
the device in batch by ``degradations.degrade`` (see :func:`make_lr`).
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..cpu_memory import available_bytes
from .data import (
    IMAGE_SUFFIXES,
    LUMA,
    ImageFolderDataset,
    ImageHeader,
    SeededSampler,
    _pad_to,
    check_small_images,
    check_texture_filter,
    decoded_bytes,
    list_images,
    load_image_array,
    no_images,
    read_packed,
    scan_headers,
    to_uint8,
)
from .degradations import RealESRGANDegradation, bicubic_degrade, degrade
from .loop import restore_generator

__all__ = ["PackedFeed", "PhotoFeed", "FolderFeed", "PairPool", "DegradedPairs", "make_feed", "make_lr",
           "default_pool_size", "degradation_seed", "PACKED_SUFFIXES", "FEEDS"]

log = logging.getLogger(__name__)
PACKED_SUFFIXES = (".npy", ".safetensors")
OFFICIAL_POOL = 160  # UPSR's queue_size: degraded pairs mixed across batches (PairPool)


class PackedFeed:
    """Random crops from packed uint8 crops held on ``device``.

    ``path``: packed file, or a folder holding exactly one (``train_pack/``). ``crop``: HR side
    (<= packed side). ``shard``: (rank, world) — each rank draws from its own slice of crops.
    """

    def __init__(self, path: str | Path, crop: int, device: torch.device, *, shard: tuple[int, int] = (0, 1)):
        path = resolve_packed(path)
        data = read_packed(path)
        rank, world = shard
        if world > 1 and data.shape[0] >= world:
            data = data[rank::world]
        if crop > data.shape[-1]:
            raise ValueError(f"crop {crop} is larger than the packed crops ({data.shape[-1]}) in {str(path)!r}")
        self.data = data.to(device)
        self.crop, self.device, self.path = crop, device, path
        log.info("packed feed: %d crops of %d px from %s on %s", data.shape[0], data.shape[-1], path, device)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def next(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, 3, crop, crop) float32 in [0, 1]; all randomness from ``generator``."""
        n, _, s, _ = self.data.shape
        idx = torch.randint(0, n, (batch,), generator=generator, device=generator.device).to(self.device)
        off = torch.randint(0, s - self.crop + 1, (batch, 2), generator=generator, device=generator.device)
        flips = torch.randint(0, 2, (batch, 3), generator=generator, device=generator.device).to(self.device)
        src = self.data[idx]
        if self.crop < s:
            ar = torch.arange(self.crop, device=self.device)
            off = off.to(self.device)
            rows = (off[:, 0, None] + ar)[:, None, :, None].expand(-1, 3, -1, s)
            src = torch.gather(src, 2, rows)
            cols = (off[:, 1, None] + ar)[:, None, None, :].expand(-1, 3, self.crop, -1)
            src = torch.gather(src, 3, cols)
        return _flip_rotate(src.float() / 255.0, flips)


def _flip_rotate(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per item: horizontal flip, vertical flip, transpose where ``flips`` (B, 3) is 1."""
    m = flips.bool()[:, :, None, None, None]
    x = torch.where(m[:, 0], x.flip(-1), x)
    x = torch.where(m[:, 1], x.flip(-2), x)
    return torch.where(m[:, 2], x.transpose(-1, -2), x)


def _sat(d: torch.Tensor) -> torch.Tensor:
    """Summed-area table (h+1, w+1) float64 of a (h, w) map, zero first row and column."""
    return F.pad(d.double().cumsum(0).cumsum(1), (1, 0, 1, 0))


def _free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` (CUDA: the driver's count; CPU: Linux's MemAvailable), or None
    where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes() if device.type == "cpu" else None


def _check_room(headers: list[ImageHeader], crop: int, device: torch.device, texture: bool,
                root: str | Path) -> None:
    """Refuse, before any image is decoded, a folder whose images (uint8, padded to the crop) and,
    with the texture filter, two float64 summed-area tables per image (16 bytes per pixel) would
    not fit the memory free on ``device``."""
    px = decoded_bytes(headers, crop) // 3
    need = px * (3 + (16 if texture else 0))
    free = _free_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ValueError(f"--feed device: the {len(headers)} images of {str(root)!r} ({px / 1e6:.0f} Mpx) need about "
                         f"{need / 2**30:.1f} GiB on {device}" + (" with the texture tables of --min-texture"
                                                                  if texture else "")
                         + f", and {free / 2**30:.1f} GiB is free: use --feed loader (CPU workers decode each batch)"
                         + (" or --min-texture 0" if texture else ""))


class PhotoFeed:
    """Random crops of whole images held on ``device`` (see the module doc).

    ``root``: folder of images (recursive). ``crop``: HR side; smaller images are reflect-padded.
    ``min_texture``/``tries``: each item draws ``tries`` candidate positions and keeps the first
    whose texture (``data._texture``: mean |luma gradient| in 8-bit units) reaches
    ``min_texture``, else the most textured (0: one draw). Images are equally likely, whatever
    their size. ``shard``: (rank, world) — each rank holds its own slice of the images.
    """

    def __init__(self, root: str | Path, crop: int, device: torch.device, *, shard: tuple[int, int] = (0, 1),
                 min_texture: float = 0.0, tries: int = 10):
        check_texture_filter(min_texture, tries)
        files = list_images(root)
        rank, world = shard
        if world > 1 and len(files) >= world:
            files = files[rank::world]
        headers = scan_headers(files)
        if not headers:
            raise ValueError(no_images(root, unreadable=len(files)))
        check_small_images(headers, crop)
        self.crop, self.device, self.root = crop, device, Path(root)
        self.min_texture, self.tries = float(min_texture), tries if min_texture > 0 else 1
        _check_room(headers, crop, device, self.min_texture > 0, root)
        self.images: list[torch.Tensor] = []
        for p in (h.path for h in headers):
            a = _pad_to(to_uint8(*load_image_array(p)), crop)
            self.images.append(torch.from_numpy(np.array(a)).to(device).permute(2, 0, 1).contiguous())  # uint8
        self.sizes = torch.tensor([im.shape[1:] for im in self.images], device=device)  # (N, 2): H, W
        if self.min_texture > 0:
            # flat summed-area tables of |dy| and |dx| (float64), written image by image into one
            # buffer each (a list of tables, then a torch.cat, needed both at once), where each
            # image's table starts, and its row stride
            shapes = {"dy": [(h, w + 1) for h, w in self.sizes.tolist()],
                      "dx": [(h + 1, w) for h, w in self.sizes.tolist()]}
            self._flat = {k: torch.empty(sum(h * w for h, w in v), dtype=torch.float64, device=device)
                          for k, v in shapes.items()}
            self._base = {k: torch.tensor(np.cumsum([0] + [h * w for h, w in v[:-1]]), device=device)
                          for k, v in shapes.items()}
            self._stride = {k: torch.tensor([w for _, w in v], device=device) for k, v in shapes.items()}
            luma = torch.tensor(LUMA, device=device)[:, None, None]
            for i, img in enumerate(self.images):
                y = (img.float() * luma).sum(0)
                for k, d in (("dy", (y[1:] - y[:-1]).abs()), ("dx", (y[:, 1:] - y[:, :-1]).abs())):
                    start = int(self._base[k][i])
                    t = _sat(d).flatten()
                    self._flat[k][start:start + t.numel()] = t
        mpx = sum(im.shape[1] * im.shape[2] for im in self.images) / 1e6
        log.info("photo feed: %d images (%.1f Mpx) from %s on %s, random %d px crops, min texture %g (%d draws)",
                 len(self.images), mpx, root, device, crop, self.min_texture, self.tries)

    def __len__(self) -> int:
        return len(self.images)

    def _box(self, key: str, idx: torch.Tensor, r0, r1, c0, c1) -> torch.Tensor:
        sat, base, stride = self._flat[key], self._base[key][idx], self._stride[key][idx]
        at = lambda r, c: sat[base + r * stride + c]  # noqa: E731
        return at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)

    def texture(self, idx: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Texture of the crops at (y, x) of images ``idx`` (same-shape long tensors); needs min_texture > 0."""
        c = self.crop
        idx = idx[..., None].expand_as(y) if idx.dim() < y.dim() else idx
        dy = self._box("dy", idx, y, y + c - 1, x, x + c)
        dx = self._box("dx", idx, y, y + c, x, x + c - 1)
        return (dy + dx) / (2 * c * (c - 1))

    def next(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, 3, crop, crop) float32 in [0, 1]; all randomness from ``generator``."""
        gd, c = generator.device, self.crop
        idx = torch.randint(0, len(self.images), (batch,), generator=generator, device=gd).to(self.device)
        u = torch.rand(batch, self.tries, 2, generator=generator, device=gd).to(self.device)
        flips = torch.randint(0, 2, (batch, 3), generator=generator, device=gd).to(self.device)
        room = (self.sizes[idx] - c + 1)[:, None, :]  # (B, 1, 2) positions per axis
        pos = torch.minimum((u * room).long(), room - 1)  # (B, tries, 2)
        if self.tries > 1:
            tex = self.texture(idx, pos[..., 0], pos[..., 1])
            ok = tex >= self.min_texture
            pick = torch.where(ok.any(1), ok.float().argmax(1), tex.argmax(1))
            pos = pos[torch.arange(batch, device=self.device), pick]
        else:
            pos = pos[:, 0]
        crops = [self.images[i][:, y:y + c, x:x + c] for i, (y, x) in zip(idx.tolist(), pos.tolist())]
        return _flip_rotate(torch.stack(crops).float() / 255.0, flips)


class FolderFeed:
    """Random crops of the images of a folder through a DataLoader (CPU workers).

    An epoch lists every image ``max(1, EPOCH_SAMPLES // n)`` times (a few photos still make long
    epochs; ImageNet's 1.28 M images are listed once: the shuffle of a 1000× list would take tens
    of GB). A folder whose decoded images (from the headers, :func:`~.data.decoded_bytes`), times
    the workers that each keep a copy, fit ``CACHE_MAX_BYTES`` is kept decoded in each worker;
    a larger one is decoded per crop (a cache would grow with every image seen).
    """

    EPOCH_SAMPLES = 100_000
    CACHE_MAX_BYTES = 8 * 2**30

    def __init__(self, root: str | Path, crop: int, device: torch.device, batch: int, *, workers: int = 4,
                 seed: int = 0, min_texture: float = 0.0):
        listed = list_images(root)
        headers = scan_headers(listed)  # each header read once: a large folder takes minutes
        if not headers:
            raise ValueError(no_images(root, unreadable=len(listed)))
        held = decoded_bytes(headers, crop) * max(workers, 1)  # every worker keeps its own copy
        cache = held <= self.CACHE_MAX_BYTES
        log.info("folder feed: %s decoded (%.1f GiB in all %s)", "images kept" if cache else "images read per crop",
                 held / 2**30, "for its workers" if cache else f"would exceed {self.CACHE_MAX_BYTES / 2**30:g} GiB")
        self.dataset = ImageFolderDataset(root, crop, headers=headers, cache=cache, min_texture=min_texture,
                                          repeat=max(1, self.EPOCH_SAMPLES // len(headers)))
        self.seed = seed
        # Order and per-crop seeds from the sampler (seeded per torchrun rank by make_feed): the
        # same batches with any number of workers. The loader's generator is there only so that the
        # workers' base seed (which nothing draws from) is not taken from the global RNG.
        self.sampler = SeededSampler(len(self.dataset), seed)
        self.loader = DataLoader(self.dataset, batch_size=batch, sampler=self.sampler, num_workers=workers,
                                 drop_last=True, generator=torch.Generator().manual_seed(seed),
                                 persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                 worker_init_fn=ignore_stop_signals if workers > 0 else None)
        self.device, self.batch = device, batch
        self._it = None  # started by the first batch: resume_at() may reseed before
        log.info("folder feed: %d images in %s, random %d px crops (min texture %g), %d workers",
                 len(self.dataset.files), root, crop, min_texture, workers)

    def resume_at(self, step: int) -> None:
        """Reseed for a run resumed at ``step``: the order and the crops get a stream of their
        own, instead of the first run's sequence again. Call before the first batch."""
        if self._it is not None:
            raise RuntimeError("FolderFeed.resume_at must be called before the first batch")
        self.sampler.reseed(self.seed + 1_000_003 * step)

    def next(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if batch != self.batch:
            raise ValueError(f"FolderFeed was built for batch {self.batch}, asked for {batch}")
        if self._it is None:
            self._it = iter(self.loader)
        try:
            try:
                x = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                x = next(self._it)
        except (OSError, ValueError) as e:  # an image the workers could not read: its own message, not theirs
            raise type(e)(worker_message(str(e))) from None
        return x.to(self.device, non_blocking=True)


def worker_message(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (torch prefixes "Caught
    OSError in DataLoader worker process 0. Original Traceback …"); other text as it is."""
    if "in DataLoader worker process" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name, sep, msg = last.partition(": ")
    return msg if sep and name.replace(".", "").replace("_", "").isalnum() else last


def resolve_packed(path: str | Path) -> Path:
    """A packed file, or the single packed file inside a folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in PACKED_SUFFIXES)
        if len(found) != 1:
            raise ValueError(f"expected one .npy/.safetensors packed-crops file in {str(path)!r}, found "
                             f"{[p.name for p in found]}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"training data {str(path)!r} does not exist")
    return path


def is_packed(path: str | Path) -> bool:
    """True for a packed-crops file or a folder holding one and no images."""
    path = Path(path)
    if path.is_file():
        return path.suffix in PACKED_SUFFIXES
    if not path.is_dir():
        return False
    names = list(path.iterdir())
    packs = [p for p in names if p.suffix in PACKED_SUFFIXES]
    if packs and any(p.suffix.lower() in IMAGE_SUFFIXES for p in names):  # images first: as documented
        log.info("%s holds images: training on them, not on %s (give that file as --data to train from it)",
                 path, ", ".join(p.name for p in packs))
        return False
    return bool(packs)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker start: Ctrl-C sent to the whole process group (a terminal) is the main
    process's to handle — it finishes the step and saves a checkpoint (:meth:`Trainer.fit`) with
    the batches the workers still make. SIGTERM (``timeout``, a job scheduler, and the way
    multiprocessing and the DataLoader end their workers) ends a worker with exit code 0: killed
    by the signal, it made torch raise "DataLoader worker is killed by signal" in the main process;
    ignored, the main process's exit waited on it for ever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(_signum: int, _frame) -> None:
    raise SystemExit(0)


def default_workers() -> int:
    """DataLoader workers when --workers is not given: 4, or fewer on a machine with fewer cores
    (torch warns of more workers than cores, and they would only compete with the training)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


FEEDS = ("loader", "device")


def make_feed(data: str | Path, crop: int, device: torch.device, batch: int, *, shard: tuple[int, int] = (0, 1),
              workers: int | None = None, seed: int = 0, min_texture: float = 0.0, feed: str = "loader"):
    """PackedFeed for packed crops; for a folder of images FolderFeed (``feed='loader'``, with
    ``workers`` DataLoader workers, default :func:`default_workers`) or PhotoFeed (``feed='device'``). ``min_texture``:
    see ``ImageFolderDataset``; packed crops were filtered when packed, so it does not apply to
    them. Workers given where none are used are named in a warning, as is min_texture."""
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    packed = is_packed(data)  # lists a folder: once
    if workers is not None and (packed or feed == "device"):
        log.warning("--workers %d ignored: %s", workers,
                    f"{data} holds packed crops (no DataLoader)" if packed
                    else "--feed device crops on the training device (no DataLoader)")
    if packed:
        if min_texture:
            log.warning("min texture %g ignored: %s holds packed crops (filter them with pack_crops' min_texture)",
                        min_texture, data)
        return PackedFeed(data, crop, device, shard=shard)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {str(data)!r} is neither a folder of images nor a packed-crops file")
    if feed == "device":
        return PhotoFeed(data, crop, device, shard=shard, min_texture=min_texture)
    return FolderFeed(data, crop, device, batch, workers=default_workers() if workers is None else workers,
                      seed=seed + 7919 * shard[0], min_texture=min_texture)


def make_lr(hr: torch.Tensor, generator: torch.Generator, degradation: str = "realesrgan",
            config: RealESRGANDegradation | None = None) -> torch.Tensor:
    """LR (B,3,H/4,W/4) in [0,1] from HR (B,3,H,W): 'realesrgan' (second-order, ranges from
    ``config``, default the official ones) or 'bicubic'."""
    if degradation == "realesrgan":
        return degrade(hr.float(), generator, config=config)  # float32, autocast off inside
    if degradation == "bicubic":
        return bicubic_degrade(hr)
    raise ValueError(f"degradation must be 'realesrgan' or 'bicubic', got {degradation!r}")


class PairPool:
    """The official training-pair pool (Real-ESRGAN's ``_dequeue_and_enqueue``, UPSR
    ``queue_size: 160``): degraded pairs of several batches are mixed before training.

    The Real-ESRGAN degradation draws its resize kind/factor/mode and the final order once per
    batch (they change the tensor size); the pool breaks that correlation. While it fills, each
    batch passes through unchanged and is stored; once full, each call shuffles the pool with
    ``generator``, returns its first ``b`` pairs and puts the new batch in their place.
    ``size`` must be a multiple of the batch. Its contents are part of the training checkpoint
    (:meth:`state_dict`), so a resumed run continues exactly; a run resumed with another batch
    (another default size) keeps what fits of the stored pairs and fills on from there.
    """

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"pool size must be an integer >= 1, got {size!r}")
        self.size = size
        self.hr: torch.Tensor | None = None
        self.lr: torch.Tensor | None = None
        self.filled = 0

    def __call__(self, hr: torch.Tensor, lr: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hr`` (b,3,H,W), ``lr`` (b,3,H/4,W/4) in [0,1] -> a pair batch of the same shapes
        from the pool."""
        b = hr.shape[0]
        if self.size % b:
            raise ValueError(f"the pair pool size {self.size} must be a multiple of the batch {b}")
        if self.hr is None or self.hr.shape[1:] != hr.shape[1:] or self.lr.shape[1:] != lr.shape[1:]:
            self.hr = hr.new_empty((self.size, *hr.shape[1:]))
            self.lr = lr.new_empty((self.size, *lr.shape[1:]))
            self.filled = 0
        if self.filled < self.size:
            n = min(b, self.size - self.filled)  # < b: filled with another batch before a resume
            self.hr[self.filled:self.filled + n] = hr[:n]
            self.lr[self.filled:self.filled + n] = lr[:n]
            self.filled += n
            return hr, lr
        idx = torch.randperm(self.size, generator=generator, device=generator.device).to(self.hr.device)
        self.hr, self.lr = self.hr[idx], self.lr[idx]
        out = self.hr[:b].clone(), self.lr[:b].clone()
        self.hr[:b] = hr
        self.lr[:b] = lr
        return out

    def snapshot(self) -> tuple:
        """The state to :meth:`restore` if the step that follows is redone (compile fallback):
        the tensors a full pool replaces rather than writes, and the fill count."""
        return self.hr, self.lr, self.filled

    def restore(self, snap: tuple) -> None:
        self.hr, self.lr, self.filled = snap

    def state_dict(self) -> dict:
        """{'size', 'filled', 'hr', 'lr'}: the stored pairs (filled, 3, H, W) and (filled, 3, H/4,
        W/4) on the CPU, as uint8 levels where they lie on them exactly (the usual case: 8-bit
        crops, LR rounded by the degradation; 4× smaller), else in their float dtype."""
        if self.hr is None or self.filled == 0:
            return {"size": self.size, "filled": 0}
        return {"size": self.size, "filled": self.filled, "hr": _compact(self.hr[:self.filled]),
                "lr": _compact(self.lr[:self.filled])}

    def load_state_dict(self, sd: dict, device: torch.device) -> None:
        self.filled = min(int(sd["filled"]), self.size)
        if int(sd["size"]) != self.size:  # another --batch (the default size follows it) or --pool
            log.info("pair pool: the checkpoint's held %s of %s pairs, this run's holds %d: %d kept, filling on",
                     sd["filled"], sd["size"], self.size, self.filled)
        if self.filled == 0:
            self.hr = self.lr = None
            return
        hr, lr = _expand(sd["hr"], device)[:self.filled], _expand(sd["lr"], device)[:self.filled]
        self.hr = hr.new_empty((self.size, *hr.shape[1:]))
        self.lr = lr.new_empty((self.size, *lr.shape[1:]))
        self.hr[:self.filled], self.lr[:self.filled] = hr, lr


def _compact(x: torch.Tensor) -> torch.Tensor:
    """x on the CPU as uint8 levels if ``level / 255`` gives back exactly x (float32), else as it
    is. Checked on x's own device: CUDA divides by 255 as a multiplication by 1/255, which rounds
    otherwise than the CPU for about half the levels, and the feeds divide there."""
    x = x.detach()
    if x.dtype == torch.float32:
        q = torch.round(x * 255.0).clamp(0, 255).to(torch.uint8)
        if torch.equal(q.float() / 255.0, x):
            return q.cpu()
    return x.cpu()


def _expand(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Inverse of :func:`_compact` on ``device`` (divided there, as the feeds do)."""
    return x.to(device).float() / 255.0 if x.dtype == torch.uint8 else x.to(device)


class DegradedPairs:
    """What both training tasks do before their loss: HR crops from ``self.feed`` → LR by
    :func:`make_lr` (on ``self.deg_generator`` if set, else the step's generator) → the pair
    pool ``self.pool`` (if any); and the part of the training checkpoint this owns. Needs the
    attributes ``feed``, ``batch``, ``degradation``, ``deg_config``, ``deg_generator``, ``pool``.
    """

    restored_deg_generator = False  # set by load_training_state when the checkpoint held its state

    def degraded_pair(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """HR (batch,3,H,W) and LR (batch,3,H/4,W/4), float32 in [0,1], on the feed's device."""
        hr = self.feed.next(self.batch, generator)
        lr = make_lr(hr, self.deg_generator or generator, self.degradation, self.deg_config)
        if self.pool is not None:
            hr, lr = self.pool(hr, lr, generator)
        return hr, lr

    def training_state(self) -> dict:
        """For the checkpoint: {'pool': PairPool.state_dict()} with a pool, {'deg_generator':
        its state (uint8 tensor)} with a separate degradation generator."""
        sd = {}
        if self.pool is not None:
            sd["pool"] = self.pool.state_dict()
        if self.deg_generator is not None:
            sd["deg_generator"] = self.deg_generator.get_state()
        return sd

    def load_training_state(self, sd: dict, device: torch.device) -> None:
        """Restore what :meth:`training_state` saved (a checkpoint of an older version may hold
        neither part: the pool then fills anew; the caller reseeds the degradation generator)."""
        if self.pool is not None and "pool" in sd:
            self.pool.load_state_dict(sd["pool"], device)
        elif self.pool is not None:
            log.info("the checkpoint holds no pair pool (an older run, or --pool 0): the pool fills anew")
        elif "pool" in sd and sd["pool"].get("filled"):
            log.warning("the checkpoint holds a pair pool of %d pairs but this run has none (--pool 0): "
                        "its pairs are dropped", sd["pool"]["size"])
        if self.deg_generator is not None and "deg_generator" in sd:  # not restored: the caller reseeds it
            self.restored_deg_generator = restore_generator(self.deg_generator, sd["deg_generator"], "degradation")

    def snapshot(self) -> tuple:
        """State to :meth:`restore` if a step is redone with the same draws (compile fallback)."""
        return (None if self.pool is None else self.pool.snapshot(),
                None if self.deg_generator is None else self.deg_generator.get_state())

    def restore(self, snap: tuple) -> None:
        if snap[0] is not None:
            self.pool.restore(snap[0])
        if snap[1] is not None:
            self.deg_generator.set_state(snap[1])


def degradation_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a separate (CPU) degradation generator: per rank, and per step where a resumed
    run has no stored state for it (so it never replays the first run's draws)."""
    return seed + 17 + rank + 1_000_003 * step


def default_pool_size(batch: int, degradation: str) -> int:
    """The official 160 pairs rounded down to a multiple of ``batch`` (Real-ESRGAN degradation;
    0 = no pool for bicubic, whose pairs share no per-batch draws, or a batch above 160)."""
    if degradation != "realesrgan":
        return 0
    return OFFICIAL_POOL // batch * batch

