"""Copy one manifest group's evaluation pairs into folders of their own (the GPU run's carry).

    python tools/val_pairs.py .devcarry/train_pack          # A_val, 256: -> .devcarry/train_pack/A_val/

``shared/data/make_pairs.py`` writes every pair of group A (``A_train`` and ``A_val`` mixed) into
``PAIRS/A/hr256``, ``PAIRS/A/lr256_realesrgan``, … and names each pair's group in
``PAIRS/manifest.jsonl``. ``python -m upsr_core eval`` reads that layout directly
(``--manifest PAIRS/manifest.jsonl --group A_val``); this tool exists for the GPU run
(``tools/device_train.sh``), which must carry as little as possible: the 32 ``A_val`` pairs at
HR 256 take ~3 MiB, group A's folders 51 MiB. It writes ``OUT/hr256`` and
``OUT/lr256_realesrgan`` (``--size``, ``--kind``; default ``OUT`` = ``PAIRS/<group>``) with
byte-for-byte copies, and refuses an ``OUT`` that already holds other images (a stale copy would
be scored silently).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from upsr_core.evaluate import manifest_ids  # noqa: E402


def copy_group(pairs: Path, group: str, out: Path, *, size: int = 256, kind: str = "realesrgan") -> int:
    """Copy the group's HR and LR PNGs from ``pairs/A`` (or ``pairs/B``) to ``out``; returns the count."""
    ids = manifest_ids(pairs / "manifest.jsonl", group, size)
    src = pairs / ("B" if group == "B" else "A")
    subs = (f"hr{size}", f"lr{size}_{kind}")
    for sub in subs:
        missing = [i for i in ids if not (src / sub / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(ids)} {group} pairs are missing in {src / sub} "
                                    f"(first: {missing[0]}.png): was {pairs} made by make_pairs.py?")
    want = {f"{i}.png" for i in ids}
    for sub in subs:
        d = out / sub
        if d.is_dir():
            other = sorted(p.name for p in d.iterdir() if p.name not in want)
            if other:
                raise ValueError(f"{d} holds {len(other)} file(s) that are not {group} pairs (first: {other[0]}); "
                                 f"remove the folder or choose another --out")
        d.mkdir(parents=True, exist_ok=True)
        for i in ids:
            shutil.copyfile(src / sub / f"{i}.png", d / f"{i}.png")
    return len(ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", type=Path, help="make_pairs.py's --out folder (with manifest.jsonl and A/)")
    ap.add_argument("--group", default="A_val")
    ap.add_argument("--size", type=int, default=256, choices=[256, 512], help="HR size of the pairs")
    ap.add_argument("--kind", default="realesrgan", choices=["realesrgan", "bicubic"], help="LR degradation")
    ap.add_argument("--out", type=Path, default=None, help="default: PAIRS/<group>")
    a = ap.parse_args(argv)
    out = a.out or a.pairs / a.group
    try:
        n = copy_group(a.pairs, a.group, out, size=a.size, kind=a.kind)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} {a.group} pairs (HR {a.size}, LR {a.kind}) -> {out}/hr{a.size}, {out}/lr{a.size}_{a.kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
