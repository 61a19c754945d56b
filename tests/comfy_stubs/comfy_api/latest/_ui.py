# (signatures, defaults and errors as ComfyUI 0.3.64 has them)
"""Stand-in for comfy_api.latest._ui: PreviewImage keeps the image instead of writing a temp PNG."""
from __future__ import annotations

from typing import Any


class _UIOutput:
    def as_dict(self) -> dict:
        raise NotImplementedError


class PreviewImage(_UIOutput):
    def __init__(self, image: Any, animated: bool = False, cls: Any = None, **kwargs):
        if getattr(image, "ndim", None) != 4 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"PreviewImage expects an IMAGE [B,H,W,C], got {getattr(image, 'shape', image)}")
        self.image = image  # stub only: what the real class saves as PNGs into temp/
        self.values = [{"filename": f"ComfyUI_temp_stub_{i:05}_.png", "subfolder": "", "type": "temp"}
                       for i in range(image.shape[0])]
        self.animated = animated

    def as_dict(self):
        return {"images": self.values, "animated": (self.animated,)}


class PreviewMask(PreviewImage):
    def __init__(self, mask: Any, animated: bool = False, cls: Any = None, **kwargs):
        preview = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        super().__init__(preview, animated, cls, **kwargs)
