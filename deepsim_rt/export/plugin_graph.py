"""Registration graphs whose warps are TensorRT plugin nodes (deepsim_rt::Warp3D) instead of ONNX GridSample.

    module = PluginWarpRegNet(prepared_regnet)       # same numbers as the RegNet, in PyTorch, on the CPU
    export_onnx(model, "reg3d-trt.onnx", target="tensorrt", warp_op="trt_plugin")

Every warp of the model (the final image warp and each scaling-and-squaring step) goes through the torch custom op
`deepsim_rt_export::warp3d` (CPU implementation: deepsim_rt.kernels.reference.warp, so the module is checkable here),
which the ONNX exporter translates into a node op_type "Warp3D", domain "deepsim_rt", attributes mode / padding /
add_self and the plugin_namespace / plugin_version TensorRT's ONNX parser uses to find the plugin
(export.trt_plugin). ONNX Runtime cannot run such a graph (no kernel for the node); TensorRT builds it as one engine.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from deepsim_rt.export.trt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = ["PluginWarpRegNet", "warp3d_op", "onnx_translation_table"]


@functools.cache
def warp3d_op():
    """The torch custom op deepsim_rt_export::warp3d(image, flow, mode, padding, add_self) (registered once)."""
    from deepsim_rt.kernels import reference

    @torch.library.custom_op("deepsim_rt_export::warp3d", mutates_args=())
    def _warp3d(image: torch.Tensor, flow: torch.Tensor, mode: str, padding: str, add_self: int) -> torch.Tensor:
        out = reference.warp(image, flow, mode=mode, padding=padding)
        return out + image if add_self else out

    @_warp3d.register_fake
    def _(image, flow, mode, padding, add_self):
        return torch.empty_like(image)

    return _warp3d


def onnx_translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: the custom op -> one "Warp3D" node (domain deepsim_rt)."""
    import onnxscript
    from onnx.defs import OpSchema

    # A schema for the exporter's own bookkeeping (never registered with onnx): inputs, output, attributes.
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    schema = OpSchema(
        PLUGIN_NAME, PLUGIN_NAMESPACE, 1, doc="deepsim_rt 3D warp, a TensorRT plugin (deepsim_rt.export.trt_plugin)",
        inputs=[param("image", "T"), param("flow", "T")], outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16, one dtype")],
        attributes=[attr("mode", OpSchema.AttrType.STRING, "linear | nearest"),
                    attr("padding", OpSchema.AttrType.STRING, "border | zeros"),
                    attr("add_self", OpSchema.AttrType.INT, "1: return u + warp(u, u)"),
                    attr("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                    attr("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version")])
    node = onnxscript.values.Op(onnxscript.values.Opset(domain=PLUGIN_NAMESPACE, version=1), PLUGIN_NAME, schema)

    def warp3d_onnx(image, flow, mode: str, padding: str, add_self: int):
        return node(image, flow, mode=mode, padding=padding, add_self=add_self, plugin_namespace=PLUGIN_NAMESPACE,
                    plugin_version=PLUGIN_VERSION)

    return {warp3d_op()._opoverload: warp3d_onnx}


class PluginWarpRegNet(nn.Module):
    """A RegNet (or export.precision.HalfRegNet) whose integration and warp are Warp3D ops; same I/O as RegNet.

    Integration: u = v / 2**steps, then `steps` times u = u + warp(u, u) (the add_self plugin call), exactly
    deepsim_rt.kernels.reference.integrate. Flow and warp in float32 (the network may be half precision).
    """

    def __init__(self, regnet: nn.Module) -> None:
        super().__init__()
        if regnet.cfg.ndim != 3:
            raise ValueError(f"the Warp3D plugin is for 3D models (2D ones use TensorRT's GridSample), got ndim "
                             f"{regnet.cfg.ndim}")
        self.net = regnet
        self.cfg = regnet.cfg

    def head_flow(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.net.head_flow(moving, fixed).float()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        op = warp3d_op()
        steps, padding = self.cfg.integrate_steps, self.cfg.padding
        u = self.head_flow(moving, fixed)
        if steps > 0:
            u = u / (2.0**steps)
            for _ in range(steps):
                u = op(u, u, "linear", padding, 1)
        return op(moving.float(), u, "linear", padding, 0), u
