"""Test stand-in for ComfyUI's comfy package (see tests/comfy_stubs/README.md)."""
