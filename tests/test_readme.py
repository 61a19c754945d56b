"""The README's Python example runs as pasted (bundled demo model, shipped sample photo) and its
comments hold: the stage-by-stage result is ``model.upscale(lr, seed=0)``, the file is ×4."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_and_equals_upscale(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (code,) = [b for b in blocks if "load_upsr(" in b and "write_png" in b]
    (tmp_path / "docs").mkdir()
    shutil.copyfile(REPO / "docs" / "sample_lr.png", tmp_path / "docs" / "sample_lr.png")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    lr, sr = ns["lr"], ns["sr"]
    assert lr.shape == (1, 3, 96, 128) and sr.shape == (1, 3, 384, 512)
    assert torch.equal(sr, ns["model"].upscale(lr, seed=0))
    assert Image.open(tmp_path / "sample_x4.png").size == (512, 384)
