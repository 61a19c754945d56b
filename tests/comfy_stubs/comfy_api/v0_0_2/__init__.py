"""Stand-in for comfy_api.v0_0_2, the versioned API the nodes import: in ComfyUI 0.3.64 it
re-exports ``io``, ``ui`` and ``ComfyExtension`` from ``comfy_api.latest``, as here."""
from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
