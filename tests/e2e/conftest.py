"""End-to-end fixtures: one real ComfyUI server per session (see comfy_server.py).

Skipped, with the reason, when ``COMFYUI_DIR`` is unset or the stdlib client comfy_e2e.py
(shared/tools, or ``$UPSR_SHARED/tools``) is missing. Set ``COMFYUI_PYTHON`` to the interpreter of
the ComfyUI environment (default: the one running pytest).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_server

SKIP_REASON = ("end-to-end tests need a ComfyUI checkout: set COMFYUI_DIR=/path/to/ComfyUI "
               "(and COMFYUI_PYTHON=/path/to/its/python)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    mine = [i for i in items if Path(str(i.fspath)).resolve().parent == here]
    reason = None
    if comfy_server.comfyui_dir() is None:
        reason = SKIP_REASON
    elif not (comfy_server.shared_tools() / "comfy_e2e.py").is_file():
        reason = f"comfy_e2e.py not found in {comfy_server.shared_tools()} (set UPSR_SHARED to the shared/ folder)"
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def e2e():
    """The comfy_e2e client module."""
    sys.path.insert(0, str(comfy_server.shared_tools()))
    return importlib.import_module("comfy_e2e")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = comfy_server.start(tmp_path_factory.mktemp("comfy_base"))
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, f"ComfyUI (pid {srv.proc.pid}) is still running"


@pytest.fixture(scope="session")
def client(server, e2e):
    return e2e.ComfyClient(server.url)


@pytest.fixture(scope="session")
def object_info(client):
    return client.object_info()
