"""Half-precision exports of the bundled registration models: Dice on the bundled test pairs within 0.001 of fp32.

fp16 / bf16 put the network (U-Net + flow head) in half precision inside the graph, integration and warp in fp32
(export.precision). Measured here on the CPU where the runtime has kernels: ONNX fp16 through ONNX Runtime CPU
(float16 nodes without a CPU kernel run through inserted fp32 casts), AOTInductor fp16 / bf16 compiled for the
CPU. ONNX bf16 cannot run in ONNX Runtime CPU (no bfloat16 Conv kernel) and is not measured. Slow: every case is
an export (AOTInductor: a C++ compile of minutes on 2 shared cores). Figures: notes/h14.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from deepsim_rt.runtime import Registrator, bundled_model_path

warnings.filterwarnings("ignore", module=r"torch\.onnx.*")

DICE_TOL = 1e-3


def _dice_both(name: str, path) -> tuple[torch.Tensor, torch.Tensor]:
    from test_runtime_backends import _dice, _need_weights, _pairs

    from deepsim_rt.data.synthetic import num_classes

    _need_weights(name)
    pairs, ds = _pairs(name)
    k = num_classes(ds.config)
    eager = _dice(Registrator.load(name, backend="eager", device="cpu"), pairs, k)
    half = _dice(Registrator.load(path, device="cpu"), pairs, k)
    return eager, half


@pytest.mark.slow
@pytest.mark.parametrize("fmt,precision,name", [
    ("onnx", "fp16", "default-2d"), ("onnx", "fp16", "default-3d"),
    ("aoti", "fp16", "default-2d"), ("aoti", "bf16", "default-2d"),
])
def test_half_precision_export_keeps_dice(fmt, precision, name, tmp_path):
    ckpt = bundled_model_path(name)
    if fmt == "onnx":
        from deepsim_rt.export.onnx import export_onnx

        res = export_onnx(ckpt, tmp_path / "h.onnx", precision=precision)
    else:
        from deepsim_rt.export.aoti import export_aoti

        res = export_aoti(ckpt, tmp_path / "h.pt2", precision=precision)
    assert res.info.extra["precision"] == precision
    eager, half = _dice_both(name, res.path)
    diff = float((half - eager).abs().max())
    print(f"\n{fmt} {precision} {name}: per-pair foreground Dice fp32 {eager.tolist()} {precision} {half.tolist()} "
          f"max |diff| {diff:.5f}; verify max abs error {res.report.max_abs:.3e}")
    assert diff <= DICE_TOL
