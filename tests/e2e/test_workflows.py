"""Every example workflow, as shipped, through a real ComfyUI server's HTTP API.

UI workflows are converted to API prompts the way the frontend does (comfy_e2e.ui_to_api, checked
once against the frontend's own graphToPrompt), queued over HTTP while a websocket collects the
progress messages, and their outputs are downloaded and checked: ×4 sizes, the basic chain equal to
what ``python -m upsr_core upscale`` writes, the painted region at full noise, progress over
steps × tiles, and Cancel within one denoiser step.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import comfy_server
import numpy as np
import pytest
from PIL import Image

from upsr_core.model import ESTIMATOR_BLOCK
from upsr_core.tiling import partition, plan_tiles

REPO = comfy_server.REPO
EXAMPLES = REPO / "example_workflows"
WORKFLOWS = sorted(p.stem for p in EXAMPLES.glob("*.json"))
STEPS = 5
TIMINGS: dict[str, float] = {}


def load_workflow(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def run_watched(client, e2e, prompt: dict, *, timeout: float = 900, on_message=None) -> tuple[dict, list[dict]]:
    """Queue ``prompt`` with a websocket open; returns (history entry, this prompt's messages)."""
    msgs = e2e.ws_messages(client.server, client.client_id, timeout=timeout)
    next(msgs)  # the 'status' greeting: subscribed before queueing
    pid = client.submit(prompt)
    seen = []
    try:
        for m in msgs:
            d = m.get("data", {})
            if d.get("prompt_id", pid) != pid:
                continue
            seen.append(m)
            if on_message is not None:
                on_message(m)
            if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                break
    finally:
        msgs.close()
    return client.wait(pid, timeout), seen


def outputs(client, entry: dict, node_id: str, dest: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(client.download(img, str(dest))))
            for img in entry["outputs"].get(node_id, {}).get("images", [])]


def progress_of(msgs: list[dict], node_id: str) -> list[tuple[int, int]]:
    return [(m["data"]["value"], m["data"]["max"]) for m in msgs
            if m["type"] == "progress" and m["data"].get("node") == node_id]


def expected_progress_max(prompt: dict, node_id: str, lr_hw: tuple[int, int], multiple: int = 64) -> int:
    """Denoiser steps × tiles; UPSR Upscale counts its estimator blocks too (one image)."""
    inp = prompt[node_id]["inputs"]
    hp, wp = (-(-s // multiple) * multiple for s in lr_hw)
    blocks = len(partition(hp, wp, ESTIMATOR_BLOCK)) if prompt[node_id]["class_type"] == "UPSRUpscale" else 0
    return STEPS * len(plan_tiles(hp, wp, inp["tile"], inp["overlap"])) + blocks


def lr_size(prompt: dict, server) -> tuple[int, int]:
    (load,) = nodes_of(prompt, "LoadImage")
    with Image.open(server.input_dir / prompt[load]["inputs"]["image"]) as im:
        return im.height, im.width


def reference(server, image: str, tmp: Path, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(CLI PNG, float result) from the server's python for the shipped LR ``image``."""
    spec = {"model": str(server.model_file), "image": str(server.input_dir / image), "png": str(tmp / "cli.png"),
            "npy": str(tmp / "ref.npy"), **kw}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.json").write_text(json.dumps(spec))
    subprocess.run([comfy_server.comfyui_python(), str(Path(__file__).with_name("reference.py")),
                    str(tmp / "spec.json")], check=True, cwd=REPO, timeout=900)
    return np.asarray(Image.open(tmp / "cli.png").convert("RGB")), np.load(tmp / "ref.npy")


def is_fast(prompt: dict) -> bool:
    """Whether the prompt's Load UPSR Model runs the fast implementation (its default)."""
    (loader,) = nodes_of(prompt, "LoadUPSRModel")
    return prompt[loader]["inputs"].get("implementation", "fast") == "fast"


def as_saveimage(x: np.ndarray) -> np.ndarray:
    """How ComfyUI's SaveImage / PreviewImage quantise an IMAGE (truncation, not rounding)."""
    return np.clip(255.0 * x, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the frontend's conversion
def test_ui_to_api_matches_the_frontend(server, e2e, object_info, tmp_path):
    node, chromium = shutil.which("node"), os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    pw = Path(os.environ.get("PLAYWRIGHT_CORE_DIR", "/work/pw/node_modules")) / "playwright-core"
    if not node or not Path(chromium).exists() or not pw.exists():
        pytest.skip(f"needs node, chromium ({chromium}) and playwright-core ({pw})")
    for name in WORKFLOWS:
        api_out, shot = tmp_path / f"{name}.api.json", tmp_path / f"{name}.png"
        r = subprocess.run([node, str(REPO / "tools" / "screenshot_workflow.mjs"), "--url", server.url, "--workflow",
                            str(EXAMPLES / f"{name}.json"), "--out", str(shot), "--api-out", str(api_out),
                            "--width", "1800", "--height", "1000"],
                           capture_output=True, text=True, timeout=300, check=False,
                           env={**os.environ, "PLAYWRIGHT_CORE_DIR": str(pw.parent)})
        summary = json.loads(r.stdout)
        assert r.returncode == 0 and summary["missing"] == [] and summary["error_nodes"] == [], summary
        frontend = json.loads(api_out.read_text())
        ours = e2e.ui_to_api(load_workflow(name), object_info)
        def strip(p: dict) -> dict:
            return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}

        assert strip(ours) == strip(frontend), name


def failure(entry: dict) -> str:
    """A failed prompt's error: the node, the exception and its last traceback lines."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            tb = "".join(data.get("traceback", [])[-3:])
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}\n{tb}"
    return json.dumps(entry["status"])[-2000:]


# ----------------------------------------------------------------------------- each workflow as shipped
def test_templates_are_served(server, client):
    assert sorted(client.get_json("/workflow_templates")[comfy_server.PACK_DIR_NAME]) == WORKFLOWS


def test_node_help_pages_are_served(server, client, object_info):
    """The frontend's node Help fetches /extensions/<pack folder>/docs/<node id>.md (WEB_DIRECTORY)."""
    ours = sorted(k for k, v in object_info.items() if v.get("python_module", "").endswith(comfy_server.PACK_DIR_NAME))
    assert len(ours) == 6, ours
    for node_id in ours:
        page = client._req("GET", f"/extensions/{comfy_server.PACK_DIR_NAME}/docs/{node_id}.md").decode("utf-8")
        assert page.startswith(f"# {object_info[node_id]['display_name']}\n"), node_id


def test_basic_equals_the_cli(server, client, e2e, object_info, tmp_path):
    prompt = e2e.ui_to_api(load_workflow("upsr_basic"), object_info)
    (smp,) = nodes_of(prompt, "UPSRSample")
    (save,) = nodes_of(prompt, "SaveImage")
    t0 = time.monotonic()
    entry, msgs = run_watched(client, e2e, prompt)
    TIMINGS["upsr_basic"] = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", failure(entry)
    h, w = lr_size(prompt, server)
    (out,) = outputs(client, entry, save, tmp_path / "out")
    assert out.shape == (4 * h, 4 * w, 3)
    n = expected_progress_max(prompt, smp, (h, w))
    assert progress_of(msgs, smp) == [(k, n) for k in range(1, n + 1)]
    # previews of ψ (EstimateUncertainty) and w (WeightNoise) at the HR size
    for cls in ("EstimateUncertainty", "WeightNoise"):
        (preview,) = outputs(client, entry, nodes_of(prompt, cls)[0], tmp_path / cls)
        assert preview.shape == (4 * h, 4 * w, 3)
    inp = prompt[smp]["inputs"]
    cli, ref = reference(server, prompt[nodes_of(prompt, "LoadImage")[0]]["inputs"]["image"], tmp_path,
                         fast=is_fast(prompt),
                         seed=inp["seed"], tile=inp["tile"], overlap=inp["overlap"], tile_batch=inp["tile_batch"])
    assert np.array_equal(as_saveimage(ref), out), "the chain's IMAGE differs from UPSRModel.upscale"
    assert np.array_equal(np.round(np.clip(ref, 0, 1) * 255).astype(np.uint8), cli)
    assert int(np.abs(cli.astype(int) - out).max()) <= 1  # SaveImage truncates, the CLI rounds

    # the one-node UPSRUpscale with the same values gives the same image
    one = {k: v for k, v in prompt.items() if v["class_type"] not in ("EstimateUncertainty", "WeightNoise")}
    one[smp] = {"class_type": "UPSRUpscale", "inputs": {
        **{k: inp[k] for k in ("upsr_model", "image", "seed", "tile", "overlap", "tile_batch")},
        "b_u": 0.4, "psi_max": 0.05}}
    one[save]["inputs"]["filename_prefix"] = "UPSR/basic_one_node"
    entry = client.run(one, timeout=900)["history"]
    (out_one,) = outputs(client, entry, save, tmp_path / "one")
    assert np.array_equal(out_one, out)


def test_color_fix(server, client, e2e, object_info, tmp_path):
    """upsr_color_fix as shipped: its preview is UPSR Upscale ×4's result, its saved image the
    colour-fixed one, equal to what upscale --color-fix computes (exactly before SaveImage's
    truncation, within one level of the CLI's rounded PNG)."""
    prompt = e2e.ui_to_api(load_workflow("upsr_color_fix"), object_info)
    (up,), (cf,), (prev,), (save,), (load,) = (nodes_of(prompt, c) for c in (
        "UPSRUpscale", "UPSRColorFix", "PreviewImage", "SaveImage", "LoadImage"))
    t0 = time.monotonic()
    entry = client.run(prompt, timeout=900)["history"]
    TIMINGS["upsr_color_fix"] = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", failure(entry)
    (out,), (raw,) = outputs(client, entry, save, tmp_path / "out"), outputs(client, entry, prev, tmp_path / "prev")
    h, w = lr_size(prompt, server)
    assert out.shape == raw.shape == (4 * h, 4 * w, 3)
    inp, image = prompt[up]["inputs"], prompt[load]["inputs"]["image"]
    kw = dict(fast=is_fast(prompt), seed=inp["seed"], tile=inp["tile"], overlap=inp["overlap"],
              tile_batch=inp["tile_batch"])
    levels = prompt[cf]["inputs"]["levels"]
    assert levels == 5
    cli, ref = reference(server, image, tmp_path / "fixed", color_fix=levels, **kw)
    assert np.array_equal(as_saveimage(ref), out)
    assert int(np.abs(cli.astype(int) - out).max()) <= 1  # SaveImage truncates, the CLI rounds
    _, ref_raw = reference(server, image, tmp_path / "raw", **kw)
    assert np.array_equal(as_saveimage(ref_raw), raw)
    assert not np.array_equal(raw, out)


def test_paint_uncertainty(server, client, e2e, object_info, tmp_path):
    prompt = e2e.ui_to_api(load_workflow("upsr_paint_uncertainty"), object_info)
    t0 = time.monotonic()
    entry, msgs = run_watched(client, e2e, prompt)
    TIMINGS["upsr_paint_uncertainty"] = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", failure(entry)
    h, w = lr_size(prompt, server)
    (out,) = outputs(client, entry, nodes_of(prompt, "SaveImage")[0], tmp_path / "out")
    assert out.shape == (4 * h, 4 * w, 3)
    (edited,) = outputs(client, entry, nodes_of(prompt, "PreviewImage")[0], tmp_path / "mask")
    (heat,) = outputs(client, entry, nodes_of(prompt, "WeightNoise")[0], tmp_path / "heat")
    assert edited.shape == heat.shape == (4 * h, 4 * w, 3)
    painted = np.asarray(Image.open(server.input_dir / "upsr_example_dandelion_painted.png"))[..., 3] == 0
    cy, cx = (int(np.mean(a)) for a in np.nonzero(painted))
    assert (edited[4 * cy, 4 * cx] == 255).all()  # ψ + painted = 1 (clamped) inside the painted region
    assert np.abs(heat[4 * cy, 4 * cx].astype(int) - [252, 255, 163]).max() <= 1  # w = 1: the top of the colour map
    smp = nodes_of(prompt, "UPSRSample")[0]
    n = expected_progress_max(prompt, smp, (h, w))
    assert progress_of(msgs, smp) == [(k, n) for k in range(1, n + 1)]


def test_large_tiled(server, client, e2e, object_info, tmp_path):
    prompt = e2e.ui_to_api(load_workflow("upsr_large_tiled"), object_info)
    (up,) = nodes_of(prompt, "UPSRUpscale")
    t0 = time.monotonic()
    entry, msgs = run_watched(client, e2e, prompt)
    TIMINGS["upsr_large_tiled"] = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", failure(entry)
    h, w = lr_size(prompt, server)
    (out,) = outputs(client, entry, nodes_of(prompt, "SaveImage")[0], tmp_path / "out")
    assert out.shape == (4 * h, 4 * w, 3) and out.std() > 0
    n = expected_progress_max(prompt, up, (h, w))
    batch = prompt[up]["inputs"]["tile_batch"]
    assert n > STEPS and progress_of(msgs, up)[-1] == (n, n)  # several tiles, counted to the end
    assert all(b - a in (1, batch) for (a, _), (b, _) in zip(progress_of(msgs, up), progress_of(msgs, up)[1:]))


def test_same_noise_makes_a_batch_of_frames_steady(server, client, e2e, object_info, tmp_path):
    """A two-frame batch of one image (core RepeatImageBatch) through UPSR Upscale ×4: with same_noise
    both frames get the seed's noise and come out alike; without it (seed + i) they differ."""
    prompt = e2e.ui_to_api(load_workflow("upsr_large_tiled"), object_info)
    (up,) = nodes_of(prompt, "UPSRUpscale")
    (load,) = nodes_of(prompt, "LoadImage")
    prompt[load]["inputs"]["image"] = "upsr_example_bee.png"
    prompt["rep"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [load, 0], "amount": 2}}
    prompt[up]["inputs"] |= {"image": ["rep", 0], "tile": 512, "overlap": 64, "seed": 3}
    frames = {}
    for same in (True, False):
        prompt[up]["inputs"]["same_noise"] = same
        entry, _ = run_watched(client, e2e, prompt)
        assert entry["status"]["status_str"] == "success", failure(entry)
        frames[same] = outputs(client, entry, nodes_of(prompt, "SaveImage")[0], tmp_path / str(same))
        assert len(frames[same]) == 2
    a, b = (f.astype(int) for f in frames[True])
    # fast path: both frames in one denoiser batch, equal up to float rounding (≤ 1e-6), which Save
    # Image's truncation can turn into one level at a few pixels
    assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01
    a, b = (f.astype(int) for f in frames[False])
    assert np.abs(a - b).mean() > 0.1  # 0.23 levels with the tiny random nets (nearly flat output)


def test_every_workflow_was_run():
    """Guards against a new example workflow without an e2e test above."""
    assert set(WORKFLOWS) == {"upsr_basic", "upsr_paint_uncertainty", "upsr_large_tiled", "upsr_color_fix"}


# ----------------------------------------------------------------------------- cancel
def test_cancel_stops_within_one_step_and_the_next_run_is_normal(server, client, e2e, object_info, tmp_path):
    prompt = e2e.ui_to_api(load_workflow("upsr_basic"), object_info)
    (smp,) = nodes_of(prompt, "UPSRSample")
    prompt[smp]["inputs"]["seed"] = 7  # not in the cache: UPSRSample must run
    cancelled = []

    def cancel_after_the_first_step(m):
        if m["type"] == "progress" and m["data"].get("node") == smp and not cancelled:
            client.interrupt()
            cancelled.append(m["data"]["value"])

    entry, msgs = run_watched(client, e2e, prompt, on_message=cancel_after_the_first_step)
    kinds = [m["type"] for m in msgs]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    assert entry["status"]["status_str"] == "error"
    steps = progress_of(msgs, smp)
    assert 1 <= len(steps) <= 2, f"progress after Cancel: {steps}"  # the running step may still report
    assert steps[-1][0] < steps[-1][1]

    entry, msgs = run_watched(client, e2e, prompt)
    assert entry["status"]["status_str"] == "success"
    (out,) = outputs(client, entry, nodes_of(prompt, "SaveImage")[0], tmp_path / "out")
    inp = prompt[smp]["inputs"]
    _, ref = reference(server, prompt[nodes_of(prompt, "LoadImage")[0]]["inputs"]["image"], tmp_path,
                       fast=is_fast(prompt), seed=7, tile=inp["tile"], overlap=inp["overlap"],
                       tile_batch=inp["tile_batch"])
    assert np.array_equal(as_saveimage(ref), out)


def test_a_map_wired_into_the_wrong_input_is_named(server, client, e2e, object_info):
    """The pack's IMAGE maps carry their role through ComfyUI's executor (cache included): the
    heatmap wired into UPSR Sample's noise_weight fails naming both, instead of sampling with a
    colour picture as w."""
    prompt = e2e.ui_to_api(load_workflow("upsr_basic"), object_info)
    (smp,) = nodes_of(prompt, "UPSRSample")
    wn = prompt[smp]["inputs"]["noise_weight"][0]
    prompt[smp]["inputs"]["noise_weight"] = [wn, 1]  # WeightNoise's second output: the heatmap
    entry = client.wait(client.submit(prompt), 900)
    assert entry["status"]["status_str"] == "error"
    assert ("noise_weight: got UPSR Weight Noise's heatmap (a colour picture of w); connect UPSR Weight Noise's "
            "noise_weight (w) here") in failure(entry)


TINY_ESRGAN = """
import sys
from safetensors.torch import save_file
from spandrel.architectures.ESRGAN import ESRGAN
import torch
torch.manual_seed(0)
net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
save_file({k: v.contiguous() for k, v in net.state_dict().items()}, sys.argv[1])
"""


def test_an_upscale_model_as_estimator_reports_each_tile(server, client, e2e, object_info):
    """A real UPSCALE_MODEL (a tiny ESRGAN that ComfyUI's spandrel loads) as g, on an LR that core's
    tiling cuts into 2 tiles: Estimate Uncertainty's bar counts the tiles (it counted images only)."""
    dest = server.base / "models" / "upscale_models" / "tiny_esrgan.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([comfy_server.comfyui_python(), "-c", TINY_ESRGAN, str(dest)], check=True, timeout=300)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 600, 3), dtype=np.uint8)).save(
        server.input_dir / "upsr_wide.png")  # padded to 64x640: two 512-px tiles with 32 px of overlap
    base = e2e.ui_to_api(load_workflow("upsr_basic"), object_info)
    (loader,) = nodes_of(base, "LoadUPSRModel")
    prompt = {"1": base[loader], "2": {"class_type": "LoadImage", "inputs": {"image": "upsr_wide.png"}},
              "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": dest.name}},
              "4": {"class_type": "EstimateUncertainty",
                    "inputs": {"upsr_model": ["1", 0], "image": ["2", 0], "upscale_model": ["3", 0]}},
              "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    entry, msgs = run_watched(client, e2e, prompt)
    assert entry["status"]["status_str"] == "success", failure(entry)
    assert progress_of(msgs, "4") == [(1, 2), (2, 2)]


def ws_frames(url: str, client_id: str, timeout: float = 300.0, flags: dict | None = None):
    """Yield (opcode, payload) of every websocket frame ComfyUI sends this client, binary ones
    (previews) included — comfy_e2e.ws_messages yields only the JSON ones. Minimal RFC 6455
    reader (no TLS, no extensions, no fragmentation: ComfyUI sends whole frames). ``flags``: sent
    first as the client's feature flags, as the frontend does."""
    import base64
    import socket
    import struct
    import urllib.parse

    u = urllib.parse.urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
    sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""

    def take(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    try:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head[:200]
        if flags is not None:  # one masked text frame (client frames must be masked), < 126 bytes
            data, mask = json.dumps({"type": "feature_flags", "data": flags}).encode(), os.urandom(4)
            assert len(data) < 126
            sock.sendall(bytes([0x81, 0x80 | len(data)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(data)))
        while True:
            b0, b1 = take(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", take(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", take(8))[0]
            payload = take(n)  # (server frames are not masked)
            if b0 & 0x0F == 0x8:
                return
            yield b0 & 0x0F, payload
    finally:
        sock.close()


@pytest.mark.parametrize("metadata", [False, True])
def test_sampling_previews_reach_the_browser(server, client, e2e, object_info, metadata):
    """The server runs with ``--preview-method auto``: UPSR Upscale sends each step's x̂0 as a
    preview image over the websocket, one per denoiser step, right after that step's only progress
    message. To a client without feature flags as event 1 PREVIEW_IMAGE (format 1: JPEG); to one
    that supports preview metadata, as the 0.3.64 frontend, as event 4 with the node's id."""
    from io import BytesIO

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
        server.input_dir / "upsr_preview.png")
    base = e2e.ui_to_api(load_workflow("upsr_basic"), object_info)
    (loader,) = nodes_of(base, "LoadUPSRModel")
    prompt = {"1": base[loader], "2": {"class_type": "LoadImage", "inputs": {"image": "upsr_preview.png"}},
              "3": {"class_type": "UPSRUpscale", "inputs": {"upsr_model": ["1", 0], "image": ["2", 0],
                                                            "seed": int(metadata), "b_u": 0.4, "psi_max": 0.05,
                                                            "tile": 512, "overlap": 32, "tile_batch": 1}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    # (a seed per case: ComfyUI would take the other case's result from its cache and run nothing)
    # and a client (websocket id) of its own, with the feature flags of the case
    own = e2e.ComfyClient(client.server)
    frames = ws_frames(own.server, own.client_id, flags={"supports_preview_metadata": True} if metadata else None)
    next(frames)  # the 'status' greeting: subscribed before queueing
    if metadata:
        assert json.loads(next(frames)[1])["type"] == "feature_flags"  # the server's answer: flags taken
    pid = own.submit(prompt)
    previews, progress = [], []
    try:
        for op, payload in frames:
            if op == 0x2:
                event, rest = int.from_bytes(payload[:4], "big"), payload[4:]
                if event == 1 and not metadata:
                    kind, jpeg = int.from_bytes(rest[:4], "big"), rest[4:]
                elif event == 4 and metadata:
                    n = int.from_bytes(rest[:4], "big")
                    meta, jpeg = json.loads(rest[4 : 4 + n]), rest[4 + n :]
                    kind = (meta["image_type"], meta["node_id"], meta["prompt_id"] == pid)
                else:
                    raise AssertionError(f"binary event {event} with metadata={metadata}")
                previews.append((kind, Image.open(BytesIO(jpeg)).size, progress[-1] if progress else None))
                continue
            m = json.loads(payload)
            d = m.get("data", {})
            if d.get("prompt_id") != pid:
                continue
            if m["type"] == "progress" and d.get("node") == "3":
                progress.append(d["value"])
            if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                assert m["type"] == "execution_success", m
                break
    finally:
        frames.close()
    assert own.wait(pid, 300)["status"]["status_str"] == "success"
    # one estimator block (a check before it at 0), then the steps, each reported once
    assert progress == list(range(STEPS + 2))
    # 160×96, shown at --preview-size 512, one per step (counts 2..6: the estimator's unit is 1);
    # ComfyUI's hook sends the event-4 preview (through its progress registry) before the step's
    # "progress" message, the event-1 one after it
    kind, seen_at = (("image/jpeg", "3", True), range(1, STEPS + 1)) if metadata else (1, range(2, STEPS + 2))
    assert previews == [(kind, (512, 307), k) for k in seen_at]


def test_one_server_runs_every_setting_in_turn(server, client, e2e):
    """tools/comfy_soak.py, shortened: one long-lived server runs upsr_basic with every
    implementation × precision × tile setting in turn (the model reloaded at each switch) on
    LR sizes that change every run; each result is downloaded and is ×4 its input (the tool
    raises otherwise). The memory figures are the tool's to print (a long run is in
    docs/RELIABILITY.md), not asserted: glibc's RSS moves by tens of MiB from run to run."""
    from _support import load_tool

    soak = load_tool("comfy_soak")
    t0 = time.perf_counter()
    rows = soak.soak(client, e2e, server, runs=2 * len(soak.SETTINGS), switch_every=2, log=lambda m: None)
    TIMINGS["soak"] = time.perf_counter() - t0
    assert [(r["implementation"], r["precision"], r["tile"]) for r in rows[::2]] == [s[:3] for s in soak.SETTINGS]
    assert [tuple(r["lr"]) for r in rows] == soak.SIZES[: len(rows)]
    assert len(soak.cycle_means(rows, 2)) == 1 and all(r["rss_mib"] > 0 for r in rows)


def test_report_timings(server):
    """Prints the wall time of each workflow run (pytest -s), and checks the server is still up."""
    print("\nE2E timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
    assert server.proc.poll() is None
