"""Node contract tests: the ComfyUI pack against small stand-ins of the comfy modules (no ComfyUI needed).

The stand-ins live in tests/comfy_stubs/ (signatures checked against ComfyUI 0.3.64 by
tests/e2e/test_stub_fidelity.py). They are importable only while this module's tests run,
so other tests still see an environment without comfy. The pack is loaded the way ComfyUI
loads it: its folder's ``__init__.py`` as a package, then ``comfy_entrypoint()``.

A tiny random-weight model (both nets, LR multiple 8) stands in for the demo model.
"""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import platform
import sys
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from upsr_core import UPSRModel
from upsr_core.checkpoint import save_converted
from upsr_core.config import ATDConfig, DenoiserConfig
from upsr_core.nets import ATD, UPSRDenoiser
from upsr_core.stages import estimate_maps, sample_maps, uncertainty_mask, weight_map

REPO = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "comfy_stubs"
EXAMPLES = REPO / "example_workflows"
PACK = "upsr_pack_under_test"
DEMO = "upsr_demo_x4.safetensors"

TINY_DENOISER = DenoiserConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), swin_levels=(16, 8),
                               image_size=16, swin_embed_dim=32, swin_num_heads=1, window_size=4, num_feat=16)
TINY_ATD = ATDConfig(embed_dim=16, depths=(1,), num_heads=(2,), window_size=4, category_size=16, num_tokens=8,
                     reducted_dim=4, convffn_kernel_size=3)


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Pack:
    """The loaded pack and the stub modules it runs against."""

    module: ModuleType
    nodes: dict[str, type]
    io: ModuleType
    mm: ModuleType
    utils: ModuleType
    folder_paths: ModuleType
    extra_dir: Path  # the `upsr:` folder of a simulated extra_model_paths.yaml
    models_upsr: Path  # <ComfyUI>/models/upsr
    model_file: Path


def _tiny_nets() -> tuple[UPSRDenoiser, ATD]:
    torch.manual_seed(1234)
    return UPSRDenoiser(TINY_DENOISER).eval(), ATD(TINY_ATD).eval()


def _drop_modules(prefixes: tuple[str, ...]) -> None:
    for name in [m for m in sys.modules if m == PACK or m.startswith(PACK + ".") or m.split(".")[0] in prefixes]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Pack:
    stub_roots = ("comfy", "comfy_api", "folder_paths")
    assert not any(m.split(".")[0] in stub_roots for m in sys.modules), "a real or stub comfy is already imported"
    base = tmp_path_factory.mktemp("comfy_base")
    sys.path.insert(0, str(STUBS))
    try:
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths
        from comfy_api.v0_0_2 import io

        folder_paths.stub_reset(str(base))
        extra = base / "extra_models" / "upsr"  # what extra_model_paths.yaml `upsr: ...` registers
        extra.mkdir(parents=True)
        folder_paths.add_model_folder_path("upsr", str(extra))
        model_file = extra / DEMO
        save_converted(model_file, *_tiny_nets())

        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "a V3 pack must not define NODE_CLASS_MAPPINGS"
        ext = asyncio.run(module.comfy_entrypoint())
        from comfy_api.v0_0_2 import ComfyExtension

        assert isinstance(ext, ComfyExtension)
        node_list = asyncio.run(ext.get_node_list())
        assert isinstance(node_list, list)
        nodes = {cls.GET_SCHEMA().node_id: cls for cls in node_list}
        yield Pack(module, nodes, io, mm, comfy.utils, folder_paths, extra, base / "models" / "upsr", model_file)
    finally:
        sys.path.remove(str(STUBS))
        _drop_modules(stub_roots)


@pytest.fixture(scope="module")
def handle(pack):
    return run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="fp32")[0]


@pytest.fixture(scope="module")
def model(handle) -> UPSRModel:
    return handle.model


def run(pack: Pack, node_id: str, **kwargs):
    """Execute a node as ComfyUI does (a class clone with hidden inputs, normalised output, under
    torch.inference_mode as ComfyUI's executor runs every prompt: a loader's weights are then
    inference tensors, which, e.g., have no version counter)."""
    cls = pack.nodes[node_id].PREPARE_CLASS_CLONE({"UNIQUE_ID": "7"})
    with torch.inference_mode():
        out = cls.EXECUTE_NORMALIZED(**kwargs)
    assert isinstance(out, pack.io.NodeOutput)
    return out


def defaults(pack: Pack, node_id: str) -> dict:
    """The widget defaults, as a new node in the frontend has them."""
    return {i.id: i.default for i in pack.nodes[node_id].GET_SCHEMA().inputs if hasattr(i, "default")}


def lr_image(h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    """A smooth random IMAGE [B,h,w,3] in [0,1] with 8-bit values (so a PNG round trip is exact)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, h // 4 + 2, w // 4 + 2, generator=g), size=(h, w), mode="bilinear")
    return ((x * 255).round() / 255).movedim(1, -1).contiguous()


def chain(pack: Pack, handle, image: torch.Tensor, **sample_overrides):
    """The four-node chain with default widget values -> (sr IMAGE, per-node outputs)."""
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=image)
    wn = run(pack, "WeightNoise", **defaults(pack, "WeightNoise") | {"uncertainty": est[1]})
    kw = defaults(pack, "UPSRSample") | sample_overrides
    sr = run(pack, "UPSRSample", upsr_model=handle, image=image, sr_estimate=est[0], noise_weight=wn[0], **kw)
    return sr[0], est, wn


# ----------------------------------------------------------------------------- registration and schemas
def test_entrypoint_lists_the_six_nodes(pack):
    assert list(pack.nodes) == ["LoadUPSRModel", "EstimateUncertainty", "WeightNoise", "UPSRSample", "UPSRUpscale",
                                "UPSRColorFix"]
    for cls in pack.nodes.values():
        assert cls.GET_SCHEMA().category == "image/upscaling/UPSR"
        assert cls.GET_SCHEMA().display_name


def test_every_node_has_a_help_page_that_names_its_inputs(pack):
    """web/docs/<node id>.md: the page the frontend's node Help shows (WEB_DIRECTORY); it fell back
    to a generated page after two 404s. Each page must be titled with the node's display name and
    mention every input the artist sets, so a renamed input cannot leave its page behind."""
    web = REPO / pack.module.WEB_DIRECTORY
    assert sorted(p.stem for p in (web / "docs").glob("*.md")) == sorted(pack.nodes)
    for node_id, cls in pack.nodes.items():
        schema = cls.GET_SCHEMA()
        page = (web / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
        assert page.startswith(f"# {schema.display_name}\n"), node_id
        missing = [i.id for i in schema.inputs if i.id not in page]
        assert not missing, f"{node_id}.md does not mention {missing}"


def _spec(pack, node_id):
    info = pack.nodes[node_id].GET_NODE_INFO_V1()
    flat = {k: v for sec in ("required", "optional") for k, v in info["input"].get(sec, {}).items()}
    return info, flat


def test_schema_types_and_order(pack):
    expect = {
        "LoadUPSRModel": ({"required": ["model_name", "estimator_name", "precision"], "optional": ["implementation"]},
                          ["UPSR_MODEL"], ["upsr_model"]),
        "EstimateUncertainty": ({"required": ["upsr_model", "image"], "optional": ["upscale_model"]},
                                ["IMAGE", "IMAGE", "MASK"], ["sr_estimate", "uncertainty", "uncertainty_mask"]),
        "WeightNoise": ({"required": ["b_u", "psi_max"], "optional": ["uncertainty", "uncertainty_mask"]},
                        ["IMAGE", "IMAGE"], ["noise_weight", "heatmap"]),
        "UPSRSample": ({"required": ["upsr_model", "image", "sr_estimate", "noise_weight", "seed", "tile", "overlap",
                                     "tile_batch"], "optional": ["same_noise"]}, ["IMAGE"], ["image"]),
        "UPSRUpscale": ({"required": ["upsr_model", "image", "seed", "b_u", "psi_max", "tile", "overlap",
                                      "tile_batch"], "optional": ["same_noise"]}, ["IMAGE"], ["image"]),
        "UPSRColorFix": ({"required": ["image", "reference", "levels"]}, ["IMAGE"], ["IMAGE"]),
    }
    for node_id, (order, outputs, names) in expect.items():
        info, _ = _spec(pack, node_id)
        assert info["input_order"] == order, node_id
        assert info["output"] == outputs and info["output_name"] == names, node_id
    types = {"upsr_model": "UPSR_MODEL", "image": "IMAGE", "sr_estimate": "IMAGE", "noise_weight": "IMAGE",
             "uncertainty": "IMAGE", "uncertainty_mask": "MASK", "upscale_model": "UPSCALE_MODEL", "seed": "INT",
             "tile": "INT", "overlap": "INT", "tile_batch": "INT", "b_u": "FLOAT", "psi_max": "FLOAT",
             "model_name": "COMBO", "estimator_name": "COMBO", "precision": "COMBO",
             "implementation": "COMBO", "same_noise": "BOOLEAN", "reference": "IMAGE", "levels": "INT"}
    for node_id in expect:
        for name, (typ, _opts) in _spec(pack, node_id)[1].items():
            assert typ == types[name], (node_id, name)


def test_every_input_and_output_has_a_tooltip(pack):
    for node_id, node in pack.nodes.items():
        schema = node.GET_SCHEMA()
        for slot in (*schema.inputs, *schema.outputs):
            assert slot.tooltip, f"{node_id}.{slot.id or slot.display_name} has no tooltip"


def test_schema_defaults_and_slider_ranges(pack):
    # ψ_max tops out at 1 on Weight Noise (a painted MASK holds values up to 1: at 1, grey is a
    # linear strength) and at 0.5 on the one-node Upscale (its ψ is computed and never exceeds ½)
    for node_id, psi_top in (("WeightNoise", 1.0), ("UPSRUpscale", 0.5)):
        _, s = _spec(pack, node_id)
        assert {k: s["b_u"][1][k] for k in ("default", "min", "max", "display")} == \
            {"default": 0.4, "min": 0.0, "max": 1.0, "display": "slider"}
        assert {k: s["psi_max"][1][k] for k in ("default", "min", "max", "display")} == \
            {"default": 0.05, "min": 0.001, "max": psi_top, "display": "slider"}
    for node_id in ("UPSRSample", "UPSRUpscale"):
        _, s = _spec(pack, node_id)
        assert s["seed"][1]["control_after_generate"] is True and s["seed"][1]["default"] == 0
        assert s["seed"][1]["min"] == 0 and s["seed"][1]["max"] == 2**64 - 1  # KSampler's range
        assert (s["tile"][1]["default"], s["tile"][1]["min"], s["tile"][1]["step"]) == (512, 64, 64)
        assert (s["overlap"][1]["default"], s["tile_batch"][1]["default"]) == (64, 1)
        assert s["same_noise"][1]["default"] is False  # seed + i per image, as before the option existed
    _, s = _spec(pack, "LoadUPSRModel")
    assert s["precision"][1]["options"] == ["auto", "fp32", "bf16", "fp16"] and s["precision"][1]["default"] == "auto"
    assert s["implementation"][1]["options"] == ["fast", "reference"] and s["implementation"][1]["default"] == "fast"
    assert s["model_name"][1]["options"] == [DEMO] and s["model_name"][1]["default"] == DEMO
    assert s["estimator_name"][1]["options"] == ["(from the model file)", DEMO]
    assert s["estimator_name"][1]["default"] == "(from the model file)"
    _, s = _spec(pack, "UPSRColorFix")
    assert {k: s["levels"][1][k] for k in ("default", "min", "max", "display")} == \
        {"default": 5, "min": 1, "max": 8, "display": "slider"}


def test_model_folder_keeps_extra_paths_first_and_adds_models_upsr_and_bundled_weights(pack):
    paths, exts = pack.folder_paths.folder_names_and_paths["upsr"]
    assert paths[0] == str(pack.extra_dir)
    assert paths[1] == str(pack.models_upsr)
    assert paths[2].endswith(str(Path("upsr_core") / "weights"))
    assert {".safetensors", ".pth"} <= exts and ".txt" not in exts
    pack.models_upsr.mkdir(parents=True, exist_ok=True)
    (pack.models_upsr / "notes.txt").write_text("not a model")
    (pack.models_upsr / "other.pth").write_bytes(b"")
    try:
        assert pack.nodes["LoadUPSRModel"].GET_SCHEMA().inputs[0].options == ["other.pth", DEMO]
    finally:
        (pack.models_upsr / "notes.txt").unlink()
        (pack.models_upsr / "other.pth").unlink()


def test_execute_bodies_are_at_most_30_lines(pack):
    for cls in pack.nodes.values():
        src = inspect.getsource(cls.execute)
        assert len(src.splitlines()) <= 31, f"{cls.__name__}.execute has {len(src.splitlines()) - 1} lines"


# ----------------------------------------------------------------------------- LoadUPSRModel
def test_load_converted_file_puts_both_nets_under_comfy_memory_management(pack, handle):
    m = handle.model
    assert m.estimator is not None and m.dtype == torch.float32
    assert handle.patcher.load_device == pack.mm.get_torch_device()
    n = len(pack.mm.stub_loaded)
    assert handle.load() is m
    assert len(pack.mm.stub_loaded) == n + 1 and pack.mm.stub_loaded[-1] == [handle.patcher]
    assert set(dict(handle.patcher.model.named_children())) == {"denoiser", "estimator"}


def test_sampling_nodes_ask_comfy_for_room_for_their_tiles(pack, handle, model):
    # so that ComfyUI unloads other models up front instead of the run running out of memory
    img = lr_image(16, 24, b=2)
    run(pack, "UPSRUpscale", upsr_model=handle, image=img, **(defaults(pack, "UPSRUpscale") | {"tile_batch": 2}))
    want = model.working_memory((16, 24), batch=2, tile=512, tile_batch=2, estimator_block=512)
    assert pack.mm.stub_memory_required[-1] == want > 0
    # EstimateUncertainty asked for no room at all: now for one estimator block (here the image)
    run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    assert pack.mm.stub_memory_required[-1] == model.estimator_memory((16, 24)) > 0
    # UPSR Upscale asks for the estimator's room where it is the larger (the demo-size denoiser's is here)
    handle.model.estimator_memory = lambda *a, **k: 10**12
    try:
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))
    finally:
        del handle.model.estimator_memory
    assert 10**12 <= pack.mm.stub_memory_required[-1] < 10**12 + 2**20  # (+ the fast path's small canvas)
    # the full-size fast path in fp16 at LR 256 (H100: 0.94 GiB peak, 0.24 GiB weights) -> about 0.9 GiB
    with torch.device("meta"):  # the full-size net's shapes, no memory
        den_full = UPSRDenoiser(DenoiserConfig()).to(torch.float16)
    full = type(model)(den_full, None, dtype=torch.float16)
    assert 0.7 * 2**30 < full.working_memory((256, 256)) < 1.2 * 2**30


def test_load_two_files_and_precisions(pack, tmp_path):
    den, atd = _tiny_nets()  # one net per file, unprefixed keys (as upsr.pth / atd_real.pth)
    save_file({k: v.contiguous() for k, v in den.state_dict().items()}, str(pack.extra_dir / "den_only.safetensors"),
              metadata={"denoiser_config": json.dumps(den.config.to_dict())})
    save_file({k: v.contiguous() for k, v in atd.state_dict().items()}, str(pack.extra_dir / "atd_only.safetensors"),
              metadata={"estimator_config": json.dumps(atd.config.to_dict())})
    try:
        h = run(pack, "LoadUPSRModel", model_name="den_only.safetensors", estimator_name="atd_only.safetensors",
                precision="fp16")[0]
        assert h.model.dtype == torch.float16
        assert next(h.model.denoiser.parameters()).dtype == torch.float16
        assert next(h.model.estimator.parameters()).dtype == torch.float32  # never fp16
        h = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="bf16")[0]
        assert next(h.model.estimator.parameters()).dtype == torch.bfloat16
        h = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="auto")[0]
        assert h.model.dtype == torch.float32  # auto on a CPU device
        auto = sys.modules[PACK + ".nodes.load_model"].auto_precision
        mm = pack.mm
        with pytest.MonkeyPatch.context() as mp:  # a GPU where ComfyUI allows fp16 / only bf16 / neither
            mp.setattr(mm, "should_use_fp16", lambda device=None, **kw: True)
            assert auto("cuda") == torch.float16
            mp.setattr(mm, "should_use_fp16", lambda device=None, **kw: False)
            mp.setattr(mm, "should_use_bf16", lambda device=None, **kw: True)
            assert auto("cuda") == torch.bfloat16
            mp.setattr(mm, "should_use_bf16", lambda device=None, **kw: False)
            assert auto("cuda") == torch.float32
        with pytest.MonkeyPatch.context() as mp:  # --novram: ComfyUI leaves non-comfy.ops weights on the CPU
            mp.setattr(mm, "get_torch_device", lambda: torch.device("cuda"))
            mp.setattr(mm, "should_use_fp16", lambda device=None, **kw: getattr(device, "type", device) == "cuda")
            mp.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
            h = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="auto")[0]
            # not fp16 on the CPU
            assert h.model.dtype == torch.float32 and h.patcher.load_device == torch.device("cpu")
        with pytest.raises(ValueError, match="holds only the denoiser"):
            run(pack, "LoadUPSRModel", model_name="den_only.safetensors", estimator_name="(from the model file)",
                precision="fp32")
        with pytest.raises(ValueError, match="holds ATD estimator weights"):
            run(pack, "LoadUPSRModel", model_name="atd_only.safetensors", estimator_name="(from the model file)",
                precision="fp32")
    finally:
        (pack.extra_dir / "den_only.safetensors").unlink()
        (pack.extra_dir / "atd_only.safetensors").unlink()


def test_implementation_fast_is_the_default_without_graphs_or_compile(pack, handle):
    from upsr_core.fast import FastUPSRModel

    m = handle.model
    assert isinstance(m, FastUPSRModel)
    # CUDA graphs and torch.compile stay off under ComfyUI (memory outside its accounting, compile time);
    # the device-dependent switches follow ComfyUI's device (the stub's is the CPU: subpixel on, and
    # channels-last unless NNPACK's Winograd convs, which take NCHW maps, run: AVX2 CPUs)
    assert (m.fast_options.compile, m.fast_options.cuda_graphs) == (False, False)
    assert m.fast_options.subpixel and m.fast_options.channels_last != m.fast_options.winograd
    ref = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="fp32",
              implementation="reference")[0].model
    assert type(ref) is UPSRModel
    make_fast = sys.modules[PACK + ".nodes.load_model"].make_fast
    bench_flag = torch.backends.cudnn.benchmark
    on_gpu = make_fast(UPSRModel(*_tiny_nets()), torch.device("cuda"))  # nets on the CPU, set up for a GPU
    assert torch.backends.cudnn.benchmark == bench_flag  # ComfyUI's own setting (--fast autotune), untouched
    assert (on_gpu.fast_options.compile, on_gpu.fast_options.cuda_graphs) == (False, False)
    # channels-last with the Triton GroupNorm where Triton is installed, else NCHW (PyTorch's norm
    # would copy channels-last maps to NCHW and back)
    from upsr_core.nets.triton_norm import available

    triton = available(torch.device("cuda"))
    assert (on_gpu.fast_options.subpixel, on_gpu.fast_options.channels_last) == (False, triton)
    assert on_gpu.fast_options.triton_norm == triton


def test_load_rejects_bad_choices_with_clear_messages(pack):
    node = pack.nodes["LoadUPSRModel"]
    # before the run: model_name only (ComfyUI shows the message on every input validate_inputs takes,
    # and checks the other combos itself, on the input at fault; live probe 2026-11-27)
    assert list(inspect.signature(node.validate_inputs).parameters) == ["model_name"]
    assert node.validate_inputs(DEMO) is True
    msg = node.validate_inputs("nope.pth")
    assert "model_name 'nope.pth' is not in the upsr model folders" in msg and DEMO in msg
    assert node.validate_inputs(None) is True  # linked: known only when the prompt runs
    # at run time: all four (linked values arrive only then)
    assert node.check_all(DEMO, "(from the model file)", "fp32", "fast") is None
    assert "estimator_name 'x.pth'" in node.check_all(DEMO, "x.pth", "fp32", "fast")
    assert "precision must be one of auto, fp32, bf16, fp16" in node.check_all(DEMO, "(from the model file)", "fp8",
                                                                                 "fast")
    assert "implementation must be one of fast, reference, got 'turbo'" in node.check_all(
        DEMO, "(from the model file)", "fp32", "turbo")
    with pytest.raises(ValueError, match="nope.pth"):
        run(pack, "LoadUPSRModel", model_name="nope.pth", estimator_name="(from the model file)", precision="fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="fp8")
    with pytest.raises(ValueError, match="precision has no value: connect or set it"):
        run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision=None)


def test_empty_model_folder(pack, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(pack.folder_paths.folder_names_and_paths, "upsr", ([str(empty)], {".safetensors"}))
    schema = pack.nodes["LoadUPSRModel"].GET_SCHEMA()
    assert schema.inputs[0].options == [] and schema.inputs[0].default is None
    with pytest.raises(ValueError, match=r"no UPSR model found: put upsr_demo_x4\.safetensors .* into one of: .*empty"):
        run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="fp32")


# ----------------------------------------------------------------------------- layouts
@pytest.mark.slow
def test_execute_layouts(pack, handle):
    img = lr_image(12, 20, b=2)
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    sr_est, psi, mask = est.args
    assert sr_est.shape == psi.shape == (2, 48, 80, 3) and mask.shape == (2, 48, 80)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in est.args)
    assert psi.min() >= 0 and mask.min() >= 0 and mask.max() <= 1  # ψ is not clamped (nor is g(y))
    assert est.ui.as_dict()["images"] and est.ui.image.shape == (2, 48, 80, 3)  # the ψ heat map
    wn = run(pack, "WeightNoise", b_u=0.3, psi_max=0.05, uncertainty=psi)
    w, heat = wn.args
    assert w.shape == heat.shape == (2, 48, 80, 3) and w.min() >= 0.3 - 1e-7 and w.max() <= 1
    assert torch.equal(wn.ui.image, heat)
    sr = run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=sr_est, noise_weight=w, seed=3, tile=64,
             overlap=16, tile_batch=2)[0]
    assert sr.shape == (2, 48, 80, 3) and sr.dtype == torch.float32 and 0 <= sr.min() and sr.max() <= 1


# ----------------------------------------------------------------------------- the chain is the CLI
@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_chain_with_defaults_writes_what_the_cli_writes(pack, implementation, tmp_path):
    """fast (the default) is `upscale --fast`, reference is `upscale`: the same code, bit for bit; precision
    auto (the default) is fp32 on the CPU, the CLI's default dtype."""
    handle = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="auto",
                 **({} if implementation == "fast" else {"implementation": implementation}))[0]
    model = handle.model
    assert model.dtype == torch.float32
    img = lr_image(20, 28, seed=5)
    Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "lr.png")
    from upsr_core.cli import main

    assert main(["upscale", str(tmp_path / "lr.png"), "-o", str(tmp_path / "sr.png"), "--model",
                 str(pack.model_file), "--device", "cpu", "-q", *(["--fast"] if implementation == "fast" else [])]) == 0
    cli = np.asarray(Image.open(tmp_path / "sr.png").convert("RGB"))
    sr, _, _ = chain(pack, handle, img)
    assert np.array_equal((sr[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8), cli)
    # exact in float too, and not trivially: another seed gives another image
    assert torch.equal(sr, model.upscale(img.movedim(-1, 1).contiguous()).movedim(1, -1))
    assert not torch.equal(sr, chain(pack, handle, img, seed=1)[0])


def test_an_image_resized_by_comfy_s_bicubic_is_clamped_not_refused(pack, handle, caplog):
    # ComfyUI's ImageScale(By) bicubic does not clamp: ringing at edges leaves [0, 1]
    img = lr_image(16, 24, seed=3)
    over = (img * 1.2 - 0.1).contiguous()  # [-0.1, 1.1]: the size of what a ×0.5 bicubic gives on photos
    d = defaults(pack, "UPSRUpscale")
    with caplog.at_level(logging.INFO):
        got = run(pack, "UPSRUpscale", upsr_model=handle, image=over, **d)[0]
    assert torch.equal(got, run(pack, "UPSRUpscale", upsr_model=handle, image=over.clamp(0, 1), **d)[0])
    assert "(a resize's overshoot): clamped to [0, 1]" in caplog.text
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=over)
    assert torch.equal(est[0], run(pack, "EstimateUncertainty", upsr_model=handle, image=over.clamp(0, 1))[0])
    # the chain through copies of its maps: each found again by the LR both nodes clamp alike
    wn = run(pack, "WeightNoise", **defaults(pack, "WeightNoise") | {"uncertainty": est[1]})
    chained = run(pack, "UPSRSample", upsr_model=handle, image=over, sr_estimate=est[0].clone(),
                  noise_weight=wn[0].clone(), **defaults(pack, "UPSRSample"))[0]
    assert torch.equal(chained, run(pack, "UPSRUpscale", upsr_model=handle, image=over.clamp(0, 1), **d)[0])
    with pytest.raises(ValueError, match=r"divide 8-bit values by 255"):  # not an overshoot: still an error
        run(pack, "UPSRUpscale", upsr_model=handle, image=img * 255, **d)


def test_seeds_of_64_bits_draw_the_noise_of_their_low_32_bits(pack, handle):
    # ComfyUI checks no range on a linked seed, and seed nodes give up to 2**64 - 1; the CPU
    # generator keeps a seed's low 32 bits, so the node maps it there: the same images as the
    # seeds below 2**32 (image i of the batch: seed + i, wrapping the same way)
    img = lr_image(16, 24, b=2, seed=7)
    d = defaults(pack, "UPSRUpscale")
    top = run(pack, "UPSRUpscale", upsr_model=handle, image=img, **d | {"seed": 2**64 - 1})[0]
    low = run(pack, "UPSRUpscale", upsr_model=handle, image=img, **d | {"seed": 2**32 - 1})[0]
    assert torch.equal(top, low)
    second = run(pack, "UPSRUpscale", upsr_model=handle, image=img[1:], **d | {"seed": 0})[0]
    # (2**64 - 1) + 1 wraps to seed 0's noise; 1e-6: a batch of two and a single image run the
    # fast path's CPU kernels with other blocking (last-bit rounding, see the chain test below)
    assert (top[1:] - second).abs().max() <= 1e-6
    from upsr_core.pipeline import generator_seed, starting_noise

    assert torch.equal(starting_noise(generator_seed(5 + 2**40), 1, (8, 8)), starting_noise(5 + 2**40, 1, (8, 8)))
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got -1"):
        generator_seed(-1)
    with pytest.raises(ValueError, match=r"got 18446744073709551616"):
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **d | {"seed": 2**64})


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["reference", "fast"])
def test_upscale_node_equals_the_chain(pack, implementation):
    h = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="fp32",
            implementation=implementation)[0]
    img = lr_image(20, 36, b=2, seed=2)
    kw = {"seed": 11, "tile": 64, "overlap": 16, "tile_batch": 1}
    sr_chain, _, _ = chain(pack, h, img, **kw)
    d = defaults(pack, "UPSRUpscale") | kw
    sr_one = run(pack, "UPSRUpscale", upsr_model=h, image=img, **d)[0]
    one_by_one = torch.cat([run(pack, "UPSRUpscale", upsr_model=h, image=img[i : i + 1], **d | {"seed": 11 + i})[0]
                            for i in range(2)])
    assert torch.equal(one_by_one, sr_chain)  # the chain runs the images one by one, as the CLI does
    if implementation == "reference":
        assert torch.equal(sr_one, sr_chain)
    else:  # the fast path runs small images of a batch as one denoiser batch: other CPU kernel blocking
        d = (sr_one - sr_chain).abs().max().item()
        assert d <= 1e-6  # measured 6e-8 (2026-11-26, CPU): last-bit rounding through 5 steps


@pytest.mark.slow
def test_same_noise_gives_identical_frames_identical_results(pack, handle):
    """A batch of video frames with same_noise: every frame gets the seed's noise, so two identical
    frames come out identical (off, as before: seed + i, so they differ); a prompt without the
    optional input runs as off."""
    frame = lr_image(16, 24, seed=6)
    img = torch.cat([frame, frame])
    on, _, _ = chain(pack, handle, img, same_noise=True)
    off, _, _ = chain(pack, handle, img, same_noise=False)
    assert torch.equal(on[0], on[1]) and not torch.equal(off[0], off[1])
    assert torch.equal(on[:1], chain(pack, handle, frame)[0])  # frame 1 too gets seed 0, not 1
    # the one-node path batches the frames in one denoiser call (fast implementation): the same
    # images up to the batch's last-bit rounding (≤ 1e-6, as test_upscale_node_equals_the_chain)
    d = defaults(pack, "UPSRUpscale")
    one = run(pack, "UPSRUpscale", upsr_model=handle, image=img, **d | {"same_noise": True})[0]
    assert (one - on).abs().max().item() <= 1e-6 and (one[0] - one[1]).abs().max().item() <= 1e-6
    d.pop("same_noise")
    assert (run(pack, "UPSRUpscale", upsr_model=handle, image=img, **d)[0] - off).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------- the mask path
@pytest.mark.slow
def test_mask_path(pack, handle, model):
    """The MASK is ψ's channel mean; given back unedited it stands for ψ per channel (and its padded
    border), so the chain through it is the CLI's result; painted in part, only the painted pixels
    change (the rest keeps ψ per channel)."""
    img = lr_image(16, 24, seed=3)
    sr_chain, est, wn = chain(pack, handle, img)
    mask = est[2]
    lr = img.movedim(-1, 1).contiguous()
    sr_est, psi = estimate_maps(model, lr)
    assert torch.equal(mask, uncertainty_mask(psi)[:, 0])
    w = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty_mask=mask.clone())[0]
    assert torch.equal(w, wn[0]) and not torch.equal(w[..., 0], w[..., 2])  # ψ per channel, as the IMAGE path
    kw = defaults(pack, "UPSRSample")
    sr = run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=est[0], noise_weight=w, **kw)[0]
    assert torch.equal(sr, sr_chain)
    # an edited mask: zero uncertainty on the left half -> w = b_u there, full noise (1) where painted white
    edited = mask.clone()
    half = edited.shape[2] // 2
    edited[:, :, :half] = 0
    edited[:, :8, -8:] = 1
    w2, _ = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty_mask=edited).args
    assert torch.allclose(w2[:, :, :half], torch.tensor(0.4)) and torch.all(w2[:, :8, -8:] == 1)
    assert torch.equal(w2[:, 8:, half:], wn[0][:, 8:, half:])  # not painted: ψ per channel, as before
    grey = torch.full_like(mask, 0.5)  # ψ_max 1: a 50 % grey brush is halfway between b_u and full noise
    assert torch.allclose(run(pack, "WeightNoise", b_u=0.4, psi_max=1.0, uncertainty_mask=grey)[0], torch.tensor(0.7))
    sr = run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=est[0], noise_weight=w2, **kw)[0]
    want = sample_maps(model, lr, sr_est, w2.movedim(-1, 1).contiguous(), seed=0)
    assert torch.equal(sr, want.movedim(1, -1))
    assert not torch.equal(sr, sr_chain)


@pytest.mark.slow
def test_copies_of_the_maps_give_the_chain_result(pack, handle):
    """A node that hands a map on as a new tensor with the same values (a copy, an identity resize)
    lost the padded original the map carried, and the padded border (86 % of the canvas here) was
    mirrored instead: up to 0.04 off with the demo model. The original is found by value now."""
    img = lr_image(20, 28, seed=4)
    sr_chain, est, wn = chain(pack, handle, img)
    copied = [t.clone() for t in (est[0], wn[0])]
    assert not any(hasattr(t, "_upsr_full") for t in copied)
    sr = run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=copied[0], noise_weight=copied[1],
             **defaults(pack, "UPSRSample"))[0]
    assert torch.equal(sr, sr_chain)


def test_an_edit_keeps_the_padded_border_and_the_unedited_values():
    """A map edited in part keeps its original everywhere else, border included; the border pixels
    that mirror an edited pixel (the LR's reflection: padded HR rows 28…31 mirror rows 7…4) take the
    edit. A map with no original left is mirror-padded as before."""
    from upsr_core.stages import make_visible, mirror_pad_hr, recover_full

    lr_size, padded = (5, 7), (8, 8)
    full = torch.rand(1, 3, 32, 32)
    vis = make_visible(full, lr_size)
    assert torch.equal(recover_full(vis.clone(), lr_size, padded), full)  # a copy: the original itself
    edited = vis.clone()
    edited[..., 2:6, 3:9] = 0.25
    want = full.clone()
    want[..., 2:6, 3:9] = 0.25
    want[..., 30:32, 3:9] = 0.25  # rows 4 and 5 mirrored to 31 and 30
    assert torch.equal(recover_full(edited, lr_size, padded), want)
    mostly = vis.clone()
    mostly[..., :12, :] = 0.5  # 60 % changed: still that map, edited
    got = recover_full(mostly, lr_size, padded)
    assert torch.equal(got[..., 12:24, :], full[..., 12:24, :])  # rows 20…23 mirror 15…12: not edited
    assert torch.all(got[..., :12, :] == 0.5) and torch.all(got[..., 24:, :] == 0.5)  # 24…31 mirror 11…4
    other = torch.rand(1, 3, 20, 28)  # not one of the maps made here: mirror-padded, as before
    assert torch.equal(recover_full(other, lr_size, padded), mirror_pad_hr(other, lr_size, padded))
    scattered = vis.clone()
    scattered[..., :16, :] = 0.5  # 80 % changed (a global edit leaves scattered values): a map of its own
    assert torch.equal(recover_full(scattered, lr_size, padded), mirror_pad_hr(scattered, lr_size, padded))


def test_one_sr_estimate_for_a_batch_of_images_is_refused(pack, handle):
    img = lr_image(16, 24, b=2, seed=5)
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    wn = run(pack, "WeightNoise", **defaults(pack, "WeightNoise") | {"uncertainty": est[1]})
    with pytest.raises(ValueError, match=r"one g\(y\) per image"):
        run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=est[0][:1].clone(),
            noise_weight=wn[0], **defaults(pack, "UPSRSample"))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(pack, handle):
    img, other = lr_image(12, 16), lr_image(16, 16)
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    w = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty=est[1])[0]
    est_other = run(pack, "EstimateUncertainty", upsr_model=handle, image=other)
    w_other = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty=est_other[1])[0]
    d = defaults(pack, "UPSRSample")

    def sample(**kw):
        return run(pack, "UPSRSample", **({"upsr_model": handle, "image": img, "sr_estimate": est[0],
                                           "noise_weight": w} | d | kw))

    # sizes as the artist sees them (width×height), naming the input
    with pytest.raises(ValueError, match=r"^noise_weight is 64×64 px; expected ×4 of the LR image \(16×12 px\), "
                                         r"i\.e\. 64×48 px: sr_estimate fits the LR image, so the map or mask going "
                                         r"into UPSR Weight Noise is the one to fix: make it 64×48 px$"):
        sample(noise_weight=w_other)  # e.g. a Solid Mask of another size painted into Weight Noise (artist probe)
    with pytest.raises(ValueError, match=r"^sr_estimate is 64×64 px; expected .*: connect the sr_estimate that UPSR "
                                         r"Estimate Uncertainty made from this same LR image$"):
        sample(sr_estimate=est_other[0])
    with pytest.raises(ValueError, match=r"^sr_estimate is 64×64 px; .*: give UPSR Sample the same LR image that "
                                         r"went into UPSR Estimate Uncertainty$"):
        sample(sr_estimate=est_other[0], noise_weight=w_other)  # both maps from another image: the LR is off
    with pytest.raises(ValueError, match=r"sr_estimate is 16×12 px; .*: it has the LR image's size; connect UPSR "
                                         r"Estimate Uncertainty's sr_estimate output"):
        sample(sr_estimate=img)  # wrong wiring: the LR into sr_estimate
    with pytest.raises(ValueError, match=r"noise_weight is 16×12 px; .*: it has the LR image's size; a map painted "
                                         r"on the LR image must be scaled ×4 first"):
        sample(noise_weight=img)  # a map painted at LR size
    with pytest.raises(ValueError, match=r"sr_estimate is 64×48 px; expected ×4 of the LR image \(64×48 px\).*: "
                                         r"the 'image' input has the maps' size, so it looks already upscaled"):
        sample(image=est[0].clone())  # an upscaled image (not one of the pack's maps) wired in as the LR
    # the pack's own maps carry their role: one wired into another's input is named (sizes match, so the
    # heatmap or ψ into noise_weight ran with the wrong values silently)
    heat = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty=est[1])[1]
    for kw, msg in [({"noise_weight": heat}, r"^noise_weight: got UPSR Weight Noise's heatmap \(a colour picture of "
                                             r"w\); connect UPSR Weight Noise's noise_weight \(w\) here$"),
                    ({"noise_weight": est[1]}, r"^noise_weight: got UPSR Estimate Uncertainty's uncertainty \(ψ\)"),
                    ({"sr_estimate": w}, r"^sr_estimate: got UPSR Weight Noise's noise_weight \(w\); connect UPSR "
                                         r"Estimate Uncertainty's sr_estimate \(g\(y\)\) here$"),
                    ({"sr_estimate": w, "noise_weight": est[0]}, r"^sr_estimate: got"),  # swapped: the first named
                    ({"image": est[0]}, r"^image: got UPSR Estimate Uncertainty's sr_estimate \(g\(y\)\); connect "
                                        r"the low-resolution image here$")]:
        with pytest.raises(ValueError, match=msg):
            sample(**kw)
    with pytest.raises(ValueError, match=r"^UPSR Weight Noise, input 'uncertainty': got UPSR Weight Noise's heatmap"):
        run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty=heat)
    with pytest.raises(ValueError, match=r"^image: got UPSR Weight Noise's noise_weight"):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=w)
    with pytest.raises(ValueError, match=r"^image: got UPSR Estimate Uncertainty's uncertainty"):
        run(pack, "UPSRUpscale", **({"upsr_model": handle, "image": est[1]} | defaults(pack, "UPSRUpscale")))
    # an edited copy is the artist's own map: no role, no check
    assert run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty=est[1].clone())[0].shape == w.shape
    with pytest.raises(ValueError, match=r"^image: the image has an alpha channel \(4 channels\); UPSR upscales RGB"):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=torch.cat([img, img[..., :1]], -1))
    with pytest.raises(ValueError, match=r"noise_weight is a batch of 3; expected 1 \(for every image\) or 2 "
                                         r"\(one per LR image\)"):
        sample(image=img.repeat(2, 1, 1, 1), sr_estimate=est[0], noise_weight=w.repeat(3, 1, 1, 1))
    with pytest.raises(ValueError, match=r"noise_weight is a batch of 3; expected 1, as the LR image is one$"):
        sample(image=img, sr_estimate=est[0], noise_weight=w.repeat(3, 1, 1, 1))  # said "1 (...) or 1 (...)"
    with pytest.raises(ValueError, match=r"UPSR Weight Noise, input 'uncertainty_mask': uncertainty ψ must be "
                                         r"finite and >= 0, got values in \[-0\.49"):
        run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty_mask=est[2] - 0.5)
    with pytest.raises(ValueError, match=r"image: the image batch is empty"):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=img[:0])
    with pytest.raises(ValueError, match=r"expected an IMAGE \[B,H,W,3\] \(batch, height, width, RGB\), got "
                                         r"\(1, 48, 64\)"):
        sample(noise_weight=est[2])  # wrong wiring: a MASK into an IMAGE input
    with pytest.raises(ValueError, match=r"uncertainty_mask: expected a MASK \[B,H,W\], got \(1, 48, 64, 3\)"):
        run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty_mask=est[1])
    # a [B,1,H,W] mask (some nodes pass masks so; ComfyUI's own reshape them) is that mask (2026-11-29 review)
    w3 = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty_mask=est[2])[0]
    w4 = run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty_mask=est[2].unsqueeze(1).clone())[0]
    assert torch.equal(w3, w4)
    assert len(repr(handle)) < 120 and repr(handle).startswith("UPSRHandle(denoiser ")  # not the module tree
    with pytest.raises(ValueError, match="connect exactly one of .* got both"):
        run(pack, "WeightNoise", b_u=0.4, psi_max=0.05, uncertainty=est[1], uncertainty_mask=est[2])
    with pytest.raises(ValueError, match="connect exactly one of .* got neither"):
        run(pack, "WeightNoise", b_u=0.4, psi_max=0.05)
    with pytest.raises(ValueError, match="tile must be a multiple of 64 LR pixels .* got 100: try 64"):
        sample(tile=100)  # a linked value: checked at run time, before any work
    with pytest.raises(ValueError, match=r"overlap \(64\) must be less than the tile \(64\)"):
        sample(tile=64, overlap=64)
    with pytest.raises(ValueError, match=r"b_u must be in \[0, 1\]"):
        run(pack, "WeightNoise", b_u=1.5, psi_max=0.05, uncertainty=est[1])



def test_a_bad_image_is_refused_before_the_model_is_loaded(pack, handle, monkeypatch):
    """Loading may offload the user's other models from the GPU: not for an image that is refused."""
    loads = []
    monkeypatch.setattr(type(handle), "load_for", lambda self, *a, **k: loads.append(1))
    monkeypatch.setattr(type(handle), "load", lambda self, *a, **k: loads.append(1))
    img = lr_image(12, 16)
    with pytest.raises(ValueError, match=r"^the image must hold values in \[0, 1\], got"):  # 0-255 by mistake
        run(pack, "EstimateUncertainty", upsr_model=handle, image=img * 255)  # loaded first (error audit 2026-11-28)
    rgba = torch.cat([img, img[..., :1]], -1)
    with pytest.raises(ValueError, match=r"^image: the image has an alpha channel"):
        run(pack, "UPSRUpscale", **({"upsr_model": handle, "image": rgba} | defaults(pack, "UPSRUpscale")))
    nan = img.clone()
    nan[0, 0, 0, 0] = float("nan")
    maps = torch.rand(1, 48, 64, 3)
    with pytest.raises(ValueError, match="NaN"):
        run(pack, "UPSRSample", **({"upsr_model": handle, "image": nan, "sr_estimate": maps, "noise_weight": maps}
                                   | defaults(pack, "UPSRSample")))
    assert loads == []


# ----------------------------------------------------------------------------- external estimator
class FakeUpscaleModel:
    """A spandrel-descriptor look-alike: bicubic ×scale, with .scale, .input_channels and .to()."""

    def __init__(self, scale: int = 4):
        self.scale, self.input_channels, self.device, self.moves = scale, 3, torch.device("cpu"), []

    def to(self, device):
        self.moves.append(str(device))
        return self

    def __call__(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)


def test_upscale_model_as_estimator(pack, handle, monkeypatch):
    g = FakeUpscaleModel()
    monkeypatch.setattr(pack.utils, "stub_tiled_calls", [])
    monkeypatch.setattr(pack.mm, "stub_loaded", [])
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=lr_image(12, 16, b=2), upscale_model=g)
    assert est[1].abs().max() < 1e-5  # g = bicubic: no uncertainty
    assert pack.mm.stub_loaded == []  # the UPSR nets are not needed (loading them could evict other models)
    assert g.moves[-1] == "cpu" and len(g.moves) == 2
    # one image at a time through ComfyUI's tiling, with core's Upscale-node settings (not the whole
    # batch in one call: a batch of video frames ran out of memory where core's node did not)
    assert pack.utils.stub_tiled_calls == [dict(shape=(1, 3, 16, 16), tile=(512, 512), overlap=32,
                                                upscale_amount=4)] * 2
    with pytest.raises(ValueError, match="must be a ×4 RGB model"):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=lr_image(12, 16), upscale_model=FakeUpscaleModel(2))


def test_upscale_model_that_is_not_x4_is_named_before_comfy_tiling_fails(pack, handle):
    # it says ×4 but gives ×2: ComfyUI's tiled_scale would fail writing it into its ×4 buffer
    class Says4Gives2(FakeUpscaleModel):
        def __call__(self, x):
            return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)

    g = Says4Gives2(4)
    with pytest.raises(ValueError, match=r"upscale_model says ×4 but turned a 16×16 tile into 32×32: it must "
                                         r"upscale ×4"):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=lr_image(12, 16), upscale_model=g)
    assert g.moves[-1] == "cpu"


def test_an_upscale_model_returning_another_range_or_nan_is_named(pack, handle):
    """A model returning 0..255 made ψ up to 127 (the MASK clamped to 1 without a word); NaN was
    reported by the preview as "heatmap needs a finite float map", naming neither the model nor g."""
    class Times255(FakeUpscaleModel):
        def __call__(self, x):
            return super().__call__(x) * 255

    class GivesNaN(FakeUpscaleModel):
        def __call__(self, x):
            return super().__call__(x) * float("nan")

    for g, match in ((Times255(), r"upscale_model must return values in \[0, 1\] .*got \[-?[0-9.]+, 2[0-9.]+\]"),
                     (GivesNaN(), "upscale_model returned NaN or Inf values")):
        with pytest.raises(ValueError, match=match):
            run(pack, "EstimateUncertainty", upsr_model=handle, image=lr_image(12, 16), upscale_model=g)
        assert g.moves[-1] == "cpu"


# ----------------------------------------------------------------------------- UPSRColorFix
def test_color_fix_node_is_the_core_function_after_the_upscale(pack, handle):
    from upsr_core.colorfix import wavelet_color_fix

    img = lr_image(16, 24, b=2)
    sr = run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))[0]
    out = run(pack, "UPSRColorFix", image=sr, reference=img, levels=3)[0]
    want = wavelet_color_fix(sr.movedim(-1, 1).contiguous(), img.movedim(-1, 1).contiguous(), levels=3)
    assert out.shape == sr.shape == (2, 64, 96, 3) and out.is_contiguous()
    assert torch.equal(out, want.movedim(1, -1))
    # a reference of the result's size, and one reference for the batch
    same = run(pack, "UPSRColorFix", image=sr, reference=sr[:1], **defaults(pack, "UPSRColorFix"))[0]
    assert torch.equal(same, wavelet_color_fix(sr.movedim(-1, 1).contiguous(),
                                               sr[:1].movedim(-1, 1).contiguous()).movedim(1, -1))


def test_color_fix_node_refuses_wrong_inputs_by_name(pack, handle):
    img = lr_image(16, 24)
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    with pytest.raises(ValueError, match=r"reference is 20×16 and image 96×64"):
        run(pack, "UPSRColorFix", image=torch.rand(1, 64, 96, 3), reference=lr_image(16, 20), levels=5)
    with pytest.raises(ValueError, match=r"^reference: got UPSR Estimate Uncertainty's uncertainty \(ψ\); connect the "
                                         r"low-resolution image \(or a picture of the result's size\) whose colours"):
        run(pack, "UPSRColorFix", image=torch.rand(1, 64, 96, 3), reference=est[1], levels=5)
    w, heat = run(pack, "WeightNoise", **defaults(pack, "WeightNoise"), uncertainty=est[1])
    with pytest.raises(ValueError, match=r"^image: got UPSR Weight Noise's heatmap .*; connect the ×4 result to fix "
                                         r"\(UPSR's image, or any ×4 upscaler's\) here$"):
        run(pack, "UPSRColorFix", image=heat, reference=img, levels=5)
    # g(y) is a ×4 picture as any upscaler's: it was refused with "connect the low-resolution image here"
    fixed = run(pack, "UPSRColorFix", image=est[0], reference=img, levels=5)[0]
    assert fixed.shape == est[0].shape
    with pytest.raises(ValueError, match=r"reference must hold values in \[0, 1\], got \[.*\] \(divide 8-bit"):
        run(pack, "UPSRColorFix", image=torch.rand(1, 64, 96, 3), reference=img * 255, levels=5)
    with pytest.raises(ValueError, match="image: the image has an alpha channel"):
        run(pack, "UPSRColorFix", image=torch.rand(1, 64, 96, 4), reference=img, levels=5)


# ----------------------------------------------------------------------------- progress, cancel, OOM
def test_outputs_are_contiguous_tensors(pack, handle):
    # other nodes may .view() an IMAGE or write into it: no movedim views, no expanded channels
    img = lr_image(16, 24)
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    wn = run(pack, "WeightNoise", **defaults(pack, "WeightNoise"), uncertainty_mask=est[2])
    sr = run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))
    for t in (*est.args, *wn.args, *sr.args):
        assert t.is_contiguous() and t.view(-1).numel() == t.numel()
    with torch.inference_mode():  # as another node in ComfyUI's executor
        wn.args[0].add_(0)  # writable: an expand of one channel would raise here


@pytest.fixture(params=[Exception, BaseException], ids=["interrupt-Exception", "interrupt-BaseException"])
def interrupt(request, pack, monkeypatch):
    """ComfyUI's InterruptProcessingException, which Cancel raises through the nodes' progress
    checks: an Exception in 0.3.64 (the stub's), a BaseException in newer ComfyUI (read 2026-11-29),
    which no ``except Exception`` catches; the cancel tests run with both."""
    cls = type("InterruptProcessingException", (request.param,), {})
    monkeypatch.setattr(pack.mm, "InterruptProcessingException", cls)
    return cls


def test_color_fix_reports_progress_per_strip_and_can_be_cancelled(pack, monkeypatch, interrupt):
    """UPSR Color Fix had no progress bar and no Cancel check (a large video batch ran to its end)."""
    from upsr_core.colorfix import strip_rows

    seen = []
    monkeypatch.setattr(pack.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: seen.append((v, t)))
    rows = 2 * strip_rows(3) + 8  # three strips
    sr, ref = lr_image(rows, 16, b=2, seed=1), lr_image(rows, 16, b=2, seed=2)
    run(pack, "UPSRColorFix", image=sr, reference=ref, levels=3)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    pack.mm.interrupt_current_processing(True)
    with pytest.raises(interrupt):
        run(pack, "UPSRColorFix", image=sr, reference=ref, levels=3)
    assert not pack.mm.processing_interrupted()


def test_estimate_uncertainty_reports_progress_and_can_be_cancelled(pack, handle, model, monkeypatch, interrupt):
    seen = []
    monkeypatch.setattr(pack.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: seen.append((v, t)))
    img = lr_image(16, 24, b=3)
    run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    assert seen == [(1, 3), (2, 3), (3, 3)]  # one block per image here
    calls = []
    real = model._estimator_call
    monkeypatch.setattr(model, "_estimator_call", lambda x: calls.append(1) or real(x))
    pack.mm.interrupt_current_processing(True)  # Cancel pressed while the estimator runs
    with pytest.raises(interrupt):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    assert len(calls) == 1 and not pack.mm.processing_interrupted()


def test_an_upscale_model_reports_progress_per_tile_and_can_be_cancelled_between_tiles(pack, handle, monkeypatch,
                                                                                       interrupt):
    """With an upscale_model the bar counted images only (core's tiling got no pbar), so a large
    image sat at 0 % and Cancel waited for the whole image; now every tile of every image counts."""
    seen, tiles_run = [], []
    monkeypatch.setattr(pack.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: seen.append((v, t)))
    real = pack.utils.tiled_scale

    def two_tiles(samples, function, tile_x=64, tile_y=64, overlap=8, upscale_amount=4, out_channels=3,
                  output_device="cpu", pbar=None):
        assert (tile_x, tile_y, overlap) == (512, 512, 32)
        tiles_run.append(1)
        pbar.update(1)  # as if the first of two tiles were done; the second does the work
        tiles_run.append(2)
        return real(samples, function, tile_x, tile_y, overlap, upscale_amount, out_channels, output_device, pbar)

    monkeypatch.setattr(pack.utils, "tiled_scale", two_tiles)
    monkeypatch.setattr(pack.utils, "get_tiled_scale_steps", lambda w, h, tx, ty, o: 2)
    g = FakeUpscaleModel()
    run(pack, "EstimateUncertainty", upsr_model=handle, image=lr_image(12, 16, b=3), upscale_model=g)
    assert seen == [(k, 6) for k in range(1, 7)]
    tiles_run.clear()
    g.moves.clear()
    pack.mm.interrupt_current_processing(True)  # Cancel pressed during the first tile
    with pytest.raises(interrupt):
        run(pack, "EstimateUncertainty", upsr_model=handle, image=lr_image(12, 16, b=3), upscale_model=g)
    assert tiles_run == [1] and not pack.mm.processing_interrupted()
    assert g.moves == [str(pack.mm.get_torch_device()), "cpu"]  # moved back to the CPU after the Cancel too


@pytest.mark.parametrize("oom", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    # Apple silicon: the MPS allocator raises plain RuntimeErrors (the retry missed them before)
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: "
                 "18.13 GB). Tried to allocate 2.00 GB on private pool."),
    RuntimeError("Invalid buffer size: 5.00 GB"),
], ids=["cuda", "mps", "mps-buffer"])
def test_estimator_out_of_memory_halves_its_blocks(pack, handle, model, monkeypatch, caplog, oom):
    img = lr_image(16, 24, seed=6)
    want = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    real, calls = model._estimator_call, []

    def flaky(x):
        calls.append(tuple(x.shape))
        if len(calls) == 1:
            raise oom
        return real(x)

    monkeypatch.setattr(model, "_estimator_call", flaky)
    with caplog.at_level(logging.WARNING):
        got = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    assert "out of memory with estimator block 512, retrying with estimator block 256" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got.args, want.args))  # one block either way at this size


@pytest.mark.slow
def test_progress_counts_steps_times_tiles(pack, handle, monkeypatch):
    seen = []
    monkeypatch.setattr(pack.utils, "PROGRESS_BAR_HOOK", lambda v, t, preview, node_id=None: seen.append((v, t)))
    img = lr_image(16, 40)  # tile 64, overlap 16 on 16x40: 1 tile
    run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale") | {"tile": 64,
                                                                                              "overlap": 16})
    # (0, 6) first: a report (and Cancel check) before the estimator runs; its block is one unit
    assert seen == [(0, 6)] + [(k, 6) for k in range(1, 7)]
    seen.clear()
    img = lr_image(16, 136)  # 3 tiles in a row
    run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale") | {"tile": 64,
                                                                                              "overlap": 16})
    assert seen == [(0, 16)] + [(k, 16) for k in range(1, 17)]


@pytest.fixture
def previews(pack, monkeypatch):
    """ComfyUI started with ``--preview-method auto``: the hook's (value, total, preview) calls."""
    cli_args = sys.modules["comfy.cli_args"]
    monkeypatch.setattr(cli_args.args, "preview_method", cli_args.LatentPreviewMethod.Auto)
    seen = []
    monkeypatch.setattr(pack.utils, "PROGRESS_BAR_HOOK",
                        lambda v, t, preview, node_id=None: seen.append((v, t, preview)))
    return seen


@pytest.mark.parametrize("node", ["UPSRSample", "UPSRUpscale"])
def test_previews_show_each_steps_estimate_when_comfyui_shows_previews(pack, handle, previews, node):
    """With ``--preview-method`` other than none, the sampling nodes show each step's x̂0 as
    KSampler shows its latents: in the step's own progress update (one per step), as ("JPEG", PIL
    image, --preview-size); the last step's x̂0 is the result (one tile: to the 8-bit level)."""
    img = lr_image(16, 24)
    kw = defaults(pack, node) | {"upsr_model": handle, "image": img}
    if node == "UPSRSample":
        est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
        wn = run(pack, "WeightNoise", **defaults(pack, "WeightNoise") | {"uncertainty": est[1]})
        kw |= {"sr_estimate": est[0], "noise_weight": wn[0]}
        assert all(p[2] is None for p in previews)  # the estimator's bar shows none
        previews.clear()
    sr = run(pack, node, **kw)[0]
    shown = [(i, p) for i, p in enumerate(previews) if p[2] is not None]
    assert len(shown) == 5 and previews[-1] == shown[-1][1]
    for i, (v, t, (kind, im, size)) in shown:
        assert (kind, size, im.mode, im.size) == ("JPEG", 512, "RGB", (96, 64))
        assert (previews[i - 1][0] if i else 0) < v  # the step's count, reported once: with its picture
    last = torch.from_numpy(np.array(shown[-1][1][2][1])).float() / 255
    assert torch.equal(last, (sr[0] * 255).round() / 255)


def test_no_previews_by_default(pack, handle, monkeypatch):
    """ComfyUI's default ``--preview-method none``: no preview is made (nor its x̂0 copied)."""
    seen = []
    monkeypatch.setattr(pack.utils, "PROGRESS_BAR_HOOK", lambda v, t, preview, node_id=None: seen.append(preview))
    run(pack, "UPSRUpscale", upsr_model=handle, image=lr_image(16, 24), **defaults(pack, "UPSRUpscale"))
    assert len(seen) == 7 and seen == [None] * 7


@pytest.mark.parametrize("size", [(16, 24), (16, 600)])  # one piece; streamed tiles with 2 estimator blocks
def test_upscale_node_cancelled_before_it_starts_runs_no_estimator_block(pack, handle, model, monkeypatch, size,
                                                                         interrupt):
    calls = []
    real = model.estimator.forward
    monkeypatch.setattr(model.estimator, "forward", lambda x: calls.append(tuple(x.shape)) or real(x))
    pack.mm.interrupt_current_processing(True)  # Cancel pressed while an earlier node ran
    with pytest.raises(interrupt):
        run(pack, "UPSRUpscale", upsr_model=handle, image=lr_image(*size), **defaults(pack, "UPSRUpscale"))
    assert calls == [] and not pack.mm.processing_interrupted()


def _wrap_denoiser(model, monkeypatch, wrapper) -> None:
    """Route every denoiser pass through ``wrapper(original, *args)``: the reference ``forward``
    and the fast path's ``forward_step`` (one shared step per batch) alike."""
    for name in ("forward", "forward_step"):
        original = getattr(model.denoiser, name)
        monkeypatch.setattr(model.denoiser, name, partial(wrapper, original))


def _count_denoiser_calls(model, monkeypatch) -> list[int]:
    calls = [0]

    def counted(original, *a, **k):
        calls[0] += 1
        return original(*a, **k)

    _wrap_denoiser(model, monkeypatch, counted)
    return calls


def test_cancel_stops_within_one_denoiser_step_and_the_next_run_is_normal(pack, handle, model, monkeypatch, interrupt):
    img = lr_image(16, 24)
    want = chain(pack, handle, img)[0]
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    w = run(pack, "WeightNoise", **defaults(pack, "WeightNoise"), uncertainty=est[1])[0]
    checks = [0]
    real_check = pack.mm.throw_exception_if_processing_interrupted

    def cancel_on_third_check():
        checks[0] += 1
        if checks[0] == 3:  # the user pressed Cancel during the third denoiser step
            pack.mm.interrupt_current_processing(True)
        real_check()

    monkeypatch.setattr(pack.mm, "throw_exception_if_processing_interrupted", cancel_on_third_check)
    calls = _count_denoiser_calls(model, monkeypatch)
    with pytest.raises(interrupt):
        run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=est[0], noise_weight=w,
            **defaults(pack, "UPSRSample"))
    assert calls[0] == 3 and not pack.mm.processing_interrupted()
    monkeypatch.undo()
    again = run(pack, "UPSRSample", upsr_model=handle, image=img, sr_estimate=est[0], noise_weight=w,
                **defaults(pack, "UPSRSample"))[0]
    assert torch.equal(again, want)


def test_cancel_in_the_one_node_upscale(pack, handle, model, monkeypatch, interrupt):
    pack.mm.interrupt_current_processing(True)  # pressed before the node starts
    calls = _count_denoiser_calls(model, monkeypatch)
    with pytest.raises(interrupt):
        run(pack, "UPSRUpscale", upsr_model=handle, image=lr_image(16, 24), **defaults(pack, "UPSRUpscale"))
    assert calls[0] == 0  # seen before the estimator, so before any denoiser step


def _oom_on_first_calls(model, monkeypatch, n: int, error: Exception | None = None) -> list[tuple]:
    """The denoiser raises ``error`` (CUDA out-of-memory) on its first ``n`` calls; returns the
    input shapes seen."""
    shapes = []

    def flaky(original, x, *a, **k):
        shapes.append(tuple(x.shape))
        if len(shapes) <= n:
            raise error or torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(x, *a, **k)

    _wrap_denoiser(model, monkeypatch, flaky)
    return shapes


@pytest.mark.slow
@pytest.mark.parametrize("node_id", ["UPSRSample", "UPSRUpscale"])
def test_oom_on_the_first_tile_retries_with_smaller_tiles(pack, handle, model, monkeypatch, caplog, node_id):
    img = lr_image(16, 128, seed=4)
    lr = img.movedim(-1, 1).contiguous()
    sr_est, psi = estimate_maps(model, lr)
    # what the retry runs: the chain's estimate stays (blocks of 512); the one-node Upscale also
    # shrinks the estimator's blocks to the new tile (either net may be the one that ran out)
    direct = {"UPSRSample": lambda: sample_maps(model, lr, sr_est, weight_map(psi), seed=0, tile=64, overlap=16),
              "UPSRUpscale": lambda: model.upscale(lr, seed=0, tile=64, overlap=16, estimator_block=64)}[node_id]()
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    w = run(pack, "WeightNoise", **defaults(pack, "WeightNoise"), uncertainty=est[1])[0]
    inputs = {"UPSRSample": {"sr_estimate": est[0], "noise_weight": w}, "UPSRUpscale": {}}[node_id]
    kw = defaults(pack, node_id) | {"tile": 512, "overlap": 16}
    shapes = _oom_on_first_calls(model, monkeypatch, 1)
    empties = pack.mm.stub_empty_cache_calls
    with caplog.at_level(logging.WARNING):
        sr = run(pack, node_id, upsr_model=handle, image=img, **inputs, **kw)[0]
    # whole image, then tiles of at most 64 px: three of 56 (the net's multiple 8) overlap by >= 16
    assert shapes[0][-2:] == (16, 128) and shapes[1][-2:] == (16, 56)
    block = {"UPSRSample": "", "UPSRUpscale": ", estimator block 64"}[node_id]
    assert f"out of memory with tile 512, overlap 16, retrying with tile 64, overlap 16{block}" in caplog.text
    assert pack.mm.stub_empty_cache_calls == empties + 1
    assert torch.equal(sr, direct.movedim(1, -1))


@pytest.mark.parametrize("node_id", ["UPSRSample", "UPSRUpscale"])
def test_oom_first_unloads_other_models_and_keeps_the_tile(pack, handle, model, monkeypatch, caplog, node_id):
    # Another model (an SDXL of an earlier stage, say) still on the device: the first OOM unloads
    # it (never the UPSR nets) and runs the same tiles again, so the result is the one asked for;
    # only a second OOM shrinks the tile.
    img = lr_image(16, 24, seed=5)
    want = run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))[0]
    est = run(pack, "EstimateUncertainty", upsr_model=handle, image=img)
    w = run(pack, "WeightNoise", **defaults(pack, "WeightNoise"), uncertainty=est[1])[0]
    inputs = {"UPSRSample": {"sr_estimate": est[0], "noise_weight": w}, "UPSRUpscale": {}}[node_id]
    other = object()
    monkeypatch.setattr(pack.mm, "stub_others", [other])
    monkeypatch.setattr(pack.mm, "stub_free_calls", [])
    # as on a GPU, where the others go to the CPU (the stub runs on the CPU: offload elsewhere)
    monkeypatch.setattr(pack.mm, "current_loaded_models", [_loaded_elsewhere(handle, "meta")])
    shapes = _oom_on_first_calls(model, monkeypatch, 1)
    with caplog.at_level(logging.WARNING):
        sr = run(pack, node_id, upsr_model=handle, image=img, **inputs, **defaults(pack, node_id))[0]
    assert pack.mm.stub_others == [] and len(pack.mm.stub_free_calls) == 1
    (_, device, keep), = pack.mm.stub_free_calls
    assert device == handle.patcher.load_device and keep == [pack.mm.LoadedModel(handle.patcher)]
    assert "out of memory with tile 512, overlap 64: unloaded 1 other model(s), retrying the same" in caplog.text
    assert shapes[0] == shapes[1] and torch.equal(sr, want)


def _loaded_elsewhere(handle, offload: str):
    """Another model in ComfyUI's list, on UPSR's device, offloaded to ``offload``."""
    fake = types.SimpleNamespace(load_device=handle.patcher.load_device, offload_device=torch.device(offload))
    return types.SimpleNamespace(device=handle.patcher.load_device, model=fake)


@pytest.mark.parametrize("upsr_offload, other_offload, freed", [
    ("meta", "meta", 1),  # a GPU's default: everything goes to the CPU ("meta" plays it here)
    ("cpu", "meta", 1),  # --highvram: UPSR stays (offload = load device), a text encoder goes
    ("cpu", "cpu", 0),  # --cpu / --gpu-only: nothing is offloaded anywhere else
])
def test_free_others_unloads_where_another_model_would_leave_the_device(pack, handle, monkeypatch, upsr_offload,
                                                                      other_offload, freed):
    """Under --highvram it gave up at once because UPSR's own offload device is its load device,
    though the text encoders and VAE there go to the CPU (2026-11-29 review)."""
    monkeypatch.setattr(handle.patcher, "offload_device", torch.device(upsr_offload))
    monkeypatch.setattr(pack.mm, "stub_others", [object()])
    monkeypatch.setattr(pack.mm, "stub_free_calls", [])
    monkeypatch.setattr(pack.mm, "current_loaded_models", [_loaded_elsewhere(handle, other_offload)])
    assert handle.free_others() == freed and len(pack.mm.stub_free_calls) == freed


def test_oom_where_models_offload_to_their_own_device_shrinks_at_once(pack, handle, model, monkeypatch, caplog):
    """Under --cpu (or --gpu-only) models are offloaded to the device they run on: unloading the
    others frees nothing, and retrying the same tiles cost a whole failing attempt (minutes on a
    CPU) and dropped the user's models from ComfyUI's list. The tile shrinks at once."""
    assert handle.patcher.offload_device == handle.patcher.load_device  # the stub: both the CPU
    img = lr_image(16, 128, seed=4)
    other = object()
    monkeypatch.setattr(pack.mm, "stub_others", [other])
    monkeypatch.setattr(pack.mm, "stub_free_calls", [])
    shapes = _oom_on_first_calls(model, monkeypatch, 1)
    with caplog.at_level(logging.WARNING):
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale") | {"overlap": 16})
    assert pack.mm.stub_others == [other] and pack.mm.stub_free_calls == []
    assert "retrying with tile 64, overlap 16" in caplog.text and "unloaded" not in caplog.text
    assert shapes[0][-2:] == (16, 128) and shapes[1][-2:] == (16, 56)


@pytest.mark.parametrize("error", [
    RuntimeError("Invalid buffer size: 5.00 GB"),  # MPS: one buffer over the device's limit
    torch.cuda.OutOfMemoryError("out of memory: the denoiser's ×4 head would hold a 8.0 GiB tensor for one "
                                "1024×1024 LR tile, over MPS's 4 GiB per-tensor limit: use a smaller tile"),
], ids=["mps-buffer", "head-limit"])
def test_a_per_buffer_limit_shrinks_the_tile_without_unloading_other_models(pack, handle, model, monkeypatch,
                                                                          caplog, error):
    """Unloading the user's other models cannot make one buffer fit under a per-buffer limit:
    the retry keeps them and goes straight to a smaller tile."""
    img = lr_image(16, 128, seed=4)
    other = object()
    monkeypatch.setattr(pack.mm, "stub_others", [other])
    monkeypatch.setattr(pack.mm, "stub_free_calls", [])
    shapes = _oom_on_first_calls(model, monkeypatch, 1, error)
    with caplog.at_level(logging.WARNING):
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale") | {"overlap": 16})
    assert pack.mm.stub_others == [other] and pack.mm.stub_free_calls == []
    assert "retrying with tile 64, overlap 16" in caplog.text and "unloaded" not in caplog.text
    assert shapes[0][-2:] == (16, 128) and shapes[1][-2:] == (16, 56)


def test_oom_gives_up_below_the_minimum_tile(pack, handle, model, monkeypatch):
    _oom_on_first_calls(model, monkeypatch, 10)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(pack, "UPSRUpscale", upsr_model=handle, image=lr_image(16, 128), **defaults(pack, "UPSRUpscale"))


@pytest.mark.parametrize("node_id", ["UPSRSample", "UPSRUpscale"])
def test_tiling_widgets_are_checked_before_the_prompt_runs(pack, node_id):
    node = pack.nodes[node_id]
    assert node.validate_inputs(tile=512, overlap=64) is True
    assert node.validate_inputs(overlap=64) is True and node.validate_inputs() is True  # linked: unknown yet
    assert node.validate_inputs(tile=64, overlap=64) == (
        "overlap (64) must be less than the tile (64): lower the overlap or raise the tile")
    # ComfyUI skips its own min/max check for inputs a validate_inputs takes, so these are ours
    assert node.validate_inputs(tile=32, overlap=0) == "tile must be in [64, 4096] LR pixels, got 32"
    assert node.validate_inputs(tile=512, overlap=-8) == "overlap must be in [0, 1024] LR pixels, got -8"
    # the widget's step guides the slider only: 100 over the API failed at run time, after the estimate
    assert node.validate_inputs(tile=100, overlap=8) == (
        "tile must be a multiple of 64 LR pixels (64, 128, …, 512, …), got 100: try 64")


def test_cpu_out_of_memory_is_not_retried(pack, handle, model, monkeypatch):
    """A CPU allocation failure is a plain RuntimeError (not comfy's OOM_EXCEPTION): it propagates."""
    def fail(original, *a, **k):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    _wrap_denoiser(model, monkeypatch, fail)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        run(pack, "UPSRUpscale", upsr_model=handle, image=lr_image(16, 24), **defaults(pack, "UPSRUpscale"))


# ----------------------------------------------------------------------------- shipped examples
def test_example_inputs_are_copied_into_the_input_folder_once(pack):
    nodes_pkg = sys.modules[PACK + ".nodes"]
    dest = Path(pack.folder_paths.get_input_directory())
    shipped = sorted(p.name for p in EXAMPLES.glob("upsr_example_*") if p.suffix in (".png", ".jpg"))
    assert shipped, "example_workflows/ ships no upsr_example_* input images"
    assert sorted(p.name for p in dest.iterdir()) == shipped  # copied by get_node_list() at load
    (dest / shipped[0]).write_bytes(b"edited by the user")
    assert nodes_pkg.install_example_inputs() == []
    assert (dest / shipped[0]).read_bytes() == b"edited by the user"
    # a dangling link planted in input/ was written through (security review 2026-11-28): left alone now
    victim = dest.parent / "outside_input.bin"
    (dest / shipped[-1]).unlink()
    (dest / shipped[-1]).symlink_to(victim)
    assert nodes_pkg.install_example_inputs() == [] and not victim.exists()


WIDGET_TYPES = {"INT", "FLOAT", "COMBO", "STRING", "BOOLEAN"}


def _workflows() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def test_example_workflows_ship_thumbnails_and_inputs():
    assert len(_workflows()) >= 3
    for wf_path in _workflows():
        assert wf_path.with_suffix(".jpg").is_file(), f"{wf_path.name} has no .jpg thumbnail"
        wf = json.loads(wf_path.read_text())
        for n in wf["nodes"]:
            if n["type"] == "LoadImage":
                assert (EXAMPLES / n["widgets_values"][0]).is_file(), f"{wf_path.name}: {n['widgets_values'][0]}"


def test_example_workflows_match_the_node_schemas(pack):
    """widgets_values in the order the frontend writes them (required, then optional widgets, with the
    control_after_generate value after the seed), in range, and links typed as our outputs."""
    for wf_path in _workflows():
        wf = json.loads(wf_path.read_text())
        links = {lk[0]: lk for lk in wf["links"]}
        nodes = {n["id"]: n for n in wf["nodes"]}
        for n in wf["nodes"]:
            if n["type"] not in pack.nodes:
                continue
            info, spec = _spec(pack, n["type"])
            values = list(n.get("widgets_values") or [])
            for name in info["input_order"]["required"] + info["input_order"].get("optional", []):
                typ, opts = spec[name]
                if typ not in WIDGET_TYPES:
                    continue
                value = values.pop(0)
                where = f"{wf_path.name} node {n['id']} {n['type']}.{name}={value!r}"
                if typ == "COMBO":
                    assert value in opts["options"], where
                elif typ == "BOOLEAN":
                    assert value is False, f"{where}: examples keep the default (seed + i)"
                else:
                    assert opts["min"] <= value <= opts["max"], where
                if opts.get("control_after_generate"):
                    assert values.pop(0) == "fixed", f"{where}: examples must use a fixed seed"
            assert values == [], f"{wf_path.name} node {n['id']}: extra widgets_values {values}"
            for slot in n.get("inputs", []):
                if slot.get("link") is not None:
                    _, src, src_slot, _, _, typ = links[slot["link"]]
                    src_node = nodes[src]
                    assert typ == spec[slot["name"]][0], f"{wf_path.name}: link into {n['type']}.{slot['name']}"
                    if src_node["type"] in pack.nodes:
                        assert pack.nodes[src_node["type"]].RETURN_TYPES[src_slot] == typ


def test_nan_result_is_an_error_naming_the_precision(pack):
    """A denoiser whose output turns NaN (here finite weights that overflow float32, as fp16 overflows
    with some weights) stops UPSR Sample and UPSR Upscale with the core's error, not a black image."""
    h = run(pack, "LoadUPSRModel", model_name=DEMO, estimator_name="(from the model file)", precision="fp32",
            implementation="reference")[0]
    h.model.denoiser.time_embed[0].weight.data.mul_(1e30)
    img = lr_image(12, 16, seed=2)
    with pytest.raises(FloatingPointError, match=r"the denoiser \(float32\) produced NaN") as e:
        chain(pack, h, img)
    assert type(e.value).__name__ == "NonFiniteOutputError"
    with pytest.raises(FloatingPointError, match="produced NaN"):
        run(pack, "UPSRUpscale", upsr_model=h, image=img, **defaults(pack, "UPSRUpscale"))


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="the hint is about glibc's allocator (Linux)")
def test_cpu_runs_log_the_glibc_start_up_hint_once(pack, handle, monkeypatch, caplog):
    """On the CPU the first sampling logs how to start ComfyUI with glibc's settings for large
    tensors (docs/NODES.md), once per process; nothing when they are already set. The pack
    never changes the host's allocator itself."""
    loader = sys.modules[PACK + ".nodes.load_model"]
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setattr(loader, "_HINTED", False)
    img = lr_image(16, 24, seed=8)
    with caplog.at_level(logging.INFO):
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))
    hints = [r.getMessage() for r in caplog.records if "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0" in r.getMessage()]
    assert len(hints) == 1 and "~1.7x faster" in hints[0]
    caplog.clear()
    monkeypatch.setattr(loader, "_HINTED", False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    with caplog.at_level(logging.INFO):
        run(pack, "UPSRUpscale", upsr_model=handle, image=img, **defaults(pack, "UPSRUpscale"))
    assert "MALLOC_ARENA_MAX" not in caplog.text


def test_another_images_maps_are_never_taken_as_originals(model):
    """Maps are recognised by value, but only among those of the same kind made from the same LR:
    with image A's maps alive, image B sampled with a weight made elsewhere (all ones: w is exactly
    1 wherever ψ ≥ ψ_max, so A's w shares many values with it) gave a result moved by up to 0.03;
    a solid mask (ψ_max 1) took A's live w as if it were ψ."""
    import gc

    from upsr_core.stages import _original

    g = torch.Generator().manual_seed(6)
    lr_a, lr_b = torch.rand(1, 3, 20, 28, generator=g), torch.rand(1, 3, 20, 28, generator=g)
    ones = torch.ones(1, 3, 80, 112)
    sr_b, _ = estimate_maps(model, lr_b)
    alone = sample_maps(model, lr_b, sr_b, ones, seed=0)
    sr_a, psi_a = estimate_maps(model, lr_a)
    w_a = weight_map(psi_a, 0.4, 0.001)  # nearly all exactly 1
    assert (w_a == 1).float().mean() > 0.9
    assert torch.equal(sample_maps(model, lr_b, sr_b, ones, seed=0), alone)
    solid = torch.ones(1, 1, 80, 112)
    assert _original(solid, (20, 28), pm=False, role="uncertainty") is None  # w_a is no ψ
    assert torch.equal(weight_map(solid, 0.4, 1.0), torch.ones(1, 1, 80, 112))
    del sr_a, psi_a, w_a
    gc.collect()


def test_one_images_weight_for_a_batch_keeps_its_original(model):
    """A w made from one frame and given for a batch of frames ("one weight for all") is that
    frame's map: its original (padded border) is found, as for that frame alone."""
    from upsr_core.stages import _original, lr_digest

    g = torch.Generator().manual_seed(8)
    frames = torch.rand(2, 3, 20, 28, generator=g)
    _, psi0 = estimate_maps(model, frames[:1])
    w = weight_map(psi0)  # alive, as ComfyUI keeps a node's outputs
    w0 = w.clone()
    found = _original(w0, (20, 28), pm=False, role="noise_weight", lr_key=lr_digest(frames))
    assert found is not None and found[1].lr_key == lr_digest(frames[:1])
    assert _original(w0, (20, 28), pm=False, role="noise_weight", lr_key=lr_digest(frames[1:])) is None
