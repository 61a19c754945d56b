"""Print, as JSON, the interface of the ComfyUI modules the UPSR nodes use: parameter names, kinds and
defaults of the stubbed callables, plus what a sample V3 node serialises to (/object_info view).

    cd $COMFYUI_DIR && $COMFYUI_PYTHON tests/e2e/signatures.py          # the real ComfyUI
    PYTHONPATH=tests/comfy_stubs python tests/e2e/signatures.py --stubs  # tests/comfy_stubs

test_stub_fidelity.py runs both and compares.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys


def params(fn) -> list:
    return [[p.name, p.kind.name, repr(p.default) if p.default is not inspect.Parameter.empty else None]
            for p in inspect.signature(fn).parameters.values()]


def main() -> None:
    if "--stubs" not in sys.argv:
        sys.path.insert(0, os.getcwd())
        from comfy.cli_args import args

        args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
    from comfy.cli_args import LatentPreviewMethod, args
    from comfy_api.v0_0_2 import ComfyExtension, io, ui

    out: dict = {}
    callables = {
        "ComfyExtension.get_node_list": ComfyExtension.get_node_list,
        "io.Input": io.Input.__init__, "io.WidgetInput": io.WidgetInput.__init__, "io.Output": io.Output.__init__,
        "io.Int.Input": io.Int.Input.__init__, "io.Float.Input": io.Float.Input.__init__,
        "io.Combo.Input": io.Combo.Input.__init__, "io.Boolean.Input": io.Boolean.Input.__init__,
        "io.String.Input": io.String.Input.__init__, "io.Image.Input": io.Image.Input.__init__,
        "io.Image.Output": io.Image.Output.__init__, "io.NodeOutput": io.NodeOutput.__init__,
        "io.Custom": io.Custom, "io.ComfyNode.PREPARE_CLASS_CLONE": io.ComfyNode.PREPARE_CLASS_CLONE,
        "io.ComfyNode.INPUT_TYPES": io.ComfyNode.INPUT_TYPES, "io.HiddenHolder": io.HiddenHolder.__init__,
        "ui.PreviewImage": ui.PreviewImage.__init__,
        "mm.get_torch_device": mm.get_torch_device, "mm.unet_offload_device": mm.unet_offload_device,
        "mm.should_use_bf16": mm.should_use_bf16, "mm.should_use_fp16": mm.should_use_fp16,
        "mm.load_models_gpu": mm.load_models_gpu, "mm.soft_empty_cache": mm.soft_empty_cache,
        "mm.free_memory": mm.free_memory, "mm.LoadedModel": mm.LoadedModel.__init__,
        "utils.tiled_scale": comfy.utils.tiled_scale, "utils.get_tiled_scale_steps": comfy.utils.get_tiled_scale_steps,
        "mm.interrupt_current_processing": mm.interrupt_current_processing,
        "mm.processing_interrupted": mm.processing_interrupted,
        "mm.throw_exception_if_processing_interrupted": mm.throw_exception_if_processing_interrupted,
        "utils.ProgressBar": comfy.utils.ProgressBar.__init__,
        "utils.ProgressBar.update_absolute": comfy.utils.ProgressBar.update_absolute,
        "utils.ProgressBar.update": comfy.utils.ProgressBar.update,
        "utils.set_progress_bar_global_hook": comfy.utils.set_progress_bar_global_hook,
        "ModelPatcher": comfy.model_patcher.ModelPatcher.__init__,
        "folder_paths.add_model_folder_path": folder_paths.add_model_folder_path,
        "folder_paths.get_folder_paths": folder_paths.get_folder_paths,
        "folder_paths.get_filename_list": folder_paths.get_filename_list,
        "folder_paths.get_full_path": folder_paths.get_full_path,
        "folder_paths.get_full_path_or_raise": folder_paths.get_full_path_or_raise,
        "folder_paths.get_input_directory": folder_paths.get_input_directory,
        "folder_paths.get_temp_directory": folder_paths.get_temp_directory,
    }
    out["signatures"] = {k: params(v) for k, v in callables.items()}
    out["schema_fields"] = [[f.name, None if f.default is dataclasses.MISSING else repr(f.default)]
                            for f in dataclasses.fields(io.Schema)]
    out["enums"] = {"NumberDisplay": [m.value for m in io.NumberDisplay], "Hidden": [m.value for m in io.Hidden],
                    "VRAMState": [m.name for m in mm.VRAMState],
                    "LatentPreviewMethod": [[m.name, m.value] for m in LatentPreviewMethod]}
    out["preview_args"] = {"preview_method": args.preview_method.name, "preview_size": args.preview_size}
    out["mm"] = {"OOM_EXCEPTION": mm.OOM_EXCEPTION.__name__,
                 "InterruptProcessingException": [b.__name__ for b in mm.InterruptProcessingException.__mro__]}
    out["supported_pt_extensions"] = sorted(folder_paths.supported_pt_extensions)
    out["folder_keys"] = ["upscale_models" in folder_paths.folder_names_and_paths]

    Thing = io.Custom("UPSR_MODEL")

    class Sample(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="UPSRStubSample", display_name="Sample", category="image/upscaling/UPSR", description="d",
                inputs=[Thing.Input("m"), io.Image.Input("image", tooltip="t"),
                        io.Combo.Input("c", options=["a", "b"], default="b", tooltip="t"),
                        io.Float.Input("f", default=0.4, min=0.0, max=1.0, step=0.01,
                                       display_mode=io.NumberDisplay.slider),
                        io.Int.Input("seed", default=0, min=0, max=2**60, control_after_generate=True),
                        io.UpscaleModel.Input("u", optional=True), io.Mask.Input("mask", optional=True)],
                outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="m2"),
                         Thing.Output(display_name="thing")],
                hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, **kw):
            return io.NodeOutput(kw.get("image"))

    info = Sample.GET_NODE_INFO_V1()
    out["v1_info"] = json.loads(json.dumps({k: info[k] for k in (
        "input", "input_order", "output", "output_is_list", "output_name", "output_tooltips", "name",
        "display_name", "description", "category", "output_node")}, default=str))
    out["return"] = [list(Sample.RETURN_TYPES), list(Sample.RETURN_NAMES)]
    clone = Sample.PREPARE_CLASS_CLONE({"UNIQUE_ID": "5"})
    out["hidden_unique_id"] = clone.hidden.unique_id
    out["execute_normalized"] = type(clone.EXECUTE_NORMALIZED(image=None)).__name__
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
