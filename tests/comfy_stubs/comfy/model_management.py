# (signatures, defaults and errors as ComfyUI 0.3.64 has them)
"""Stand-in for comfy.model_management: the device, dtype, memory and interrupt calls the nodes use.

``stub_device`` (env ``UPSR_STUB_DEVICE``, default cpu) plays ComfyUI's chosen device.
``stub_loaded`` records every ``load_models_gpu`` call (its ``memory_required`` in
``stub_memory_required``); ``stub_others`` plays the other
models resident on the device, which ``free_memory`` unloads (all of them: the stub has no
memory figures) unless kept.
"""
from __future__ import annotations

import os
import threading
from enum import Enum

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError


class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


vram_state = VRAMState.NORMAL_VRAM

stub_device = torch.device(os.environ.get("UPSR_STUB_DEVICE", "cpu"))
stub_loaded: list[list] = []
stub_memory_required: list = []
stub_empty_cache_calls = 0
stub_others: list = []
current_loaded_models: list = []  # ComfyUI's LoadedModel list (here only what a test puts in)
stub_free_calls: list[tuple] = []


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def get_torch_device():
    return stub_device


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def is_device_cpu(device):
    return getattr(device, "type", device) == "cpu"


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return device is not None and not is_device_cpu(device) and torch.cuda.is_available()


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    if device is None or is_device_cpu(device):
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    stub_loaded.append(list(models))
    stub_memory_required.append(memory_required)
    for m in models:
        m.model.to(m.load_device)
        m.model.device = m.load_device


class LoadedModel:
    def __init__(self, model):
        self.model = model

    @property
    def device(self):
        return self.model.load_device

    def __eq__(self, other):
        return self.model is other.model


def free_memory(memory_required, device, keep_loaded=[]):  # noqa: B006 (ComfyUI's signature)
    stub_free_calls.append((memory_required, device, list(keep_loaded)))
    unloaded = [m for m in stub_others if LoadedModel(m) not in keep_loaded]
    stub_others[:] = [m for m in stub_others if m not in unloaded]
    return unloaded


def soft_empty_cache(force=False):
    global stub_empty_cache_calls
    stub_empty_cache_calls += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()
