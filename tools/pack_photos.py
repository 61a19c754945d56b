"""Write the training photos of one split group as JPEGs into a folder that travels to the GPU.

    python tools/pack_photos.py                  # photos/ group A_train -> .devcarry/train_photos/

The GPU run (``tools/device_train.sh``, ``MODE=finetune``) trains on this folder with
``--data .devcarry/train_photos --feed device``: ``PhotoFeed`` takes a fresh random crop (with
random flips/90° rotations) of a whole photo every step, instead of the 164 fixed 256-px crops
of ``.devcarry/train_pack/A_train_256.npy`` — far more variety for the same carry budget.

What is written, and why:

* the photos listed with ``group == A_train`` in ``photos/SOURCES.tsv`` (``--group``); the
  ``A_val`` photos are never written (their crops are the evaluation pairs);
* reduced with ``prescale auto`` (Lanczos by ``floor(short side / 1024)`` when that is >= 2,
  ``upsr_core.train.data.load_image_array``), the same reduction ``make_pairs.py`` applied to the
  evaluation pairs and ``pack_crops`` to the packed crops: training sees the same scale of
  detail per pixel as the evaluation (10 of the 41 A_train photos are reduced: 9 by 2, 1 by 3);
* JPEG quality 95 with 4:4:4 chroma (no chroma subsampling: the HR targets keep full-resolution
  colour; the sources were JPEGs of quality 70-99 already, so q95 adds little). 41 photos take
  26.6 MiB, so no further downscaling is needed; ``--max-side`` can cap the longest side
  (Lanczos) should the carry budget ever require it — at the cost of a scale shift away from
  the evaluation pairs, which is why it is off by default;
* ``PHOTOS.json`` beside them: per photo the source, its original and written size, the
  reduction factor, bytes and sha256 (the dataset ignores non-image files).

The folder is under ``.devcarry/`` (gitignored): photos are never committed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from upsr_core.imageio import open_image  # noqa: E402
from upsr_core.train.data import (  # noqa: E402
    IMAGE_SUFFIXES,
    _prescale_factor,
    load_image_array,
    photos_of_group,
    to_uint8,
)


def write_photos(photos: Path, group: str, out: Path, *, quality: int = 95, max_side: int | None = None,
                 prescale: str | int = "auto") -> dict:
    """Write the group's photos as ``out/<stem>.jpg``; returns the ``PHOTOS.json`` content."""
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if max_side is not None and max_side < 256:
        raise ValueError(f"--max-side must be >= 256 (the training crop), got {max_side}")
    files = photos_of_group(photos, group)
    by_name: dict[str, Path] = {}
    for p in files:  # a.png and a.jpg, or x/a.jpg and y/a.jpg: one would overwrite the other
        other = by_name.setdefault(p.stem + ".jpg", p)
        if other != p:
            raise ValueError(f"{other} and {p} would both be written as {out / (p.stem + '.jpg')}; rename one")
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for p in files:
        a, maxval = load_image_array(p, prescale)
        with open_image(p) as im:  # the user's own photos: no bomb bound, as training
            orig = im.size
            factor = _prescale_factor(orig, prescale)
        img = Image.fromarray(to_uint8(a, maxval))
        if max_side is not None and max(img.size) > max_side:
            s = max_side / max(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, subsampling=0)
        data = buf.getvalue()
        dst = out / (p.stem + ".jpg")
        dst.write_bytes(data)
        items.append({"file": dst.name, "source": p.name, "source_size": list(orig), "prescale": factor,
                      "size": list(img.size), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        print(f"{p.name} {orig[0]}x{orig[1]} -> {dst.name} {img.width}x{img.height} {len(data) / 2**20:.2f} MiB",
              flush=True)
    info = {"format": "upsr-train-photos-1", "group": group, "count": len(items), "quality": quality,
            "subsampling": "4:4:4", "prescale": prescale, "max_side": max_side,
            "total_bytes": sum(i["bytes"] for i in items), "items": items}
    (out / "PHOTOS.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    written = {i["file"] for i in items}
    extra = sorted(q.name for q in out.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.name not in written)
    if extra:
        print(f"warning: {len(extra)} other image(s) in {out} will be trained on too: {extra[:5]}", file=sys.stderr)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", default="photos", help="folder with the photos and SOURCES.tsv")
    ap.add_argument("--group", default="A_train", help="SOURCES.tsv group to write")
    ap.add_argument("--out", default=".devcarry/train_photos", help="output folder")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--max-side", type=int, default=None, help="cap the longest side (default: no cap)")
    ap.add_argument("--budget-mib", type=float, default=40.0, help="fail if the JPEGs take more than this")
    a = ap.parse_args(argv)
    try:
        info = write_photos(Path(a.photos), a.group, Path(a.out), quality=a.quality, max_side=a.max_side)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mib = info["total_bytes"] / 2**20
    print(f"{info['count']} photos of group {a.group} -> {a.out} ({mib:.1f} MiB, JPEG q{a.quality} 4:4:4)")
    if mib > a.budget_mib:
        print(f"error: {mib:.1f} MiB exceeds --budget-mib {a.budget_mib}: use --max-side or a lower --quality",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
