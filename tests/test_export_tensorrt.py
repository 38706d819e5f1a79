"""TensorRT 10 / 11 without TensorRT: the strongly typed builder configuration against both API generations, no
removed API anywhere in the builder code, the Warp3D plugin's shape / dtype / launch logic, its kernel (Triton
interpreter vs the reference, and compiled to PTX for sm_90 with no GPU), the plugin and fp16 ONNX graphs.

What needs TensorRT and a GPU (building and running engines) is in tests/test_export_triton_trt.py and skips here
with the reason.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import warnings
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from deepsim_rt.export import tensorrt as trt_mod
from deepsim_rt.export import trt_plugin
from deepsim_rt.export.tensorrt import REMOVED_IN_TRT11, configure_builder, network_flags
from deepsim_rt.export.trt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, launch_params, plugin_output
from deepsim_rt.kernels import reference

warnings.filterwarnings("ignore", module=r"torch\.onnx.*")


# ---------------------------------------------------------------------------------------------------------------
# Builder configuration: TensorRT 10.x and 11.x API surfaces
# ---------------------------------------------------------------------------------------------------------------
class _Config:
    """Records what the builder code sets (stands in for IBuilderConfig: TensorRT cannot be installed here)."""

    def __init__(self) -> None:
        self.flags_set: list = []
        self.flags_cleared: list = []
        self.pools: dict = {}

    def set_flag(self, flag) -> None:
        self.flags_set.append(flag)

    def clear_flag(self, flag) -> None:
        self.flags_cleared.append(flag)

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[pool] = size


def _api(version: str):
    """The enum members the builder code may touch, per generation (NVIDIA's 10.x -> 11.x migration guide)."""
    flags = {"TF32": "TF32", "REFIT": "REFIT"}
    if version.startswith("10."):
        flags.update(FP16="FP16", BF16="BF16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY")
    return SimpleNamespace(__version__=version, BuilderFlag=SimpleNamespace(**flags),
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
                           MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"))


@pytest.mark.parametrize("version", ["10.9.0", "11.3.0"])
def test_builder_configuration_is_strongly_typed_on_10_and_11(version):
    trt = _api(version)
    assert network_flags(trt) == 1 << 1  # STRONGLY_TYPED: required on 10.x, accepted on 11.x
    cfg = _Config()
    done = configure_builder(trt, cfg, workspace_gib=0.5)
    assert cfg.flags_set == []  # no precision flag of any kind: the precision is in the graph
    assert cfg.flags_cleared == ["TF32"] and done["tf32"] == "off"
    assert cfg.pools == {"WORKSPACE": 1 << 29}
    # an 11.x without the creation flag at all (strong typing implied): still a valid call
    trt.NetworkDefinitionCreationFlag = SimpleNamespace()
    assert network_flags(trt) == 0


def _attribute_chains(source: str) -> set[str]:
    """Every dotted attribute access in `source` as 'A.B' (last two parts) and 'B' alone."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
            if isinstance(node.value, ast.Attribute):
                out.add(f"{node.value.attr}.{node.attr}")
            elif isinstance(node.value, ast.Name):
                out.add(f"{node.value.id}.{node.attr}")
    return out


def test_builder_code_uses_no_api_removed_in_tensorrt_11():
    """Issue 14: BuilderFlag.FP16 (used for fp16 engines until now) does not exist in TensorRT 11. Every attribute
    the TensorRT modules access is checked against the removed-API table; the table itself must keep the names
    the old code used, so this test fails on the code before this change."""
    for mod in (trt_mod, trt_plugin):
        used = _attribute_chains(inspect.getsource(mod))
        bad = sorted(name for name in REMOVED_IN_TRT11 if name in used)
        assert bad == [], f"{mod.__name__} uses APIs removed in TensorRT 11: {bad}"
    old_code = "config.set_flag(trt.BuilderFlag.FP16)\nconfig.clear_flag(trt.BuilderFlag.TF32)\n"
    assert [n for n in REMOVED_IN_TRT11 if n in _attribute_chains(old_code)] == ["BuilderFlag.FP16"]


@pytest.mark.skipif(trt_mod.tensorrt_unavailable_reason() is not None,
                    reason=f"checks names against the installed TensorRT: {trt_mod.tensorrt_unavailable_reason()}")
def test_builder_code_names_exist_in_installed_tensorrt():  # pragma: no cover - needs TensorRT
    import tensorrt as trt

    for name in ("MemoryPoolType.WORKSPACE", "NetworkDefinitionCreationFlag", "BuilderFlag"):
        obj = trt
        for part in name.split("."):
            obj = getattr(obj, part)


# ---------------------------------------------------------------------------------------------------------------
# The Warp3D plugin: shape / dtype logic, launch parameters, kernel numbers, PTX
# ---------------------------------------------------------------------------------------------------------------
def test_plugin_output_shapes_and_dtypes():
    assert plugin_output((2, 1, 9, 10, 11), "float32", (2, 3, 9, 10, 11), "float32") == ((2, 1, 9, 10, 11), "float32")
    assert plugin_output((-1, 3, -1, -1, -1), "float16", (-1, 3, -1, -1, -1), "float16", "linear", "zeros", 1)[1] \
        == "float16"
    bad = [
        (((2, 1, 9, 10), "float32", (2, 3, 9, 10), "float32"), "5D"),
        (((2, 1, 9, 10, 11), "float32", (2, 2, 9, 10, 11), "float32"), "3 channels"),
        (((2, 1, 9, 10, 11), "float32", (2, 3, 9, 10, 12), "float32"), "disagree on axis 4"),
        (((2, 1, 9, 10, 11), "float32", (2, 3, 9, 10, 11), "float16"), "share one dtype"),
        (((2, 1, 9, 10, 11), "int32", (2, 3, 9, 10, 11), "int32"), "supports dtypes"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            plugin_output(*args)
    with pytest.raises(ValueError, match="needs mode 'linear'"):
        plugin_output((1, 3, 4, 4, 4), "float32", (1, 3, 4, 4, 4), "float32", "nearest", "border", 1)
    with pytest.raises(ValueError, match="image must have 3 channels"):
        plugin_output((1, 1, 4, 4, 4), "float32", (1, 3, 4, 4, 4), "float32", "linear", "border", 1)
    with pytest.raises(ValueError, match="padding must be one of"):
        plugin_output((1, 1, 4, 4, 4), "float32", (1, 3, 4, 4, 4), "float32", "linear", "reflect", 0)


def test_launch_params():
    grid, threads, extra = launch_params((3, 2, 160, 192, 224))
    assert grid == (-(-160 * 192 * 224 // 256), 3, 1) and threads == 128 and extra == (2, 160, 192, 224)
    with pytest.raises(ValueError, match="int32"):
        launch_params((1, 3, 1024, 1024, 1024))


@pytest.mark.parametrize("mode,padding,add_self", [("linear", "border", 0), ("linear", "zeros", 0),
                                                   ("nearest", "border", 0), ("nearest", "zeros", 0),
                                                   ("linear", "border", 1)])
def test_plugin_kernel_matches_reference(mode, padding, add_self, rng):
    """The kernel TensorRT launches, with TensorRT's argument order (inputs, C, D, H, W, output) and the strides it
    derives, run by the Triton interpreter on the CPU, against the reference warp."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("runs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest without CUDA)")
    B, C, S = 2, (3 if add_self else 2), (5, 6, 7)
    flow = torch.randn(B, 3, *S, generator=rng) * 2.5
    image = flow.clone() if add_self else torch.rand(B, C, *S, generator=rng)
    out = torch.empty_like(image)
    grid, _threads, (c, d, h, w) = launch_params(tuple(image.shape))
    trt_plugin._plugin_kernel()[grid](image, flow, c, d, h, w, out, BORDER=padding == "border",
                                      NEAREST=mode == "nearest", ADD_SELF=bool(add_self), BLOCK=trt_plugin.BLOCK)
    want = reference.warp(image, flow, mode=mode, padding=padding) + (image if add_self else 0)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-6)


def test_plugin_kernel_compiles_to_ptx_for_sm90_without_a_gpu():
    """triton.compile with an explicit GPUTarget("cuda", 90, 32): the PTX TensorRT embeds, built on a machine with
    no GPU and no driver (a subprocess: this one runs the interpreter). Parameters in TensorRT's AOT order: two
    input pointers, four int32 scalars (C, D, H, W), the output pointer (then Triton's unused scratch pointers)."""
    code = ("from deepsim_rt.export.trt_plugin import compile_warp_ptx\n"
            "k = compile_warp_ptx('fp16', 'linear', 'zeros', add_self=False, arch=90)\n"
            "import re\n"
            "params = re.findall(r'\\.param \\.(u64|u32)', k.ptx.split('.entry', 1)[1].split(')', 1)[0])\n"
            "print('TARGET', '.target sm_90' in k.ptx, 'NAME', k.name, 'WARPS', k.num_warps)\n"
            "print('PARAMS', ','.join(params))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TARGET True NAME warp3d_plugin_kernel WARPS 4" in res.stdout
    params = res.stdout.split("PARAMS ")[1].split()[0].split(",")
    assert params[:7] == ["u64", "u64", "u32", "u32", "u32", "u32", "u64"], params


@pytest.mark.slow
def test_plugin_onnx_graph_has_one_node_per_warp(tmp_path):
    """The 3D serving graph for TensorRT: every warp (final + 2 integration steps) a deepsim_rt::Warp3D node with
    the attributes the plugin declares, no GridSample; the exported PyTorch side verified against the model."""
    import onnx

    from deepsim_rt.export.onnx import export_onnx
    from deepsim_rt.export.verify import FP32_TOL, random_regnet

    res = export_onnx(random_regnet(3, seed=12, integrate_steps=2), tmp_path / "p.onnx", target="tensorrt",
                      warp_op="trt_plugin")
    assert res.report.max_abs <= FP32_TOL and res.info.extra["warp_op"] == "trt_plugin"
    nodes = onnx.load(str(tmp_path / "p.onnx")).graph.node
    ops = Counter((n.domain, n.op_type) for n in nodes)
    assert ops[(PLUGIN_NAMESPACE, PLUGIN_NAME)] == 3 and ops[("", "GridSample")] == 0
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes
             if n.op_type == PLUGIN_NAME]
    assert sorted(a["add_self"] for a in attrs) == [0, 1, 1]
    assert all(a["plugin_namespace"] == b"deepsim_rt" and a["mode"] == b"linear" for a in attrs)
    with pytest.raises(ValueError, match="3D registration graphs built by TensorRT"):
        export_onnx(random_regnet(2), tmp_path / "q.onnx", warp_op="trt_plugin")


@pytest.mark.slow
def test_fp16_onnx_graph_runs_in_onnxruntime_cpu(tmp_path):
    """The fp16 graph a strongly typed TensorRT build takes: a float16 network between Casts, float32 I/O,
    verified in ONNX Runtime CPU (float16 nodes without a CPU kernel run through inserted fp32 casts) at the
    half-precision tolerance. bf16: ONNX Conv takes bfloat16 only from opset 22; refused below."""
    import onnx

    from deepsim_rt.export.onnx import export_onnx
    from deepsim_rt.export.verify import FP16_TOL, random_regnet

    model = random_regnet(2, seed=21)
    res = export_onnx(model, tmp_path / "h.onnx", precision="fp16", target="tensorrt")
    assert res.report.max_abs <= FP16_TOL and res.report.max_abs > 1e-5  # really half precision somewhere
    proto = onnx.load(str(tmp_path / "h.onnx"))
    conv_in = {i for n in proto.graph.node if n.op_type == "Conv" for i in n.input}
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    assert {inits[n] for n in conv_in if n in inits} == {onnx.TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    with pytest.raises(ValueError, match="bf16 ONNX graph needs opset >= 22"):
        export_onnx(model, tmp_path / "b.onnx", precision="bf16", opset=19)
