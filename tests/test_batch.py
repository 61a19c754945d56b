"""`upscale` over folders: torchrun-style sharding by RANK/WORLD_SIZE, and resuming.

Each rank must take files r, r+N, … and write exactly what a single process writes for
them (each file is its own image under the seed contract), so the shards' union is the
single-process result, byte for byte.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upsr_core.cli import main


@pytest.fixture()
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (9 + k, 12, 3), dtype=np.uint8)).save(src / f"img{k}.png")
    return src


def _run(src, out, model, monkeypatch, rank=None, world=None, quiet=True):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
    quiet_flag = ["-q"] if quiet else []  # -q silences the "skipping" note too
    assert main(["upscale", str(src), "-o", str(out), "--model", str(model), "--device", "cpu", *quiet_flag]) == 0


def test_ranks_take_disjoint_shards_that_add_up_to_the_single_run(folder, tmp_path, tiny_model_file, monkeypatch):
    _run(folder, tmp_path / "single", tiny_model_file, monkeypatch)
    for r in range(2):
        _run(folder, tmp_path / f"rank{r}", tiny_model_file, monkeypatch, rank=r, world=2)
    got = {r: sorted(p.name for p in (tmp_path / f"rank{r}").glob("*.png")) for r in range(2)}
    assert got[0] == ["img0.png", "img2.png", "img4.png"]
    assert got[1] == ["img1.png", "img3.png"]
    for r, names in got.items():
        for n in names:
            assert (tmp_path / f"rank{r}" / n).read_bytes() == (tmp_path / "single" / n).read_bytes()


def test_rerun_skips_existing_outputs(folder, tmp_path, tiny_model_file, monkeypatch, caplog):
    out = tmp_path / "out"
    _run(folder, out, tiny_model_file, monkeypatch)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "img3.png").unlink()
    with caplog.at_level("INFO", logger="upsr_core"):
        _run(folder, out, tiny_model_file, monkeypatch, quiet=False)
    assert "skipping 4 image(s)" in caplog.text
    assert sorted(p.name for p in out.glob("*.png")) == [f"img{k}.png" for k in range(5)]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in stamp.items() if n != "img3.png")


def test_output_folder_inside_the_input_folder_is_not_an_input(folder, tmp_path, tiny_model_file, monkeypatch,
                                                                caplog):
    out = folder / "x4"  # upscale in -o in/x4: the second run must resume, not upscale the results
    _run(folder, out, tiny_model_file, monkeypatch)
    first = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    with caplog.at_level("INFO", logger="upsr_core"):
        _run(folder, out, tiny_model_file, monkeypatch, quiet=False)
    assert "skipping 5 image(s)" in caplog.text
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == first
    assert first == [f"img{k}.png" for k in range(5)] + [f"x4/img{k}.png" for k in range(5)]


def test_files_a_folder_run_skips_are_named(folder, caplog):
    from upsr_core.batch import collect_inputs

    Image.new("RGB", (8, 8)).save(folder / "anim.gif")  # read when named, not from a folder
    (folder / "notes.txt").write_text("x")
    (folder / "README").write_text("x")
    Image.new("RGB", (8, 8)).save(folder / "photo.jfif", "JPEG")  # browsers' name for a JPEG: read
    with caplog.at_level("WARNING", logger="upsr_core"):  # a warning: -q (notes off) still shows it
        assert [f.name for f, _ in collect_inputs([str(folder)])] == [f"img{k}.png" for k in range(5)] + ["photo.jfif"]
    assert caplog.messages == [f"{folder}: 3 file(s) with other suffixes skipped ((none), .gif, .txt)"]


def test_a_pipe_or_a_folder_given_as_an_image_is_named_as_such(tmp_path):
    """`upscale <(curl …)` said "input not found" of a pipe that exists (2026-11-29 review)."""
    import os

    from upsr_core.batch import collect_inputs
    from upsr_core.imageio import image_size, read_image

    os.mkfifo(tmp_path / "x.png")
    for call in (lambda p: collect_inputs([str(p)]), read_image, image_size):
        with pytest.raises(ValueError, match=r"x\.png' is not a regular file \(a pipe, device or socket\); expected "
                                             r"an image file \(save a stream to a file first\)"):
            call(tmp_path / "x.png")
        with pytest.raises(ValueError, match="is a folder; expected an image file"):
            read_image(tmp_path) if call is read_image else image_size(tmp_path)
        with pytest.raises(FileNotFoundError, match="input not found"):
            call(tmp_path / "missing.png")


def test_bad_rank_is_an_error(folder, tmp_path, tiny_model_file, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "o"), "--model", str(tiny_model_file)]) == 2
    assert "RANK 2 must be in [0, WORLD_SIZE 2)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --batch: same-size images per call
@pytest.fixture()
def mixed(tmp_path):
    """Frames of one size with an odd one out, gray and RGBA frames of that size, and a large image
    that runs as several tile rows with --tile 16 (the tiny net pads to multiples of 8)."""
    src = tmp_path / "mixed"
    src.mkdir()
    rng = np.random.default_rng(1)
    frame = lambda h=12, w=16, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()  # noqa: E731
    for k in range(3):
        Image.fromarray(frame()).save(src / f"a{k}.png")
    Image.fromarray(frame(10)).save(src / "b0.png")  # another size: ends the group
    Image.fromarray(frame(c=1), "L").save(src / "b1.png")  # same size as a*, gray: written gray
    Image.fromarray(frame(c=4), "RGBA").save(src / "b2.png")  # alpha upscaled on its own
    Image.fromarray(frame(40, 16)).save(src / "c0.png")  # several tile rows: streamed, alone
    for k in range(2):
        Image.fromarray(frame()).save(src / f"d{k}.png")
    return src


def _upscale(src, out, model, *extra, tile=16):
    assert main(["upscale", str(src), "-o", str(out), "--model", str(model), "--device", "cpu", "-q",
                 "--tile", str(tile), "--overlap", "4", *extra]) == 0
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


def test_batch_groups_consecutive_same_size_one_row_images(mixed, tmp_path, tiny_model_file, monkeypatch):
    from upsr_core.model import UPSRModel

    calls = []
    original = UPSRModel.upscale

    def spy(self, lr, **kw):
        calls.append((lr.shape[0], tuple(lr.shape[-2:]), kw.get("sink") is not None))
        return original(self, lr, **kw)

    monkeypatch.setattr(UPSRModel, "upscale", spy)
    _upscale(mixed, tmp_path / "out", tiny_model_file, "--batch", "2")
    # sorted: a0 a1 a2 b0 b1 b2 c0 d0 d1 -> [a0 a1] [a2] [b0] [b1 b2] c0 (streamed) [d0 d1]
    assert calls == [(2, (12, 16), False), (1, (12, 16), False), (1, (10, 16), False), (2, (12, 16), False),
                     (1, (40, 16), True), (2, (12, 16), False)]


def test_batch_writes_the_bytes_of_one_by_one(mixed, tmp_path, tiny_model_file):
    one = _upscale(mixed, tmp_path / "one", tiny_model_file)
    four = _upscale(mixed, tmp_path / "four", tiny_model_file, "--batch", "4")
    assert list(one) == list(four) == sorted(p.stem + ".png" for p in mixed.iterdir())
    assert one["b1.png"].ndim == 2 and one["b2.png"].shape[-1] == 4  # gray stays gray, RGBA keeps alpha
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "four" / name).read_bytes(), name


def test_batch_with_color_fix_fixes_each_image_by_its_own_input(mixed, tmp_path, tiny_model_file):
    """--color-fix on grouped images (--batch 4): each output is its own input's fix, the bytes of
    one by one (a reference shared across the group, or another level, would differ)."""
    one = _upscale(mixed, tmp_path / "one", tiny_model_file, "--color-fix", "3")
    four = _upscale(mixed, tmp_path / "four", tiny_model_file, "--batch", "4", "--color-fix", "3")
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "four" / name).read_bytes(), name
    plain = _upscale(mixed, tmp_path / "plain", tiny_model_file, "--batch", "4")
    assert all(not np.array_equal(plain[n], four[n]) for n in four)


def test_fast_batch_agrees_with_one_by_one(mixed, tmp_path, tiny_model_file):
    # tile 32: four padded 16x16 frames fit one fast call (tile_batch x tile^2 pixels); c0 still has 2 tile rows
    one = _upscale(mixed, tmp_path / "one", tiny_model_file, "--fast", tile=32)
    four = _upscale(mixed, tmp_path / "four", tiny_model_file, "--fast", "--batch", "4", tile=32)
    for name in one:  # one denoiser batch instead of several: float rounding, at most one 8-bit level
        assert np.abs(one[name].astype(int) - four[name]).max() <= 1, name


def test_batch_interrupted_while_writing_leaves_no_part_file(mixed, tmp_path, tiny_model_file, monkeypatch):
    from upsr_core import batch

    written = []
    original = batch.write_png

    def flaky(path, *a, **k):
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(path)
        return original(path, *a, **k)

    monkeypatch.setattr(batch, "write_png", flaky)
    out = tmp_path / "out"
    assert main(["upscale", str(mixed), "-o", str(out), "--model", str(tiny_model_file), "--device", "cpu", "-q",
                 "--batch", "3"]) == 130  # Ctrl-C's exit code
    assert sorted(p.name for p in out.iterdir()) == ["a0.png"]  # the first of the group was complete
    monkeypatch.undo()
    assert main(["upscale", str(mixed), "-o", str(out), "--model", str(tiny_model_file), "--device", "cpu", "-q",
                 "--batch", "3"]) == 0  # resumes: a0 skipped, the rest written
    assert len(list(out.glob("*.png"))) == 9 and not list(out.glob("*.part"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsync'd file through /proc (Linux)")
def test_each_output_is_on_the_disk_before_it_gets_its_name(mixed, tmp_path, tiny_model_file, monkeypatch):
    """fsync of the .part file, then the rename: after a power loss an output that exists is complete
    (a resumed run skips existing outputs, so a truncated one would be kept for good)."""
    import os

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b))[1])
    out = tmp_path / "out"
    assert main(["upscale", str(mixed), "-o", str(out), "--model", str(tiny_model_file), "--device", "cpu", "-q",
                 "--batch", "3", "--tile", "16", "--overlap", "4"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 9 and len(events) == 18
    for (k1, a), (k2, b) in zip(events[::2], events[1::2]):  # each file: fsync of the .part, then its rename
        assert (k1, k2) == ("fsync", "replace") and a == b and a.endswith(".part")

def test_bad_batch_is_an_error(folder, tmp_path, tiny_model_file, capsys):
    assert main(["upscale", str(folder), "-o", str(tmp_path / "o"), "--model", str(tiny_model_file),
                 "--batch", "0"]) == 2
    assert "argument --batch: must be >= 1, got 0" in capsys.readouterr().err


def test_batch_writes_the_images_read_before_a_bad_file(tmp_path, tiny_model_file, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (6, 5), name == "a" and "red" or "blue").save(src / f"{name}.png")
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (6, 5), "green").save(src / "d.png")
    out = tmp_path / "out"
    rc = main(["upscale", str(src), "-o", str(out), "--model", str(tiny_model_file), "--device", "cpu", "-q",
               "--batch", "3"])
    assert rc == 2 and "c.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # the pending group was finished first


def test_compile_is_opt_in_and_needs_fast(folder, tmp_path, tiny_model_file, monkeypatch, capsys):
    from upsr_core import fast

    seen = []
    original = fast.enable_fast
    monkeypatch.setattr(fast, "enable_fast",
                        lambda m, **kw: (seen.append(kw), original(m, **kw | {"compile": False}))[1])
    for extra in ([], ["--compile"]):
        assert main(["upscale", str(folder / "img0.png"), "-o", str(tmp_path / f"o{len(extra)}.png"), "--model",
                     str(tiny_model_file), "--device", "cpu", "-q", "--fast", *extra]) == 0
    assert seen == [{"compile": False}, {"compile": True}]  # --fast alone never compiles (minutes per size)
    assert main(["upscale", str(folder), "-o", str(tmp_path / "o"), "--model", str(tiny_model_file),
                 "--compile"]) == 2
    assert "--compile compiles the fast path's nets: give --fast too" in capsys.readouterr().err


def test_output_folder_checks_see_a_case_insensitive_file_system(tmp_path, monkeypatch):
    """macOS/Windows: `upscale photos/ -o Photos/` is the input folder, and earlier results in
    Photos/x4 lie inside photos/ — which path comparison alone (case-sensitive on macOS) missed.
    Emulated here: names equal up to case are one file (portability review 2026-11-28)."""
    from upsr_core.batch import collect_inputs

    src = tmp_path / "photos"
    for f in (src / "a.png", src / "x4" / "a.png"):  # x4/a.png: an earlier run's result
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(f)
    real_exists = Path.exists

    def ci(p):
        return Path(str(Path(p).absolute()).lower())

    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: real_exists(self) or real_exists(ci(self)))
    monkeypatch.setattr(os.path, "samefile", lambda a, b: ci(a).resolve() == ci(b).resolve())
    with pytest.raises(ValueError, match=r"-o '.*Photos' is the input folder"):
        collect_inputs([str(src)], str(tmp_path / "Photos"))
    found = collect_inputs([str(src)], str(tmp_path / "Photos" / "x4"))
    assert [f.relative_to(src).as_posix() for f, _ in found] == ["a.png"]  # not x4/a.png


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="O_NOFOLLOW is POSIX (Windows links need privileges)")
def test_a_planted_part_link_is_never_written_through(tmp_path, tiny_model_file):
    """In a shared folder, `out.png.part -> victim` made upscale overwrite the victim's file with
    PNG data (security review 2026-11-28): the stale name is removed, and every PNG writer opens
    without following a link."""
    from upsr_core.imageio import PngStreamWriter, write_png

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    src = tmp_path / "in.png"
    Image.new("RGB", (10, 8), (1, 2, 3)).save(src)
    (tmp_path / "out.png.part").symlink_to(victim)
    assert main(["upscale", str(src), "-o", str(tmp_path / "out.png"), "--model", str(tiny_model_file),
                 "--device", "cpu", "-q"]) == 0
    assert victim.read_text() == "precious" and not (tmp_path / "out.png").is_symlink()
    assert Image.open(tmp_path / "out.png").size == (40, 32)
    link = tmp_path / "link.png"
    link.symlink_to(victim)
    for write in (lambda: write_png(link, torch.zeros(3, 4, 4)), lambda: write_png(link, torch.zeros(3, 4, 4), bits=16),
                  lambda: PngStreamWriter(link, 4, 4)):
        with pytest.raises(OSError, match="is a symbolic link; outputs are not written through links"):
            write()
    assert victim.read_text() == "precious"


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="O_NOFOLLOW is POSIX (Windows links need privileges)")
def test_results_logs_and_exported_weights_are_not_written_through_a_planted_link(tmp_path):
    """eval's results and contact sheet, training logs, packed crops and safetensors exports go
    through the same no-follow open as the images: a link planted at the name is refused."""
    from upsr_core.checkpoint import write_safetensors
    from upsr_core.evaluate import contact_sheet
    from upsr_core.imageio import write_text
    from upsr_core.train.data import pack_crops

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(photos / "a.png")
    for name, write in [
        ("results.json", lambda p: write_text(p, "{}")),
        ("w.safetensors", lambda p: write_safetensors({"a": torch.zeros(2)}, p)),
        ("crops.npy", lambda p: pack_crops(photos, p, crop=16, per_image=1)),
        ("sheet.png", lambda p: contact_sheet([{"images": {"lr": torch.zeros(1, 3, 8, 8),
                                                           "bicubic": torch.zeros(1, 3, 32, 32)}, "metrics": {}}],
                                              ["bicubic"], p)),
    ]:
        link = tmp_path / name
        link.symlink_to(victim)
        with pytest.raises(OSError, match="is a symbolic link; outputs are not written through links"):
            write(link)
        assert victim.read_text() == "precious"
    plain = tmp_path / "plain.safetensors"
    write_safetensors({"a": torch.arange(3.0)}, plain, {"k": "v"})
    from safetensors import safe_open

    with safe_open(str(plain), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("a"), torch.arange(3.0))


def test_a_failed_write_leaves_the_file_that_was_there_and_no_part(tmp_path, monkeypatch):
    """Model files, checkpoints, packed crops and results are written all or nothing (error audit
    2026-11-28: a full disk during `convert` left a truncated .safetensors, in place over its own
    input; training left a torn estimator.safetensors and an empty .npy). The full disk is the
    fsync's ENOSPC, raised where the real write path raises it; the message names the file."""
    import errno

    from upsr_core.checkpoint import write_safetensors
    from upsr_core.imageio import write_atomically, write_text

    target = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.arange(3.0)}, target)
    before = target.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("upsr_core.imageio.os.fsync", full)
    with pytest.raises(OSError, match=f"cannot write {str(target)!r}: No space left on device"):
        write_safetensors({"a": torch.zeros(1000)}, target)
    with pytest.raises(OSError, match="No space left on device"):
        write_text(tmp_path / "results.json", "{}")
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt), write_atomically(target) as f:  # Ctrl-C half-way
        f.write(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    (tmp_path / "w.safetensors.part").write_bytes(b"stale")  # from a power loss: replaced, not appended to
    write_safetensors({"a": torch.ones(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


_RANK = """
import os, signal, sys, time
from upsr_core.cli import _terminate_with_launcher, _terminated
signal.signal(signal.SIGTERM, _terminated)
if len(sys.argv) > 1:  # still starting (torch loading) when the launcher dies: wait for that first
    print("imported", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
_terminate_with_launcher()
print("ready", flush=True)
time.sleep(30)
sys.exit(0)
"""
_LAUNCHER = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], start_new_session=True)  # as torchrun starts ranks
print(rank.pid, flush=True)
rank.wait()
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()  # a zombie no one reaps here has exited too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_torchrun_rank_stops_when_its_launcher_is_killed(tmp_path):
    """torchrun starts each rank in a session of its own: with the launcher killed by SIGKILL, the
    ranks ran on unattended (out of Ctrl-C's reach) and wrote into the folder a rerun wrote into.
    A rank now asks the kernel for SIGTERM at its launcher's death and stops as SIGTERM stops it."""
    import subprocess

    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _RANK], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
    try:
        rank = int(launcher.stdout.readline())
        assert launcher.stdout.readline() == "ready\n"  # the rank's: it asked for the signal
        assert not _gone(rank), "the rank stopped on its own"
        launcher.kill()
        launcher.wait()
        _wait_gone(rank)
    finally:
        launcher.kill()
        launcher.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_a_torchrun_rank_whose_launcher_died_while_it_started_stops(tmp_path):
    """The launcher killed while the rank still loads torch: the rank was already re-parented when
    it asked for the signal, which then never came; the parent recorded at the package's import
    tells."""
    import subprocess

    go = tmp_path / "go"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _RANK, str(go)], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
    try:
        rank = int(launcher.stdout.readline())
        assert launcher.stdout.readline() == "imported\n"
        launcher.kill()
        launcher.wait()
        go.touch()
        _wait_gone(rank)
    finally:
        launcher.kill()
        launcher.wait()


def _wait_gone(pid: int) -> None:
    import time

    deadline = time.monotonic() + 20
    while not _gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the rank kept running after its launcher was killed")
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="removes a file that is open: Windows refuses")
def test_a_second_writer_of_one_output_never_gets_a_half_file_its_name(tmp_path):
    """Two runs writing one folder at once (a double start; ranks left running by a killed
    torchrun): the second removed the first's .part and wrote its own, and the first then renamed
    the second's unfinished file to the output (torn for good if the second was killed then). Now
    the first sees its .part is not its file any more: no rename, no removal of the other's .part,
    an error that says what happened. (The other writer here ignores the .part's lock, see below.)"""
    from upsr_core.imageio import write_atomically

    out = tmp_path / "x.png"
    part = tmp_path / "x.png.part"
    with pytest.raises(OSError, match=r"x.png.part' was removed or replaced by another process while this one wrote "
                                      r"it, so .*x.png' was not written: is a second run writing into"):
        with write_atomically(out) as f:
            f.write(b"first, complete")
            part.unlink()  # what the second writer does on starting (a stale .part from its view)
            part.write_bytes(b"second, half")
    assert not out.exists() and part.read_bytes() == b"second, half"  # the other writer's file untouched
    part.unlink()
    with pytest.raises(OSError, match="was removed or replaced by another process"):
        with write_atomically(out) as f:
            f.write(b"a")
            part.unlink()  # the other writer finished first and renamed the name away
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with write_atomically(out) as f:  # alone: as always
        f.write(b"alone")
    assert out.read_bytes() == b"alone" and not part.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="flock: Windows refuses to remove an open file instead")
def test_a_part_file_being_written_is_not_taken_for_a_stale_one(tmp_path):
    """The second writer removed the first's .part as stale (a power loss's) and both wrote one
    inode, or the first renamed the second's file: the .part is now locked while it is written, so
    the second writer stops with an error and the first one's output is whole."""
    from upsr_core.imageio import write_atomically

    out = tmp_path / "x.png"
    with write_atomically(out) as f:
        f.write(b"first")
        with pytest.raises(OSError, match=r"x.png.part' is being written by another process, so .*x.png' was not "
                                          r"written: is a second run writing into"):
            with write_atomically(out) as g:
                g.write(b"second")
        f.write(b", complete")
    assert out.read_bytes() == b"first, complete" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_file_closed_inside_write_atomically_is_not_put_in_place(tmp_path):
    """The bytes are fsynced through the handle the .part's lock is on; a caller that closed it
    (and with it the lock) gets a ValueError saying so, and the output is as it was, no .part."""
    from upsr_core.imageio import write_atomically

    out = tmp_path / "x.png"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"the file for .*x.png' was closed inside write_atomically's with block"):
        with write_atomically(out) as f:
            f.write(b"new")
            f.close()
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_convert_refuses_to_write_over_its_own_input(tmp_path, tiny_model_file, capsys):
    src = tmp_path / "m.safetensors"
    src.write_bytes(Path(tiny_model_file).read_bytes())
    assert main(["convert", "--model", str(src), "-o", str(src), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert f"-o {str(src)!r} is the --model file itself: write the converted file under another name" in err
    assert src.read_bytes() == Path(tiny_model_file).read_bytes()


def test_an_output_folder_that_takes_no_file_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """-o on a read-only or full file system failed at the first .part, after the model had loaded
    and the first image had run (minutes on a CPU; error audit 2026-11-28). The folder's nearest
    existing parent is probed (the test runs as any user: the refusal is emulated)."""
    import errno
    import tempfile

    import upsr_core.batch as batch

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    real = tempfile.TemporaryFile
    probed = []

    def read_only(*a, dir=None, **kw):
        probed.append(Path(dir))
        if Path(dir) == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(batch.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(batch, "load_upsr", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "ro").mkdir()
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "ro" / "new" / "sub/")]) == 2
    assert f"error: -o: cannot write into {str(tmp_path / 'ro')!r} (Read-only file system)" in capsys.readouterr().err
    assert probed == [tmp_path / "ro"] and not (tmp_path / "ro" / "new").exists()  # nothing made
    (tmp_path / "f").write_text("")
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "f" / "x.png")]) == 2
    assert f"{str(tmp_path / 'f')!r} is a file" in capsys.readouterr().err


def test_outputs_differing_only_in_case_are_refused_where_case_is_ignored(tmp_path, monkeypatch):
    """A.jpg and a.png write A.png and a.png: one file on macOS/Windows (the second overwrote the
    first, or was skipped as done). The probe of the output folder decides: this Linux file
    system keeps case, so both are planned; a case-insensitive one (emulated) refuses."""
    import upsr_core.batch as batch
    from upsr_core.batch import collect_inputs

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "A.jpg")
    Image.new("RGB", (8, 8)).save(src / "a.png")
    found = collect_inputs([str(src)])
    out = tmp_path / "out"
    assert not batch._case_insensitive(out)  # this VM's file system keeps case (the probe is removed)
    assert [p.name for p in batch.plan_outputs(found, str(out), False)] == ["A.png", "a.png"]
    assert not out.exists() and os.listdir(tmp_path) == ["in"]
    monkeypatch.setattr(batch, "_case_insensitive", lambda folder: True)
    with pytest.raises(ValueError, match=r"would write .*A\.png' and .*a\.png', one file on this case-insensitive"):
        batch.plan_outputs(found, str(out), False)


def test_a_file_given_twice_through_nested_inputs_is_refused(folder, tmp_path, tiny_model_file, capsys):
    """`upscale in in/sub` wrote in/sub/x.png twice (out/sub/x.png and out/x.png): the check for a
    repeated input only fired when both copies mapped to one output."""
    (folder / "sub").mkdir()
    (folder / "img0.png").rename(folder / "sub" / "x.png")
    for extra in (folder / "sub", folder / "sub" / "x.png"):
        rc = main(["upscale", str(folder), str(extra), "-o", str(tmp_path / "out"), "--model", str(tiny_model_file),
                   "--device", "cpu", "-q"])
        assert rc == 2
        # the two arguments are named (it named the same path twice)
        assert (f"input {str(folder / 'sub' / 'x.png')!r} is given twice, through {str(folder)!r} and {str(extra)!r}"
                in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_output_named_as_a_folder_is_refused_and_never_counts_as_done(tmp_path, tiny_model_file, capsys,
                                                                         monkeypatch):
    """d1/a.png/b.png (a folder named a.png) beside d2/a.jpg: the first run died renaming a.png.part
    onto the folder, and every rerun then skipped a.jpg as "done" (the folder existed)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rng = np.random.default_rng(1)
    for rel in ("d1/a.png/b.png", "d2/a.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / rel)
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_file), "--device", "cpu", "-q"]
    assert main(["upscale", str(tmp_path / "d1"), str(tmp_path / "d2"), "-o", str(out), *args]) == 2
    assert (f"would write {str(out / 'a.png')!r} and {str(out / 'a.png' / 'b.png')!r} inside it, a file and a "
            "folder of one name") in capsys.readouterr().err
    one = tmp_path / "one"
    (one / "a.png").mkdir(parents=True)
    (tmp_path / "d1" / "a.png" / "b.png").rename(one / "a.png" / "b.png")
    (tmp_path / "d2" / "a.jpg").rename(one / "a.jpg")
    assert main(["upscale", str(one), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"would write {str(out / 'a.png')!r} and {str(out / 'a.png' / 'b.png')!r} inside it" in err
    assert not out.exists()
    # an existing folder where an output goes is refused, not taken as that output done
    (out / "a.png").mkdir(parents=True)
    (one / "a.png" / "b.png").unlink()
    (one / "a.png").rmdir()
    assert main(["upscale", str(one), "-o", str(out), *args]) == 2
    assert f"{str(out / 'a.png')!r}, is an existing folder" in capsys.readouterr().err


@pytest.mark.parametrize("env, match", [({"WORLD_SIZE": "3"}, "WORLD_SIZE='3' is set but RANK is not"),
                                        ({"RANK": "1"}, "RANK='1' is set but WORLD_SIZE is not"),
                                        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' and WORLD_SIZE='2' must be "
                                                                              "integers")])
def test_torchrun_variables_come_in_pairs(folder, tmp_path, tiny_model_file, monkeypatch, capsys, env, match):
    """A stray WORLD_SIZE=3 in the shell wrote 2 of 5 images and exited 0; RANK=abc said only
    "invalid literal for int()"."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_model_file), "--device",
               "cpu", "-q"])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_finished_run_loads_no_model_and_a_rank_logs_its_share(folder, tmp_path, tiny_model_file, monkeypatch,
                                                                 caplog):
    import upsr_core.batch as batch

    out = tmp_path / "out"
    _run(folder, out, tiny_model_file, monkeypatch)
    monkeypatch.setattr(batch, "load_upsr", lambda *a, **k: pytest.fail("model loaded with nothing to do"))
    with caplog.at_level("INFO", logger="upsr_core"):
        _run(folder, out, tiny_model_file, monkeypatch, rank=1, world=2, quiet=False)
    assert "skipping 2 image(s)" in caplog.text
    assert "rank 1 of 2: 2 of 5 files (list " in caplog.text


def test_symlinked_folders_are_named_in_the_log_not_skipped_silently(folder, tmp_path, tiny_model_file,
                                                                     monkeypatch, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "broken.png").symlink_to(tmp_path / "gone.png")
    with caplog.at_level("WARNING", logger="upsr_core"):
        _run(folder, tmp_path / "out", tiny_model_file, monkeypatch)
    assert "2 symbolic link(s) to folders or to nothing not followed" in caplog.text
    assert str(folder / "linked") in caplog.text and str(folder / "broken.png") in caplog.text


def test_an_unwritable_output_folder_is_named_as_such_not_as_case_insensitive(tmp_path, monkeypatch):
    """The case probe of an output folder where nothing can be written counted it as
    case-insensitive, and `A.jpg` beside `a.png` into /proc/x4 said so."""
    import tempfile

    import upsr_core.batch as batch

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"^-o: cannot write into '.*' \(Permission denied\)$"):
        batch._case_insensitive(tmp_path)


def test_two_links_to_one_file_are_two_inputs(tmp_path, tiny_model_file, monkeypatch):
    """A folder of links into a blob store (git-annex, DVC, deduplicated frames) upscales every
    name; only one file reached twice through the folders given is refused."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "frames").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "blobs" / "b1.png")
    for n in ("0001.png", "0002.png"):
        (tmp_path / "frames" / n).symlink_to(tmp_path / "blobs" / "b1.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "frames"), "-o", str(out), "--model", str(tiny_model_file),
                 "--device", "cpu", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0001.png", "0002.png"]


@pytest.mark.parametrize("env", [{"RANK": "0"}, {"WORLD_SIZE": "1"}])
def test_a_lone_single_process_value_is_not_an_error(env, monkeypatch):
    from upsr_core.batch import _shard

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _shard(5) == range(0, 5, 1)


def test_estimator_block_reaches_the_model(folder, tmp_path, tiny_model_file, monkeypatch):
    """The estimator's blocks were always 512 LR px from the CLI (the nodes halve them on out of
    memory); --estimator-block sets them, and 512 stays the default."""
    from upsr_core.model import UPSRModel

    seen, real = [], UPSRModel.upscale

    def spy(self, lr, **kw):
        seen.append(kw["estimator_block"])
        return real(self, lr, **kw)

    monkeypatch.setattr(UPSRModel, "upscale", spy)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = [str(folder / "img0.png"), "--model", str(tiny_model_file), "--device", "cpu", "-q"]
    assert main(["upscale", *args, "-o", str(tmp_path / "a.png")]) == 0
    assert main(["upscale", *args, "-o", str(tmp_path / "b.png"), "--estimator-block", "64"]) == 0
    assert seen == [512, 64]


# ------------------------------------------------------------------ 2026-11-29 (session 34): folder review
def _upscale_err(capsys, *argv) -> tuple[int, str]:
    rc = main(["upscale", *map(str, argv), "--device", "cpu", "-q"])
    return rc, capsys.readouterr().err


def test_images_under_an_output_folder_inside_the_input_that_are_not_its_outputs_are_named(
        folder, tmp_path, tiny_model_file, monkeypatch, caplog, capsys):
    """`upscale in -o in/sub` left in/sub/d.png, a real input, out without a word."""
    monkeypatch.delenv("RANK", raising=False)
    (folder / "sub").mkdir()
    (folder / "img4.png").rename(folder / "sub" / "d.png")
    with caplog.at_level("WARNING", logger="upsr_core"):
        assert _upscale_err(capsys, folder, "-o", folder / "sub", "--model", tiny_model_file)[0] == 0
    assert f"its images are not read: 1 of them are not outputs of this run and are left out too: " \
           f"{folder / 'sub' / 'd.png'}" in caplog.text
    caplog.clear()
    (folder / "sub" / "d.png").unlink()
    with caplog.at_level("WARNING", logger="upsr_core"):  # a resume: its own outputs there are no news
        assert _upscale_err(capsys, folder, "-o", folder / "sub", "--model", tiny_model_file)[0] == 0
    assert "not outputs of this run" not in caplog.text


def test_upscale_names_its_flags_and_says_how_to_get_past_a_bad_file(folder, tmp_path, tiny_model_file,
                                                                       monkeypatch, caplog, capsys):
    monkeypatch.delenv("RANK", raising=False)
    rc, err = _upscale_err(capsys, folder, "-o", tmp_path / "o", "--model", tiny_model_file, "--tile", "30",
                       "--overlap", "4")
    assert rc == 2 and "error: --tile 30 / --overlap 4: tile size must be a positive multiple of" in err
    (tmp_path / "one.png").write_bytes(b"")
    rc, err = _upscale_err(capsys, folder / "img0.png", "-o", f"{tmp_path / 'one.png'}/", "--model", tiny_model_file)
    assert rc == 2 and "must be a folder when it ends in a separator, and" in err and "is a file" in err
    (folder / "img2.png").write_text("<html>")
    rc, err = _upscale_err(capsys, folder, "-o", tmp_path / "o", "--model", tiny_model_file)
    assert rc == 2 and "img2.png" in err and "move or remove this file" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img0.png", "img1.png"]  # the ones before it
    (folder / "img2.png").unlink()
    (tmp_path / "o" / "img1.png").write_bytes(b"")  # cut short by something else: not done
    with caplog.at_level("WARNING", logger="upsr_core"):
        assert _upscale_err(capsys, folder, "-o", tmp_path / "o", "--model", tiny_model_file)[0] == 0
    assert "1 output(s) are empty files" in caplog.text and (tmp_path / "o" / "img1.png").stat().st_size > 0


def test_the_same_file_twice_names_its_argument_and_a_separator_on_a_file_says_so(folder, tmp_path,
                                                                                  tiny_model_file, capsys):
    f = folder / "img0.png"
    rc, err = _upscale_err(capsys, f, f, "-o", tmp_path / "o", "--model", tiny_model_file)
    assert rc == 2 and f"is given twice, through {str(f)!r} and {str(f)!r}" in err
    (tmp_path / "x.jpg").write_bytes(b"")
    rc, err = _upscale_err(capsys, f, "-o", f"{tmp_path / 'x.jpg'}/", "--model", tiny_model_file)
    assert rc == 2 and "must be a folder when it ends in a separator" in err
