# ruff: noqa: LOG015
# (signatures, defaults and errors as ComfyUI 0.3.64 has them)
"""Stand-in for ComfyUI's folder_paths: the model-folder registry and the input/temp folders.

``base_path`` comes from env ``UPSR_STUB_COMFY_BASE`` (a temp folder by default); tests may
also reassign ``models_dir`` and call ``stub_reset()`` before importing the pack.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

base_path = os.environ.get("UPSR_STUB_COMFY_BASE") or ""
if not base_path:  # a folder of our own for this process, removed when it exits
    base_path = tempfile.mkdtemp(prefix="upsr-comfy-stub-")
    atexit.register(shutil.rmtree, base_path, ignore_errors=True)
models_dir = os.path.join(base_path, "models")
output_directory = os.path.join(base_path, "output")
temp_directory = os.path.join(base_path, "temp")
input_directory = os.path.join(base_path, "input")

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {
    "upscale_models": ([os.path.join(models_dir, "upscale_models")], supported_pt_extensions),
}


def stub_reset(base: str) -> None:
    """Point every folder at ``base`` and forget registered model folders (test hook)."""
    global base_path, models_dir, output_directory, temp_directory, input_directory
    base_path = base
    models_dir = os.path.join(base, "models")
    output_directory, temp_directory, input_directory = (os.path.join(base, n) for n in ("output", "temp", "input"))
    folder_names_and_paths.clear()
    folder_names_and_paths["upscale_models"] = ([os.path.join(models_dir, "upscale_models")], supported_pt_extensions)


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    if folder_name in folder_names_and_paths:
        paths, _exts = folder_names_and_paths[folder_name]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def filter_files_extensions(files, extensions):
    return sorted(f for f in files if os.path.splitext(f)[-1].lower() in extensions or len(extensions) == 0)


def _walk(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    out = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if d != ".git"]
        out += [os.path.relpath(os.path.join(root, f), directory) for f in files]
    return out


def get_filename_list(folder_name: str) -> list[str]:
    """Sorted relative paths of the matching files in every path of ``folder_name`` (no cache)."""
    paths, exts = folder_names_and_paths[folder_name]
    found: set[str] = set()
    for p in paths:
        found.update(filter_files_extensions(_walk(p), exts))
    return sorted(found)


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(x, filename)
        if os.path.isfile(full_path):
            return full_path
        if os.path.islink(full_path):
            logging.warning("WARNING path %s exists but doesn't link anywhere, skipping.", full_path)
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path
