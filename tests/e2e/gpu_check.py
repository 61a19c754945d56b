"""Node checks that need a CUDA GPU, against tests/comfy_stubs with ComfyUI's device = cuda.

    python tests/e2e/gpu_check.py [OUT.json]

Not collected by pytest (no ComfyUI and no GPU in CI). Checks: precision auto -> fp16 (stub ComfyUI allows fp16 on
CUDA) and the estimator never in fp16; the fp32 chain equal to the CLI on the same GPU (implementation fast:
`upscale --fast`; reference: `upscale`) and UPSR Upscale equal to the chain; a real CUDA out-of-memory (a capped
allocator) retried with smaller tiles, giving the result of those tiles; Cancel within one step on the GPU; the fast
model after ComfyUI offloads and reloads its nets (same result); a canvas blended on the CPU (same result); chain
seconds, fast vs reference; the Triton switches the fast path set and any kernel failure. Prints one JSON
report.
"""
from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ["UPSR_STUB_DEVICE"] = "cuda"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE.parent / "comfy_stubs"), str(REPO), str(HERE)]

import comfy.model_management as mm  # noqa: E402
import comfy_server  # noqa: E402
import folder_paths  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from upsr_core.pipeline import generator_seed  # noqa: E402

report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def save() -> None:
    """The report so far, written after each section: a later crash or a kill keeps the earlier ones."""
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))


base = Path(tempfile.mkdtemp(prefix="upsr-gpu-"))
folder_paths.stub_reset(str(base))
folder_paths.add_model_folder_path("upsr", str(base / "extra"))
comfy_server.make_tiny_model(base / "extra" / comfy_server.DEMO)
spec = importlib.util.spec_from_file_location("upsr_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
pack = importlib.util.module_from_spec(spec)
sys.modules["upsr_pack"] = pack
spec.loader.exec_module(pack)
NODES = {c.GET_SCHEMA().node_id: c for c in asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())}


def run(node_id, **kw):
    return NODES[node_id].PREPARE_CLASS_CLONE({"UNIQUE_ID": "1"}).EXECUTE_NORMALIZED(**kw)


def defaults(node_id):
    return {i.id: i.default for i in NODES[node_id].GET_SCHEMA().inputs if hasattr(i, "default")}


def load(precision, implementation="fast"):
    return run("LoadUPSRModel", model_name=comfy_server.DEMO, estimator_name="(from the model file)",
               precision=precision, implementation=implementation)[0]


def chain(h, img, **kw):
    est = run("EstimateUncertainty", upsr_model=h, image=img)
    w = run("WeightNoise", **defaults("WeightNoise"), uncertainty=est[1])[0]
    return run("UPSRSample", upsr_model=h, image=img, sr_estimate=est[0], noise_weight=w,
               **defaults("UPSRSample") | kw)[0]


g = torch.Generator().manual_seed(0)
img = torch.nn.functional.interpolate(torch.rand(1, 3, 40, 50, generator=g), size=(160, 200), mode="bilinear")
img = ((img * 255).round() / 255).movedim(1, -1).contiguous()

# 1. precisions
for p in ("fp32", "auto", "bf16", "fp16"):
    h = load(p)
    t0 = time.perf_counter()
    sr = chain(h, img)
    torch.cuda.synchronize()
    report[f"precision_{p}"] = {
        "denoiser": str(next(h.model.denoiser.parameters()).dtype), "on": str(h.model.device),
        "estimator": str(next(h.model.estimator.parameters()).dtype), "seconds": round(time.perf_counter() - t0, 2),
        "finite": bool(torch.isfinite(sr).all()), "range": [round(float(sr.min()), 4), round(float(sr.max()), 4)]}
    save()

# 2. chain == CLI on the same GPU, UPSRUpscale == chain, for both implementations
Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(base / "lr.png")
from upsr_core.cli import main  # noqa: E402

for impl in ("fast", "reference"):
    h = load("fp32", impl)
    main(["upscale", str(base / "lr.png"), "-o", str(base / "sr.png"), "--model",
          str(base / "extra" / comfy_server.DEMO), "--device", "cuda", "-q", "--overwrite",
          *(["--fast"] if impl == "fast" else [])])
    cli = np.asarray(Image.open(base / "sr.png").convert("RGB"))
    sr = chain(h, img)
    ours = (sr[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    one = run("UPSRUpscale", upsr_model=h, image=img, **defaults("UPSRUpscale"))[0]
    report[f"chain_vs_cli_gpu_{impl}"] = {"equal_png": bool(np.array_equal(ours, cli)),
                                          "max_abs_png": int(np.abs(ours.astype(int) - cli).max())}
    report[f"upscale_vs_chain_gpu_{impl}"] = {"equal": bool(torch.equal(one, sr)),
                                              "max_abs": float((one - sr).abs().max())}
save()
h = load("fp32")  # fast, for the checks below

# 2b. ComfyUI offloads the nets to the CPU and loads them back: the fast model follows (same result)
first = chain(h, img)
h.patcher.model.to("cpu")
again = chain(h, img)
report["fast_after_offload_reload"] = {"equal": bool(torch.equal(again, first)), "on": str(h.model.device)}
save()

# 2c. a tiled image whose canvas is blended on the CPU (as above 1 GiB) gives the device-canvas result
from upsr_core import fast  # noqa: E402

tiled_kw = defaults("UPSRUpscale") | {"tile": 64, "overlap": 16}
on_device = run("UPSRUpscale", upsr_model=h, image=img, **tiled_kw)[0]
limit, fast.CANVAS_DEVICE_MAX_BYTES = fast.CANVAS_DEVICE_MAX_BYTES, 0
try:
    on_host = run("UPSRUpscale", upsr_model=h, image=img, **tiled_kw)[0]
finally:
    fast.CANVAS_DEVICE_MAX_BYTES = limit
report["host_canvas_equals_device_canvas"] = {"equal": bool(torch.equal(on_host, on_device)),
                                              "max_abs": float((on_host - on_device).abs().max())}

# 2d. node speed: the chain at fp16, fast vs reference (second run of each, after warm-up)
for impl in ("fast", "reference"):
    hh = load("fp16", impl)
    chain(hh, img)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    chain(hh, img)
    torch.cuda.synchronize()
    report[f"chain_fp16_seconds_{impl}"] = round(time.perf_counter() - t0, 3)
    del hh
    torch.cuda.empty_cache()
save()

# 3. a real CUDA OOM: cap the allocator below a whole-image run's peak
big = torch.rand(1, 768, 768, 3, generator=g)
kw = defaults("UPSRUpscale") | {"tile": 768, "overlap": 32}
torch.cuda.reset_peak_memory_stats()
base_mem = torch.cuda.memory_allocated()
run("UPSRUpscale", upsr_model=h, image=big, **kw)
peak = torch.cuda.max_memory_allocated() - base_mem
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.empty_cache()
torch.cuda.set_per_process_memory_fraction(min(1.0, (base_mem + 0.5 * peak) / total))
warnings = []


class Grab(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger("upsr_pack.nodes.sample").addHandler(Grab())
try:
    t0 = time.perf_counter()
    retried = run("UPSRUpscale", upsr_model=h, image=big, **kw)[0]
    oom = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
except torch.OutOfMemoryError as e:
    retried, oom = None, {"ok": False, "error": str(e)[:200]}
torch.cuda.set_per_process_memory_fraction(1.0)
oom.update(peak_whole_image_mb=round(peak / 2**20), warnings=warnings)
retry = [m for w in warnings if (m := re.search(r"retrying with tile (\d+), overlap (\d+)(?:, estimator block (\d+))?",
                                                 w))]
if retried is not None and retry:
    tile, overlap, block = (int(v) if v else None for v in retry[-1].groups())
    # the node's last setting, run directly (the node has no estimator-block input)
    direct = h.model.upscale(big.movedim(-1, 1).contiguous(), seed=generator_seed(kw["seed"]), b_u=kw["b_u"],
                             psi_max=kw["psi_max"], tile=tile, overlap=overlap, tile_batch=kw["tile_batch"],
                             **({} if block is None else {"estimator_block": block}))
    oom["retried_with"] = {"tile": tile, "overlap": overlap, "estimator_block": block}
    oom["equals_direct_run_at_that_tile"] = bool(torch.equal(retried, direct.movedim(1, -1).cpu()))
report["real_oom_retry"] = oom
save()

# 4. Cancel on the GPU within one step
calls = [0]


def counted(orig, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        mm.interrupt_current_processing(True)
    return orig(*a, **k)


for name in ("forward", "forward_step"):  # reference and fast-path passes
    setattr(h.model.denoiser, name, functools.partial(counted, getattr(h.model.denoiser, name)))
try:
    run("UPSRUpscale", upsr_model=h, image=img, **defaults("UPSRUpscale"))
    report["cancel"] = "not interrupted"
except mm.InterruptProcessingException:
    report["cancel"] = {"denoiser_calls": calls[0], "flag_cleared": not mm.processing_interrupted()}
del h.model.denoiser.forward, h.model.denoiser.forward_step
save()

# 5. The Triton switches the nodes' fast path set, and whether any kernel failed (then PyTorch's ops ran)
from upsr_core.nets import denoiser as _den  # noqa: E402
from upsr_core.nets import triton_norm as _tn  # noqa: E402

fast_h = load("fp16")
run("UPSRUpscale", upsr_model=fast_h, image=img, **defaults("UPSRUpscale"))  # prepared where it ran
norms = [m for m in fast_h.model.denoiser.modules() if isinstance(m, _den.GroupNorm32)]
report["triton"] = {"available": _tn.available(torch.device("cuda")),
                    "norm": any(m.triton for m in norms), "conv_epilogue": any(m.fuse_bias for m in norms),
                    "failed": list(_den._TRITON_NORM_FAILED)}

save()
print(json.dumps(report, indent=1))
