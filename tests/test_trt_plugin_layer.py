"""The Warp3D TensorRT plugin against the REAL `tensorrt.plugin` Python layer of TensorRT 10.9, 10.16, 11.1 and 11.4
(issue 18 #2), with only the native `tensorrt` extension module stood in for (no libnvinfer, no GPU here).

That layer is what a TensorRT machine runs around our plugin: it validates the @register / @autotune / @aot_impl
functions (annotations read with inspect + issubclass), its plugin creator decodes the attributes the ONNX parser
hands over (a string arrives as its bytes + the terminating NUL, onnx/onnx-tensorrt#921), and its plugin class
drives our functions at network definition (output dtypes), shape calculation (output shapes), format selection
(autotune) and engine build (aot_impl: kernel, launch grid, extra scalar arguments). Each test goes through that
code; the symbolic shape arithmetic runs on a small integer expression builder (FakeBuilder), so the launch grid
TensorRT would get is checked as numbers against the plain-Python `launch_params`.

Before the fix every version refused the plugin: TypeError (10.9-11.1) / ValueError (11.4) on the PEP 563 string
annotations, "No return annotation found for aot_impl function", then mode='linear\\x00' rejected.

The layer's files come from `make trt-bindings` (tools/fetch_trt_bindings.py: pip download of the bindings wheels,
only tensorrt_bindings/plugin/*.py unpacked to .whl/trt_bindings/); a version that could not be fetched skips with
the fetch's reason. ~1 s for all versions.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from deepsim_rt.export import trt_plugin

_spec = importlib.util.spec_from_file_location(
    "fetch_trt_bindings", Path(__file__).resolve().parents[1] / "tools" / "fetch_trt_bindings.py")
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)


# --------------------------------------------------------------------------------------------------------------
# A stand-in for the native `tensorrt` module: enums are distinct named classes; the few value types the plugin
# layer constructs or indexes (Dims, DimsExprs, PluginField, tensor descriptors) are small real classes.
# --------------------------------------------------------------------------------------------------------------
class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        v = _named(name)
        setattr(cls, name, v)
        return v

    def __repr__(cls):
        return f"trt.{cls.__name__}"


def _inst_getattr(self, name):
    if name.startswith("__"):
        raise AttributeError(name)
    return lambda *a, **k: None


def _named(name):
    return _Meta(name, (), {"__init__": lambda self, *a, **k: None, "__getattr__": _inst_getattr})


def _stub_tensorrt(plugin_parent: Path, version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__path__ = [str(plugin_parent)]  # `import tensorrt.plugin` finds the real package there
    trt.__version__ = version

    class Dims(tuple):
        MAX_DIMS = 8

    class DimsExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    class PluginField:
        def __init__(self, name="", data=None, type=None):
            self.name, self.data, self.type = name, data, type

    class PluginFieldCollection(list):
        pass

    class PluginTensorDesc:
        def __init__(self):
            self.dims, self.type, self.format, self.scale = Dims(), None, None, 1.0

    class DynamicPluginTensorDesc:
        def __init__(self, dims=(), type=None, format=None):
            self.desc = PluginTensorDesc()
            self.desc.dims, self.desc.type, self.desc.format = Dims(dims), type, format
            self.min = self.max = self.opt = Dims(dims)

    class Registry:
        def __init__(self):
            self.creators = {}

        def register_creator(self, creator, namespace):
            self.creators[(creator.name, namespace)] = creator
            return True

        def get_creator(self, name, version, namespace):
            return self.creators.get((name, namespace))

    registry = Registry()
    dtype = _named("DataType")
    for name, attr in (("float32", "FLOAT"), ("float16", "HALF"), ("int8", "INT8"), ("int32", "INT32"),
                       ("bfloat16", "BF16")):
        setattr(trt, name, getattr(dtype, attr))  # trt.float32 IS trt.DataType.FLOAT, as in TensorRT
    trt.DataType = dtype
    trt.Dims, trt.DimsExprs, trt.PluginField = Dims, DimsExprs, PluginField
    trt.PluginFieldCollection, trt.PluginTensorDesc = PluginFieldCollection, PluginTensorDesc
    trt.DynamicPluginTensorDesc = DynamicPluginTensorDesc
    trt.get_plugin_registry = lambda: registry
    trt.registry = registry

    def _mod_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        v = _named(name)
        setattr(trt, name, v)
        return v

    trt.__getattr__ = _mod_getattr
    return trt


class FakeBuilder:
    """trt.IExprBuilder over integers: what TensorRT's shape calculation does, with every size known."""

    def __init__(self, trt):
        class Dim(trt.IDimensionExpr):
            def __init__(self, value):
                self.value = int(value)

            def is_constant(self):
                return True

            def get_constant_value(self):
                return self.value

        self.Dim = Dim

    def constant(self, value):
        return self.Dim(value)

    def operation(self, op, a, b):
        x, y = a.value, b.value
        fn = {"SUM": lambda: x + y, "PROD": lambda: x * y, "SUB": lambda: x - y, "MAX": lambda: max(x, y),
              "MIN": lambda: min(x, y), "FLOOR_DIV": lambda: x // y, "CEIL_DIV": lambda: -(-x // y)}
        return self.Dim(fn[op.__name__]())


@pytest.fixture(params=fetch.VERSIONS)
def layer(request, monkeypatch):
    """(trt stub, the real tensorrt.plugin of one version) installed as `tensorrt` for one test, then removed."""
    version = request.param
    why = fetch.missing_reason(version)
    if why is not None:
        pytest.skip(why)
    saved = {k: v for k, v in sys.modules.items() if k == "tensorrt" or k.startswith("tensorrt.")}
    for k in saved:
        del sys.modules[k]
    trt = _stub_tensorrt(fetch.plugin_parent(version), version)
    sys.modules["tensorrt"] = trt
    monkeypatch.setattr(trt_plugin, "_REGISTERED_WITH", None)
    try:
        with warnings.catch_warnings():  # the layer's docstrings hold invalid escapes ('\s'): compile warnings
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            import tensorrt.plugin as trtp

        assert Path(trtp.__file__).is_relative_to(fetch.plugin_parent(version)), trtp.__file__
        yield trt, trtp
    finally:
        for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _registered(trt, trtp):
    trt_plugin.register_warp_plugin()
    desc = sys.modules["tensorrt.plugin._lib"].QDP_REGISTRY[trt_plugin.PLUGIN_ID]
    creator = trt.registry.get_creator(trt_plugin.PLUGIN_NAME, "1", trt_plugin.PLUGIN_NAMESPACE)
    return desc, creator


def _parser_fields(trt, creator, mode="linear", padding="border", add_self=0):
    """The attributes as TensorRT's ONNX parser hands them to the creator (onnx-tensorrt loadFields): only the
    creator's declared field names, in its order; a STRING attribute as kCHAR data of len + 1 bytes (the NUL
    included), an INT attribute as one int32."""
    values = {"mode": mode.encode() + b"\0", "padding": padding.encode() + b"\0", "add_self": add_self}
    out = []
    for f in creator.field_names:
        v = values[f.name]
        data = np.frombuffer(v, dtype=np.int8) if isinstance(v, bytes) else np.array([v], dtype=np.int32)
        out.append(trt.PluginField(f.name, data))
    return out


def _plugin(trt, **attrs):
    desc, creator = _registered(trt, sys.modules["tensorrt.plugin"])
    qpcr = trt.QuickPluginCreationRequest.UNKNOWN  # no `aot` attribute: the parser expresses no preference
    return creator.create_plugin(trt_plugin.PLUGIN_NAME, trt_plugin.PLUGIN_NAMESPACE,
                                 _parser_fields(trt, creator, **attrs), trt.TensorRTPhase.BUILD, qpcr)


def test_registers_with_the_real_layer(layer):
    trt, trtp = layer
    desc, creator = _registered(trt, trtp)
    trt_plugin.register_warp_plugin()  # idempotent: a second @register of the id would raise in tensorrt.plugin
    assert desc.input_tensor_names == ["image", "flow"] and desc.num_outputs == 1
    # add_self is a 1-element int32 array attribute: as `int`, TensorRT < 11.4 decodes it with int(array), a
    # TypeError under numpy >= 2.4 (seen here on 10.9 / 10.16 / 11.1)
    assert desc.input_attrs == {"mode": str, "padding": str, "add_self": trt_plugin.INT_ATTR}
    assert desc.aot_impl_func is not None and desc.impl_func is None and desc.autotune_func is not None
    # the creator declares exactly the attributes the parser will forward (never plugin_namespace / _version)
    assert creator is not None and [f.name for f in creator.field_names] == ["mode", "padding", "add_self"]
    assert hasattr(trtp.op.deepsim_rt, "Warp3D")


def test_parser_attributes_reach_the_plugin_without_nul_and_pick_aot(layer):
    trt, trtp = layer
    plg = _plugin(trt, mode="nearest", padding="zeros")
    assert type(plg).__name__ == "_TemplateAOTPlugin"
    assert plg.attrs["mode"] in ("nearest", "nearest\x00")  # as the layer decodes it (NUL kept, onnx-tensorrt#921)
    assert trt_plugin._attr_int(plg.attrs["add_self"]) == 0
    assert plg.get_output_data_types([trt.float32, trt.float32], [5, 5]) == [trt.float32]
    assert plg.get_output_data_types([trt.float16, trt.float16], [5, 5]) == [trt.float16]
    self_step = _plugin(trt, add_self=1)  # the scaling-and-squaring step
    assert self_step.get_output_data_types([trt.float32, trt.float32], [5, 5]) == [trt.float32]


@pytest.mark.parametrize("attrs,types,ranks,match", [
    ({}, ("float32", "float16"), (5, 5), "share one dtype"),
    ({}, ("int8", "int8"), (5, 5), "float32 / float16"),
    ({}, ("float32", "float32"), (4, 4), "5D image"),
    ({"mode": "cubic"}, ("float32", "float32"), (5, 5), "mode must be one of .* got 'cubic'"),
    ({"padding": "reflect"}, ("float32", "float32"), (5, 5), "padding must be one of"),
    ({"mode": "nearest", "add_self": 1}, ("float32", "float32"), (5, 5), "needs mode 'linear'"),
])
def test_network_definition_errors_name_the_problem(layer, attrs, types, ranks, match):
    trt, _ = layer
    plg = _plugin(trt, **attrs)
    with pytest.raises(ValueError, match=match):
        plg.get_output_data_types([getattr(trt, t) for t in types], list(ranks))


def _in_out(trt, image, flow, dtype):
    return [trt.DynamicPluginTensorDesc(s, dtype, trt.TensorFormat.LINEAR) for s in (image, flow, image)]


def test_shapes_formats_and_aot_launch_through_the_layer(layer, monkeypatch):
    """Shape calculation, format selection and the AOT build step as TensorRT calls them, sizes known: the output
    has the image's shape, the formats are (fp32 x3 | fp16 x3) linear, the kernel is compiled for the decoded
    attributes, and the launch grid / extra arguments equal launch_params() of the same shape."""
    trt, trtp = layer
    compiled = []

    def fake_compile(dtype, mode, padding, add_self, arch):  # the real PTX compile is tested in test_export_tensorrt
        compiled.append((dtype, mode, padding, add_self, arch))
        return trt_plugin.CompiledWarp("warp3d_kernel", ".version 8.0", 4, 0, 90)

    monkeypatch.setattr(trt_plugin, "compile_warp_ptx", fake_compile)
    image, flow = (2, 1, 13, 21, 29), (2, 3, 13, 21, 29)
    plg = _plugin(trt, padding="zeros")
    plg.get_output_data_types([trt.float16, trt.float16], [5, 5])
    b = FakeBuilder(trt)
    out = plg.get_output_shapes([[b.Dim(v) for v in image], [b.Dim(v) for v in flow]], [], b)
    assert [[e.get_constant_value() for e in o] for o in out] == [list(image)]
    in_out = _in_out(trt, image, flow, trt.float16)
    combos = plg.get_supported_format_combinations(in_out, 2)
    assert [c.type for c in combos] == [trt.float32] * 3 + [trt.float16] * 3
    assert {c.format for c in combos} == {trt.TensorFormat.LINEAR}
    plg.configure_plugin(in_out[:2], in_out[2:])
    plg.set_tactic(0)

    class Launch:
        pass

    class Setter(dict):
        nbSymExprs = 0

    launch, setter = Launch(), Setter()
    plg.get_launch_params([[b.Dim(v) for v in s] for s in (image, flow)], in_out, 2, launch, setter, b)
    assert compiled == [("fp16", "linear", "zeros", False, None)]  # NUL gone; arch None = the build machine's GPU
    grid, threads, extra = trt_plugin.launch_params(image)
    got = tuple(getattr(launch, f"grid_{a}").expr.value for a in "xyz")
    assert got == grid == (math.ceil(13 * 21 * 29 / 256), 2, 1)
    assert launch.block_x.expr.value == threads == 128 and launch.shared_mem.expr.value == 0
    assert setter.nbSymExprs == 4 and tuple(setter[i].expr.value for i in range(4)) == extra == (1, 13, 21, 29)
    assert all(setter[i].dtype is trt.PluginArgDataType.INT32 for i in range(4))
    name, ptx = plg.get_kernel([d.desc for d in in_out[:2]], [in_out[2].desc])  # at run time: PluginTensorDescs
    assert name == "warp3d_kernel" and ptx == b".version 8.0"


def test_static_shapes_are_checked_at_shape_calculation(layer):
    """Where TensorRT knows an axis as a constant, a flow that cannot pair with the image fails the build with the
    plugin's message (at network definition the sizes are unknown: only ranks and dtypes are checked)."""
    trt, _ = layer
    plg = _plugin(trt)
    plg.get_output_data_types([trt.float32, trt.float32], [5, 5])
    b = FakeBuilder(trt)
    with pytest.raises(ValueError, match="flow must have 3 channels"):
        plg.get_output_shapes([[b.Dim(v) for v in (1, 1, 9, 9, 9)], [b.Dim(v) for v in (1, 2, 9, 9, 9)]], [], b)
    with pytest.raises(ValueError, match="disagree on axis 3"):
        plg.get_output_shapes([[b.Dim(v) for v in (1, 1, 9, 9, 9)], [b.Dim(v) for v in (1, 3, 9, 8, 9)]], [], b)


def test_attr_str_drops_only_trailing_nuls():
    assert trt_plugin._attr_str("linear\x00") == "linear" and trt_plugin._attr_str(b"border\x00\x00") == "border"
    assert trt_plugin._attr_str("nearest") == "nearest"
    with pytest.raises(ValueError, match="mode must be one of"):
        trt_plugin.plugin_output((1, 1, 9, 9, 9), "float32", (1, 3, 9, 9, 9), "float32", "li\x00near")
