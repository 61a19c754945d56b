"""Checkpoint reading (SPEC §1): every official layout, converted files, and refusals.

Uses the oracle's small official nets as the weights (float16-exact values, so fp16
storage round trips bit for bit).
"""
from __future__ import annotations

import builtins
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from upsr_core import cli
from upsr_core.checkpoint import build_denoiser, build_estimator, read_checkpoint, split_nets
from upsr_core.config import ATDConfig, DenoiserConfig
from upsr_core.errors import UnsupportedCheckpointError
from upsr_core.model import load_upsr

from _support import tiny_upsr


def _f32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def sds(oracle) -> dict[str, dict[str, torch.Tensor]]:
    """The small official state dicts, float32 like the official .pth files."""
    return {"denoiser": _f32(oracle.net_state_dict("denoiser.")), "estimator": _f32(oracle.net_state_dict("atd."))}


@pytest.fixture(scope="module")
def any_sds(request) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`sds`, or without the oracle (CI has no ../shared) the random tiny nets' state dicts:
    unwrapping a checkpoint's layout does not depend on the values, so the layout tests (params_ema's
    precedence among them) run in CI too."""
    try:
        return request.getfixturevalue("sds")
    except pytest.skip.Exception:
        tiny = tiny_upsr()
        return {"denoiser": _f32(tiny.denoiser.state_dict()), "estimator": _f32(tiny.estimator.state_dict())}


@pytest.fixture(scope="module")
def pth_files(sds, tmp_path_factory):
    """den.pth / atd.pth exactly as BaseModel.save_network writes them."""
    d = tmp_path_factory.mktemp("pth")
    torch.save({"params": sds["denoiser"], "params_ema": sds["denoiser"]}, d / "upsr.pth")
    torch.save({"params": sds["estimator"], "params_ema": sds["estimator"]}, d / "atd_real.pth")
    return d / "upsr.pth", d / "atd_real.pth"


def load_one(path, kind: str) -> torch.nn.Module:
    sd, _ = read_checkpoint(path)
    nets = split_nets(sd)
    assert set(nets) == {kind}
    return (build_denoiser if kind == "denoiser" else build_estimator)(nets[kind])


def assert_same_weights(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = net.state_dict()
    assert sorted(own) == sorted(sd)  # (safetensors stores keys sorted)
    for k, v in sd.items():
        assert own[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
        assert torch.equal(own[k], v.float() if v.is_floating_point() else v), k


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def wrap(sd: dict[str, torch.Tensor], layout: str) -> dict:
    if layout == "params_ema":
        return {"params_ema": sd}
    if layout == "params":
        return {"params": sd}
    if layout == "both":  # params_ema wins (SPEC §1); params holds different values
        return {"params": {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, "params_ema": sd}
    if layout == "bare":
        return dict(sd)
    if layout == "module":  # DataParallel-saved keys
        return {"params_ema": {f"module.{k}": v for k, v in sd.items()}}
    raise AssertionError(layout)


# ------------------------------------------------------------------ accepted layouts
# Unwrapping is the same code for both nets: every layout runs on the small ATD; the
# (slower to build) denoiser runs the official save_network layout and one of each kind.
LAYOUT_CASES = [("estimator", lay) for lay in ("params_ema", "params", "both", "bare", "module")] + [
    ("denoiser", "both"), ("denoiser", "module")]


@pytest.mark.parametrize("kind, layout", LAYOUT_CASES)
def test_pth_layouts(any_sds, tmp_path, kind, layout):
    path = tmp_path / "net.pth"
    torch.save(wrap(any_sds[kind], layout), path)
    assert_same_weights(load_one(path, kind), any_sds[kind])


@pytest.mark.parametrize("kind, layout", [("estimator", "bare"), ("estimator", "module"), ("denoiser", "bare")])
def test_safetensors_layouts(any_sds, tmp_path, kind, layout):
    sd = wrap(any_sds[kind], layout)
    sd = sd.get("params_ema", sd)
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert_same_weights(load_one(path, kind), any_sds[kind])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "raw-pickle"])
def test_a_pth_named_safetensors_is_read_as_the_pickle_it_is(sds, tmp_path, legacy):
    """Renaming upsr.pth to .safetensors (an easy mistake) was refused with "its safetensors header
    is 578712552184433488 bytes … a crafted one": the content decides, not the suffix."""
    path = tmp_path / "net.safetensors"
    torch.save(sds["estimator"], path, _use_new_zipfile_serialization=not legacy)
    assert_same_weights(load_one(path, "estimator"), sds["estimator"])


def test_pickled_checkpoints_are_refused_on_a_torch_whose_weights_only_loader_is_unsafe(sds, tmp_path, monkeypatch):
    """Before torch 2.6 a crafted pickle could run code through weights_only=True (CVE-2025-32434):
    there a .pth is refused with the way out; a .safetensors file still loads."""
    import upsr_core.checkpoint as ck

    pth, st = tmp_path / "net.pth", tmp_path / "net.safetensors"
    torch.save(sds["estimator"], pth)
    save_file({k: v.contiguous() for k, v in sds["estimator"].items()}, str(st))
    monkeypatch.setattr(ck.torch, "__version__", "2.5.1+cu121")
    with pytest.raises(UnsupportedCheckpointError, match=r"net\.pth: a pickled checkpoint is not loaded with torch "
                                                         r"2\.5\.1\+cu121: .*\(CVE-2025-32434\)\. Upgrade torch, or "
                                                         r"convert the file where torch is newer"):
        read_checkpoint(pth)
    assert_same_weights(load_one(st, "estimator"), sds["estimator"])
    monkeypatch.setattr(ck.torch, "__version__", "2.6.0")
    assert_same_weights(load_one(pth, "estimator"), sds["estimator"])
    assert ck._torch_version() == (2, 6)


@pytest.mark.parametrize("kind", ["estimator", "denoiser"])
@pytest.mark.parametrize("damage", ["out-of-range", "in-range"])
def test_a_damaged_relative_position_index_is_refused_at_load(sds, tmp_path, kind, damage):
    """The index buffers are read, not rebuilt: one out of range failed only at inference (a CUDA
    device-side assert), one in range made wrong images silently. Refused at load, naming it."""
    sd = dict(sds[kind])
    key = next(k for k in sd if k.rsplit(".", 1)[-1].startswith("relative_position_index"))
    idx = sd[key]
    sd[key] = {"out-of-range": idx + 10_000, "in-range": idx.flip(0)}[damage]
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(UnsupportedCheckpointError, match=rf"its {key} is not the relative-position index of a "):
        load_one(path, kind)


def test_another_projects_safetensors_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch):
    """An SDXL checkpoint picked by mistake (~7 GB) was read whole before the 'expected an UPSR
    denoiser' error; the key names decide first, and no tensor is read."""
    import upsr_core.checkpoint as ck

    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(2)}, str(path))
    read = []
    real = ck.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def metadata(self):
            return self.inner.metadata()

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, k):
            read.append(k)
            return self.inner.get_tensor(k)

    monkeypatch.setattr(ck, "safe_open", Spy)
    with pytest.raises(UnsupportedCheckpointError, match=r"sdxl\.safetensors: expected an UPSR denoiser .*"
                                                         r"'model\.diffusion_model\.input_blocks"):
        read_checkpoint(path)
    assert read == []


def test_convert_to_fp16_refuses_weights_that_overflow_it(tmp_path):
    """--dtype fp16 of a weight over 65504 wrote Inf, a file the loader then refused."""
    from upsr_core.checkpoint import save_converted

    from _support import tiny_upsr

    m = tiny_upsr()
    m.denoiser.conv_last.weight.data[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match=r"^denoiser\.conv_last\.weight does not fit fp16: up to 1e\+05 in magnitude"):
        save_converted(tmp_path / "x.safetensors", m.denoiser, m.estimator, dtype="fp16")
    assert not (tmp_path / "x.safetensors").exists()
    save_converted(tmp_path / "x.safetensors", m.denoiser, m.estimator, dtype="bf16")  # bf16's range holds it


HALF_CASES = [("estimator", dt, sfx) for dt in (torch.float16, torch.bfloat16) for sfx in (".pth", ".safetensors")]
HALF_CASES += [("denoiser", torch.float16, ".safetensors"), ("denoiser", torch.bfloat16, ".pth")]


@pytest.mark.parametrize("kind, dtype, suffix", HALF_CASES)
def test_half_precision_weights_are_upcast(sds, tmp_path, kind, dtype, suffix):
    stored = cast(sds[kind], dtype)
    path = tmp_path / f"net{suffix}"
    if suffix == ".pth":
        torch.save({"params_ema": stored}, path)
    else:
        save_file(stored, str(path))
    net = load_one(path, kind)
    assert_same_weights(net, stored)  # float32 parameters holding exactly the stored values
    if dtype == torch.float16:  # the oracle weights are float16-representable: nothing was lost
        assert_same_weights(net, sds[kind])


def test_canonicalize_does_not_change_the_callers_dict(sds):
    from upsr_core.checkpoint import canonicalize_state_dict

    obj = wrap(sds["estimator"], "module")
    keys = list(obj["params_ema"])
    out = canonicalize_state_dict(obj)
    assert list(obj["params_ema"]) == keys and all(k.startswith("module.") for k in keys)
    assert sorted(out) == sorted(sds["estimator"])


@pytest.fixture(scope="module")
def pth_model(pth_files):
    return load_upsr(*pth_files)


def test_load_upsr_from_official_pth_pair(pth_model, sds):
    model = pth_model
    assert_same_weights(model.denoiser, sds["denoiser"])
    assert_same_weights(model.estimator, sds["estimator"])
    # category_size is in no tensor shape: an official .pth gives the official 128
    assert model.estimator.config.category_size == 128


def test_converted_file_keeps_category_size(small_model_file, small_configs):
    model = load_upsr(small_model_file)
    assert model.denoiser.config == small_configs[0]
    assert model.estimator.config == small_configs[1]  # category_size 48 comes from the metadata


# ------------------------------------------------------------------ convert
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_convert_cli(pth_files, pth_model, sds, tmp_path, dtype):
    out = tmp_path / "upsr.safetensors"
    rc = cli.main(["convert", "--model", str(pth_files[0]), "--estimator", str(pth_files[1]),
                   "-o", str(out), "--dtype", dtype])
    assert rc == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # safetensors alone writes 0600: another account could
    # not read it (a ComfyUI service)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        stored_dtypes = {f.get_tensor(k).dtype for k in keys}
    assert meta["format"] == "upsr-core" and meta["format_version"] == "1" and meta["dtype"] == dtype
    ref = pth_model
    assert DenoiserConfig.from_dict(json.loads(meta["denoiser_config"])) == ref.denoiser.config
    assert ATDConfig.from_dict(json.loads(meta["estimator_config"])) == ref.estimator.config
    expected_keys = [f"denoiser.{k}" for k in sds["denoiser"]] + [f"estimator.{k}" for k in sds["estimator"]]
    assert sorted(keys) == sorted(expected_keys)
    assert (torch.float16 in stored_dtypes) == (dtype == "fp16")
    conv = load_upsr(out)
    lr = torch.rand(1, 3, 16, 16)
    # fp16 storage is exact for these weights, so even the fp16 file gives identical outputs
    assert torch.equal(conv.upscale(lr, seed=3), ref.upscale(lr, seed=3))


def test_convert_cli_needs_the_estimator(pth_files, tmp_path, capsys):
    assert cli.main(["convert", "--model", str(pth_files[0]), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--estimator" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ refusals
def expect_refusal(*args, match: str | None = None) -> str:
    with pytest.raises(UnsupportedCheckpointError, match=match) as e:
        load_upsr(*args)
    return str(e.value)


def test_atd_given_as_denoiser(pth_files):
    msg = expect_refusal(pth_files[1], match="ATD estimator weights")
    assert "denoiser" in msg


def test_denoiser_given_as_estimator(pth_files):
    expect_refusal(pth_files[0], pth_files[0], match="expected the ATD estimator")


def test_converted_file_given_as_estimator_is_accepted_for_its_estimator(pth_files, small_model_file):
    # a converted file holds both nets: as --estimator its estimator part is what is used
    model = load_upsr(pth_files[0], small_model_file)
    assert model.estimator.config.category_size == 48


SD_UNET = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(32),
    "model.diffusion_model.time_embed.0.weight": torch.zeros(128, 32),
    "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
    "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
}
LDM_UNET_BARE = {k.removeprefix("model.diffusion_model."): v for k, v in SD_UNET.items() if "diffusion_model" in k}
ESRGAN = {
    "conv_first.weight": torch.zeros(64, 3, 3, 3),
    "conv_first.bias": torch.zeros(64),
    "RRDB_trunk.0.RDB1.conv1.weight": torch.zeros(32, 64, 3, 3),
    "RRDB_trunk.0.RDB1.conv1.bias": torch.zeros(32),
    "trunk_conv.weight": torch.zeros(64, 64, 3, 3),
    "upconv1.weight": torch.zeros(64, 64, 3, 3),
    "conv_last.weight": torch.zeros(3, 64, 3, 3),
}


@pytest.mark.parametrize("name, sd, first_key", [
    ("sd-unet", SD_UNET, "model.diffusion_model.input_blocks.0.0.weight"),
    ("ldm-unet-bare", LDM_UNET_BARE, "input_blocks.0.0.weight"),
    ("esrgan", ESRGAN, "conv_first.weight"),
])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_foreign_architectures(tmp_path, name, sd, first_key, suffix):
    path = tmp_path / f"{name}{suffix}"
    torch.save({"state_dict": sd}, path) if suffix == ".pth" else save_file(sd, str(path))
    msg = expect_refusal(path)
    assert "UPSR denoiser" in msg  # what was expected
    assert repr(first_key) in msg  # what the file holds


def test_missing_key_is_listed(sds, tmp_path):
    sd = dict(sds["denoiser"])
    gone = ["output_blocks.3.1.blocks.0.mlp.fc2.weight", "middle_block.0.out_layers.3.bias"]
    for k in gone:
        del sd[k]
    torch.save({"params_ema": sd}, tmp_path / "d.pth")
    msg = expect_refusal(tmp_path / "d.pth", match="UPSR denoiser: keys do not fit")
    assert "2 missing" in msg and all(repr(k) in msg for k in gone)


def test_extra_key_is_listed(sds, tmp_path):
    sd = {**sds["estimator"], "layers.0.extra.weight": torch.zeros(3), "ema_decay": torch.zeros(())}
    torch.save({"params_ema": sd}, tmp_path / "a.pth")
    with pytest.raises(UnsupportedCheckpointError, match="ATD estimator: keys do not fit") as e:
        load_one(tmp_path / "a.pth", "estimator")
    assert "2 unexpected" in str(e.value) and "'layers.0.extra.weight'" in str(e.value)


def test_wrong_shape_is_named(sds, tmp_path):
    sd = {**sds["estimator"], "norm.weight": torch.zeros(7)}
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(UnsupportedCheckpointError, match="'norm.weight': file \\(7,\\), expected \\(24,\\)"):
        load_one(tmp_path / "a.pth", "estimator")


def test_nan_weights_are_refused(sds, tmp_path):
    sd = {**sds["estimator"], "conv_first.bias": torch.full((24,), float("nan"))}
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(UnsupportedCheckpointError, match="'conv_first.bias' holds NaN"):
        load_one(tmp_path / "a.pth", "estimator")


@pytest.mark.parametrize("kind", ["denoiser", "estimator"])
def test_any_deleted_key_gives_unsupported_checkpoint_error(sds, kind):
    """Never a raw KeyError: delete keys the config reader depends on and a spread of others."""
    keys = list(sds[kind])
    critical = [k for k in keys if k in {
        "input_blocks.0.0.weight", "time_embed.0.weight", "conv_last.weight", "conv_before_upsample.0.weight",
        "input_blocks.1.1.patch_embed.proj.weight", "input_blocks.1.1.blocks.0.attn.relative_position_bias_table",
        "input_blocks.1.1.blocks.1.attn_mask", "input_blocks.1.1.blocks.0.mlp.fc1.weight",
        "conv_first.weight", "upsample.0.weight", "layers.0.residual_group.td",
        "layers.0.residual_group.layers.0.attn_win.relative_position_bias_table",
        "layers.0.residual_group.layers.0.attn_atd.wq.weight",
        "layers.0.residual_group.layers.0.convffn.dwconv.depthwise_conv.0.weight",
        "layers.0.residual_group.layers.0.convffn.fc1.weight", "relative_position_index_SA",
    }]
    assert len(critical) >= 4
    build = build_denoiser if kind == "denoiser" else build_estimator
    for k in critical + keys[:: max(1, len(keys) // 12)]:
        sd = {kk: v for kk, v in sds[kind].items() if kk != k}
        with pytest.raises(UnsupportedCheckpointError):
            build(sd)


def valid_bytes(sds, suffix: str, tmp_path) -> bytes:
    p = tmp_path / f"valid{suffix}"
    torch.save({"params_ema": sds["estimator"]}, p) if suffix == ".pth" else save_file(sds["estimator"], str(p))
    return p.read_bytes()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncated-half", "truncated-tail", "random-bytes", "empty"])
def test_unreadable_files(sds, tmp_path, suffix, damage):
    good = valid_bytes(sds, suffix, tmp_path)
    data = {
        "truncated-half": good[: len(good) // 2],
        "truncated-tail": good[:-100],
        "random-bytes": bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()),
        "empty": b"",
    }[damage]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    with pytest.raises(UnsupportedCheckpointError, match="bad" + suffix.replace(".", "\\.")) as e:
        read_checkpoint(path)
    assert "weights_only" not in str(e.value)  # torch's advice to disable the safety is never passed on


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="is a folder; expected a .pth or .safetensors file"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("obj, match", [
    ({"params_ema": {"a": 1}}, "found entry 'a' of type int"),
    ([torch.zeros(1)], "found list"),
    ({}, "no tensors"),
])
def test_pickles_without_a_state_dict(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pth")
    with pytest.raises(UnsupportedCheckpointError, match=match):
        read_checkpoint(tmp_path / "x.pth")


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [RunsShell, OpensFile])
@pytest.mark.parametrize("container", ["zip", "legacy", "raw-pickle"])
def test_hostile_pickle_is_refused_without_running(sds, tmp_path, payload, container):
    marker = tmp_path / "MARKER"
    obj = {"params_ema": {**sds["estimator"], "evil": payload(marker)}}
    path = tmp_path / "evil.pth"
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    assert not marker.exists()
    with pytest.raises(UnsupportedCheckpointError, match="refused to load"):
        read_checkpoint(path)
    with pytest.raises(UnsupportedCheckpointError, match="refused to load"):
        load_upsr(path)
    assert not marker.exists()


def test_a_state_dict_with_module_x_and_x_is_refused():
    # stripping DDP's "module." made the two one key: the last one won silently
    from upsr_core.checkpoint import canonicalize_state_dict

    sd = {"module.w": torch.zeros(2), "w": torch.ones(2)}
    with pytest.raises(UnsupportedCheckpointError, match="holds both 'module.w' and 'w'"):
        canonicalize_state_dict(sd)
    assert list(canonicalize_state_dict({"module.w": torch.zeros(2), "b": torch.ones(2)})) == ["w", "b"]


def test_an_oversized_safetensors_header_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """A header of many empty tensors (300 000 of them: 790 MB and 3.4 s inside safetensors)
    is refused by its length, read from the first 8 bytes; real files stay far below the bound
    (the demo file's header is 96 KB, the official nets' ~0.2 MB)."""
    import upsr_core.checkpoint as ck
    from upsr_core.train.data import read_packed

    with open(cli.default_model_path(), "rb") as f:
        demo = int.from_bytes(f.read(8), "little")
    assert 50_000 < demo < ck.MAX_SAFETENSORS_HEADER // 50
    path = tmp_path / "bomb.safetensors"
    save_file({f"t{i}": torch.zeros(0) for i in range(2000)}, str(path))
    n = int.from_bytes(path.read_bytes()[:8], "little")
    monkeypatch.setattr(ck, "MAX_SAFETENSORS_HEADER", n - 1)  # the same check, at this file's size
    with pytest.raises(UnsupportedCheckpointError, match=rf"bomb.safetensors: its safetensors header is {n} bytes, "
                                                         rf"more than the {n - 1} read here"):
        read_checkpoint(path)
    with pytest.raises(UnsupportedCheckpointError, match="its safetensors header is"):
        read_packed(path)
    monkeypatch.setattr(ck, "MAX_SAFETENSORS_HEADER", n)
    with pytest.raises(ValueError, match="holds no 'crops' tensor"):  # at the bound: parsed, then checked
        read_packed(path)


def test_a_refused_pickle_is_explained_without_torchs_advice_to_load_it_unsafely():
    """torch.load's weights-only errors begin with advice to retry with weights_only=False (torch
    < 2.6: "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False`
    will likely succeed, but it can result in arbitrary code execution …"; the wording below is
    torch 2.4's, seen in a run of this suite there on 2026-11-28). The reason shown is the line
    that says what was refused, never that advice."""
    from upsr_core.checkpoint import _reason

    advice = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
              "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
              "source.")
    glob = (" Please file an issue with the following so that we can make `weights_only=True` compatible with your "
            "use case: WeightsUnpickler error: Unsupported global: GLOBAL posix.system was not an allowed global by "
            "default. Please use `torch.serialization.add_safe_globals([system])` to allowlist this global if you "
            "trust this class/function.")
    assert _reason(RuntimeError(advice + "\n" + glob)) == ("Unsupported global: GLOBAL posix.system was not an "
                                                           "allowed global by default.")
    assert _reason(RuntimeError(advice)) == "torch's weights-only loader refused it"
    assert _reason(RuntimeError("Weights only load failed.\nWeightsUnpickler error: Unsupported operand 149")) == (
        "Unsupported operand 149")
    assert _reason(EOFError("Ran out of input")) == "Ran out of input"
