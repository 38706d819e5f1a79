"""ONNX Runtime runner for deepsim_rt ONNX artifacts.

Providers by availability: TensorRT -> CUDA -> CPU when the target device is CUDA (onnxruntime-gpu), CPU otherwise.
Session options: intra-op threads, graph optimization level (ORT_ENABLE_ALL by default: constant folding and
Conv+activation fusions), sequential execution. On a CUDA device inputs and outputs are bound in place (IO binding:
no host round trip); `io_binding=True` forces the same path on the CPU (tests exercise it there).

Every call checks inputs against the artifact's contract (rank, channels, spatial multiple, same shape for pairs)
and raises ValueError naming expected vs got, before ONNX Runtime sees them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from deepsim_rt.export.metadata import ArtifactInfo, parse_metadata

__all__ = ["OrtRunner", "available_providers", "providers_for", "check_inputs", "output_shapes"]

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is an install extra
        raise ValueError("the onnxruntime backend needs the onnxruntime package (pip install "
                         "'deepsim_rt[export]')") from exc
    return onnxruntime


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def providers_for(device: torch.device, available: list[str] | None = None) -> list[str]:
    """Execution providers in preference order for `device` among those available."""
    available = available_providers() if available is None else available
    if device.type == "cuda":
        gpu = [p for p in _GPU_PROVIDERS if p in available]
        if not gpu:
            raise ValueError(f"device {str(device)!r} asked for, but this onnxruntime build has no GPU provider "
                             f"(available: {available}); install onnxruntime-gpu or use device='cpu'")
        return [*gpu, "CPUExecutionProvider"]
    if device.type != "cpu":
        raise ValueError(f"onnxruntime runs on 'cpu' or 'cuda' devices, got {str(device)!r}")
    return ["CPUExecutionProvider"]


def check_inputs(info: ArtifactInfo, inputs: tuple[torch.Tensor, ...]) -> None:
    """Inputs against the artifact contract: count, torch tensors, rank ndim + 2, channels, float32, equal shapes,
    non-empty, and spatial sizes: multiples of the network's multiple m (network-only graphs) or m + 1 .. 8192
    per axis (serving graphs, info.serving). Contiguity is not required: runners make inputs contiguous."""
    if len(inputs) != len(info.inputs):
        raise ValueError(f"the {info.artifact} artifact takes {len(info.inputs)} input(s) {list(info.inputs)}, got "
                         f"{len(inputs)}")
    nd, ch, m = info.ndim, info.in_channels, info.spatial_multiple
    for name, x in zip(info.inputs, inputs, strict=True):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != nd + 2:
            raise ValueError(f"{name}: this {nd}D artifact takes (B, C, {'D, H, W' if nd == 3 else 'H, W'}) "
                             f"inputs of rank {nd + 2}, got shape {tuple(x.shape)} (rank {x.dim()})")
        if x.shape[1] != ch:
            raise ValueError(f"{name}: the artifact expects {ch} channel(s), got {x.shape[1]} (shape "
                             f"{tuple(x.shape)})")
        if any(int(s) == 0 for s in x.shape):
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
        if info.serving and any(not m < int(s) <= 8192 for s in x.shape[2:]):
            raise ValueError(f"{name}: this serving graph takes spatial sizes {m + 1}..8192 per axis, got "
                             f"{tuple(x.shape[2:])}")
        if not info.serving and any(int(s) % m for s in x.shape[2:]):
            raise ValueError(f"{name}: spatial size {tuple(x.shape[2:])} must be a non-zero multiple of {m} "
                             "(Registrator pads automatically; a serving-graph export takes any size)")
        if x.dtype != torch.float32:
            raise ValueError(f"{name}: the artifact takes float32, got {x.dtype} (convert with .float(); "
                             "Registrator.register does)")
    if len(inputs) == 2 and inputs[0].shape != inputs[1].shape:
        raise ValueError(f"{info.inputs[0]} and {info.inputs[1]} must have the same shape, got "
                         f"{tuple(inputs[0].shape)} and {tuple(inputs[1].shape)}")


def output_shapes(info: ArtifactInfo, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output shapes for an input of `shape` (B, C, *S) (for preallocated IO binding)."""
    b, c, *sp = shape
    cfg = info.cfg
    if info.artifact == "registration":
        if info.extra.get("graph") == "flow":
            return [(b, cfg.ndim, *sp)]
        return [(b, c, *sp), (b, cfg.ndim, *sp)]
    levels = [tuple(s // 2 ** (lvl + 1) for s in sp) for lvl in range(len(cfg.enc_channels))]
    if info.artifact == "features":
        return [(b, ch, *lv) for ch, lv in zip(cfg.enc_channels, levels, strict=True)]
    return [(b,), *[(b, *lv) for lv in levels]]


class OrtRunner:
    """Run a deepsim_rt ONNX artifact: `runner(*inputs) -> tuple of torch tensors` (on `device`).

    path: .onnx file with deepsim_rt metadata. device: "cpu" / "cuda[:i]" / torch.device.
    threads: intra-op threads (None: ORT default = physical cores). graph_optimization: one of
    ("disable", "basic", "extended", "all"). expect: the artifact kind this caller needs (checked).
    providers: override the automatic choice (list of provider names). io_binding: None = on for CUDA only.
    """

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None,
                 expect: str | None = None, graph_optimization: str = "all", providers: list[str] | None = None,
                 io_binding: bool | None = None) -> None:
        ort = _ort()
        path = Path(path)
        self.path = path
        self.device = torch.device(device)
        if not path.is_file():
            raise ValueError(f"ONNX model not found: {str(path)!r}")
        if graph_optimization not in _OPT_LEVELS:
            raise ValueError(f"graph_optimization must be one of {_OPT_LEVELS}, got {graph_optimization!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be a non-negative int or None, got {threads!r}")
        self.providers = providers or providers_for(self.device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
        provider_args = [(p, self._provider_options(p)) for p in self.providers]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=provider_args)
        except Exception as exc:  # InvalidProtobuf, Fail, InvalidGraph: all "this file is not a usable model"
            raise ValueError(f"{str(path)!r} is not a loadable ONNX model (corrupt or truncated?): "
                             f"{type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info: ArtifactInfo = parse_metadata(meta, str(path), expect=expect)
        sess_in = [i.name for i in self.session.get_inputs()]
        sess_out = [o.name for o in self.session.get_outputs()]
        if sess_in != list(self.info.inputs) or sess_out != list(self.info.outputs):
            raise ValueError(f"{str(path)!r}: graph inputs/outputs {sess_in} -> {sess_out} disagree with its "
                             f"metadata {list(self.info.inputs)} -> {list(self.info.outputs)}")
        self.io_binding = (self.device.type == "cuda") if io_binding is None else bool(io_binding)

    def _provider_options(self, provider: str) -> dict[str, str]:
        dev = str(self.device.index or 0)
        if provider == "TensorrtExecutionProvider":
            # Engines are cached beside the model: the first session builds them (minutes), later ones load them.
            return {"device_id": dev, "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(self.path.parent / ".trt_cache"), "trt_timing_cache_enable": "True"}
        if provider == "CUDAExecutionProvider":
            return {"device_id": dev}
        return {}

    @property
    def session_providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_inputs(self.info, inputs)
        if self.io_binding:
            return self._run_bound(inputs)
        feeds = {n: x.detach().cpu().contiguous().numpy() for n, x in zip(self.info.inputs, inputs, strict=True)}
        outs = self.session.run(list(self.info.outputs), feeds)
        return tuple(torch.from_numpy(np.asarray(o)).to(self.device) for o in outs)

    def _run_bound(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # Inputs and outputs stay where they are (GPU memory on CUDA); ORT reads and writes through raw pointers,
        # so the torch tensors must be contiguous float32 on this runner's device and stay alive during the run.
        dev_type = "cuda" if self.device.type == "cuda" else "cpu"
        dev_id = self.device.index or 0
        xs = [x.detach().to(self.device, torch.float32).contiguous() for x in inputs]
        outs = [torch.empty(s, device=self.device, dtype=torch.float32)
                for s in output_shapes(self.info, tuple(xs[0].shape))]
        binding = self.session.io_binding()
        for name, x in zip(self.info.inputs, xs, strict=True):
            binding.bind_input(name, dev_type, dev_id, np.float32, list(x.shape), x.data_ptr())
        for name, y in zip(self.info.outputs, outs, strict=True):
            binding.bind_output(name, dev_type, dev_id, np.float32, list(y.shape), y.data_ptr())
        if dev_type == "cuda":
            torch.cuda.synchronize(self.device)  # inputs produced on torch's stream must be ready
        self.session.run_with_iobinding(binding)
        return tuple(outs)
