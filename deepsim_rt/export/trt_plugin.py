"""The 3D warp as a TensorRT plugin: our Triton warp kernel compiled to PTX and embedded in the engine (no Python
at run time). TensorRT's IGridSampleLayer is 2D only; this is how a 3D registration model becomes ONE engine.

    register_warp_plugin()                # tensorrt.plugin: @register (shapes/dtypes) + @autotune + @aot_impl
    name, ptx, meta = compile_warp_ptx("fp32", "linear", "border", add_self=False, arch=90)   # no GPU needed

Plugin "deepsim_rt::Warp3D" (TensorRT >= 10.9, Quickly Deployable Plugin API with an AOT implementation):
    inputs   image (B, C, D, H, W), flow (B, 3, D, H, W), same dtype, float32 or float16, linear (contiguous) format
    output   (B, C, D, H, W), the image's dtype: out(p) = image(p + flow(p)) (+ image(p) when add_self = 1, the
             scaling-and-squaring step u + u o (id + u), with image = flow)
    attrs    mode "linear" | "nearest", padding "border" | "zeros", add_self 0 | 1
Semantics are exactly deepsim_rt.kernels.warp (voxel units, channel i along spatial axis i, align_corners=True);
the kernel IS `warp_kernel._warp_fwd_kernel`, called from `_warp3d_kernel.warp3d_plugin_kernel`, whose only job
is the argument order TensorRT's AOT launcher uses, (inputs..., extra int32 scalars..., outputs...), and the
strides of contiguous tensors computed from (C, D, H, W).

In the ONNX graph (export_onnx(..., warp_op="trt_plugin")) each warp is a node op_type "Warp3D" in domain
"deepsim_rt" with attributes mode / padding / add_self plus plugin_namespace "deepsim_rt" and plugin_version "1",
which TensorRT's ONNX parser resolves through the plugin registry to this plugin once `register_warp_plugin()` ran
in the building process. AOT plugin attributes are not serialized (the choices are compiled into the PTX), and the
serialized engine carries the PTX, so Triton Inference Server loads it with no plugin library and no Python.

What runs where: the PTX compilation for sm_90 (triton.compile with an explicit GPUTarget, no driver), the shape /
dtype / launch logic (plain Python: `plugin_output`, `launch_params`) and the wrapper kernel's numbers (Triton
interpreter vs the reference) are tested on CPU; registering the plugin and building / running an engine need
TensorRT and a GPU (tests/test_export_tensorrt.py skips with the reason elsewhere). Not run anywhere yet: no machine
available to this project has TensorRT. Registration itself, and the shape / dtype / attribute / launch logic as
TensorRT's `tensorrt.plugin` layer drives it, are tested on CPU against that layer's real Python code of TensorRT
10.9 to 11.4 with the native module stubbed (tests/test_trt_plugin_layer.py, tools/fetch_trt_bindings.py).

Three rules the `tensorrt.plugin` layer imposes (issue 18 #2; each one made registration fail on every version):
  * the plugin functions' annotations must be real objects: it reads them with inspect.signature and issubclass,
    so this module must NOT use `from __future__ import annotations` (strings: TypeError on 10.9-11.1, ValueError
    on 11.4);
  * `aot_impl` needs a return annotation, tuple[str, str, KernelLaunchParams, SymIntExprs];
  * the ONNX parser hands a STRING attribute over as its bytes plus the terminating NUL (onnx/onnx-tensorrt#921),
    which the layer decodes as-is: the plugin receives mode='linear\\x00'. `_attr_str` drops trailing NULs.
  * an INT attribute arrives as a 1-element array, which the layer of TensorRT < 11.4 turns into an `int`
    attribute with int(array): a TypeError under numpy >= 2.4 (ndim > 0 to scalar). add_self is therefore declared
    as a numpy int32 array attribute (decoded with astype on every version) and read with `_attr_int`.
The parser forwards only the attributes the plugin declares (mode, padding, add_self), so the ONNX node's
plugin_namespace / plugin_version never reach it; with no `aot` attribute the AOT implementation is chosen.
"""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["PLUGIN_NAMESPACE", "PLUGIN_NAME", "PLUGIN_ID", "PLUGIN_VERSION", "MODES", "PADDINGS", "DTYPES",
           "BLOCK", "plugin_output", "launch_params", "compile_warp_ptx", "register_warp_plugin", "CompiledWarp"]

PLUGIN_NAMESPACE = "deepsim_rt"
PLUGIN_NAME = "Warp3D"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"
MODES = ("linear", "nearest")
PADDINGS = ("border", "zeros")
# Triton pointer types per tensor dtype name (TensorRT DataType names lower-cased: "float", "half").
DTYPES = {"float32": "fp32", "float16": "fp16"}
# Same block as the eager launcher (warp_kernel.BLOCK): 256 voxels per program, 4 warps.
BLOCK = 256
NUM_WARPS = 4


def _attr_str(value: str | bytes) -> str:
    """A string attribute as the plugin layer hands it over, without the ONNX parser's trailing NUL(s)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value.rstrip("\x00")


def _attr_int(value) -> int:
    """An integer attribute as the plugin layer hands it over: an int, or a 1-element numpy array."""
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"Warp3D integer attribute must hold one value, got {arr.size}: {arr.tolist()}")
    return int(arr[0])


# add_self's declared type: a 1-D int32 array (see the module docstring: `int` breaks TensorRT < 11.4 + numpy 2.4).
INT_ATTR = npt.NDArray[np.int32]


def _check_attrs(mode: str, padding: str, add_self: int) -> None:
    if mode not in MODES:
        raise ValueError(f"Warp3D mode must be one of {MODES}, got {mode!r}")
    if padding not in PADDINGS:
        raise ValueError(f"Warp3D padding must be one of {PADDINGS}, got {padding!r}")
    if add_self not in (0, 1):
        raise ValueError(f"Warp3D add_self must be 0 or 1, got {add_self!r}")
    if add_self and mode != "linear":
        raise ValueError("Warp3D add_self=1 (a scaling-and-squaring step) needs mode 'linear'")


def plugin_output(image_shape: tuple, image_dtype: str, flow_shape: tuple, flow_dtype: str, mode: str = "linear",
                  padding: str = "border", add_self: int = 0) -> tuple[tuple, str]:
    """(output shape, output dtype) of the plugin, or ValueError naming what is wrong.

    Shapes may hold ints or -1 (dynamic, as TensorRT reports them at network definition); dtypes are names in
    DTYPES ("float32", "float16"). image (B, C, D, H, W) and flow (B, 3, D, H, W) must agree on B, D, H, W.
    """
    _check_attrs(mode, padding, add_self)
    if len(image_shape) != 5 or len(flow_shape) != 5:
        raise ValueError(f"Warp3D takes 5D image (B, C, D, H, W) and flow (B, 3, D, H, W), got ranks "
                         f"{len(image_shape)} and {len(flow_shape)}")
    if flow_shape[1] not in (3, -1):
        raise ValueError(f"Warp3D flow must have 3 channels (d, h, w displacement in voxels), got {flow_shape}")
    for axis in (0, 2, 3, 4):
        a, b = image_shape[axis], flow_shape[axis]
        if a != -1 and b != -1 and a != b:
            raise ValueError(f"Warp3D image {tuple(image_shape)} and flow {tuple(flow_shape)} disagree on axis {axis}")
    if image_dtype not in DTYPES or flow_dtype not in DTYPES:
        raise ValueError(f"Warp3D supports dtypes {tuple(DTYPES)}, got image {image_dtype}, flow {flow_dtype}")
    if image_dtype != flow_dtype:
        raise ValueError(f"Warp3D image and flow must share one dtype, got {image_dtype} and {flow_dtype}")
    if add_self and image_shape[1] not in (3, -1):
        raise ValueError(f"Warp3D add_self=1 warps the flow by itself: the image must have 3 channels, got "
                         f"{tuple(image_shape)}")
    return tuple(image_shape), image_dtype


def launch_params(shape: tuple[int, int, int, int, int]) -> tuple[tuple[int, int, int], int, tuple[int, ...]]:
    """(grid (x, y, z), threads per block, extra int32 args (C, D, H, W)) for an image of `shape` (B, C, D, H, W).

    Grid x: one program per BLOCK voxels of one sample; y: the batch (program_id(1) in the kernel). The aot_impl
    builds the same expressions symbolically (trtp.cdiv on shape expressions)."""
    b, c, d, h, w = (int(v) for v in shape)
    if min(b, c, d, h, w) < 1:
        raise ValueError(f"Warp3D launch needs a non-empty (B, C, D, H, W), got {tuple(shape)}")
    if c * d * h * w >= 2**31:
        raise ValueError(f"Warp3D strides are int32: C*D*H*W must be < 2**31, got {c * d * h * w}")
    return (-(-d * h * w // BLOCK), b, 1), NUM_WARPS * 32, (c, d, h, w)


def _plugin_kernel():
    # Imported here: the kernel module imports Triton, and TRITON_INTERPRET must be decided before that.
    from deepsim_rt.export._warp3d_kernel import warp3d_plugin_kernel

    return warp3d_plugin_kernel


@dataclass(frozen=True)
class CompiledWarp:
    name: str          # the kernel's symbol in the PTX
    ptx: str
    num_warps: int
    shared: int        # bytes of shared memory per block
    arch: int


def compile_warp_ptx(dtype: str = "fp32", mode: str = "linear", padding: str = "border", add_self: bool = False,
                     arch: int | None = 90, warp_size: int = 32) -> CompiledWarp:
    """Compile the plugin kernel to PTX for CUDA compute capability `arch` (90 = H100/H200) without a GPU
    (explicit GPUTarget); arch=None compiles for the active device (inside aot_impl on the build machine).

    dtype "fp32" / "fp16" (image, flow and output pointers). Needs the real @triton.jit kernel: not under
    TRITON_INTERPRET=1 (ValueError then)."""
    import os

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {tuple(DTYPES.values())}, got {dtype!r}")
    _check_attrs(mode, padding, int(add_self))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ValueError("compile_warp_ptx needs the compiled Triton path; TRITON_INTERPRET=1 is set in this process")
    src = ASTSource(
        fn=_plugin_kernel(),
        signature={"img_ptr": f"*{dtype}", "flow_ptr": f"*{dtype}", "C": "i32", "D": "i32", "H": "i32", "W": "i32",
                   "out_ptr": f"*{dtype}", "BORDER": "constexpr", "NEAREST": "constexpr", "ADD_SELF": "constexpr",
                   "BLOCK": "constexpr"},
        constexprs={"BORDER": padding == "border", "NEAREST": mode == "nearest", "ADD_SELF": bool(add_self),
                    "BLOCK": BLOCK},
    )
    target = None if arch is None else GPUTarget("cuda", int(arch), int(warp_size))
    compiled = triton.compile(src, target=target, options={"num_warps": NUM_WARPS})
    # Triton >= 3.3 appends global / profile scratch pointers to every kernel's parameters; TensorRT's AOT launcher
    # passes only (inputs, extra args, outputs), so the kernel must not USE scratch memory (it does not: 0 bytes).
    for key in ("global_scratch_size", "profile_scratch_size"):
        if getattr(compiled.metadata, key, 0):
            raise ValueError(f"the Warp3D kernel needs {key}={getattr(compiled.metadata, key)}; TensorRT's AOT launch "
                             "cannot provide scratch memory")
    return CompiledWarp(name=compiled.metadata.name, ptx=compiled.asm["ptx"], num_warps=compiled.metadata.num_warps,
                        shared=compiled.metadata.shared, arch=int(arch) if arch is not None else -1)


def _trt_dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16"}
    if dtype not in names:
        raise ValueError(f"Warp3D supports float32 / float16 tensors, got {dtype}")
    return names[dtype]


def _static_dims(desc) -> tuple[int, ...]:
    """A TensorDesc's shape as ints, -1 where unknown: fake expressions at network definition (get_output_data_types),
    symbolic ones at shape calculation unless TensorRT knows them as constants (a static axis)."""
    dims = []
    for e in desc.shape_expr:
        known = not getattr(e, "is_fake", True) and e.is_constant
        dims.append(int(e.constant_value()) if known else -1)
    return tuple(dims)


# The tensorrt.plugin module this process registered Warp3D with (registration is once per plugin layer: a second
# @register of the same id raises in tensorrt.plugin).
_REGISTERED_WITH = None


def register_warp_plugin() -> None:
    """Register deepsim_rt::Warp3D with tensorrt.plugin in this process (idempotent). Needs TensorRT >= 10.9.

    After this, TensorRT's ONNX parser resolves "Warp3D" nodes to the plugin (AOT implementation: the kernel's
    PTX is compiled for the build machine's GPU and stored in the engine)."""
    global _REGISTERED_WITH
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if _REGISTERED_WITH is trtp:
        return

    # Annotations below are evaluated at definition (no PEP 563 in this module): tensorrt.plugin validates them.
    @trtp.register(PLUGIN_ID)
    def _warp3d_desc(image: trtp.TensorDesc, flow: trtp.TensorDesc, mode: str, padding: str,
                     add_self: INT_ATTR) -> tuple[trtp.TensorDesc]:
        # Shape and dtype checks at network definition (ranks known, sizes -1) and again at shape calculation
        # (static axes known), then "same as image".
        plugin_output(_static_dims(image), _trt_dtype_name(trt, image.dtype), _static_dims(flow),
                      _trt_dtype_name(trt, flow.dtype), _attr_str(mode), _attr_str(padding), _attr_int(add_self))
        return (image.like(),)

    @trtp.autotune(PLUGIN_ID)
    def _warp3d_autotune(image: trtp.TensorDesc, flow: trtp.TensorDesc,
                         outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        # Positions pair up option by option: (fp32, fp32, fp32) or (fp16, fp16, fp16), linear layout only.
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _warp3d_aot(image: trtp.TensorDesc, flow: trtp.TensorDesc, mode: str, padding: str, add_self: INT_ATTR,
                    outputs: tuple[trtp.TensorDesc], tactic: int
                    ) -> tuple[str, str, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dtype = DTYPES[_trt_dtype_name(trt, image.dtype)]
        # arch=None: the build machine's GPU
        kernel = compile_warp_ptx(dtype, _attr_str(mode), _attr_str(padding), bool(_attr_int(add_self)),
                                  arch=None)
        s = image.shape_expr  # (B, C, D, H, W), symbolic
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(s[2] * s[3] * s[4], BLOCK)
        launch.grid_y = s[0]
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        extra = trtp.SymIntExprs(4)
        for i, axis in enumerate((1, 2, 3, 4)):  # C, D, H, W, in the kernel's order
            extra[i] = trtp.SymInt32(s[axis])
        return kernel.name, kernel.ptx, launch, extra

    _REGISTERED_WITH = trtp
