"""Bad command lines end in one `error: …` line naming the flag (or file) and what was expected,
exit code 2, before any work — and never in a traceback, a lost result or a silent change.

Each case here was found by feeding every subcommand bad input (2026-11-26 audit): before
the fix it gave a traceback, overwrote a result, or ran on after dropping what was asked.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from upsr_core.cli import main


def _img(path, h=8, w=10, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def fails(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    return one_error(capsys)


# ------------------------------------------------------------------ numbers refused while parsing
@pytest.mark.parametrize("argv, msg", [
    (["eval", "--hr", "h", "--lr", "l", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["eval", "--hr", "h", "--lr", "l", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),  # was [: -1]
    (["eval", "--hr", "h", "--lr", "l", "--crop-border", "-1"], "argument --crop-border: must be >= 0, got -1"),
    (["eval", "--hr", "h", "--lr", "l", "--sheet", "-1"], "argument --sheet: must be >= 0, got -1"),
    (["eval", "--hr", "h", "--lr", "l", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["eval", "--hr", "h", "--lr", "l", "--seed", "-1"],
     "argument --seed: must be in [0, 9223372036854775807], got -1"),
    (["bench", "--sizes", "0"], "argument --sizes: must be >= 1, got 0"),
    (["bench", "--sizes", "-64"], "argument --sizes: must be >= 1, got -64"),
    (["bench", "--sizes", ","], "argument --sizes: expected a comma list of integers >= 1, got ','"),
    (["bench", "--batches", "0"], "argument --batches: must be >= 1, got 0"),
    (["bench", "--tiled", "-5"], "argument --tiled: must be >= 0, got -5"),
    (["bench", "--reps", "0"], "argument --reps: must be >= 1, got 0"),  # was: silently the default
    (["bench", "--budget-s", "-1"], "argument --budget-s: must be a finite number >= 0, got -1"),
    (["bench", "--tile-batch", "0"], "argument --tile-batch: must be >= 1, got 0"),
    (["bench", "--compile-sizes", "0"], "argument --compile-sizes: must be >= 1, got 0"),
    (["train", "estimator", "--data", "d", "--log-every", "0"], "argument --log-every: must be >= 1, got 0"),
    (["train", "estimator", "--data", "d", "--ckpt-every", "0"], "argument --ckpt-every: must be >= 1, got 0"),
    (["train", "estimator", "--data", "d", "--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["train", "estimator", "--data", "d", "--ema-decay", "1"], "argument --ema-decay: must be in [0, 1), got 1"),
    (["train", "denoiser", "--data", "d", "--estimator", "e", "--lpips-weight", "-1"],
     "argument --lpips-weight: must be a finite number >= 0, got -1"),
    (["train", "denoiser", "--data", "d", "--estimator", "e", "--psi-max", "2"],
     "argument --psi-max: must be in (0, 0.5], got 2"),
    (["train", "bench", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["train", "denoiser", "--data", "d", "--estimator", "e", "--lpips", "foo"],  # was after the estimator loaded
     "argument --lpips: invalid choice: 'foo'"),
    # a negative number in exponent notation is a value, not a flag (argparse's own pattern has no exponent)
    (["train", "estimator", "--data", "d", "--lr", "-1e-4"], "argument --lr: must be a finite number > 0, got -1e-4"),
    (["upscale", "a.png", "-o", "b.png", "--b-u", "-2.5E-1"], "argument --b-u: must be in [0, 1], got -2.5E-1"),
    (["train", "bench", "--iters", "0"], "argument --iters: must be >= 1, got 0"),
    (["upscale", "a.png", "-o", "b.png", "--psi-max", "0.7"], "argument --psi-max: must be in (0, 0.5], got 0.7"),
    (["upscale", "a.png", "-o", "b.png", "--tile", "abc"], "argument --tile: expected an integer >= 1, got 'abc'"),
])
def test_bad_numbers_are_refused_while_parsing(capsys, argv, msg):
    line = fails(capsys, *argv)
    assert msg in line and "--help" in line


def test_missing_arguments_are_one_line_too(capsys):
    assert "the following arguments are required: inputs, -o/--output" in fails(capsys, "upscale")


# ------------------------------------------------------------------ upscale: where results go
def test_two_inputs_writing_one_output_are_refused(tmp_path, tiny_model_file, capsys):
    a, b = _img(tmp_path / "c1" / "x.png"), _img(tmp_path / "c2" / "x.png", 12, 16)
    line = fails(capsys, "upscale", a, b, "-o", tmp_path / "out", "--model", tiny_model_file)
    assert "would both write" in line and "x.png" in line
    assert not (tmp_path / "out").exists()
    c = _img(tmp_path / "c3" / "y.png")
    c.with_suffix(".jpg").write_bytes(b"")  # y.jpg and y.png in one folder: both y.png
    Image.open(c).save(c.with_suffix(".jpg"))
    assert "would both write" in fails(capsys, "upscale", tmp_path / "c3", "-o", tmp_path / "o3",
                                       "--model", tiny_model_file)


def test_an_output_that_is_its_input_is_refused(tmp_path, tiny_model_file, capsys):
    src = _img(tmp_path / "self.png")
    before = src.read_bytes()
    line = fails(capsys, "upscale", src, "-o", src, "--overwrite", "--model", tiny_model_file)
    assert "would overwrite the input itself" in line
    assert src.read_bytes() == before
    # the same file under another name: a hard link here; on a case-insensitive file system (macOS,
    # Windows) `IMG.PNG -o img.png` is this case, and resolve() does not see it
    link = tmp_path / "other_name.png"
    os.link(src, link)
    line = fails(capsys, "upscale", src, "-o", link, "--overwrite", "--model", tiny_model_file)
    assert "would overwrite the input itself" in line
    assert src.read_bytes() == before
    # a folder into itself: x.jpg's result x.png would be an input of the next run (which then failed as
    # "would overwrite the input itself", so an interrupted run could not resume): refused up front
    jpg = tmp_path / "in" / "x.jpg"
    jpg.parent.mkdir()
    Image.open(src).save(jpg)
    line = fails(capsys, "upscale", jpg.parent, "-o", jpg.parent, "--model", tiny_model_file)
    assert "is the input folder" in line and "itself" in line
    assert sorted(p.name for p in jpg.parent.iterdir()) == ["x.jpg"]


def test_output_names_file_or_folder(tmp_path, tiny_model_file, capsys):
    src = _img(tmp_path / "in" / "s.png")
    common = ["--model", str(tiny_model_file), "--device", "cpu", "-q"]
    # a trailing slash, or a name without .png, is a folder (it used to become a file named 'newdir')
    assert main(["upscale", str(src), "-o", str(tmp_path / "newdir") + "/", *common]) == 0
    assert (tmp_path / "newdir" / "s.png").is_file()
    assert main(["upscale", str(src), "-o", str(tmp_path / "plain"), *common]) == 0
    assert (tmp_path / "plain" / "s.png").is_file()
    # a .png name is a file for one input, and an error for several (it used to become a folder 'o6.png')
    two = [str(src), str(_img(tmp_path / "in" / "t.png", seed=1))]
    assert "names a .png file, but 2 images are given: pass a folder" in fails(
        capsys, "upscale", *two, "-o", tmp_path / "o6.png", *common)
    assert not (tmp_path / "o6.png").exists()
    _img(tmp_path / "one" / "u.png")
    assert "names a .png file, but the input is a folder" in fails(
        capsys, "upscale", tmp_path / "one", "-o", tmp_path / "o7.png", *common)
    # upscale writes PNG only: a .jpg name used to get PNG bytes
    line = fails(capsys, "upscale", src, "-o", tmp_path / "x.jpg", *common)
    assert "argument -o/--output" in line and "writes PNG only" in line
    assert "end it with /" in line  # a folder named like v1.2
    assert "argument -o/--output: is empty; expected a .png file or a folder" in fails(
        capsys, "upscale", src, "-o", "", *common)  # it said the output would overwrite the input
    assert f"input {str(src)!r} is given twice" in fails(capsys, "upscale", src, src, "-o", tmp_path / "o8", *common)


# ------------------------------------------------------------------ files named on the command line
def test_convert_output_must_be_a_safetensors_file_and_its_folder_is_made(tmp_path, tiny_model_file, capsys):
    (tmp_path / "adir").mkdir()
    assert "is a folder" in fails(capsys, "convert", "--model", tiny_model_file, "-o", tmp_path / "adir")
    assert "must end in .safetensors" in fails(capsys, "convert", "--model", tiny_model_file, "-o", tmp_path / "c.pth")
    out = tmp_path / "new" / "sub" / "c.safetensors"
    assert main(["convert", "--model", str(tiny_model_file), "-o", str(out)]) == 0 and out.is_file()


def test_export_to_a_folder_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    line = fails(capsys, "train", "denoiser", "--data", tmp_path, "--estimator", "e", "--export", tmp_path / "adir")
    assert "argument --export" in line and "is a folder" in line


def test_checkpoint_errors_name_the_file_and_its_role(tmp_path, tiny_model_file, capsys):
    junk = tmp_path / "random.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(junk))
    src = _img(tmp_path / "a.png")
    line = fails(capsys, "upscale", src, "-o", tmp_path / "o.png", "--model", junk)
    assert f"{str(junk)!r} (the model): expected an UPSR denoiser" in line and "['w' (1 keys)]" in line
    line = fails(capsys, "upscale", src, "-o", tmp_path / "o.png", "--model", tiny_model_file, "--estimator", junk)
    assert f"{str(junk)!r} (the estimator)" in line
    line = fails(capsys, "convert", "--model", src, "-o", tmp_path / "c.safetensors")
    assert "a.png: not a checkpoint" in line and "\\x89PNG" in line


def test_device_mps_without_mps_is_an_error_line(tmp_path, tiny_model_file, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    line = fails(capsys, "upscale", _img(tmp_path / "a.png"), "-o", tmp_path / "o.png", "--device", "mps",
                 "--model", tiny_model_file)
    assert "--device mps was asked for, but MPS (Apple silicon) is not available" in line


def test_device_cuda_n_without_cuda_names_the_device_asked_for(tmp_path, tiny_model_file, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = fails(capsys, "upscale", _img(tmp_path / "a.png"), "-o", tmp_path / "o.png", "--device", "cuda:1",
                 "--model", tiny_model_file)
    assert "--device cuda:1 was asked for, but CUDA is not available" in line


def test_device_cuda_index_beyond_the_gpus_and_malformed_names_are_error_lines(tmp_path, tiny_model_file, capsys,
                                                                              monkeypatch):
    # a machine with one GPU, pretended (this one may have none): cuda:3 used to pass the CLI's check and
    # fail later inside torch; "cuda:x" reached torch.device and left a traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    src = _img(tmp_path / "a.png")
    line = fails(capsys, "upscale", src, "-o", tmp_path / "o.png", "--device", "cuda:3", "--model", tiny_model_file)
    assert "--device cuda:3 was asked for, but there are 1 CUDA device(s)" in line
    line = fails(capsys, "upscale", src, "-o", tmp_path / "o.png", "--device", "cuda:x", "--model", tiny_model_file)
    assert "--device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'" in line
    monkeypatch.setenv("LOCAL_RANK", "2")
    line = fails(capsys, "upscale", src, "-o", tmp_path / "o.png", "--device", "cuda", "--model", tiny_model_file)
    assert "--device cuda (LOCAL_RANK 2) was asked for, but there are 1 CUDA device(s)" in line


# ------------------------------------------------------------------ eval
@pytest.fixture()
def pairs(tmp_path):
    for k in range(3):
        _img(tmp_path / "hr" / f"p{k}.png", 32, 32, seed=k)
    _img(tmp_path / "lr" / "p0.png", 8, 8, seed=9)
    return tmp_path


def test_eval_says_which_hr_images_have_no_lr(pairs, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="upsr_core.evaluate"):
        assert main(["eval", "--hr", str(pairs / "hr"), "--lr", str(pairs / "lr"), "--method", "bicubic",
                     "--niqe-params", "off", "--sheet", "0", "--out", str(pairs / "ev")]) == 0
    assert "2 HR image(s)" in caplog.text and "p1.png, p2.png" in caplog.text
    assert json.loads((pairs / "ev" / "results.json").read_text())["info"]["pairs"] == 1


def test_eval_explicit_requests_are_not_dropped(pairs, capsys, monkeypatch):
    base = ["eval", "--hr", pairs / "hr", "--lr", pairs / "lr", "--method", "bicubic", "--sheet", "0",
            "--out", pairs / "ev"]
    assert "--niqe-params 'nope.npz'" in fails(capsys, *base, "--niqe-params", "nope.npz")
    junk = pairs / "junk.safetensors"
    save_file({"w": torch.zeros(2)}, str(junk))
    assert "is not a NIQE parameter file" in fails(capsys, *base, "--niqe-params", junk)
    # an image: numpy's "contains pickled data ... allow_pickle=" was passed on (error audit 2026-11-28)
    line = fails(capsys, *base, "--niqe-params", pairs / "lr" / "p0.png")
    assert "is not a NIQE parameter file (.npz with mu_pris_param" in line and "it starts with b'\\x89PNG'" in line
    assert "pickle" not in line
    monkeypatch.setitem(__import__("sys").modules, "pyiqa", None)  # as if not installed
    assert "--pyiqa lpips needs the pyiqa package" in fails(capsys, *base, "--niqe-params", "off", "--pyiqa", "lpips")
    (pairs / "m.jsonl").write_text("{\"id\": \"p0\", \"group\": \"A\"}\nnot json\n")
    assert "--manifest" in (line := fails(capsys, *base, "--niqe-params", "off", "--manifest", pairs / "m.jsonl",
                                          "--group", "A")) and "line 2" in line
    (pairs / "afile").write_text("")
    assert "--out" in fails(capsys, *base[:-2], "--out", pairs / "afile", "--niqe-params", "off")


# ------------------------------------------------------------------ train data
def test_train_data_checks(tmp_path, capsys, caplog):
    junk = tmp_path / "random.safetensors"
    save_file({"w": torch.zeros(2)}, str(junk))
    line = fails(capsys, "train", "estimator", "--data", junk, "--config", "tiny", "--out", tmp_path / "o")
    assert "holds no 'crops' tensor" in line and "['w']" in line
    assert "make one with python -m upsr_core.train.data --photos DIR --out FILE" in line
    # not packed crops (error audit 2026-11-28: a SafetensorError traceback; numpy's "contains pickled
    # data ... allow_pickle=" for a text file, not naming it)
    (cut := tmp_path / "cut.safetensors").write_bytes(junk.read_bytes()[:-4])
    (text := tmp_path / "text.npy").write_text("not an array\n")
    np.save(obj := tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    np.save(f32 := tmp_path / "f32.npy", np.zeros((2, 3, 8, 8), np.float32))
    for bad, why in [(cut, "incomplete metadata"), (text, "it starts with b'not an'"),
                     (obj, "allow_pickle=False"), (f32, "it holds torch.float32 (2, 3, 8, 8)")]:
        line = fails(capsys, "train", "estimator", "--data", bad, "--config", "tiny", "--out", tmp_path / "o")
        assert f"{str(bad)!r} is not a packed-crops file" in line and why in line, line
    photos = tmp_path / "photos"
    _img(photos / "a.png", 16, 16), _img(photos / "b.png", 48, 40)
    line = fails(capsys, "train", "estimator", "--data", photos, "--config", "tiny", "--crop", "64", "--feed",
                 "device", "--out", tmp_path / "o")
    assert "--crop 64 is larger than every image (2; the largest short side is 40 px, b.png 40x48)" in line
    with caplog.at_level(logging.WARNING):
        assert main(["train", "estimator", "--data", str(photos), "--config", "tiny", "--crop", "32", "--feed",
                     "device", "--steps", "1", "--batch", "1", "--out", str(tmp_path / "o"),
                     "--degradation", "bicubic"]) == 0
    assert "1 of 2 images have a side below the crop 32 and are reflect-padded to it: a.png 16x16" in caplog.text


def test_estimator_crop_of_one_lr_pixel_trains(tmp_path):
    """--crop 4 (LR 1×1) crashed in ATD's window reshape: a side under half a window now mirrors again."""
    photos = tmp_path / "photos"
    _img(photos / "a.png", 16, 16)
    assert main(["train", "estimator", "--data", str(photos), "--config", "tiny", "--crop", "4", "--feed", "device",
                 "--steps", "1", "--batch", "2", "--out", str(tmp_path / "o"), "--degradation", "bicubic"]) == 0


def test_bench_module_entry_point_keeps_the_one_line_contract(capsys):
    # `python -m upsr_core.bench` (tools/device_bench.sh calls it) had its own plain argparse:
    # usage text and SystemExit on a bad flag. It is now the same parser as `upsr_core bench`.
    from upsr_core.bench import main as bench_main

    assert bench_main(["--sizes", "0"]) == 2
    assert one_error(capsys) == "error: argument --sizes: must be >= 1, got 0 (see python -m upsr_core bench --help)"


# ------------------------------------------------------------------ training runs (probe of 2026-11-27)
def _photos(folder, n=3, size=40):
    for i in range(n):
        _img(folder / f"p{i}.png", size, size, seed=i)
    return folder


TINY = ["--config", "tiny", "--feed", "device", "--degradation", "bicubic", "--amp", "off", "--batch", "2"]


def _train(tmp_path, *extra, stage="estimator", out="run"):
    return main(["train", stage, "--data", str(_photos(tmp_path / "photos")), *TINY, "--out", str(tmp_path / out),
                 *map(str, extra)])


def test_train_out_must_be_a_writable_folder_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    assert _train(tmp_path, "--steps", "1", out="afile") == 2
    assert "--out" in (line := one_error(capsys)) and "is a file; expected a folder" in line  # was [Errno 17]
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # (root may write anywhere: refuse as a read-only disk)
    assert _train(tmp_path, "--steps", "1", out="ro") == 2
    assert "--out" in (line := one_error(capsys)) and "cannot write there (Permission denied)" in line
    assert not (tmp_path / "ro").exists()  # the folder the failed run made is gone again


def test_train_export_folder_is_made_and_checked_before_training(tmp_path, capsys):
    est = tmp_path / "run" / "estimator.safetensors"
    assert _train(tmp_path, "--steps", "1") == 0 and est.is_file()
    capsys.readouterr()
    (tmp_path / "afile").write_text("")
    rc = _train(tmp_path, "--steps", "1", "--estimator", est, "--export", tmp_path / "afile" / "x.safetensors",
                stage="denoiser", out="den")
    assert rc == 2 and "--export's folder" in one_error(capsys)  # was a SafetensorError traceback after training
    assert not (tmp_path / "den").exists()
    deep = tmp_path / "new" / "sub" / "x.safetensors"
    assert _train(tmp_path, "--steps", "1", "--estimator", est, "--export", deep, stage="denoiser", out="den") == 0
    assert deep.is_file()


def test_train_resume_names_another_config_and_warns_of_changed_settings(tmp_path, capsys, caplog):
    assert _train(tmp_path, "--steps", "2", "--lr", "1e-3") == 0
    capsys.readouterr()
    line = fails(capsys, "train", "estimator", "--data", tmp_path / "photos", *TINY[:1], "small",
                 *TINY[2:], "--crop", "32", "--out", tmp_path / "run", "--steps", "3")
    assert "holds the training of another net" in line and "--fresh" in line  # was a 60-line load_state_dict dump
    with caplog.at_level(logging.WARNING):
        assert _train(tmp_path, "--steps", "3", "--lr", "5e-2") == 0
    assert "with other settings than its last run: lr 0.001 -> 0.05" in caplog.text
    log = json.loads((tmp_path / "run" / "estimator_log.json").read_text())
    assert log["changed_on_resume"] == {"lr": [0.001, 0.05]}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _train(tmp_path, "--steps", "2", "--lr", "5e-2") == 0  # at step 3 already
    assert "at step 3, --steps is 2: nothing to train" in caplog.text
    assert "other settings" not in caplog.text  # the last run's settings are the ones compared


def test_train_init_with_a_training_checkpoint_is_explained(tmp_path, capsys):
    assert _train(tmp_path, "--steps", "1") == 0
    capsys.readouterr()
    assert _train(tmp_path, "--steps", "1", "--init", tmp_path / "run" / "estimator.ckpt", out="two") == 2
    line = one_error(capsys)
    assert "--init" in line and "is a training checkpoint" in line and "estimator.safetensors" in line
    assert _train(tmp_path, "--steps", "1", "--init", tmp_path / "nope.safetensors", out="two") == 2
    assert "--init" in (line := one_error(capsys)) and "does not exist" in line


def test_a_folder_of_images_with_a_packed_file_trains_on_the_images(tmp_path, caplog):
    from upsr_core.train.feed import is_packed

    photos = _photos(tmp_path / "photos")
    np.save(photos / "crops.npy", np.zeros((2, 32, 32, 3), np.uint8))
    with caplog.at_level(logging.INFO):
        assert not is_packed(photos)  # the images were ignored for the .npy, silently
    assert "holds images: training on them, not on crops.npy" in caplog.text


def test_an_undecodable_image_is_named(tmp_path, capsys):
    """--feed device decodes the folder at the start: a file cut short is an error naming it."""
    photos = _photos(tmp_path / "photos", size=64)
    data = (photos / "p0.png").read_bytes()
    (photos / "p0.png").write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    rc = main(["train", "estimator", "--data", str(photos), "--config", "tiny", "--feed", "device", "--degradation",
               "bicubic", "--amp", "off", "--batch", "2", "--steps", "30", "--out", str(tmp_path / "run")])
    assert rc == 2
    line = one_error(capsys)
    assert "p0.png" in line and "cannot decode the image" in line


def test_an_undecodable_image_met_mid_run_is_named_and_skipped(tmp_path, caplog):
    """--feed loader decodes per crop, hours in for a large folder: the file is named in a warning
    and its crops come from other images (it stopped the run, and every resume, before)."""
    photos = _photos(tmp_path / "photos", size=64)
    data = (photos / "p0.png").read_bytes()
    (photos / "p0.png").write_bytes(data[: len(data) // 2])
    rc = main(["train", "estimator", "--data", str(photos), "--config", "tiny", "--feed", "loader", "--workers", "0",
               "--degradation", "bicubic", "--amp", "off", "--batch", "2", "--steps", "30", "--out",
               str(tmp_path / "run")])
    assert rc == 0 and (tmp_path / "run" / "estimator.safetensors").is_file()
    warned = [r.getMessage() for r in caplog.records if "p0.png" in r.getMessage()]
    assert len(warned) == 1 and "cannot decode the image" in warned[0] and "training goes on without it" in warned[0]


def test_pack_crops_cli_errors_are_one_line(tmp_path, capsys):
    from upsr_core.train.data import main as pack_main

    assert pack_main(["--photos", str(tmp_path / "nope"), "--out", str(tmp_path / "c.npy")]) == 2
    assert "nope" in one_error(capsys)  # was a FileNotFoundError traceback
    ph = str(_photos(tmp_path / "ph"))
    # each names its flag, as the other commands' lines do (error audit 2026-11-28: "crop must be a
    # positive int", "out_path must end in", argparse's usage text for --crop abc)
    for args, line in [
        (["--crop", "0"], "error: argument --crop: must be >= 1, got 0 (see python -m upsr_core.train.data --help)"),
        (["--crop", "abc"], "error: argument --crop: expected an integer >= 1, got 'abc'"),
        (["--out", str(tmp_path / "c.txt")], f"error: argument --out: {str(tmp_path / 'c.txt')!r} must end in .npy "
                                              "or .safetensors"),
        (["--group", "A_train"], "SOURCES.tsv' not found: the project's ../shared/data/get_photos.py --out"),
    ]:
        assert pack_main(["--photos", ph, "--out", str(tmp_path / "c.npy"), *args]) == 2
        assert line in one_error(capsys)
    assert not (tmp_path / "c.npy").exists()


def test_train_device_cuda_index_beyond_the_gpus_and_malformed_names_are_errors(monkeypatch):
    # checked before torch.cuda.set_device, whose own error for cuda:3 is "invalid device ordinal";
    # "cuda:x" was int("x")'s ValueError (one GPU pretended: this machine may have none)
    from upsr_core.train.loop import setup_distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device cuda:3 \(GPU 3\) was asked for, but there are 1 CUDA device"):
        setup_distributed("cuda:3")
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"):
        setup_distributed("cuda:x")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"--device cuda \(GPU 1\) was asked for, but there are 1 CUDA device"):
        setup_distributed("cuda")


# ------------------------------------------------------------------ 2026-11-28 portability review
def test_hidden_files_in_a_folder_are_not_images(tmp_path, tiny_model_file, caplog):
    """macOS's AppleDouble companions (._x.png) and a Mac zip's __MACOSX/ have image suffixes but
    are not images: one of them stopped `upscale DIR`, `train --data DIR` and `eval` before."""
    from upsr_core.evaluate import pair_files
    from upsr_core.train.data import list_images

    src = tmp_path / "in"
    _img(src / "a.png")
    (src / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (src / "__MACOSX").mkdir()
    (src / "__MACOSX" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "b.png").write_bytes(b"junk")
    with caplog.at_level(logging.INFO, logger="upsr_core"):
        assert main(["upscale", str(src), "-o", str(tmp_path / "out"), "--model", str(tiny_model_file),
                     "--device", "cpu", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["a.png"]
    assert [p.name for p in list_images(src)] == ["a.png"]
    hr = tmp_path / "hr"
    _img(hr / "a.png", 32, 40)
    (hr / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert [(h.name, lr.name) for h, lr in pair_files(hr, src)] == [("a.png", "a.png")]


@pytest.mark.skipif(sys.platform == "win32", reason="emulates Windows' rule with fcntl (Unix)")
def test_the_output_is_fsynced_through_a_handle_windows_accepts(tmp_path, tiny_model_file, monkeypatch):
    # Windows' fsync (FlushFileBuffers) fails with EBADF on a read-only handle: every output was lost
    import fcntl

    fsync, seen = os.fsync, []

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")
        seen.append(fd)
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    src = _img(tmp_path / "x.png")
    assert main(["upscale", str(src), "-o", str(tmp_path / "y.png"), "--model", str(tiny_model_file),
                 "--device", "cpu", "-q"]) == 0
    assert seen and (tmp_path / "y.png").is_file()


def test_help_survives_a_console_that_cannot_print_psi(tmp_path):
    # a Windows pipe or redirect is cp1252: `--help` (ψ, ≡) ended in a 'charmap' codec error, exit 2
    import subprocess

    from _support import REPO

    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": str(REPO)}
    for argv in (["upscale", "--help"], ["eval", "--help"], ["train", "denoiser", "--help"]):
        r = subprocess.run([sys.executable, "-m", "upsr_core", *argv], capture_output=True, env=env, timeout=120,
                           check=False)
        assert r.returncode == 0 and b"usage:" in r.stdout, r.stderr.decode("cp1252", "replace")


def test_the_installed_upsr_command_runs_as_python_m_upsr_core(monkeypatch):
    # the console script called main() as a library caller would: no SIGTERM clean-up, no allocator setting
    import re

    from upsr_core import cli

    from _support import REPO

    text = (REPO / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project takes 3.10)
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r"^(\w+) = \"([^\"]+)\"", section, re.M) == [("upsr", "upsr_core.cli:console_main")]
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None, **kw: calls.append((argv, kw)) or 0)
    assert cli.console_main() == 0 and calls == [(None, {"own_process": True})]


# ------------------------------------------------------------------ 2026-11-29 training review
def test_train_a_non_image_named_jpg_is_left_out_with_a_warning(tmp_path, caplog):
    """An HTML page saved as z.jpg stopped training at the header scan with Pillow's "cannot identify
    image file <_io.BufferedReader …>", though the docs promise an undecodable image is skipped."""
    photos = _photos(tmp_path / "photos")
    (photos / "z.jpg").write_text("<html>not found</html>")
    for feed in ("device", "loader"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["train", "estimator", "--data", str(photos), *TINY[:2], "--feed", feed, *TINY[4:],
                         "--workers", "0", "--out", str(tmp_path / feed), "--steps", "1"]) == 0
        assert f"{photos / 'z.jpg'}: not a readable image" in caplog.text and "goes on without it" in caplog.text


def test_train_denoiser_resume_notices_an_estimator_retrained_in_place_and_refuses_to_export_onto_it(
        tmp_path, capsys, caplog):
    """The estimator was compared by path: retraining it in place went unnoticed on resume (and a
    moved run folder was reported as a change); --export onto it silently replaced stage 1; a
    wrong --estimator was named only after the data folder's setup; a rerun with nothing to train
    rewrote the log with an empty summary."""
    assert _train(tmp_path, "--steps", "1", out="est") == 0
    est = tmp_path / "est" / "estimator.safetensors"
    capsys.readouterr()
    rc = _train(tmp_path, "--steps", "1", "--estimator", est, "--export", est, stage="denoiser", out="den")
    assert rc == 2 and f"--export {str(est)!r} is --estimator" in one_error(capsys)
    assert _train(tmp_path, "--steps", "1", "--estimator", est, stage="denoiser", out="den") == 0
    before = json.loads((tmp_path / "den" / "denoiser_log.json").read_text())
    caplog.clear()
    with caplog.at_level(logging.INFO):  # nothing to train: the log keeps the last run's record
        assert _train(tmp_path, "--steps", "1", "--estimator", est, stage="denoiser", out="den") == 0
    assert "keeps the last run's record" in caplog.text
    assert json.loads((tmp_path / "den" / "denoiser_log.json").read_text()) == before
    assert _train(tmp_path, "--steps", "2", "--seed", "9", "--fresh", out="est") == 0  # retrained in place
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _train(tmp_path, "--steps", "2", "--estimator", est, stage="denoiser", out="den") == 0
    assert "other settings than its last run: estimator_sha256 " in caplog.text
    assert "seed" not in json.loads((tmp_path / "den" / "denoiser_log.json").read_text())["changed_on_resume"]
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = _train(tmp_path, "--steps", "1", "--estimator", tmp_path / "nope.safetensors", stage="denoiser",
                    out="d2")
    assert rc == 2 and "nope.safetensors" in one_error(capsys)
    assert "feed" not in caplog.text.lower()  # named before the data folder is set up
    # a stage-2 output alone cannot upscale: the hint names the run's own estimator, not only atd_real.pth
    rc = main(["upscale", str(_img(tmp_path / "in" / "a.png")), "-o", str(tmp_path / "a_x4.png"), "--model",
               str(tmp_path / "den" / "denoiser.safetensors")])
    assert rc == 2 and "the estimator.safetensors its stage 2 was trained with" in one_error(capsys)


def test_train_warns_when_the_warm_up_outlasts_the_run(tmp_path, caplog):
    """A short fine-tune under a preset's 200 warm-up steps trained at a tiny fraction of --lr
    without a word (2026-11-29 review)."""
    with caplog.at_level(logging.WARNING):
        assert _train(tmp_path, "--steps", "2", "--warmup", "20") == 0
    assert ("--warmup 20 >= --steps 2: the learning rate never gets past 0.1 of --lr (give a smaller --warmup, "
            "e.g. a tenth of --steps: 0)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _train(tmp_path, "--steps", "4", "--warmup", "1", out="b") == 0
    assert "--warmup" not in caplog.text
