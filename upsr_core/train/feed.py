"""HR batches for training, produced on the training device.

* :class:`PackedFeed` keeps a packed-crops file (uint8 (N,3,S,S), see ``data.read_packed``)
  on the device and draws random crops with random flips/rotations per image from a
  ``torch.Generator`` living on that device: no worker processes, no host copies, and an
  exactly resumable stream (the generator state is checkpointed).
* :class:`FolderFeed` wraps ``data.ImageFolderDataset`` in a DataLoader (CPU workers);
  not bit-resumable (worker RNG), good for large folders.

Both return float32 (B, 3, crop, crop) in [0, 1] on the device; LR images are then made on
the device in batch by ``degradations.degrade`` (see :func:`make_lr`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data import ImageFolderDataset, read_packed
from .degradations import bicubic_degrade, degrade

__all__ = ["PackedFeed", "FolderFeed", "make_feed", "make_lr", "PACKED_SUFFIXES"]

log = logging.getLogger(__name__)
PACKED_SUFFIXES = (".npy", ".safetensors")


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
        x = src.float() / 255.0
        m = flips.bool()[:, :, None, None, None]
        x = torch.where(m[:, 0], x.flip(-1), x)
        x = torch.where(m[:, 1], x.flip(-2), x)
        return torch.where(m[:, 2], x.transpose(-1, -2), x)


class FolderFeed:
    """Random crops of the images of a folder through a DataLoader (CPU workers)."""

    def __init__(self, root: str | Path, crop: int, device: torch.device, batch: int, *, workers: int = 4,
                 seed: int = 0, min_texture: float = 0.0):
        self.dataset = ImageFolderDataset(root, crop, repeat=1000, cache=True, min_texture=min_texture)
        g = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(self.dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                 generator=g, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        self.device, self.batch = device, batch
        self._it = iter(self.loader)
        log.info("folder feed: %d images in %s, random %d px crops (min texture %g), %d workers",
                 len(self.dataset.files), root, crop, min_texture, workers)

    def next(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if batch != self.batch:
            raise ValueError(f"FolderFeed was built for batch {self.batch}, asked for {batch}")
        try:
            x = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            x = next(self._it)
        return x.to(self.device, non_blocking=True)


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
    return path.is_dir() and any(p.suffix in PACKED_SUFFIXES for p in path.iterdir())


def make_feed(data: str | Path, crop: int, device: torch.device, batch: int, *, shard: tuple[int, int] = (0, 1),
              workers: int = 4, seed: int = 0, min_texture: float = 0.0):
    """PackedFeed for packed crops, else FolderFeed for a folder of images (``min_texture``: see
    ``ImageFolderDataset``; packed crops were filtered when packed, so it does not apply to them)."""
    if is_packed(data):
        if min_texture:
            log.warning("min texture %g ignored: %s holds packed crops (filter them with pack_crops' min_texture)",
                        min_texture, data)
        return PackedFeed(data, crop, device, shard=shard)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {str(data)!r} is neither a folder of images nor a packed-crops file")
    return FolderFeed(data, crop, device, batch, workers=workers, seed=seed + 7919 * shard[0], min_texture=min_texture)


def make_lr(hr: torch.Tensor, generator: torch.Generator, degradation: str = "realesrgan") -> torch.Tensor:
    """LR (B,3,H/4,W/4) in [0,1] from HR (B,3,H,W): 'realesrgan' (second-order) or 'bicubic'."""
    if degradation == "realesrgan":
        with torch.autocast(hr.device.type, enabled=False):
            return degrade(hr.float(), generator)
    if degradation == "bicubic":
        return bicubic_degrade(hr)
    raise ValueError(f"degradation must be 'realesrgan' or 'bicubic', got {degradation!r}")
