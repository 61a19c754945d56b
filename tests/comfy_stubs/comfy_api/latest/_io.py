# ruff: noqa: RUF013, TRY002, TRY004
# (signatures, defaults and errors as ComfyUI 0.3.64 has them)
"""Stand-in for comfy_api.latest._io (ComfyUI 0.3.64): the V3 schema classes the UPSR nodes use.

Constructor signatures, attribute names and the V1 view (``INPUT_TYPES``, ``RETURN_TYPES``,
``RETURN_NAMES``, ``get_v1_info``: what /object_info serves) follow ComfyUI; execution-side
machinery (resources, lazy inputs, async, node expansion) is left out.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any


def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class classproperty:
    def __init__(self, f):
        self.f = f

    def __get__(self, obj, owner):
        return self.f(owner)


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class _ComfyType:
    Type = Any
    io_type: str = None


class _IO_V3:
    Parent: type = None

    @property
    def io_type(self):
        return self.Parent.io_type

    @property
    def Type(self):
        return self.Parent.Type


class Input(_IO_V3):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 extra_dict=None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}

    def as_dict(self):
        return _prune({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                       "lazy": self.lazy}) | _prune(self.extra_dict)

    def get_io_type(self):
        return self.io_type


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                 default: Any = None, socketless: bool = None, widget_type: str = None, force_input: bool = None,
                 extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self):
        return super().as_dict() | _prune({"default": self.default, "socketless": self.socketless,
                                           "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self):
        return self.widget_type if self.widget_type is not None else super().get_io_type()


class Output(_IO_V3):
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    def as_dict(self):
        return _prune({"display_name": self.display_name, "tooltip": self.tooltip,
                       "is_output_list": self.is_output_list})

    def get_io_type(self):
        return self.io_type


class ComfyTypeI(_ComfyType):
    class Input(Input):
        ...


class ComfyTypeIO(ComfyTypeI):
    class Output(Output):
        ...


def _clone(cls: type) -> type:
    return type(cls.__name__, (cls,), {})


def comfytype(io_type: str, **kwargs):
    """Bind ``io_type`` to a ComfyType class and give it its own Input/Output subclasses."""
    def decorator(cls):
        for name in ("Input", "Output"):
            inner = cls.__dict__.get(name) or getattr(cls, name, None)
            if inner is not None:
                inner = _clone(inner)
                inner.Parent = cls
                setattr(cls, name, inner)
        cls.io_type = io_type
        return cls
    return decorator


def Custom(io_type: str) -> type[ComfyTypeIO]:
    @comfytype(io_type=io_type)
    class CustomComfyType(ComfyTypeIO):
        ...
    return CustomComfyType


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     default: bool = None, label_on: str = None, label_off: str = None,
                     socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self):
            return super().as_dict() | _prune({"label_on": self.label_on, "label_off": self.label_off})


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     default: int = None, min: int = None, max: int = None, step: int = None,
                     control_after_generate: bool = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min = min
            self.max = max
            self.step = step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | _prune({
                "min": self.min, "max": self.max, "step": self.step,
                "control_after_generate": self.control_after_generate,
                "display": self.display_mode.value if self.display_mode else None})


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     default: float = None, min: float = None, max: float = None, step: float = None,
                     round: float = None, display_mode: NumberDisplay = None, socketless: bool = None,
                     force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min = min
            self.max = max
            self.step = step
            self.round = round
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step,
                                               "round": self.round, "display": self.display_mode})


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None, lazy: bool = None,
                     multiline=False, placeholder: str = None, default: str = None, dynamic_prompts: bool = None,
                     socketless: bool = None, force_input: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, options: list[str] | list[int] | type[Enum] = None, display_name: str = None,
                     optional=False, tooltip: str = None, lazy: bool = None, default: str | int | Enum = None,
                     control_after_generate: bool = None, upload: UploadType = None,
                     image_folder: FolderType = None, remote=None, socketless: bool = None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self):
            return super().as_dict() | _prune({"multiselect": self.multiselect, "options": self.options,
                                               "control_after_generate": self.control_after_generate})


@comfytype(io_type="IMAGE")
class Image(ComfyTypeIO):
    Type = Any  # torch.Tensor [B,H,W,C]


@comfytype(io_type="MASK")
class Mask(ComfyTypeIO):
    Type = Any  # torch.Tensor [B,H,W]


@comfytype(io_type="UPSCALE_MODEL")
class UpscaleModel(ComfyTypeIO):
    Type = Any  # spandrel ImageModelDescriptor


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    def __init__(self, unique_id: str, prompt: Any, extra_pnginfo: Any, dynprompt: Any,
                 auth_token_comfy_org: str, api_key_comfy_org: str, **kwargs):
        self.unique_id = unique_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        self.dynprompt = dynprompt
        self.auth_token_comfy_org = auth_token_comfy_org
        self.api_key_comfy_org = api_key_comfy_org

    def __getattr__(self, key: str):
        return None

    @classmethod
    def from_dict(cls, d: dict | None):
        d = d or {}
        return cls(**{h.name: d.get(h, d.get(h.value)) for h in Hidden})


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list[Input] = None
    outputs: list[Output] = None
    hidden: list[Hidden] = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        """Input ids unique, output ids unique, and no id shared between inputs and outputs."""
        ins = [i.id for i in self.inputs or []]
        outs = [o.id for o in self.outputs or []]
        issues = []
        if len(set(ins)) != len(ins):
            issues.append(f"Input ids must be unique, but {[k for k, n in Counter(ins).items() if n > 1]} are not.")
        if len(set(outs)) != len(outs):
            issues.append(f"Output ids must be unique, but {[k for k, n in Counter(outs).items() if n > 1]} are not.")
        if set(ins) & set(outs):
            issues.append(f"Ids must be unique between inputs and outputs, but {set(ins) & set(outs)} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self):
        if self.is_output_node:
            self.hidden = list(self.hidden or [])
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, output in enumerate(self.outputs or []):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"

    def get_v1_info(self, cls) -> dict:
        """The node's /object_info entry (the keys the frontend and tests read)."""
        inputs: dict = {"required": {}}
        for i in self.inputs or []:
            d = i.as_dict()
            d.pop("optional", None)
            inputs.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), d)
        for h in self.hidden or []:
            inputs.setdefault("hidden", {})[h.name] = (h.value,)
        outs = self.outputs or []
        return {
            "input": inputs,
            "input_order": {k: list(v) for k, v in inputs.items()},
            "output": [o.io_type for o in outs],
            "output_is_list": [o.is_output_list for o in outs],
            "output_name": [o.display_name or o.io_type for o in outs],
            "output_tooltips": [o.tooltip for o in outs],
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
            "category": self.category,
            "output_node": self.is_output_node,
            "deprecated": self.is_deprecated,
            "experimental": self.is_experimental,
            "api_node": self.is_api_node,
        }


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index) -> Any:
        return self.args[index]


class ComfyNode:
    RELATIVE_PYTHON_MODULE = None
    SCHEMA = None
    hidden: HiddenHolder = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool:
        raise NotImplementedError

    @classmethod
    def FINALIZE_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        if cls.define_schema.__func__ is ComfyNode.define_schema.__func__:
            raise Exception(f"No define_schema function was defined for node class {cls.__name__}.")
        if cls.execute.__func__ is ComfyNode.execute.__func__:
            raise Exception(f"No execute function was defined for node class {cls.__name__}.")
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        cls.SCHEMA = schema
        return schema

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict:
        return cls.GET_SCHEMA().get_v1_info(cls)

    @classmethod
    def INPUT_TYPES(cls, include_hidden=True, return_schema=False):
        schema = cls.FINALIZE_SCHEMA()
        inputs = schema.get_v1_info(cls)["input"]
        if not include_hidden:
            inputs.pop("hidden", None)
        return (inputs, schema) if return_schema else inputs

    @classproperty
    def RETURN_TYPES(cls):
        return tuple(cls.GET_NODE_INFO_V1()["output"])

    @classproperty
    def RETURN_NAMES(cls):
        return tuple(cls.GET_NODE_INFO_V1()["output_name"])

    @classproperty
    def CATEGORY(cls):
        return cls.GET_SCHEMA().category

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type:
        clone = type(f"{cls.__name__}Clone", (cls,), {})
        clone.hidden = HiddenHolder.from_dict(hidden_inputs)
        return clone

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        out = cls.execute(*args, **kwargs)
        if out is None:
            return NodeOutput()
        if isinstance(out, tuple):
            return NodeOutput(*out)
        if not isinstance(out, NodeOutput):
            raise Exception(f"Invalid return type from node: {type(out)}")
        return out
