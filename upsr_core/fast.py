"""Fast inference: ``enable_fast(model)`` turns an :class:`UPSRModel` into a device-resident,
graph-replayed pipeline with the same results as the reference path (fp32: equal to
rounding; bf16/fp16: see ``python -m upsr_core bench``).

What changes (the reference path, ``UPSRModel`` as loaded, is untouched):

* attention: ``scaled_dot_product_attention`` with the relative-position bias and the
  shift masks precomputed once per block (one (heads, N, N) tensor per mask pattern, for
  every image size: ``prepare_fast`` in :mod:`upsr_core.nets`); nothing rebuilt per call;
* GroupNorm in the net's own dtype (statistics still accumulated in float32); on CUDA with
  Triton, three fused Triton kernels (norm + SiLU) on a channels-last denoiser
  (:mod:`upsr_core.nets.triton_norm`), without Triton an NCHW denoiser; optionally both nets
  ``torch.compile``\\ d (eager fallback if compiling fails; weights frozen on the CPU);
* every stage stays on the model's device: padding, bicubic, ATD, ψ/w, the 5 DDIM steps,
  crop and clamp; the schedule constants live on the device, so the sampling loop has no
  host-device sync and no host copy;
* on the CPU each nearest ×2 + 3x3 conv pair runs as four 2x2 sub-pixel convs at the low
  resolution (13 % fewer denoiser FLOPs); on AVX2 CPUs the denoiser's 3x3 convolutions on
  maps of 64² and more run through NNPACK's Winograd kernels (:mod:`upsr_core.nets.winograd`;
  6–16 % faster at LR 64, ~12 % at LR 128); on other CPUs (timed on AVX-512) the denoiser
  runs channels-last;
* on CUDA each fixed shape is captured once as a CUDA graph and replayed
  (:class:`upsr_core.graphs.GraphCache`); images that fit in one tile run as ONE graph;
  tiles are batched (``tile_batch``) and blended on the device; progress (and with it a
  cancel check) is reported after every denoiser step wherever no graph is replayed;
* the model follows its nets: when something else moves them (ComfyUI's model management
  loads and offloads the ``nn.Module``\\ s directly), the next call re-prepares the masks,
  constants and graphs for the new placement.

The SR results of :meth:`FastUPSRModel.denoise` / ``upscale`` stay on the model's device
(the reference returns CPU tensors), except results that together would exceed
``CANVAS_DEVICE_MAX_BYTES`` (1 GiB; a tiled image's canvas, or a batch of images run a few
per call): those are gathered and returned on the CPU. The fast path is for inference only.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .errors import FastOptionError, is_out_of_memory
from .graphs import GraphCache, check_max_graphs
from .model import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    ESTIMATOR_BLOCK,
    Preview,
    Progress,
    StepCounter,
    UPSRModel,
    check_block,
    check_preview,
    check_progress,
)
from .nets.denoiser import GroupNorm32, SwinBlock, Upsample, prepare_subpixel
from .nets.triton_norm import available as triton_norm_runs
from .nets.winograd import auto_on as winograd_auto
from .nets.winograd import available as winograd_available
from .nets.winograd import set_winograd
from .pipeline import (
    SCALE,
    bicubic_x4,
    check_lr,
    check_noise_choice,
    check_seed,
    check_weight_and_noise,
    crop_hr,
    pad_lr,
    padded_size,
    run_estimator,
    starting_noise,
)
from .schedule import make_schedule
from .tiling import batches, check_tile_batch, check_tiling, fits_one, plan_tiles, tile_weight
from .uncertainty import DEFAULT_B_U, DEFAULT_PSI_MAX, check_weight_params

__all__ = ["enable_fast", "FastUPSRModel", "FastOptions", "noise_weight", "param_dicts", "placement"]

log = logging.getLogger("upsr_core")

GRAPH_MAX_PIXELS = 2 * 256 * 256
"""Tile groups up to this many LR pixels are graph-replayed; bigger ones run eagerly (their
launch overhead is negligible, and one memory pool keeps the peak at one tile group's)."""

CANVAS_DEVICE_MAX_BYTES = 1 << 30
"""A tiled image's output canvas and blend norm (float32, ``(3B + 1) · 4h · 4w`` values) stay on
the device up to this size; larger ones are kept (and returned) on the CPU, so device memory
stays bounded by the tile, not the image (LR 2048² → HR 8192²: 1.07 GB). The same holds for the
results of a batch of one-tile images that runs in several calls (e.g. video frames); the
tiles' blend ramps wait on the CPU and go to the canvas one at a time."""


@dataclass(frozen=True)
class FastOptions:
    """Resolved switches of the fast path (``"auto"`` already decided for the device).
    ``triton_norm`` is the wish: the norms use the kernels only while the nets are on a device
    where they can run (see :meth:`FastUPSRModel._prepare`)."""

    compile: bool
    cuda_graphs: bool
    channels_last: bool
    subpixel: bool = False
    compile_mode: str | None = None
    max_graphs: int = 6
    nhwc_norm: bool = False
    triton_norm: bool = False
    conv_epilogue: bool = False
    winograd: bool = False


def _resolve(name: str, value: bool | str, auto: bool) -> bool:
    if value == "auto":
        return auto
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    return value


def enable_fast(
    model: UPSRModel,
    *,
    device: torch.device | str | None = None,
    compile: bool | str = False,
    cuda_graphs: bool | str = "auto",
    channels_last: bool | str = "auto",
    subpixel: bool | str = "auto",
    compile_mode: str | None = None,
    max_graphs: int = 6,
    nhwc_norm: bool | str = False,
    triton_norm: bool | str = "auto",
    conv_epilogue: bool | str = "auto",
    cudnn_benchmark: bool | str = "auto",
    winograd: bool | str = "auto",
) -> "FastUPSRModel":
    """Switch ``model`` (in place) to the fast path and return it.

    ``device``: where the model will run, which decides the "auto" switches (default: where
    its denoiser is now; a host that moves the nets itself, such as ComfyUI, passes its device);
    ``compile``: torch.compile the denoiser and the estimator (default off: it compiles for
    minutes per new image size, worth it over many same-size images; "auto": on CUDA when
    Triton is installed; a net whose compilation fails runs eagerly, with a warning; on the CPU
    Inductor freezes the weights — oneDNN-prepacked convolutions with fused epilogues, 11–15 %
    faster than eager at full size on a 2-core VM, a second copy of the weights in memory — and
    weights changed later are compiled anew on the next call);
    ``cuda_graphs``: capture fixed shapes as CUDA graphs (auto: on CUDA);
    ``channels_last``: channels-last denoiser (auto: on CUDA with a GroupNorm that reads
    channels-last memory in place, the Triton one or ``nhwc_norm`` — PyTorch's CUDA norm copies
    it to NCHW and back, so without Triton the denoiser stays NCHW there; and on the CPU when
    neither ``winograd`` nor ``compile`` is on — PyTorch's CPU GroupNorm reads channels-last
    maps, oneDNN ran the 1x1 convs on large maps and the ×4 head's convs 2–6× faster so, and
    the sub-pixel maps go straight to their places: full size on a 2-core AVX-512 VM,
    2026-11-29, fp32 LR 64 2.39 → 2.32 s, LR 128 9.01 → 8.21 s, bf16 LR 128 5.32 → 4.71 s, the
    demo model at LR 256 ~12.2 → 9.8 s; NNPACK takes only NCHW maps, and the compiled code
    chooses its own layouts); ``subpixel``: run each nearest
    ×2 + 3x3 conv pair as four 2x2 convs at the low resolution, 13% fewer denoiser FLOPs
    (auto: on the CPU, where the FLOPs are the time; on CUDA and MPS the extra interleave copy
    may cost what it saves); ``compile_mode``: passed to
    torch.compile (None = default; never a cudagraph mode: graphs are captured here);
    ``max_graphs``: captured shapes kept per model; ``nhwc_norm``: with channels-last, the
    denoiser's GroupNorms run on the NHWC memory itself (:func:`upsr_core.nets.denoiser.group_norm_nhwc`:
    no layout copies, full-occupancy statistics; off by default: on the H100 it was slower than
    the native norm at LR 64 and slower than ``triton_norm`` at LR 256); ``triton_norm``: with
    channels-last on CUDA, the denoiser's GroupNorms (and the SiLU after the ResBlocks' norms)
    run as Triton kernels on the NHWC memory (:mod:`upsr_core.nets.triton_norm`; auto: on
    CUDA with channels-last when Triton is installed and can compile for the GPU (compute
    capability >= 7.0) and ``nhwc_norm`` is off; on the H100,
    2026-11-27, fp16 LR 64 30.7 → 25.5 ms and LR 256 203 → 132 ms per image; if its kernels
    fail, a warning and the native norm; on a device where they cannot run, e.g. after moving
    the nets to the CPU, the native norm; the kernels are compiled once per new shape class
    and cached by Triton on disk); ``conv_epilogue``: with ``triton_norm``, the convolutions
    around the norms run without their bias and the Triton kernels add it: the ResBlocks' first
    conv's bias inside the next norm, their second (and skip) conv's in one residual pass, the
    Swin MLP's fc1 with its GELU and fc2 with its residual (94 of the full denoiser's 124 bias
    passes; PyTorch's CUDA convolution adds its bias as a separate kernel, 14 ms of 131 at LR 256
    fp16 on the H100; auto: whenever ``triton_norm`` is on; not yet timed on a GPU);
    ``cudnn_benchmark``: set the process-wide ``torch.backends.cudnn.benchmark = True``, as the
    official test script does (auto: on CUDA; a host with its own setting, such as ComfyUI,
    passes False and the flag is left alone); ``winograd``: on the CPU, the denoiser's 3x3
    stride-1 convolutions on maps of at least 64² run through NNPACK's Winograd F(6×6, 3×3)
    kernels (:mod:`upsr_core.nets.winograd`; float32 only, eager only, so not with ``compile``,
    and NCHW only, so not with ``channels_last=True``;
    outputs within ~1e-4 of oneDNN's per conv; auto: on x86 CPUs whose best PyTorch kernels
    are AVX2, where NNPACK runs, when not compiling; full-size denoiser pass on a 2-core AVX2
    VM, 2026-11-29: LR 64 1.32 → 1.10 s, LR 128 5.41 → 4.73 s, LR 256 27.4 → 21.3 s with the
    cut at 32²). On MPS (Apple silicon) ``compile`` is refused with a warning (Inductor's MPS backend is a
    prototype) and the GroupNorms keep their float32 statistics (MPS's native group norm
    went through batch_norm in the input precision: fp16 sums of squares overflow there).
    Call it after loading and after ``model.to(...)`` (``FastUPSRModel.to`` re-prepares).
    Switches that cannot run on ``device`` or together raise :class:`upsr_core.errors.FastOptionError`
    (a ValueError naming the keywords in ``options``), before the model is touched.
    """
    if not isinstance(model, UPSRModel):
        raise TypeError(f"enable_fast expects an UPSRModel, got {type(model).__name__}")
    if compile_mode not in (None, "default", "max-autotune-no-cudagraphs"):
        raise ValueError(f"compile_mode must be None, 'default' or 'max-autotune-no-cudagraphs', got "
                         f"{compile_mode!r} (the other modes capture CUDA graphs themselves: use cuda_graphs)")
    check_max_graphs(max_graphs)  # here, not only in GraphCache: before the model's class is switched
    try:
        dev = model.device if device is None else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a name such as 'cuda', 'cuda:1', 'cpu', 'mps'; "
                         f"got {device!r}") from e
    cuda, mps = dev.type == "cuda", dev.type == "mps"
    triton = importlib.util.find_spec("triton") is not None
    want_compile = _resolve("compile", compile, cuda and triton)
    if want_compile and mps:
        log.warning("torch.compile is not used on MPS (Inductor's MPS backend is a prototype): running eagerly")
    want_nhwc = _resolve("nhwc_norm", nhwc_norm, False)
    kernels_run = triton_norm_runs(dev)  # the Triton GroupNorm can run on dev
    if triton_norm is True and not kernels_run:
        raise FastOptionError(f"triton_norm=True needs Triton and a CUDA device of compute capability >= 7.0 "
                              f"(or TRITON_INTERPRET=1); the model is for {dev}, Triton "
                              f"{'is' if triton else 'is not'} installed", "triton_norm")
    # channels-last pays on CUDA with a norm that reads it in place; PyTorch's GroupNorm copies
    # it to NCHW and back (on the H100, LR 256: 173 ms channels-last against 154 ms NCHW, bf16)
    norm_in_place = want_nhwc or (triton_norm is not False and kernels_run)
    cpu = dev.type == "cpu"
    if winograd is True:
        if not cpu or not winograd_available():
            raise FastOptionError(f"winograd=True needs the CPU and a PyTorch build whose NNPACK runs on it; the "
                                  f"model is for {dev}, NNPACK {'runs' if winograd_available() else 'does not run'} "
                                  "here", "winograd")
        if want_compile:
            raise FastOptionError("winograd=True runs eagerly (the compiled code keeps oneDNN's convolutions): "
                                  "choose it or compile=True", "winograd", "compile")
        if channels_last is True:  # the Winograd convs would pass every channels-last map to oneDNN
            raise FastOptionError("winograd=True takes NCHW maps (NNPACK has no channels-last kernels): choose it "
                                  "or channels_last=True", "winograd", "channels_last")
    # NNPACK takes NCHW maps: not where the denoiser is asked to be channels-last, or for a norm of
    # channels-last maps
    want_winograd = _resolve("winograd", winograd, cpu and not want_compile and channels_last is not True
                             and nhwc_norm is not True and triton_norm is not True and winograd_auto())
    want_cl = _resolve("channels_last", channels_last,
                       (cuda and norm_in_place) or (cpu and not want_compile and not want_winograd))
    opts = FastOptions(
        compile=want_compile and not mps,
        cuda_graphs=_resolve("cuda_graphs", cuda_graphs, cuda),
        channels_last=want_cl,
        subpixel=_resolve("subpixel", subpixel, dev.type == "cpu"),
        compile_mode=compile_mode,
        max_graphs=max_graphs,
        nhwc_norm=want_nhwc,
        triton_norm=_resolve("triton_norm", triton_norm, cuda and want_cl and not want_nhwc and kernels_run),
        winograd=want_winograd,
    )
    for name in ("nhwc_norm", "triton_norm"):
        if getattr(opts, name) and not opts.channels_last:
            raise FastOptionError(f"{name}=True needs channels_last (it normalises channels-last maps); "
                                  "got channels_last=False", name, "channels_last")
    if conv_epilogue is True and not opts.triton_norm:
        raise FastOptionError("conv_epilogue=True needs triton_norm (its kernels add the conv biases); "
                              "got triton_norm off", "conv_epilogue", "triton_norm")
    opts = dataclasses.replace(opts, conv_epilogue=_resolve("conv_epilogue", conv_epilogue, opts.triton_norm))
    if opts.nhwc_norm and opts.triton_norm:
        raise FastOptionError("nhwc_norm and triton_norm are two implementations of the same norm: choose one",
                              "nhwc_norm", "triton_norm")
    if _resolve("cudnn_benchmark", cudnn_benchmark, cuda):
        torch.backends.cudnn.benchmark = True
    # every argument was checked above: from here on the model is the caller's only if it is ready
    model.__class__ = FastUPSRModel
    model._setup(opts)  # type: ignore[attr-defined]
    return model  # type: ignore[return-value]


def _canvas_bytes(b: int, h: int, w: int) -> int:
    """Bytes of ``b`` float32 ×4 results of an h × w LR and their blend norm, ``(3b + 1) · 4h · 4w``
    values: what stays on the device up to :data:`CANVAS_DEVICE_MAX_BYTES`."""
    return (3 * b + 1) * (SCALE * h) * (SCALE * w) * 4


def _f32_nchw(x: torch.Tensor) -> torch.Tensor:
    """The denoiser's output as float32 NCHW (one cast or copy, none where it already is): a
    channels-last denoiser's x̂0 would otherwise carry its layout through the sampler's updates
    into the returned image, which callers expect NCHW-contiguous like the reference path's."""
    return x.to(torch.float32, memory_format=torch.contiguous_format)


def param_dicts(*nets: torch.nn.Module | None) -> list[dict]:
    """The ``_parameters`` dicts of every module of the nets (None nets skipped), in order: kept by
    a caller, walking them is ~4× cheaper than ``Module.parameters()`` (0.28 against 1.2 ms for the
    full-size nets on a busy 2-core VM), and they still show a parameter replaced by assignment."""
    return [m._parameters for n in nets if n is not None for m in n.modules() if m._parameters]


def placement(*nets: torch.nn.Module | None, dicts: list[dict] | None = None) -> tuple:
    """What masks, constants and captured graphs prepared for these nets' weights depend on
    (None nets skipped): the device and dtype of the first parameter, and the storage and
    in-place version counter of every parameter; compare two to know whether the nets moved,
    were given new values in place (``load_state_dict``, an optimizer step, a patcher's
    ``copy_``; not seen for inference tensors, which have no version counter) or had a parameter
    replaced since. ``dicts``: :func:`param_dicts` of the same nets,
    kept by a caller that asks often (a submodule replaced as a whole is then not seen). Host-side
    only (no GPU sync): 0.28 ms for the full-size nets with ``dicts`` on a busy 2-core VM."""
    params = [p for d in (param_dicts(*nets) if dicts is None else dicts) for p in d.values() if p is not None]
    # weights made under torch.inference_mode (ComfyUI loads and runs everything in it) have no
    # version counter: their storage is all that can be watched (-1 for the version)
    return (params[0].device, params[0].dtype,
            *((p.data_ptr(), -1 if p.is_inference() else p._version) for p in params))


def _method(net: torch.nn.Module, fn: Callable, *, fresh: bool) -> Callable:
    """``fn`` bound to ``net``; ``fresh``: on a new copy of its code object, so that Dynamo,
    which caches compiled code on the code object, compiles it anew."""
    if fresh:
        copy_ = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
        copy_.__kwdefaults__ = fn.__kwdefaults__
        fn = functools.update_wrapper(copy_, fn)
    return types.MethodType(fn, net)


def noise_weight(y_hat_pm: torch.Tensor, bic_pm: torch.Tensor, b_u: float, psi_max: float) -> torch.Tensor:
    """w = b_u + (1−b_u)·min(ψ/ψ_max, 1) with ψ = ½|ŷ − y↑|, from [-1,1] tensors (B,3,H,W).

    The operations of ``weight_noise(estimate.uncertainty())`` in the same order, without
    its validation (which needs a host sync); the caller checks b_u and ψ_max.
    """
    psi = (y_hat_pm * 0.5 - bic_pm * 0.5).abs() * 0.5
    return b_u + (1.0 - b_u) * (torch.clamp(psi * 2.0, 0.0, 2.0 * psi_max) / (2.0 * psi_max))


class FastUPSRModel(UPSRModel):
    """An :class:`UPSRModel` after :func:`enable_fast`; same methods and signatures,
    ``upscale`` also takes ``noise`` (ε, (B,48,Hp,Wp)) like ``denoise``."""

    fast_options: FastOptions

    # ------------------------------------------------------------------ set-up
    def _setup(self, opts: FastOptions) -> None:
        self.fast_options = opts
        self.graphs = GraphCache(opts.cuda_graphs, opts.max_graphs)
        self._compiled: dict[str, Callable] = {}  # net name -> compiled callable (dropped if it fails)
        self._compile_failed: set[str] = set()
        self._compiled_for: tuple | None = None  # what the compiled callables were made for
        self._prepare()

    def _prepare(self) -> None:
        """(Re)build everything that depends on the weights, dtype or device."""
        # the Triton norm where its kernels can run (enable_fast may have been told another device)
        triton = self.fast_options.triton_norm and triton_norm_runs(self.device)
        for m in self.denoiser.modules():
            if isinstance(m, SwinBlock):
                m.prepare_fast()
            elif isinstance(m, GroupNorm32):  # MPS: float32 statistics (see enable_fast)
                m.native = self.device.type != "mps"
                m.nhwc, m.triton = self.fast_options.nhwc_norm, triton
                m.fuse_bias = triton and self.fast_options.conv_epilogue
                if m.nhwc:  # batch_norm's float32 affine as the module's own weights: no cast per call
                    m.float()
        den = self.denoiser
        for conv in [den.conv_up1, den.conv_up2] + [m.conv for m in den.modules() if isinstance(m, Upsample)]:
            if self.fast_options.subpixel:
                prepare_subpixel(conv)
            else:
                conv.subpixel = None
        # both ways: a denoiser made channels-last before (an earlier enable_fast, or by its owner)
        # would otherwise stay so, and NNPACK's convs would pass its maps to oneDNN
        self.denoiser.to(memory_format=torch.channels_last if self.fast_options.channels_last
                         else torch.contiguous_format)
        # NNPACK's convs only where they run (the model may have been moved off the CPU)
        set_winograd(self.denoiser, self.fast_options.winograd and self.device.type == "cpu")
        if self.estimator is not None:
            self.estimator.prepare_fast()
        co = make_schedule().f32()
        dev = self.device
        self._steps = [
            tuple(co[k][t].to(dev) for k in ("std", "k", "m", "c")) for t in range(int(co["std"].shape[0]))
        ]
        self._ts = [torch.tensor([t], device=dev) for t in range(len(self._steps))]
        # each step's time embedding and scale-shifts, folded into the norms' affines (float32
        # for the NHWC and Triton norms, which apply the affine in float32, else the net's dtype)
        fp32_affine = self.fast_options.nhwc_norm or triton
        table_dtype = torch.float32 if fp32_affine else den.time_embed[0].weight.dtype
        den.prepare_steps(len(self._steps), table_dtype)
        self._prior = co["prior"].to(dev)
        self.graphs.clear()
        self._param_dicts = param_dicts(self.denoiser, self.estimator)
        self._placed = self._placement()
        if self.fast_options.compile:
            self._compile()

    def _compile(self) -> None:
        """(Re)make the compiled callables when the nets need new ones. On CUDA (and wherever
        the weights are not frozen) one set serves every placement: Dynamo's guards see moved or
        replaced tensors and values written in place are read at run time. On the CPU the
        compile freezes the weights (Inductor's ``freezing``: the convolutions' weights are
        prepacked for oneDNN and their bias and pointwise epilogues fused; full size at LR 64 on
        a 2-core AVX2 VM, fp32, eager and compiled calls interleaved: median 5.76 against 6.76 s,
        6.21 against 6.94 s with the CLI's allocator setting, 2026-11-28), so the compiled code
        holds copies of the weights: new values (a patcher's ``copy_``, ``load_state_dict``)
        need a new compile. Dynamo keeps what it compiled on the function's code object, where a
        new ``torch.compile`` of the same method would find the stale code, so each frozen
        compile gets a fresh copy of the code object."""
        frozen = self.device.type == "cpu"
        key = ("frozen", self._placed) if frozen else ("guarded",)
        if key == self._compiled_for:
            return
        if self._compiled_for is not None:
            why = ("their weights changed or moved, and the CPU compile froze them" if key[0] == self._compiled_for[0]
                   else "moved to the CPU, where the compile freezes the weights" if frozen else "moved off the CPU")
            log.info("UPSR fast path: compiling the nets again (%s)", why)
        self._compiled_for = key
        kw = dict(dynamic=False, mode=self.fast_options.compile_mode)
        nets = {"denoiser": (self.denoiser, type(self.denoiser).forward_step)}
        if self.estimator is not None:  # once per image, but ~1300 small ops in eager at full size
            nets["estimator"] = (self.estimator, type(self.estimator).forward)
        self._compiled = {}
        for name, (net, fn) in nets.items():
            if name not in self._compile_failed:
                self._compiled[name] = torch.compile(_method(net, fn, fresh=frozen), **kw)

    @property
    def _frozen(self) -> bool:
        """Whether the compiled callables freeze the weights (made for the CPU)."""
        return self._compiled_for is not None and self._compiled_for[0] == "frozen"

    def _placement(self) -> tuple:
        # the nets' identities too: a net assigned anew (model.estimator = …) has other dicts
        return id(self.denoiser), id(self.estimator), placement(dicts=self._param_dicts)

    def _follow(self) -> None:
        """Re-prepare if the nets were moved or their weights changed since :meth:`_prepare`
        (a few ms; no host sync)."""
        if self._placement() != self._placed:
            log.debug("UPSR fast path: the nets moved (now on %s) or their weights changed, re-preparing", self.device)
            self._prepare()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FastUPSRModel":
        super().to(device, dtype)
        self._prepare()
        return self

    # ------------------------------------------------------------------ network calls
    def _net_input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.fast_options.channels_last else torch.contiguous_format
        return x.to(self.dtype).contiguous(memory_format=fmt)

    @property
    def compiled(self) -> tuple[str, ...]:
        """Names of the nets that run compiled (a net whose compilation failed runs eagerly)."""
        return tuple(sorted(self._compiled))

    def _run(self, name: str, eager: Callable, *args) -> torch.Tensor:
        fn = self._compiled.get(name)
        if fn is not None:
            try:
                if not self._frozen:
                    return fn(*args)
                # Inductor reads `freezing` from its global config when it compiles (given in
                # torch.compile's options it did not freeze, torch 2.13); it applies where no
                # gradient is recorded (the sampling runs under no_grad)
                import torch._inductor.config as inductor_config

                with inductor_config.patch(freezing=True):
                    return fn(*args)
            except (RuntimeError, ImportError, OSError) as e:  # no compiler / backend failure
                if is_out_of_memory(e):  # not the compiler's fault: the caller shrinks or reports
                    raise
                log.warning("torch.compile failed, using the eager %s: %s", name, str(e).splitlines()[0])
                del self._compiled[name]
                self._compile_failed.add(name)
        return eager(*args)

    def _net(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The denoiser for a batch sharing one step ``t`` (int64 (1,) on the device)."""
        return self._run("denoiser", self.denoiser.forward_step, x, t, lq)

    def _estimator_call(self, x01: torch.Tensor) -> torch.Tensor:
        if self.estimator is None:
            return super()._estimator_call(x01)  # the error that names the missing estimator
        edt = next(self.estimator.parameters()).dtype
        return self._run("estimator", self.estimator, x01.to(edt)).float()

    def _denoiser_call(self, x: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        # the sampler's t is torch.full((B,), step): one step for the batch (pipeline.denoise_estimate)
        return _f32_nchw(self._net(self._net_input(x), t[:1], self._net_input(lq)))

    # ------------------------------------------------------------------ device stages (no syncs)
    def _estimate_core(self, lr_pm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """padded lr_pm (B,3,Hp,Wp) -> (y↑, ŷ), both (B,3,4Hp,4Wp) in [-1,1]. On MPS y↑ is
        computed on the CPU, as the reference path does (no MPS bicubic before torch 2.6)."""
        bic = bicubic_x4(lr_pm.cpu()).to(lr_pm.device) if lr_pm.device.type == "mps" else bicubic_x4(lr_pm)
        return bic, run_estimator(self._estimator_call, lr_pm)

    def _diffuse(self, bic: torch.Tensor, y_hat: torch.Tensor, w: torch.Tensor, noise: torch.Tensor,
                 on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """The 5 DDIM steps (SPEC §4), same operations as ``denoise_estimate``; returns the
        padded sample (B,3,4Hp,4Wp) in [-1,1], not clamped. ``on_step(x0)`` is called after each
        step with its x̂0 (B,48,Hp,Wp) (eager runs only: a captured graph cannot call back)."""
        y = F.pixel_unshuffle(bic, SCALE)
        lq = self._net_input(F.pixel_unshuffle(torch.cat([y_hat, bic], dim=1), SCALE))
        # UPSR eq. 8: x_T = y + κ√η_T · w ⊙ ε
        x = y + self._prior * F.pixel_unshuffle(w.expand_as(bic), SCALE) * noise
        for t in reversed(range(len(self._steps))):
            std, k, m, c = self._steps[t]
            # ResShift eq. 7 input scaling, then DDIM (η = 0): x_{t−1} = k_t x̂0 + m_t x_t + c_t y
            x0 = F.pixel_unshuffle(_f32_nchw(self._net(self._net_input(x / std), self._ts[t], lq)), SCALE)
            x = x0 * k + x * m + y * c
            if on_step is not None:
                on_step(x0)
        return F.pixel_shuffle(x, SCALE)

    def _diffuse_core(self, bic, y_hat, w, noise) -> tuple[torch.Tensor]:
        return (self._diffuse(bic, y_hat, w, noise),)

    def _upscale_core(self, lr: torch.Tensor, noise: torch.Tensor, b_u: float, psi_max: float,
                      on_step: Callable[[torch.Tensor], None] | None = None,
                      on_estimate: Callable[[], None] | None = None) -> tuple[torch.Tensor]:
        lr_pm = pad_lr(lr, self.multiple_of)
        bic, y_hat = self._estimate_core(lr_pm)
        if on_estimate is not None:
            on_estimate()
        x = self._diffuse(bic, y_hat, noise_weight(y_hat, bic, b_u, psi_max), noise, on_step)
        return (crop_hr(x, tuple(lr.shape[-2:])).clamp(-1, 1) * 0.5 + 0.5,)

    def _key(self, stage: str, *shape) -> tuple:
        return (stage, self.dtype, *shape)

    # ------------------------------------------------------------------ orchestration
    def _tile_loop(self, lr_pm: torch.Tensor, size: tuple[int, int], inputs, tile: int, overlap: int,
                   tile_batch: int, progress: Progress | None, sink=None,
                   estimator_units: int = 0, preview: Preview | None = None) -> torch.Tensor | None:
        """:meth:`UPSRModel._tile_loop` with the canvas on the device and :meth:`_diffuse`
        (graph-replayed for small tiles); the last tile group is padded with repeats so
        every group has one shape. Returns sr (B,3,4h,4w) in [0,1] on the model's device, or
        on the CPU when the canvas exceeds ``CANVAS_DEVICE_MAX_BYTES``. With a row ``sink``
        (streamed output) the banded CPU canvas of the base class is used."""
        if sink is not None:
            return super()._tile_loop(lr_pm, size, inputs, tile, overlap, tile_batch, progress, sink, estimator_units,
                                      preview)
        check_tiling(tile, overlap, self.multiple_of)
        check_tile_batch(tile_batch)
        b, _, hp, wp = lr_pm.shape
        h4, w4 = SCALE * size[0], SCALE * size[1]
        tiles = plan_tiles(hp, wp, tile, overlap, self.multiple_of)
        steps = len(self._steps)
        counter = StepCounter(progress, steps * len(tiles) * b + estimator_units, preview)
        dev = self.device
        host = _canvas_bytes(b, *size) > CANVAS_DEVICE_MAX_BYTES  # keep device memory bounded by the tile
        cdev = torch.device("cpu") if host else dev
        out = torch.zeros(b, 3, h4, w4, device=cdev, dtype=torch.float32)
        norm = torch.zeros(h4, w4, device=cdev, dtype=torch.float32)
        # the tiles' blend ramps (together ~0.4 canvas) wait on the CPU: each goes to cdev for its use
        weights = [tile_weight(t, tiles, SCALE) if len(tiles) > 1 else None for t in tiles]
        nb = min(tile_batch, len(tiles))
        for i in range(b):  # images one by one: memory is bounded by tile_batch tiles
            for group in batches(list(range(len(tiles))), nb):
                full = [tiles[j] for j in group + [group[-1]] * (nb - len(group))]
                sub, w_sub, n_sub = inputs(i, full, counter)
                args = (sub.bicubic_pm.to(dev), sub.sr_estimate_pm.to(dev),
                        w_sub.to(dev, torch.float32).expand_as(sub.bicubic_pm).contiguous(),
                        n_sub.to(dev, torch.float32))
                th, tw = full[0].h, full[0].w
                key = self._key("den", *args[3].shape)
                graphed = nb * th * tw <= GRAPH_MAX_PIXELS and self.graphs.replays(key, dev)
                if graphed:
                    (x,) = self.graphs.run(key, self._diffuse_core, *args)
                else:  # big tiles (launches are cheap next to the work; one memory pool), CPU, no graphs
                    seen = full[0].visible(SCALE, h4, w4)  # the first tile's part of the image: its preview
                    x = self._diffuse(*args, on_step=lambda x0: counter.step(len(group), x0, seen))
                for k, j in enumerate(group):
                    r = tiles[j].scaled(SCALE)
                    hh, ww = tiles[j].visible(SCALE, h4, w4)
                    wt = weights[j][:hh, :ww].to(cdev) if weights[j] is not None else 1.0
                    out[i, :, r.y : r.y + hh, r.x : r.x + ww] += x[k, :, :hh, :ww].to(cdev) * wt
                    if i == 0:
                        norm[r.y : r.y + hh, r.x : r.x + ww] += wt
                if graphed:  # a graph cannot call back: its steps are reported after it
                    for _ in range(steps):
                        counter(len(group))
        return out.div_(norm).clamp_(-1, 1).mul_(0.5).add_(0.5)  # in place: no extra full-size copies

    def estimate(self, lr: torch.Tensor, *, block: int | None = None, progress=None):
        """:meth:`UPSRModel.estimate` (results on the CPU), after following moved nets."""
        self._follow()
        return super().estimate(lr, block=block, progress=progress)

    def denoise(self, est, weight: torch.Tensor, **kw) -> torch.Tensor:
        """:meth:`UPSRModel.denoise` (same keywords); the result stays on the model's device."""
        self._follow()
        return super().denoise(est, weight, **kw)

    # the fast path in fp16 on the H100 (see UPSRModel): 0.94 GiB peak with 0.24 GiB of weights
    _act_bytes_per_px = 7000
    # the estimator as prepare_fast() runs it (SDPA in both attentions): 6.5 KB per LR px counted
    # for the full-size ATD, 3.3 KB for the demo's, nearly all per channel (see UPSRModel), x 1.48
    _est_bytes_per_channel, _est_bytes_per_head = 100, 50

    def working_memory(self, lr_size: tuple[int, int], *, batch: int = 1, tile: int = DEFAULT_TILE,
                       tile_batch: int = 1, estimator_block: int | None = None) -> int:
        """:meth:`UPSRModel.working_memory` plus the tiled output canvas and blend norm while they
        stay on the device (up to ``CANVAS_DEVICE_MAX_BYTES``); with ``estimator_block``, a batch
        of images that fit one tile and one block counts as the one call ``upscale`` makes of
        them (:meth:`_images_per_call`), for both nets."""
        canvas = _canvas_bytes(batch, *lr_size)
        act = super().working_memory(lr_size, batch=batch, tile=tile, tile_batch=tile_batch,
                                     estimator_block=estimator_block)
        return act + (canvas if canvas <= CANVAS_DEVICE_MAX_BYTES else 0)

    def _images_at_once(self, hp: int, wp: int, *, batch: int, tile: int, tile_batch: int,
                        estimator_block: int | None) -> int:
        # images of one tile and one block: upscale runs the batch in calls of this many (denoise,
        # and the tiled path, one image at a time)
        if estimator_block is None or not fits_one(hp, wp, min(tile, estimator_block)):
            return 1
        return self._images_per_call(batch, hp, wp, tile, tile_batch)

    def _images_per_call(self, b: int, hp: int, wp: int, tile: int, tile_batch: int) -> int:
        return max(1, min(b, tile_batch * tile * tile // (hp * wp)))

    @torch.no_grad()
    def upscale(
        self,
        lr: torch.Tensor,
        *,
        seed: int = 0,
        b_u: float = DEFAULT_B_U,
        psi_max: float = DEFAULT_PSI_MAX,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        tile_batch: int = 1,
        progress: Progress | None = None,
        noise: torch.Tensor | None = None,
        sink=None,
        same_noise: bool = False,
        estimator_block: int = ESTIMATOR_BLOCK,
        preview: Preview | None = None,
    ) -> torch.Tensor | None:
        """lr (B,3,h,w) in [0,1] -> sr (B,3,4h,4w) in [0,1] on the model's device.

        Same contract as :meth:`UPSRModel.upscale`. An image that fits one tile and one
        estimator block runs estimate, ψ/w, the 5 steps and the crop as ONE device function
        (one CUDA graph per shape), images batched within ``tile_batch`` × ``tile``² pixels;
        larger images stream through the reference tiling with :meth:`_tile_loop`. ``preview``
        gets no call from a replayed graph (CUDA graphs on, as the CLI's ``--fast`` runs: images
        and tile groups up to GRAPH_MAX_PIXELS, whose 5 steps take milliseconds).
        """
        self._follow()
        check_lr(lr)
        check_weight_params(b_u, psi_max)
        check_tiling(tile, overlap, self.multiple_of)
        check_tile_batch(tile_batch)
        check_block(estimator_block, "estimator_block")
        check_progress(progress)
        check_preview(preview)
        b, _, h, w = lr.shape
        m = self.multiple_of
        hp, wp = padded_size(h, w, m)
        if sink is not None or not fits_one(hp, wp, min(tile, estimator_block)):
            # several tiles or blocks, or streamed output: the base class's tile loop, which makes
            # ε band by band when not given (a whole field here would be 1 HR of CPU memory)
            return super().upscale(lr, seed=seed, b_u=b_u, psi_max=psi_max, tile=tile, overlap=overlap,
                                   tile_batch=tile_batch, progress=progress, noise=noise, sink=sink,
                                   same_noise=same_noise, estimator_block=estimator_block, preview=preview)
        check_noise_choice(noise, same_noise)
        given = noise is not None  # a caller's ε is checked for NaN/Inf as the reference path does;
        if given:                  # one made here is finite (and checking it would sync the host)
            check_weight_and_noise(None, noise, b, (hp, wp), values=True)
        else:  # drawn per call below (the same numbers: image i's ε comes from seed + i)
            seed = check_seed(seed, b, same_noise=same_noise)
        self._warn_if_slow()  # (the base class's upscale, above, warns itself)
        dev = self.device
        per = self._images_per_call(b, hp, wp, tile, tile_batch)
        steps = len(self._steps)
        # (steps + 1) units per image: the estimator is one, as upscale counts it
        counter = StepCounter(progress, (steps + 1) * b, preview)
        # the device holds one call's images; a batch's results as the tiled canvas would be: on
        # the device up to CANVAS_DEVICE_MAX_BYTES, else gathered on the CPU (e.g. many video frames)
        out = None
        if b > per:
            host = _canvas_bytes(b, h, w) > CANVAS_DEVICE_MAX_BYTES
            out = torch.empty(b, 3, SCALE * h, SCALE * w, device="cpu" if host else dev)
        for i in range(0, b, per):
            counter.check()  # the estimator reports nothing: a Cancel is seen before it runs
            k = min(per, b - i)
            x = lr[i : i + k].to(dev, torch.float32)
            n = (noise[i : i + k] if given else
                 starting_noise(seed if same_noise else seed + i, k, (hp, wp), same_noise=same_noise))
            n = n.to(dev, torch.float32)
            key = self._key("up", *x.shape, b_u, psi_max)
            if self.graphs.failed(key):  # e.g. the estimator would not capture: graph the 5 steps only
                lr_pm = pad_lr(x, m)
                bic, y_hat = self._estimate_core(lr_pm)
                counter(k)
                args = (bic, y_hat, noise_weight(y_hat, bic, b_u, psi_max), n)
                (sr,) = self.graphs.run(self._key("den", *n.shape), self._diffuse_core, *args)
                sr = crop_hr(sr, (h, w)).clamp(-1, 1) * 0.5 + 0.5
                graphed = True
            elif self.graphs.replays(key, dev):
                core = lambda x, n: self._upscale_core(x, n, b_u, psi_max)  # noqa: E731 (constants are in the key)
                (sr,) = self.graphs.run(key, core, x, n)
                counter(k)  # its estimator
                graphed = True
            else:  # eager (CPU, graphs off): progress after every step
                (sr,) = self._upscale_core(x, n, b_u, psi_max, lambda x0: counter.step(k, x0, (SCALE * h, SCALE * w)),
                                           partial(counter, k))
                graphed = False
            if graphed:  # a graph cannot call back: the steps are reported after it
                for _ in range(steps):
                    counter(k)
            if out is None:
                return self._checked(sr)
            out[i : i + k] = sr
        return self._checked(out)
