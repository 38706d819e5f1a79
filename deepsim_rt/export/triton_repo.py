"""Triton Inference Server model repository for a deepsim_rt ONNX artifact.

    write_triton_repo("reg.onnx", "repo/", name="deepsim_reg_3d")

Layout written (atomically: a temporary folder renamed into place):
    repo/<name>/config.pbtxt               ONNX Runtime backend ("onnxruntime"), dynamic batching, dynamic spatial dims
    repo/<name>/1/model.onnx
    repo/<name>/deepsim_rt.json            the artifact metadata (input contract, provenance); Triton ignores it
    repo/<name>/TENSORRT.txt               without an engine: how to build one on the serving machine and add the
                                           TensorRT variant (engines are specific to a GPU model and TensorRT
                                           version); no `<name>_trt` folder is written then, because Triton fails
                                           on a model folder without a version holding a model file
    repo/<name>_trt/config.pbtxt           only with an engine: TensorRT backend ("tensorrt", platform tensorrt_plan)
    repo/<name>_trt/1/model.plan
    repo/<name>_trt/deepsim_rt.json

The ONNX model should be a SERVING graph (export_onnx's registration default): raw float32 images of any size in,
warped image in the moving image's units and displacement in voxels out, so clients send their images as they are
and no Python runs before or after the model. A network-only ("minmax" or "percentile") graph is still accepted; its
config says so in the deepsim_rt_intensity parameter (clients must normalize and pad). The deepsim_rt_normalization
parameter names the network's contract either way ("minmax" | "percentile", deepsim_rt.nn.intensity): the
normalization a serving graph applies inside, or the one a client must apply before a network-only graph.
Engines from build_registration_engine are serving graphs too (2D: GridSample; 3D: the deepsim_rt::Warp3D plugin
compiled into the engine, so the server needs no plugin library); an engine from an older flow-only 3D build has the
single output "flow".
Every config.pbtxt is parsed back with `google.protobuf.text_format` into the server's `ModelConfig` protobuf
(shipped by the tritonclient package) before the folder is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from deepsim_rt.export._io import atomic_dir
from deepsim_rt.export.metadata import ArtifactInfo

__all__ = ["TritonRepo", "write_triton_repo", "model_config_text", "parse_model_config"]


@dataclass(frozen=True)
class TritonRepo:
    root: Path
    models: tuple[str, ...]
    configs: dict


def _dims(info: ArtifactInfo, name: str, graph: str) -> list[int]:
    """Dims WITHOUT the batch axis (Triton adds it when max_batch_size > 0); -1 = dynamic."""
    nd, ch = info.ndim, info.in_channels
    cfg = info.cfg
    sp = [-1] * nd
    if name in info.inputs:
        return [ch, *sp]
    if info.artifact == "registration":
        return {"warped": [ch, *sp], "displacement": [nd, *sp], "flow": [nd, *sp]}[name]
    if info.artifact == "features":
        return [cfg.enc_channels[int(name.removeprefix("level"))], *sp]
    return [1] if name == "similarity" else sp  # metric: similarity per sample (reshaped to [1]), maps (B, *S_l)


def model_config_text(info: ArtifactInfo, name: str, backend: str, max_batch_size: int = 8,
                      outputs: tuple[str, ...] | None = None) -> str:
    """config.pbtxt text for `backend` ("onnxruntime" or "tensorrt")."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"backend must be 'onnxruntime' or 'tensorrt', got {backend!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    graph = info.extra.get("graph", "full")
    outs = outputs if outputs is not None else info.outputs
    lines = [f'name: "{name}"']
    if backend == "onnxruntime":
        lines += ['backend: "onnxruntime"', 'platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"']
    else:
        lines += ['backend: "tensorrt"', 'platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
    lines.append(f"max_batch_size: {max_batch_size}")

    def tensor(n: str) -> str:
        dims = _dims(info, n, graph)
        reshape = ""
        if n == "similarity":
            reshape = " reshape: { shape: [ ] }"  # the model returns (B,), Triton wants a non-empty dims list
        return f'  {{ name: "{n}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims))} ]{reshape} }}'

    lines.append("input [\n" + ",\n".join(tensor(n) for n in info.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(n) for n in outs) + "\n]")
    lines.append("dynamic_batching { }")
    if backend == "onnxruntime":
        # the ORT backend may hand subgraphs to TensorRT on GPU servers; fp32 keeps the 1e-4 contract
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                     'parameters { key: "precision_mode" value: "FP32" } } ] } }')
    lines.append(f'parameters: {{ key: "deepsim_rt_intensity" value: {{ string_value: "{info.intensity}" }} }}')
    lines.append(f'parameters: {{ key: "deepsim_rt_normalization" value: {{ string_value: "{info.cfg.intensity}" }} }}')
    lines.append(f'parameters: {{ key: "deepsim_rt_graph" value: {{ string_value: "{graph}" }} }}')
    lines.append(f'parameters: {{ key: "deepsim_rt_spatial_multiple" value: {{ string_value: '
                 f'"{info.spatial_multiple}" }} }}')
    return "\n".join(lines) + "\n"


def parse_model_config(text: str):
    """Parse config.pbtxt text into tritonclient's ModelConfig protobuf (ValueError when it does not parse)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - installed with the export extra
        raise ValueError("validating a Triton config needs tritonclient[grpc] (pip install "
                         "'deepsim_rt[export]')") from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from exc


def write_triton_repo(onnx_path: str | os.PathLike, repo: str | os.PathLike, name: str | None = None, *,
                      max_batch_size: int = 8, engine: str | os.PathLike | None = None,
                      tensorrt: bool = True, overwrite: bool = False) -> TritonRepo:
    """Write a model repository for the ONNX artifact at `onnx_path` (see the module docstring).

    engine: an existing TensorRT engine (.plan with its .json sidecar) to place in the TensorRT variant.
    tensorrt: write the TensorRT variant's config at all. overwrite: replace an existing repo folder.
    """
    from deepsim_rt.export.onnx import read_onnx_info

    info = read_onnx_info(onnx_path)
    if info.extra.get("graph", "full") == "flow":
        raise ValueError(f"{str(onnx_path)!r} is a flow-only graph (the TensorRT 3D path); give the full ONNX "
                         "export for the ONNX Runtime model")
    name = name or f"deepsim_{info.artifact[:3]}_{info.ndim}d"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"model name must be letters, digits, '_' or '-', got {name!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    trt_info = None
    if engine is not None:
        from deepsim_rt.export.tensorrt import read_engine_info

        trt_info = read_engine_info(engine)
        if trt_info.cfg != info.cfg or trt_info.artifact != info.artifact:
            raise ValueError(f"engine {str(engine)!r} was built from another model than {str(onnx_path)!r}")
    configs: dict[str, str] = {}
    meta_json = json.dumps(info.to_metadata(), indent=1, sort_keys=True)
    trt_name = f"{name}_trt"
    root = Path(repo)

    def write(root: Path) -> None:
        model_dir = root / name
        (model_dir / "1").mkdir(parents=True)
        shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
        configs[name] = model_config_text(info, name, "onnxruntime", max_batch_size)
        (model_dir / "deepsim_rt.json").write_text(meta_json)
        if tensorrt and engine is not None:
            trt_dir = root / trt_name
            (trt_dir / "1").mkdir(parents=True)
            trt_outputs = ("flow",) if trt_info.extra.get("graph") == "flow" else trt_info.outputs
            configs[trt_name] = model_config_text(trt_info, trt_name, "tensorrt", max_batch_size,
                                                  outputs=trt_outputs)
            shutil.copyfile(engine, trt_dir / "1" / "model.plan")
            (trt_dir / "deepsim_rt.json").write_text(json.dumps(trt_info.to_metadata(), indent=1, sort_keys=True))
        elif tensorrt:
            # Paths named here are the FINAL ones (the repo as served), never this temporary staging folder.
            final = Path(repo).resolve()
            (model_dir / "TENSORRT.txt").write_text(
                "No TensorRT variant yet: engines are specific to a GPU model and TensorRT version, so build one on "
                "the serving machine and add it to this repository:\n"
                f"  deepsim-rt export --format tensorrt --model <checkpoint> --out {final / (name + '.plan')}\n"
                f"  deepsim-rt export --format triton-repo --model <checkpoint> --out {final} --name {name} "
                f"--engine {final / (name + '.plan')} --overwrite\n"
                f"This writes {final / trt_name}/config.pbtxt and {final / trt_name}/1/model.plan. "
                + ("In 3D the engine contains the deepsim_rt::Warp3D plugin (our Triton warp kernel compiled to PTX "
                   "inside the engine): the server needs no plugin library.\n" if info.ndim == 3 else "\n"))
        for model, text in configs.items():
            parse_model_config(text)  # validate against the server's schema before anything is published
            (root / model / "config.pbtxt").write_text(text)

    if root.exists() and any((root / m).exists() for m in (name, trt_name)) and not overwrite:
        raise ValueError(f"{str(root / name)!r} already exists; pass overwrite=True (CLI: --overwrite)")
    root.mkdir(parents=True, exist_ok=True)
    # Build the model folders in a temporary sibling, then move each into the repo (the repo may hold other models).
    staging = root / f".{name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    atomic_dir(staging, write)
    try:
        for model in configs:
            dst = root / model
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(staging / model, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TritonRepo(root=root, models=tuple(configs), configs=configs)
