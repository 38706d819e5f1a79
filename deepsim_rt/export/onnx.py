"""ONNX export (torch dynamo exporter) of the three artifacts, with metadata and built-in verification.

    result = export_onnx(model_or_checkpoint, "reg.onnx", artifact="registration")
    result.report.summary()      # measured max / mean abs error of every output vs PyTorch

Graph: exported from an eval-mode CPU copy with BatchNorm folded and dropout removed (wrappers.prepare_for_export);
dynamic batch and spatial axes, every spatial axis a symbolic multiple of the network's multiple (2**stages).
Opset: 20 for 3D (GridSample on 5D inputs exists from opset 20); 19 for 2D, because TensorRT's ONNX parser maps
opset-20 GridSample "linear" to nearest, so a 2D model meant for TensorRT must stay at <= 19 (ORT runs both).
Asking for target="tensorrt" with 2D opset 20 is refused. The registration model with integrate_steps > 0 contains
the unrolled scaling-and-squaring (steps x GridSample).

Writes are atomic: the model is exported, annotated and verified under a temporary name in the target directory
and renamed only when verification passed; a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepsim_rt.export.metadata import ArtifactInfo, build_metadata, io_names, parse_metadata
from deepsim_rt.export.verify import (
    FP32_TOL,
    VerifyReport,
    measure,
    random_image_pair,
    real_image_pair,
    verify_sizes,
)
from deepsim_rt.export.wrappers import prepare_for_export, wrap
from deepsim_rt.nn.checkpoint import atomic_write, file_sha256, load_model
from deepsim_rt.nn.config import NetConfig

__all__ = ["ExportError", "OnnxExport", "export_onnx", "read_onnx_info", "default_opset", "load_source",
           "example_inputs", "verification_cases", "ARTIFACT_MODEL_KINDS"]

# Which model kinds each artifact wraps.
ARTIFACT_MODEL_KINDS = {"registration": ("reg",), "features": ("seg", "ae"), "metric": ("seg", "ae")}
TARGETS = ("onnxruntime", "tensorrt")


class ExportError(ValueError):
    """An export failed (tracing, conversion, or verification above tolerance); nothing was written."""


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    info: ArtifactInfo
    opset: int
    report: VerifyReport | None
    seconds: float


def default_opset(ndim: int, target: str = "onnxruntime") -> int:
    """20 for 3D (5D GridSample); 19 for 2D (TensorRT's parser reads opset-20 linear GridSample as nearest)."""
    return 20 if ndim == 3 else 19


def load_source(model: nn.Module | str | os.PathLike, artifact: str,
                source_sha256: str | None = None) -> tuple[nn.Module, str]:
    """(model, sha256 of its checkpoint or "") from an nn.Module or a .safetensors path; checks the kind."""
    if artifact not in ARTIFACT_MODEL_KINDS:
        raise ValueError(f"artifact must be one of {tuple(ARTIFACT_MODEL_KINDS)}, got {artifact!r}")
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.suffix != ".safetensors":
            raise ValueError(f"export source must be a .safetensors checkpoint or an nn.Module, got {str(path)!r}")
        net = load_model(path, map_location="cpu")
        sha = file_sha256(path)
    elif isinstance(model, nn.Module):
        net, sha = model, ""
    else:
        raise ValueError(f"model must be an nn.Module or a checkpoint path, got {type(model).__name__}")
    cfg = getattr(net, "cfg", None)
    kinds = ARTIFACT_MODEL_KINDS[artifact]
    if not isinstance(cfg, NetConfig) or cfg.kind not in kinds:
        raise ValueError(f"a {artifact!r} artifact is built from a model of kind {kinds}, got "
                         f"{type(net).__name__} of kind {getattr(cfg, 'kind', None)!r}")
    return net, (source_sha256 if source_sha256 is not None else sha)


def example_inputs(cfg: NetConfig, artifact: str, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Trace-time example: batch 2 (a batch of 1 would be specialized), anisotropic multiples of the net multiple."""
    m = cfg.spatial_multiple
    size = (2 * m, 3 * m) if cfg.ndim == 2 else (2 * m, 3 * m, 2 * m)
    a, b = random_image_pair(size, batch=batch, channels=cfg.in_channels, seed=99)
    return (a,) if artifact == "features" else (a, b)


def dynamic_shapes(cfg: NetConfig, artifact: str) -> dict[str, dict[int, object]]:
    """Batch and every spatial axis dynamic; spatial axes are multiples of cfg.spatial_multiple."""
    from torch.export import Dim

    m = cfg.spatial_multiple
    batch = Dim("batch", min=1, max=4096)
    axes = ("d", "h", "w")[-cfg.ndim:]
    spatial = {2 + i: m * Dim(f"{ax}_div{m}", min=1, max=8192 // m) for i, ax in enumerate(axes)}
    spec = {0: batch, **spatial}
    names = io_names(artifact, len(cfg.enc_channels))[0]
    return {n: dict(spec) for n in names}


def verification_cases(cfg: NetConfig, artifact: str, export_size: tuple[int, ...]
                       ) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Random (batch 2) and real-anatomy (batch 1) inputs at sizes other than the export example's."""
    cases = []
    n_in = 1 if artifact == "features" else 2
    for k, size in enumerate(verify_sizes(cfg.ndim, cfg.spatial_multiple, export_size)):
        a, b = random_image_pair(size, batch=2, channels=cfg.in_channels, seed=1000 + k)
        cases.append((f"random b=2 {'x'.join(map(str, size))}", (a, b)[:n_in]))
        real = real_image_pair(size, channels=cfg.in_channels)
        if real is not None:
            cases.append((f"atlas b=1 {'x'.join(map(str, size))}", real[:n_in]))
    return cases


def _write_metadata(onnx_path: str, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(onnx_path)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "deepsim_rt"
    proto.doc_string = f"deepsim_rt {meta['artifact']} model ({meta['ndim']}D); see metadata_props"
    onnx.checker.check_model(proto)
    onnx.save(proto, onnx_path)


def export_onnx(model: nn.Module | str | os.PathLike, path: str | os.PathLike, *, artifact: str = "registration",
                opset: int | None = None, target: str = "onnxruntime", eps: float = 1e-6,
                source_sha256: str | None = None, verify: bool = True, tolerance: float = FP32_TOL,
                threads: int | None = None, graph: str = "full") -> OnnxExport:
    """Export `model` (nn.Module or .safetensors) as an ONNX `artifact` at `path` (.onnx), verified by ORT.

    artifact: "registration" (RegNet), "features" or "metric" (SegNet / AutoEncoder encoder; eps for the metric).
    opset: None -> default_opset(ndim). target: "onnxruntime" or "tensorrt" (2D then needs opset <= 19).
    verify: run ONNX Runtime (CPU) against PyTorch on random and atlas inputs at new sizes; raise ExportError
    when any output's max abs error exceeds `tolerance` (fp32: 1e-4). Returns OnnxExport with the report.
    graph: "full", or "flow" (registration only: outputs ("flow",), the head output before integration and warp;
    what a 3D TensorRT engine computes, see deepsim_rt.export.tensorrt).
    """
    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX output path must end in .onnx, got {str(path)!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    net, sha = load_source(model, artifact, source_sha256)
    cfg: NetConfig = net.cfg
    opset = default_opset(cfg.ndim, target) if opset is None else int(opset)
    if artifact == "registration" and cfg.ndim == 3 and opset < 20 and graph == "full":
        raise ValueError(f"a 3D registration model needs opset >= 20 (5D GridSample), got {opset}")
    if artifact == "registration" and cfg.ndim == 2 and target == "tensorrt" and opset >= 20:
        raise ValueError(f"a 2D registration model for TensorRT needs opset <= 19 (its parser turns opset-20 "
                         f"'linear' GridSample into nearest), got {opset}")
    if opset < 18:
        raise ValueError(f"the dynamo exporter emits opset >= 18, got {opset}")

    reference = wrap(prepare_reference(net), artifact, eps=eps, graph=graph)
    module = wrap(prepare_for_export(net), artifact, eps=eps, graph=graph)
    inputs, outputs = io_names(artifact, len(cfg.enc_channels))
    if graph == "flow":
        outputs = ("flow",)
    example = example_inputs(cfg, artifact)
    meta = build_metadata(artifact, cfg, source_sha256=sha, inputs=inputs, outputs=outputs,
                          extra={"opset": opset, "target": target, "eps": eps,
                                 "integrate_steps": cfg.integrate_steps, "padding": cfg.padding,
                                 "batchnorm": "folded", "tolerance": tolerance, "graph": graph})
    report: list[VerifyReport] = []

    def write(tmp: str) -> None:
        try:
            program = torch.onnx.export(module, example, dynamo=True, opset_version=opset,
                                        input_names=list(inputs), output_names=list(outputs),
                                        dynamic_shapes=dynamic_shapes(cfg, artifact), optimize=True,
                                        external_data=False, verbose=False, report=False)
            program.save(tmp, external_data=False)
        except Exception as exc:  # the exporter raises many types; report one clear error
            raise ExportError(f"ONNX export of the {artifact} model failed: {type(exc).__name__}: {exc}") from exc
        _write_metadata(tmp, meta)
        if verify:
            from deepsim_rt.export.ort import OrtRunner

            runner = OrtRunner(tmp, device="cpu", threads=threads, expect=artifact)
            cases = verification_cases(cfg, artifact, tuple(example[0].shape[2:]))
            ref_fn = reference if graph == "full" else (lambda *xs: (reference(*xs),))
            rep = measure(ref_fn, runner, cases, outputs, artifact=f"{artifact} ONNX (opset {opset})",
                          backend="onnxruntime CPU", tolerance=tolerance)
            rep.check()
            report.append(rep)

    try:
        atomic_write(path, write)
    except ExportError:
        raise
    except ValueError as exc:
        raise ExportError(f"ONNX export to {str(path)!r} failed: {exc}") from exc
    info = parse_metadata(meta, str(path), expect=artifact)
    return OnnxExport(path=path, info=info, opset=opset, report=report[0] if report else None,
                      seconds=time.perf_counter() - t0)


def prepare_reference(net: nn.Module) -> nn.Module:
    """The unmodified model, eval mode, CPU copy: what every export is compared against."""
    import copy

    return copy.deepcopy(net).cpu().eval()


def read_onnx_info(path: str | os.PathLike, expect: str | None = None) -> ArtifactInfo:
    """Metadata of an ONNX artifact (ValueError: missing / corrupt file, foreign or missing metadata)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX model not found: {str(path)!r}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ValueError(f"{str(path)!r} is not a readable ONNX model (corrupt or truncated?): {exc}") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    return parse_metadata(meta, str(path), expect=expect)
