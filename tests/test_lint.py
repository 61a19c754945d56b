"""ruff (pyflakes, pycodestyle, import order; rules in pyproject.toml) over the whole repository."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it comes with the [test] extra: pip install -e '.[test]')")
def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_core_never_imports_comfy():
    """House rule 1: every module of upsr_core (train included) imports without ComfyUI and pulls in
    none of its modules. In a fresh interpreter: the node tests put comfy stand-ins into
    sys.modules, where a stray `import comfy` in the core would pass unnoticed."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import upsr_core\n"
        "names = [m.name for m in pkgutil.walk_packages(upsr_core.__path__, 'upsr_core.')"
        "         if not m.name.endswith('__main__')]  # (runs the CLI)\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'comfy_extras',"
        " 'folder_paths', 'nodes', 'server', 'execution'))\n"
        "print(len(names), bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    count, bad = r.stdout.split(" ", 1)
    assert int(count) > 30 and bad.strip() == "[]", r.stdout
