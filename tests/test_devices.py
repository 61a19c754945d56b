"""Apple-silicon (MPS) guards, as far as a CPU can check them: the row scatter, the window
permutations' build device, the ×4 head's limit and the out-of-memory classification are pure
functions or have a switch, tested here against what the CPU/CUDA branch gives. The int32 sort,
the CPU bicubic, the float32 GroupNorm, the compile refusal and the sub-pixel default on MPS
are device checks this CPU cannot reach. No Mac ran any of them."""
from __future__ import annotations

import pytest
import torch

from upsr_core.errors import is_out_of_memory, is_size_limit
from upsr_core.nets.atd import scatter_rows
from upsr_core.nets.attention import index_build_device
from upsr_core.nets.denoiser import MPS_MAX_TENSOR_BYTES, head_batch
from upsr_core.train.denoiser import build_denoiser_net
from upsr_core.train.presets import get_preset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_rows_put_branch_equals_index_copy(dtype):
    """MPS writes the category-attention rows with index_put_ (no index_copy kernel before torch
    2.8): bit for bit what index_copy writes, and the inverse of the gather by the permutation."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(300, 24, generator=g).to(dtype)
    flat = torch.randperm(300, generator=g)
    a, b = scatter_rows(src, flat, put=False), scatter_rows(src, flat, put=True)
    assert torch.equal(a, b) and torch.equal(a.index_select(0, flat), src)
    assert torch.equal(scatter_rows(src, flat), a)  # CPU: index_copy


def test_window_permutations_are_built_on_the_cpu_for_mps_only():
    assert index_build_device(torch.device("mps")) == torch.device("cpu")
    for dev in ("cpu", "cuda", "cuda:1"):
        assert index_build_device(torch.device(dev)) == torch.device(dev)


def test_head_batch_keeps_mps_tensors_under_4_gib():
    """Official head (num_feat 128) at tile 512 LR: 2 GiB per image in fp32 (one at a time on
    MPS), 1 GiB in fp16 (three); tile 1024 fp32 (8 GiB for one image) is an out-of-memory the
    CLI and the nodes answer with a smaller tile, not Metal's process abort."""
    shape = (4, 128, 512, 512)
    assert head_batch(shape, 4, "cpu") == head_batch(shape, 4, "cuda") == 4
    assert head_batch(shape, 4, "mps") == 1 and head_batch(shape, 2, "mps") == 3
    assert 3 * 128 * 16 * 512 * 512 * 2 <= MPS_MAX_TENSOR_BYTES
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"8\.0 GiB tensor for one 1024×1024 LR tile") as e:
        head_batch((1, 128, 1024, 1024), 4, "mps")
    assert is_out_of_memory(e.value)


def test_the_head_split_by_images_gives_the_whole_batch_s_values(monkeypatch):
    """The MPS split runs the ×4 head an image at a time: the same output as the batch at once
    (per-image convolutions; 1e-6 for oneDNN's batch-dependent blocking)."""
    import upsr_core.nets.denoiser as dn

    torch.manual_seed(0)
    den = build_denoiser_net(get_preset("tiny").denoiser).eval()
    x, lq, t = torch.randn(3, 48, 16, 16), torch.randn(3, 96, 16, 16), torch.tensor([0, 2, 4])
    with torch.no_grad():
        whole = den(x, t, lq)
        monkeypatch.setattr(dn, "head_batch", lambda shape, itemsize, device_type: 1)
        split = den(x, t, lq)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("err, oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 9.1 GB, other allocations: 0 bytes, max allowed: "
                  "9.07 GB). Tried to allocate 256 MB on private pool."), True),
    (RuntimeError("Invalid buffer size: 4.50 GB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 68719476736 bytes."), True),
    (RuntimeError("Could not allocate tensor with 1073741824 bytes. There is not enough GPU video memory "
                  "available!"), True),  # DirectML
    (RuntimeError("shape '[2, 3]' is invalid for input of size 7"), False),
    (ValueError("out of memory"), False),  # not an allocator's error, whatever it says
])
def test_is_out_of_memory_knows_each_allocator(err, oom):
    assert is_out_of_memory(err) is oom
    # of these, only "Invalid buffer size" is over a per-buffer limit (no unloading cures it)
    assert is_size_limit(err) is ("Invalid buffer size" in str(err))


def test_the_head_s_own_limit_error_is_a_size_limit():
    with pytest.raises(torch.cuda.OutOfMemoryError) as e:
        head_batch((1, 128, 1024, 1024), 4, "mps")
    assert is_size_limit(e.value)


def test_device_parity_tool_passes_against_itself(tiny_model_file, tmp_path, capsys):
    """tools/device_parity.py, the one-run check for a Mac (or any device) against the CPU: on the
    CPU itself every probe passes, the reference upscale is bit for bit (PSNR inf) and the fast
    fp32 path is far above its 30 dB bar; fp16 is skipped on the CPU (no fast kernels)."""
    import json

    import numpy as np
    from PIL import Image

    from _support import load_tool

    img = tmp_path / "lr.png"
    Image.fromarray((np.random.default_rng(3).random((20, 28, 3)) * 255).astype(np.uint8)).save(img)
    tool = load_tool("device_parity")
    out = tmp_path / "parity.json"
    assert tool.main(["--device", "cpu", "--model", str(tiny_model_file), "--image", str(img), "--json", str(out)]) == 0
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["status"] for r in rows.values()].count("FAIL") == 0
    assert {"int64 sort", "official_sort", "window_index", "scatter_rows", "SDPA head 24", "SDPA head 32",
            "fp16 GroupNorm", "upscale reference fp32", "upscale fast fp32"} == set(rows)
    assert "PSNR inf dB, max |Δ| 0.00e+00" in rows["upscale reference fp32"]["detail"]
    assert "PASS  upscale fast fp32" in capsys.readouterr().out


def test_device_parity_reports_a_raising_kernel_as_a_row_and_goes_on(tiny_model_file, tmp_path, capsys, monkeypatch):
    """A missing MPS kernel ended the tool with a traceback, no rows and no JSON (portability
    review 2026-11-28): now it is a FAIL row and the other checks still run."""
    import json

    import numpy as np
    from PIL import Image

    from _support import load_tool

    img = tmp_path / "lr.png"
    Image.fromarray((np.random.default_rng(3).random((20, 28, 3)) * 255).astype(np.uint8)).save(img)
    tool = load_tool("device_parity")

    def unsupported(*a, **k):
        raise RuntimeError("MPS: sort with int64 keys is not supported on this macOS")

    monkeypatch.setattr(tool, "official_sort", unsupported)
    out = tmp_path / "parity.json"
    assert tool.main(["--device", "cpu", "--model", str(tiny_model_file), "--image", str(img), "--json", str(out)]) == 1
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["official_sort"]["status"] == "FAIL"
    assert rows["official_sort"]["detail"] == ("raised RuntimeError: MPS: sort with int64 keys is not supported "
                                               "on this macOS")
    assert rows["upscale fast fp32"]["status"] == "PASS" and len(rows) == 9
    assert "FAIL  official_sort" in capsys.readouterr().out
