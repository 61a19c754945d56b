"""tests/comfy_stubs must mimic the real ComfyUI: same signatures, enums, and /object_info view.

Runs tests/e2e/signatures.py under the ComfyUI python in COMFYUI_DIR and again against the stubs,
in subprocesses (neither the real modules nor the stubs enter this process), and compares.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import comfy_server

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "signatures.py"


def _dump(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_stubs_match_the_real_comfyui():
    import os

    real = _dump([comfy_server.comfyui_python(), str(SCRIPT)], comfy_server.comfyui_dir())
    stubs = _dump([sys.executable, str(SCRIPT), "--stubs"], comfy_server.REPO,
                  env={**os.environ, "PYTHONPATH": str(HERE.parent / "comfy_stubs")})
    for key in real:
        assert stubs[key] == real[key], f"tests/comfy_stubs differs from ComfyUI in {key}"
