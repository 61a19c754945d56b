# (signatures, defaults and errors as ComfyUI 0.3.64 has them)
"""Stand-in for comfy.model_patcher.ModelPatcher: holds a module and where it loads/offloads."""
from __future__ import annotations


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        if not hasattr(self.model, "device"):
            self.model.device = offload_device

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def loaded_size(self):
        return self.model_size() if self.model.device == self.load_device else 0
