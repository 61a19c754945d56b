"""Reading and writing UPSR checkpoints, safely.

Accepted everywhere a checkpoint is:

* the official ``.pth`` files: ``{'params_ema'|'params': state_dict}`` or a bare state
  dict, optional ``module.`` prefixes (SPEC §1) — read with ``torch.load(weights_only=True)``,
  so a pickle that tries to run code is refused before anything runs;
* ``.safetensors`` holding one net, or both nets under ``denoiser.`` / ``estimator.``
  prefixes (what ``python -m upsr_core convert`` writes, with the configs as metadata).

fp16/bf16 weights are up-cast to float32 on load. A file of the wrong kind raises
:class:`UnsupportedCheckpointError` saying what was expected and what was found.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ATDConfig, DenoiserConfig, atd_config_from_state_dict, denoiser_config_from_state_dict
from .errors import UnsupportedCheckpointError, describe_state_dict
from .imageio import write_atomically
from .nets import ATD, UPSRDenoiser
from .nets.attention import relative_position_index

__all__ = [
    "read_checkpoint",
    "canonicalize_state_dict",
    "split_nets",
    "detect_kind",
    "build_denoiser",
    "build_estimator",
    "save_converted",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "upsr-core"
FORMAT_VERSION = "1"
_PREFIXES = {"denoiser": ("denoiser.",), "estimator": ("estimator.", "atd.")}


def _looks_like_safetensors(head: bytes, path: Path) -> bool:
    """By content (``head``: the file's first 9 bytes), not suffix: a safetensors file starts with
    a little-endian u64 header length followed by a JSON object; zip (``PK``) and pickle
    (``0x80``) files do not."""
    if len(head) < 9:
        return path.suffix.lower() == ".safetensors"  # too short for either: let the named reader say so
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100_000_000


SAFE_PICKLE_TORCH = (2, 6)
"""The oldest torch whose ``torch.load(weights_only=True)`` is taken as safe: before 2.6 a
crafted pickle could run code through it (CVE-2025-32434, fixed in torch 2.6.0), so pickled
checkpoints (.pth/.pt/.ckpt) are refused there; safetensors files load on any torch."""


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _is_pickle_file(head: bytes) -> bool:
    """torch.save writes a zip archive (``PK``) or a raw pickle (protocol 2+: ``0x80`` then the
    protocol number)."""
    return head.startswith(b"PK") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


MAX_SAFETENSORS_HEADER = 8 * 1024 * 1024
"""The largest safetensors header (JSON: names, shapes, metadata) read: the official full-size
nets' 1261 tensors take ~0.2 MB and the demo file's 96 KB. safetensors itself allows 100 MB, and
parsing a header of 300 000 empty tensors took 790 MB and 3.4 s before any check of ours."""


def check_safetensors_header(path: str | os.PathLike) -> None:
    """Refuse (UnsupportedCheckpointError) a safetensors file whose header is longer than
    :data:`MAX_SAFETENSORS_HEADER` bytes, before the safetensors library parses it."""
    with open(path, "rb") as f:
        head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if n > MAX_SAFETENSORS_HEADER:
        raise UnsupportedCheckpointError(
            f"{path}: its safetensors header is {n} bytes, more than the {MAX_SAFETENSORS_HEADER} "
            "read here (a real model's is under 1 MB): not a model file, or a crafted one")


def read_checkpoint(path: str | os.PathLike, *, source: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint file -> (flat state dict of CPU tensors, metadata dict).

    Never executes pickled code. Raises FileNotFoundError or UnsupportedCheckpointError.
    ``source`` starts the message of a file that holds no UPSR net (default: the path), e.g.
    ``"'m.safetensors' (the model)"``, as :func:`split_nets` takes it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder; expected a .pth or .safetensors file"
                                if path.is_dir() else f"checkpoint not found: {str(path)!r}")
    with open(path, "rb") as f:
        head = f.read(9)
    # by content first: an official .pth renamed .safetensors is read as the pickle it is
    if _looks_like_safetensors(head, path) or (path.suffix.lower() == ".safetensors" and not _is_pickle_file(head)):
        check_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta, names = dict(f.metadata() or {}), list(f.keys())
                # which nets the file holds, from its key names, before any tensor is read: another
                # project's model given by mistake (an SDXL checkpoint: ~7 GB) is refused unread
                split_nets(dict.fromkeys(k.removeprefix("module.") for k in names), source or str(path))
                sd = {k: f.get_tensor(k) for k in names}
        except UnsupportedCheckpointError:
            raise
        except (SafetensorError, OSError, ValueError) as e:
            raise UnsupportedCheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
        return _canonical(sd, path), meta
    if _torch_version() < SAFE_PICKLE_TORCH:  # a model file from elsewhere (a training run's own checkpoint
        raise UnsupportedCheckpointError(       # in --out still resumes: load_pickled)
            f"{path}: a pickled checkpoint is not loaded with torch {torch.__version__}: its weights-only "
            f"loader could be made to run code before torch {'.'.join(map(str, SAFE_PICKLE_TORCH))} "
            "(CVE-2025-32434). Upgrade torch, or convert the file where torch is newer (python -m upsr_core "
            "convert … -o model.safetensors): .safetensors files load on any torch")
    return _canonical(load_pickled(path), path), {}


def load_pickled(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure an
    :class:`UnsupportedCheckpointError` naming the file and the reason (no torch advice to load
    unsafely): an empty file, one that is neither a zip archive nor a pickle, a pickle asking for
    code or objects beyond tensors and containers (nothing runs), a truncated or corrupted one."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise UnsupportedCheckpointError(f"{path}: not a readable PyTorch checkpoint: the file is empty")
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save writes a zip archive or a pickle
        raise UnsupportedCheckpointError(
            f"{path}: not a checkpoint — a .pth/.pt file is a zip archive or a pickle and a .safetensors "
            f"file starts with its JSON header; this one starts with {head!r}")
    try:
        with warnings.catch_warnings():  # a corrupted pickle's "Detected pickle protocol" warning: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            with open(path, "rb") as f:  # a file object: torch 2.13 reads a path named .safetensors as safetensors
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsupportedCheckpointError(
            f"{path}: refused to load — expected a state dict of plain tensors, but the pickle asks for "
            f"code or objects outside them, or is corrupted (nothing was executed): {_reason(e)}"
        ) from None
    # A corrupted pickle can also fail inside the unpickler with these (seen by fuzzing torch 2.13).
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
            KeyError, IndexError, AssertionError, TypeError, AttributeError) as e:
        raise UnsupportedCheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {_reason(e)}"
        ) from None


def _canonical(obj: object, path: Path) -> dict[str, torch.Tensor]:
    try:
        return canonicalize_state_dict(obj)
    except UnsupportedCheckpointError as e:
        raise UnsupportedCheckpointError(f"{path}: {e}") from None


def _reason(e: BaseException) -> str:
    """The informative line of a torch.load error (its first lines are generic advice to
    retry with weights_only=False, which must not be shown to a user as the cause)."""
    lines = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in str(e).splitlines() if ln.strip()]
    key = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), None)
    # and not its "Please use torch.serialization.add_safe_globals(...)": code a CLI user cannot run
    refused = key.split(" Please use ")[0] if key else ""
    if refused:
        return refused
    # torch < 2.6 starts with "Weights only load failed. Re-running `torch.load` with `weights_only` set
    # to `False` will likely succeed, but it can result in arbitrary code execution …": not a reason
    plain = [ln for ln in lines if "weights_only" not in ln and "Re-running" not in ln and "file an issue" not in ln]
    return plain[0] if plain else "torch's weights-only loader refused it"


MAX_NET_PARAMS = 1_000_000_000
"""The largest net :func:`load_upsr` builds from a file (8.4× the official denoiser's 119.4 M): a
file's metadata or tensor shapes could otherwise ask for terabytes before any check."""


def _check_tensor(k: str, v: torch.Tensor) -> None:
    """A plain dense CPU tensor whose storage holds all its elements: a sparse or meta tensor, or an
    expanded view of a few bytes (a zero stride declaring gigabytes), is not a weight."""
    if v.layout != torch.strided or v.device.type != "cpu" or v.is_quantized or v.is_nested:
        raise UnsupportedCheckpointError(f"tensor {k!r} is not a dense CPU tensor (layout {v.layout}, device "
                                         f"{v.device.type}): not a weight file")
    if v.numel() == 0:  # no UPSR/ATD weight is empty; sizes inferred from it would divide by zero
        raise UnsupportedCheckpointError(f"tensor {k!r} has shape {tuple(v.shape)}: a zero-size dimension is not a "
                                         "weight of these nets (a damaged or foreign file)")
    if v.untyped_storage().nbytes() < v.numel() * v.element_size():
        raise UnsupportedCheckpointError(f"tensor {k!r} of shape {tuple(v.shape)} declares more elements than "
                                         "its storage holds (an expanded view): not a weight file")


def canonicalize_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Unwrap ``params_ema``/``params``/``state_dict``, strip ``module.``; returns a new dict.

    Follows the official loader: ``params_ema`` first, then ``params``, else the dict itself.
    """
    if not isinstance(obj, Mapping):
        raise UnsupportedCheckpointError(f"expected a state dict (a mapping of tensors), found {type(obj).__name__}")
    for key in ("params_ema", "params", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UnsupportedCheckpointError(
                f"expected a state dict of tensors, found entry {k!r} of type {type(v).__name__}", obj
            )
        _check_tensor(k, v)
        name = k[len("module."):] if k.startswith("module.") else k
        if name in out:  # both "module.X" and "X": which one the net should get is unknown
            raise UnsupportedCheckpointError(f"the checkpoint holds both {('module.' + name)!r} and {name!r}: "
                                             "two nets' weights in one file, or a file written twice")
        out[name] = v
    if not out:
        raise UnsupportedCheckpointError("the checkpoint holds no tensors")
    return out


def detect_kind(sd: Mapping[str, torch.Tensor]) -> str | None:
    """'denoiser', 'estimator', 'both' (a prefixed converted file, either net may be absent) or None."""
    if any(k.startswith(p) for k in sd for ps in _PREFIXES.values() for p in ps):
        return "both"  # a converted file (``denoiser.*`` and/or ``estimator.*``)
    if "input_blocks.0.0.weight" in sd and "time_embed.0.weight" in sd:
        return "denoiser"
    if "conv_first.weight" in sd and "layers.0.residual_group.td" in sd:
        return "estimator"
    return None


def split_nets(sd: Mapping[str, torch.Tensor], source: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split a state dict into {'denoiser': …, 'estimator': …} (either may be absent).
    ``source`` (the file, and what it was given as) starts the error message."""
    kind = detect_kind(sd)
    if kind in ("denoiser", "estimator"):
        return {kind: dict(sd)}
    if kind is None:
        raise UnsupportedCheckpointError(
            (f"{source}: " if source else "")
            + "expected an UPSR denoiser (keys 'input_blocks.*', 'time_embed.*'), an ATD estimator "
            "(keys 'conv_first.*', 'layers.*.residual_group.td') or a converted file holding both",
            sd,
        )
    out: dict[str, dict[str, torch.Tensor]] = {"denoiser": {}, "estimator": {}}  # empty parts dropped below
    for k, v in sd.items():
        for name, prefixes in _PREFIXES.items():
            p = next((p for p in prefixes if k.startswith(p)), None)
            if p is not None:
                out[name][k[len(p):]] = v
                break
        else:
            raise UnsupportedCheckpointError(f"unexpected key {k!r} in a file holding both nets", sd)
    return {k: v for k, v in out.items() if v}


def _check_fit(net: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """UnsupportedCheckpointError unless ``sd`` has exactly ``net``'s keys and shapes (``net`` may
    live on the meta device: only shapes are read)."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        if bad:
            parts.append(f"{len(bad)} with other shapes (e.g. {bad[0]!r}: file {tuple(sd[bad[0]].shape)}, "
                         f"expected {tuple(own[bad[0]].shape)})")
        raise UnsupportedCheckpointError(f"{what}: keys do not fit — " + "; ".join(parts), sd)


def _load_strict(net: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    _check_fit(net, sd, what)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UnsupportedCheckpointError(f"{what}: tensor {k!r} holds NaN or Inf values")
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, strict=True)


_NETS = {  # kind -> (class, config from shapes, name, what its keys look like)
    "denoiser": (UPSRDenoiser, denoiser_config_from_state_dict, "UPSR denoiser",
                 "UNetModelSwin: 'input_blocks.*', 'time_embed.*'"),
    "estimator": (ATD, atd_config_from_state_dict, "ATD estimator", "'conv_first.*', 'layers.*.residual_group.td'"),
}


def _build(kind: str, sd: Mapping[str, torch.Tensor], config):
    cls, infer, what, keys = _NETS[kind]
    found = detect_kind(sd)
    if found != kind:
        other = next((v[2] for k, v in _NETS.items() if k == found), None)
        raise UnsupportedCheckpointError(
            f"expected {what} weights ({keys}), found {f'{other} weights' if other else describe_state_dict(sd)}"
        )
    try:
        cfg = config or infer(sd)
        with torch.device("meta"):  # shapes only (~0.1 s at full size): sizes from the file are checked
            probe = cls(cfg)        # before anything is allocated for them
        n = sum(p.numel() for p in probe.parameters())
        if n > MAX_NET_PARAMS:
            raise UnsupportedCheckpointError(
                f"{what}: its config makes a net of {n:,} parameters, more than this loader builds "
                f"({MAX_NET_PARAMS:,}; the official denoiser has 119.4 M): {cfg}")
        _check_fit(probe, sd, what)
        del probe
        net = cls(cfg)
    except UnsupportedCheckpointError:
        raise
    except ValueError as e:  # shapes that read as a net that cannot be built (e.g. 0 hidden channels)
        if config is not None:
            raise
        raise UnsupportedCheckpointError(f"{what}: the tensor shapes do not describe a consistent net: {e}", sd) from e
    _load_strict(net, sd, what)
    _check_index_buffers(net, what)
    return net.eval().requires_grad_(False)


def _check_index_buffers(net: torch.nn.Module, what: str) -> None:
    """The stored relative-position indices must be the standard Swin index of their window
    (the nets read the bias table through them: an index out of range failed only at inference,
    on CUDA as a device-side assert that breaks the process, and a wrong one in range gave
    wrong images without a word)."""
    for name, buf in net.named_buffers():
        if not name.rsplit(".", 1)[-1].startswith("relative_position_index"):
            continue
        window = math.isqrt(buf.shape[-1])
        want = relative_position_index(window)
        if buf.shape != want.shape or not torch.equal(buf.long(), want):
            raise UnsupportedCheckpointError(
                f"{what}: its {name} is not the relative-position index of a {window}×{window} window "
                f"(the standard Swin index, which the weights were trained with): a damaged or crafted file")


def build_denoiser(sd: Mapping[str, torch.Tensor], config: DenoiserConfig | None = None) -> UPSRDenoiser:
    """Build an :class:`UPSRDenoiser` (float32, eval mode) from its state dict."""
    return _build("denoiser", sd, config)


def build_estimator(sd: Mapping[str, torch.Tensor], config: ATDConfig | None = None) -> ATD:
    """Build an :class:`ATD` estimator (float32, eval mode) from its state dict."""
    return _build("estimator", sd, config)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_converted(
    path: str | os.PathLike,
    denoiser: UPSRDenoiser,
    estimator: ATD | None,
    *,
    dtype: str = "fp32",
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one ``.safetensors`` with both nets (``denoiser.*``/``estimator.*``) and metadata.

    ``dtype`` applies to floating-point parameters; integer buffers keep their dtype.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    # the file's layout follows the classes: swapped nets would write a file no loader can read
    if not isinstance(denoiser, UPSRDenoiser):
        raise TypeError(f"denoiser must be an UPSRDenoiser, got {type(denoiser).__name__}")
    if estimator is not None and not isinstance(estimator, ATD):
        raise TypeError(f"estimator must be an ATD (or None), got {type(estimator).__name__}")
    odd = {k: type(v).__name__ for k, v in (extra_metadata or {}).items()
           if not (isinstance(k, str) and isinstance(v, str))}
    if odd:  # safetensors stores strings only (its own error named neither key nor value)
        raise TypeError(f"extra_metadata keys and values must be str (json.dumps other values), got {odd}")
    reserved = {"format", "format_version", "dtype", "denoiser_config", "estimator_config"} & set(extra_metadata or {})
    if reserved:
        raise ValueError(f"extra_metadata may not set {sorted(reserved)}: they describe the file's own layout")
    tensors: dict[str, torch.Tensor] = {}
    nets = {"denoiser": denoiser, "estimator": estimator}
    for name, net in nets.items():
        if net is None:
            continue
        for k, v in net.state_dict().items():
            v = v.detach().cpu()
            if v.is_floating_point():
                cast = v.to(_DTYPES[dtype])
                if cast.isfinite().all() < v.isfinite().all():  # the loader refuses non-finite weights
                    raise ValueError(f"{name}.{k} does not fit {dtype}: up to {v.abs().max().item():.3g} in "
                                     f"magnitude (fp16 holds 65504); write it as bf16 or fp32")
                v = cast
            tensors[f"{name}.{k}"] = v.contiguous()
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "denoiser_config": json.dumps(denoiser.config.to_dict()),
    }
    if estimator is not None:
        meta["estimator_config"] = json.dumps(estimator.config.to_dict())
    meta.update(extra_metadata or {})
    write_safetensors(tensors, path, meta)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file at ``path`` with the mode an ordinary new file gets (0666 less the umask;
    ``save_file`` creates files 0600, unreadable by another account such as a ComfyUI service),
    written through :func:`imageio.write_atomically`: all or nothing (a failed write leaves the
    file that was there), a symbolic link at ``path`` refused, not followed. The file is serialised
    in memory first (its size again, transiently)."""
    data = safetensors_bytes(tensors, metadata=metadata)
    with write_atomically(path) as f:
        f.write(data)
