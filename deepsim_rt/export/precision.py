"""Half-precision registration graphs, with the precision IN the graph (what TensorRT 11's strong typing needs).

    half = half_network(prepared_regnet, torch.float16)    # or torch.bfloat16
    half(moving, fixed) -> (warped, displacement), float32 in and out

The U-Net and flow head run in the half dtype (weights stored in it, explicit casts at its input and output); the
scaling-and-squaring integration and the warp stay float32: a half-precision sampling coordinate cannot address
voxel 200 of a brain volume to better than 0.125 (fp16) / 1 (bf16) voxel, and the warp is a memory-bound ~1 % of
the work. Exported to ONNX this gives Cast nodes around a float16 / bfloat16 network, which TensorRT 10 (with
NetworkDefinitionCreationFlag.STRONGLY_TYPED) and 11 (always strongly typed) build as written; no builder flag is
involved. AOTInductor compiles the same module.

Tolerances: half precision keeps ~3 significant digits (bf16 ~2), so the fp32 1e-4 contract cannot hold; the
exports are verified at FP16_TOL (2e-2 voxels / intensity units) for fp16 and BF16_TOL (5e-2) for bf16 on the
displacement and warped image, and the task-level figure is the Dice difference on the bundled test pairs
(tests/test_export_precision.py, notes/h14.md).
"""

from __future__ import annotations

import torch
from torch import nn

from deepsim_rt.export.verify import FP16_TOL, FP32_TOL
from deepsim_rt.nn.unet import RegNet

__all__ = ["HalfRegNet", "half_network", "precision_tolerance", "HALF_DTYPES"]

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# bf16 keeps 8 mantissa bits to fp16's 11 (eps 3.9e-3 vs 4.9e-4): the bundled 2D model's bf16 AOTI package measured
# 2.48e-2 max abs error on 'warped' (atlas case, raw range 3 units, i.e. 8e-3 of the range) vs fp32, above FP16_TOL.
BF16_TOL = 5e-2


def precision_tolerance(precision: str) -> float:
    """Max abs error an export of this precision is verified to: fp32 1e-4, fp16 FP16_TOL (2e-2), bf16 BF16_TOL
    (5e-2)."""
    if precision == "fp32":
        return FP32_TOL
    if precision == "fp16":
        return FP16_TOL
    if precision == "bf16":
        return BF16_TOL
    raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")


class HalfRegNet(nn.Module):
    """A RegNet whose network runs in `dtype`; integration and warp in float32; float32 in, float32 out."""

    def __init__(self, regnet: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in HALF_DTYPES.values():
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.net = regnet.to(dtype)
        self.cfg = regnet.cfg
        self.dtype = dtype

    def head_flow(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.net.head_flow(moving.to(self.dtype), fixed.to(self.dtype)).float()

    # RegNet's own integration + warp on top of this head_flow (float32 out): one definition of the model's math.
    displacement = RegNet.displacement
    forward = RegNet.forward


def half_network(regnet: nn.Module, dtype: torch.dtype) -> HalfRegNet:
    """Wrap a prepared (wrappers.prepare_for_export) RegNet; its weights are converted in place."""
    cfg = getattr(regnet, "cfg", None)
    if getattr(cfg, "kind", None) != "reg":
        raise ValueError(f"half-precision graphs exist for registration models, got config kind "
                         f"{getattr(cfg, 'kind', None)!r}")
    return HalfRegNet(regnet, dtype)
