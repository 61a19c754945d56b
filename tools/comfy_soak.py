"""Soak probe: many runs of the basic workflow in one long-lived ComfyUI server, and its memory after each.

An artist's ComfyUI runs for days: every image size, seed, precision and implementation switch
must leave the server where it was. This starts a throw-away server (tests/e2e/comfy_server.py,
CPU, loopback), then queues ``upsr_basic`` ``--runs`` times, each with another LR size (so the
nets' size caches and the tile plans see new shapes), another seed, and every ``--switch-every``
runs the other implementation, precision or tile size (so the model is reloaded, and the
image is run in one piece or in tiles), and prints the server's
resident memory (VmRSS, from /proc) after each run, and its mean over each full cycle of
settings: a leak shows as cycle means that keep rising, where glibc's ups and downs average out.

    COMFYUI_DIR=/work/comfyui COMFYUI_PYTHON=/work/comfy_venv/bin/python \\
    UPSR_E2E_MODEL=upsr_core/weights/upsr_demo_x4.safetensors \\
        python tools/comfy_soak.py --runs 40 --json soak.json

Linux only (reads /proc). Needs shared/tools/comfy_e2e.py (or $UPSR_SHARED/tools).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import comfy_server  # noqa: E402

SIZES = [(96, 128), (64, 64), (72, 100), (128, 96), (80, 120), (100, 72), (64, 128), (112, 88)]
# (implementation, precision, tile, overlap): precision auto is fp32 on the CPU, but another value still
# makes ComfyUI load the model anew; bf16/fp16 are left out (on an AVX2 CPU a bf16 run of LR 112x88 took
# over 2 min against 8 s in fp32)
SETTINGS = [("fast", "auto", 512, 64), ("reference", "auto", 512, 64), ("fast", "fp32", 64, 16),
            ("reference", "fp32", 64, 16)]


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def soak(client, e2e, server, runs: int, switch_every: int, log=print) -> list[dict]:
    """Queue ``upsr_basic`` ``runs`` times on a running server (``server``: comfy_server.Server),
    cycling LR sizes every run and SETTINGS every ``switch_every`` runs; each result is downloaded
    and must be the ×4 size of its input. Returns one dict per run with the server's RSS after it."""
    src = Image.open(REPO / "docs" / "sample_lr.png").convert("RGB")
    for i, (h, w) in enumerate(SIZES):
        src.resize((w, h), Image.BICUBIC).save(server.input_dir / f"soak_{i}.png")
    workflow = json.loads((REPO / "example_workflows" / "upsr_basic.json").read_text())
    prompt = e2e.ui_to_api(workflow, client.object_info())
    (load_image,) = [k for k, v in prompt.items() if v["class_type"] == "LoadImage"]
    (loader,) = [k for k, v in prompt.items() if v["class_type"] == "LoadUPSRModel"]
    (sampler,) = [k for k, v in prompt.items() if v["class_type"] == "UPSRSample"]
    (save,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    rss, hwm = rss_mib(server.proc.pid)
    log(f"server pid {server.proc.pid}: RSS {rss:.0f} MiB before the first run")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            impl, precision, tile, overlap = SETTINGS[(run // switch_every) % len(SETTINGS)]
            h, w = SIZES[run % len(SIZES)]
            prompt[load_image]["inputs"]["image"] = f"soak_{run % len(SIZES)}.png"
            prompt[loader]["inputs"].update(implementation=impl, precision=precision)
            prompt[sampler]["inputs"].update(seed=run, tile=tile, overlap=overlap)
            t0 = time.perf_counter()
            entry = client.wait(client.submit(prompt), timeout=900)
            seconds = time.perf_counter() - t0
            status = entry["status"].get("status_str")
            if status != "success":
                raise RuntimeError(f"run {run} ended {status}: {json.dumps(entry['status'])[-1500:]}")
            rss, hwm = rss_mib(server.proc.pid)
            (image,) = entry["outputs"][save]["images"]
            with Image.open(client.download(image, tmp)) as out:
                if out.size != (4 * w, 4 * h):
                    raise RuntimeError(f"run {run}: LR {w}x{h} gave {out.size[0]}x{out.size[1]}, "
                                       f"expected {4 * w}x{4 * h}")
            rows.append({"run": run, "lr": [h, w], "implementation": impl, "precision": precision, "tile": tile,
                         "seconds": round(seconds, 2), "rss_mib": round(rss, 1), "hwm_mib": round(hwm, 1)})
            log(f"run {run:3d}  LR {h:3d}x{w:<3d} {impl:9s} {precision:4s} tile {tile:3d} "
                f"{seconds:6.1f} s  RSS {rss:7.0f} MiB  peak {hwm:7.0f} MiB")
    return rows


def cycle_means(rows: list[dict], switch_every: int) -> list[float]:
    """Mean RSS (MiB) over each full cycle of SETTINGS: a leak shows as means that keep rising,
    where the allocator's ups and downs within a cycle average out."""
    n = switch_every * len(SETTINGS)
    return [sum(r["rss_mib"] for r in rows[i : i + n]) / n for i in range(0, len(rows) - n + 1, n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="workflow runs (default 40)")
    ap.add_argument("--switch-every", type=int, default=5,
                    help="runs between implementation/precision/tile switches (default 5)")
    ap.add_argument("--json", type=Path, help="write the per-run figures here")
    args = ap.parse_args(argv)
    if args.runs < 2 or args.switch_every < 1:
        ap.error(f"--runs must be >= 2 and --switch-every >= 1, got {args.runs} and {args.switch_every}")

    sys.path.insert(0, str(comfy_server.shared_tools()))
    e2e = importlib.import_module("comfy_e2e")
    server = comfy_server.start()
    try:
        base = rss_mib(server.proc.pid)[0]
        rows = soak(e2e.ComfyClient(server.url), e2e, server, args.runs, args.switch_every,
                    log=lambda m: print(m, flush=True))
    finally:
        server.stop()
    means = cycle_means(rows, args.switch_every)
    print(f"mean RSS per cycle of {args.switch_every * len(SETTINGS)} runs: "
          f"{', '.join(f'{m:.0f}' for m in means)} MiB; max {max(r['rss_mib'] for r in rows):.0f} MiB "
          f"(before the first run {base:.0f} MiB)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"base_rss_mib": round(base, 1), "cycle_means_mib": means, "runs": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
