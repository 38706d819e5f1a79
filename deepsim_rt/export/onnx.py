"""ONNX export (torch dynamo exporter) of the three artifacts, with metadata and built-in verification.

    result = export_onnx(model_or_checkpoint, "reg.onnx", artifact="registration")
    result.report.summary()      # measured max / mean abs error of every output vs PyTorch

Graph: exported from an eval-mode CPU copy with BatchNorm folded and dropout removed (wrappers.prepare_for_export);
dynamic batch and spatial axes. graph="serving" (the registration default): raw float32 images of ANY size in,
normalization / padding / crop / intensity mapping inside the graph (export.serving), verified at odd sizes with raw
intensities; graph="full": the network on normalized inputs, every spatial axis a symbolic multiple of the
network's multiple (2**stages); graph="flow": the registration head only.
Opset: the requested opset must be one the exporter writes: the file's own opset_import is read back and compared
(an exporter silently writing another opset is an ExportError), and the metadata stores the file's opset.
 20 for 3D (GridSample on 5D inputs exists from opset 20); 19 for 2D, because TensorRT's ONNX parser maps
opset-20 GridSample "linear" to nearest, so a 2D model meant for TensorRT must stay at <= 19 (ORT runs both).
Asking for target="tensorrt" with 2D opset 20 is refused. The registration model with integrate_steps > 0 contains
the unrolled scaling-and-squaring (steps x GridSample).

Writes are atomic: the model is exported, annotated and verified under a temporary name in the target directory
and renamed only when verification passed; a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepsim_rt._io import file_sha256
from deepsim_rt.export.metadata import ArtifactInfo, build_metadata, io_names, parse_metadata
from deepsim_rt.export.verify import (
    VerifyReport,
    measure,
    random_image_pair,
    real_image_pair,
    verify_sizes,
)
from deepsim_rt.export.wrappers import GRAPHS, default_graph, prepare_for_export, wrap
from deepsim_rt.nn.checkpoint import atomic_write, load_model
from deepsim_rt.nn.config import NetConfig

__all__ = ["ExportError", "OnnxExport", "export_onnx", "read_onnx_info", "default_opset", "load_source",
           "example_inputs", "verification_cases", "ARTIFACT_MODEL_KINDS", "source_extra", "check_opset",
           "MIN_OPSET", "file_opset"]

# Which model kinds each artifact wraps.
ARTIFACT_MODEL_KINDS = {"registration": ("reg",), "features": ("seg", "ae"), "metric": ("seg", "ae")}
TARGETS = ("onnxruntime", "tensorrt")
# How the registration graph warps: ONNX GridSample (ORT; TensorRT in 2D) or the deepsim_rt::Warp3D TensorRT plugin
# node (3D TensorRT: IGridSampleLayer is 2D only; export.plugin_graph / export.trt_plugin).
WARP_OPS = ("gridsample", "trt_plugin")
# The dynamo exporter (torch >= 2.6) emits opset 18 and converts upward; below 18 it cannot.
MIN_OPSET = 18


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


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package knows (1.23: 26)."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    """ValueError unless MIN_OPSET <= opset <= max_opset() (an int)."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"opset must be an int, got {opset!r}")
    hi = max_opset()
    if not MIN_OPSET <= opset <= hi:
        raise ValueError(f"opset must be between {MIN_OPSET} (the dynamo exporter's lowest) and {hi} (the newest "
                         f"the installed onnx knows), got {opset}")
    return opset


def file_opset(path: str | os.PathLike) -> int:
    """The default-domain ("" / ai.onnx) opset an ONNX file declares."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return int({o.domain: o.version for o in proto.opset_import}.get("", 0))


def source_extra(model: nn.Module | str | os.PathLike) -> dict:
    """Training facts of a checkpoint to carry into every artifact's metadata extra: {"spacing_mm": [...],
    "train_grid": [...]} where the checkpoint records them (nn.checkpoint.read_scale), else {}."""
    if not isinstance(model, str | os.PathLike):
        return {}
    from deepsim_rt.nn.checkpoint import read_scale

    spacing, grid = read_scale(model)
    out: dict = {}
    if spacing is not None:
        out["spacing_mm"] = list(spacing)
    if grid is not None:
        out["train_grid"] = list(grid)
    return out


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter's internal chatter is not the user's business (issue 11 #8 saw it on every
    `--backend onnxruntime` call): its "torchvision is not installed" log lines and its axis-renaming /
    deprecation warnings are silenced for the duration of the export; errors still raise."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


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


def _raw(x: torch.Tensor, k: int) -> torch.Tensor:
    # Raw-intensity stand-ins for a serving graph: another offset and range per image, neither [0, 1]. Ranges of a
    # few units keep the absolute tolerance meaningful for 'warped' (in the moving image's units: an fp32 ulp at
    # 1000 is 6e-5, so a 0-1000 image could not be held to 1e-4 absolute); tests check 0-100 images relative to
    # their range.
    return x * (2.0 + k) + (1.0 - 2.0 * k)


def example_inputs(cfg: NetConfig, artifact: str, batch: int = 2, graph: str = "full") -> tuple[torch.Tensor, ...]:
    """Trace-time example: batch 2 (a batch of 1 would be specialized), anisotropic multiples of the net multiple;
    for a serving graph odd sizes (no axis a multiple, none equal) and raw intensities."""
    m = cfg.spatial_multiple
    if graph == "serving":
        size = (2 * m + 3, 3 * m - 1) if cfg.ndim == 2 else (2 * m + 3, 3 * m - 1, 2 * m + 1)
    else:
        size = (2 * m, 3 * m) if cfg.ndim == 2 else (2 * m, 3 * m, 2 * m)
    a, b = random_image_pair(size, batch=batch, channels=cfg.in_channels, seed=99)
    if graph == "serving":
        a, b = _raw(a, 0), _raw(b, 1)
    return (a,) if artifact == "features" else (a, b)


def dynamic_shapes(cfg: NetConfig, artifact: str, graph: str = "full") -> dict[str, dict[int, object]]:
    """Batch and every spatial axis dynamic; spatial axes are multiples of cfg.spatial_multiple, except in a
    serving graph: any size from m + 1 (padded to >= 2m: the network's shape guards exclude a padded size of m,
    whose coarsest level would be one voxel wide) up to 8192."""
    from torch.export import Dim

    m = cfg.spatial_multiple
    batch = Dim("batch", min=1, max=4096)
    axes = ("d", "h", "w")[-cfg.ndim:]
    if graph == "serving":
        spatial = {2 + i: Dim(ax, min=m + 1, max=8192) for i, ax in enumerate(axes)}
    else:
        spatial = {2 + i: m * Dim(f"{ax}_div{m}", min=1, max=8192 // m) for i, ax in enumerate(axes)}
    spec = {0: batch, **spatial}
    names = io_names(artifact, len(cfg.enc_channels))[0]
    return {n: dict(spec) for n in names}


def verification_cases(cfg: NetConfig, artifact: str, export_size: tuple[int, ...], graph: str = "full"
                       ) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Random (batch 2) and real-anatomy (batch 1) inputs at sizes other than the export example's; for a serving
    graph at odd sizes (each axis 3 voxels short of a multiple) with raw intensities."""
    cases = []
    n_in = 1 if artifact == "features" else 2
    for k, size in enumerate(verify_sizes(cfg.ndim, cfg.spatial_multiple, export_size)):
        if graph == "serving":
            size = tuple(s - 3 for s in size)
        a, b = random_image_pair(size, batch=2, channels=cfg.in_channels, seed=1000 + k)
        real = real_image_pair(size, channels=cfg.in_channels)
        if graph == "serving":
            a, b = _raw(a, 0), _raw(b, 1)
            real = None if real is None else (_raw(real[0], 1), _raw(real[1], 0))
        tag = "raw " if graph == "serving" else ""
        cases.append((f"random {tag}b=2 {'x'.join(map(str, size))}", (a, b)[:n_in]))
        if real is not None:
            cases.append((f"atlas {tag}b=1 {'x'.join(map(str, size))}", real[:n_in]))
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
                source_sha256: str | None = None, verify: bool = True, tolerance: float | None = None,
                threads: int | None = None, graph: str | None = None, precision: str = "fp32",
                warp_op: str = "gridsample") -> OnnxExport:
    """Export `model` (nn.Module or .safetensors) as an ONNX `artifact` at `path` (.onnx), verified by ORT.

    artifact: "registration" (RegNet), "features" or "metric" (SegNet / AutoEncoder encoder; eps for the metric).
    opset: None -> default_opset(ndim); else MIN_OPSET..max_opset(), and the written file must declare it.
    target: "onnxruntime" or "tensorrt" (2D then needs opset <= 19).
    verify: run ONNX Runtime (CPU) against PyTorch on random and atlas inputs at new sizes; raise ExportError
    when any output's max abs error exceeds `tolerance` (None: fp32 1e-4, fp16/bf16 FP16_TOL). Returns OnnxExport
    with the report. precision: "fp32", or "fp16" / "bf16" (registration: the network in half precision with
    explicit Casts, integration and warp float32, I/O float32: the graph TensorRT builds strongly typed; see
    export.precision). ONNX Runtime's CPU provider runs float16 nodes it has no kernel for through inserted
    fp32 casts; bfloat16 Conv has no CPU kernel at all, so a bf16 export can only be verified with verify=False
    here (ExportError otherwise, naming the missing kernel); ONNX Conv takes bfloat16 from opset 22 only, so
    precision="bf16" needs opset >= 22 (ValueError otherwise). warp_op: "gridsample", or "trt_plugin" (3D,
    target="tensorrt": every warp a deepsim_rt::Warp3D plugin node, export.plugin_graph; ONNX Runtime cannot run it,
    so verification compares the PyTorch module with the same ops against the model and checks the graph's nodes).
    graph: None -> "serving" for registration (raw images of any size, see export.serving), "full" otherwise;
    "full" (the network on normalized, padded inputs), or "flow" (registration only: outputs ("flow",), the head
    output before integration and warp). Checkpoint "spacing_mm" / "train_grid" go into the metadata extra.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX output path must end in .onnx, got {str(path)!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    graph = default_graph(artifact) if graph is None else graph
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    from deepsim_rt.export.precision import HALF_DTYPES, half_network, precision_tolerance

    tolerance = precision_tolerance(precision) if tolerance is None else tolerance
    if precision != "fp32" and artifact != "registration":
        raise ValueError(f"precision {precision!r} exists for the registration artifact only, got {artifact!r}")
    net, sha = load_source(model, artifact, source_sha256)
    cfg: NetConfig = net.cfg
    if warp_op not in WARP_OPS:
        raise ValueError(f"warp_op must be one of {WARP_OPS}, got {warp_op!r}")
    if warp_op == "trt_plugin" and (artifact != "registration" or cfg.ndim != 3 or target != "tensorrt"
                                    or graph == "flow"):
        raise ValueError("warp_op='trt_plugin' is for 3D registration graphs built by TensorRT (target='tensorrt', "
                         f"graph 'serving' or 'full'), got {artifact} {cfg.ndim}D target={target!r} graph={graph!r}")
    if precision == "bf16" and opset is None:
        opset = 22
    opset = default_opset(cfg.ndim, target) if opset is None else check_opset(opset)
    if precision == "bf16" and opset < 22:
        raise ValueError(f"a bf16 ONNX graph needs opset >= 22 (ONNX Conv takes bfloat16 from opset 22), got {opset}")
    if artifact == "registration" and cfg.ndim == 3 and opset < 20 and graph != "flow" and warp_op == "gridsample":
        raise ValueError(f"a 3D registration model needs opset >= 20 (5D GridSample), got {opset}")
    if artifact == "registration" and cfg.ndim == 2 and target == "tensorrt" and opset >= 20:
        raise ValueError(f"a 2D registration model for TensorRT needs opset <= 19 (its parser turns opset-20 "
                         f"'linear' GridSample into nearest), got {opset}")

    reference = wrap(prepare_reference(net), artifact, eps=eps, graph=graph)
    prepared = prepare_for_export(net)
    if precision != "fp32":
        prepared = half_network(prepared, HALF_DTYPES[precision])
    table = None
    if warp_op == "trt_plugin":
        from deepsim_rt.export.plugin_graph import PluginWarpRegNet, onnx_translation_table

        prepared = PluginWarpRegNet(prepared)
        table = onnx_translation_table()
    module = wrap(prepared, artifact, eps=eps, graph=graph)
    inputs, outputs = io_names(artifact, len(cfg.enc_channels))
    if graph == "flow":
        outputs = ("flow",)
    example = example_inputs(cfg, artifact, graph=graph)
    meta = build_metadata(artifact, cfg, source_sha256=sha, inputs=inputs, outputs=outputs,
                          intensity="raw" if graph == "serving" else None,
                          extra={"opset": opset, "target": target, "eps": eps,
                                 "integrate_steps": cfg.integrate_steps, "padding": cfg.padding,
                                 "batchnorm": "folded", "tolerance": tolerance, "graph": graph,
                                 "precision": precision, "warp_op": warp_op, **source_extra(model)})
    report: list[VerifyReport] = []

    def write(tmp: str) -> None:
        try:
            with _quiet_exporter():
                program = torch.onnx.export(module, example, dynamo=True, opset_version=opset,
                                            input_names=list(inputs), output_names=list(outputs),
                                            dynamic_shapes=dynamic_shapes(cfg, artifact, graph), optimize=True,
                                            external_data=False, verbose=False, report=False,
                                            custom_translation_table=table)
            program.save(tmp, external_data=False)
        except Exception as exc:  # the exporter raises many types; report one clear error
            raise ExportError(f"ONNX export of the {artifact} model failed: {type(exc).__name__}: {exc}") from exc
        written = file_opset(tmp)
        if written != opset:
            raise ExportError(f"asked for ONNX opset {opset}, but the exporter wrote opset {written}; choose an "
                              f"opset it supports (default {default_opset(cfg.ndim, target)})")
        _write_metadata(tmp, meta)
        if verify and warp_op == "trt_plugin":
            report.append(_verify_plugin_graph(tmp, module, reference, cfg, artifact, graph, example, outputs,
                                               tolerance))
        elif verify:
            from deepsim_rt.export.ort import OrtRunner

            runner = OrtRunner(tmp, device="cpu", threads=threads, expect=artifact)
            cases = verification_cases(cfg, artifact, tuple(example[0].shape[2:]), graph)
            ref_fn = reference if graph != "flow" else (lambda *xs: (reference(*xs),))
            rep = measure(ref_fn, runner, cases, outputs, artifact=f"{artifact} ONNX {precision} (opset {opset})",
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


def _verify_plugin_graph(path: str, module: nn.Module, reference: nn.Module, cfg: NetConfig, artifact: str,
                         graph: str, example: tuple, outputs: tuple, tolerance: float) -> VerifyReport:
    """A Warp3D-plugin graph cannot run in ONNX Runtime: check its nodes (one Warp3D per warp, no GridSample) and
    the PyTorch module that was exported (same ops, CPU reference implementation) against the model."""
    import onnx

    from deepsim_rt.export.trt_plugin import PLUGIN_ID, PLUGIN_NAME, PLUGIN_NAMESPACE

    nodes = onnx.load(path).graph.node
    plugin = [n for n in nodes if n.op_type == PLUGIN_NAME and n.domain == PLUGIN_NAMESPACE]
    if len(plugin) != 1 + cfg.integrate_steps or any(n.op_type == "GridSample" for n in nodes):
        raise ExportError(f"the plugin graph has {len(plugin)} {PLUGIN_ID} nodes (expected "
                          f"{1 + cfg.integrate_steps}) and {sum(n.op_type == 'GridSample' for n in nodes)} GridSample")
    cases = verification_cases(cfg, artifact, tuple(example[0].shape[2:]), graph)
    rep = measure(reference, module, cases, outputs, artifact=f"{artifact} ONNX Warp3D-plugin graph (PyTorch side)",
                  backend="PyTorch CPU, plugin ops = reference warp", tolerance=tolerance)
    return rep.check()


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
