"""UPSR for ComfyUI: uncertainty-guided diffusion ×4 super-resolution (CVPR 2025).

ComfyUI loads this folder as a package and calls :func:`comfy_entrypoint`.
"""
from __future__ import annotations

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))

WEB_DIRECTORY = "./web"
"""Served at /extensions/<this folder's name>/: ``docs/<node id>.md`` are the pages the frontend's
node Help (the ? of a node in the Node Library) shows; no JavaScript."""


def _import_bundled_core() -> None:
    """Import the bundled ``upsr_core`` as a top-level package.

    The pack folder is on ``sys.path`` only for this import: left there, its own ``nodes``
    and ``tests`` folders would shadow modules of ComfyUI and of other packs.
    """
    if "upsr_core" in sys.modules:
        return
    sys.path.insert(0, _here)
    try:
        import upsr_core  # noqa: F401
    finally:
        sys.path.remove(_here)


_import_bundled_core()


async def comfy_entrypoint():
    from .nodes import UPSRExtension

    return UPSRExtension()
