"""TensorRT engines built from our ONNX export: strongly typed (TensorRT 10 and 11), fp32 / fp16 with the precision IN
the graph, optimization profiles over spatial sizes, timing cache, the 3D warp as a plugin inside the engine.

    result = build_registration_engine(model_or_checkpoint, "reg.plan", precision="fp16")  # ONNX + build + verify
    result = build_engine("reg.onnx", "reg.plan", profiles=(Profile.around((96, 80)),))
    runner = TrtRunner("reg.plan")                 # reads reg.plan.json (metadata sidecar)

Engine files are what TensorRT serializes (Triton Inference Server's model.plan takes them as is), so the deepsim_rt
metadata lives in a JSON sidecar `<engine>.json` (same keys as every other artifact plus the engine's I/O, profile and
precision). An engine runs only with the TensorRT version and GPU model it was built with; TensorRT itself refuses
others, and we report that as a clear error.

Typing. TensorRT 11 removed weak typing: BuilderFlag.FP16 / BF16 / INT8 / FP8 / INT4 / FP4 and the precision
constraint flags no longer exist, every network is strongly typed. So precision lives in the ONNX graph
(export_onnx(precision="fp16"): a float16 network between explicit Casts, float32 I/O, integration and warp float32;
export.precision), and the builder only asks for a strongly typed network: NetworkDefinitionCreationFlag
.STRONGLY_TYPED on 10.x (required there to honour the graph's types), accepted and implied on 11.x. TF32 is switched
off where the flag exists, so an fp32 engine is compared at 1e-4. `REMOVED_IN_TRT11` lists the removed names this
module must never use (a test reads the source against it).

Graphs. Engines are built from SERVING graphs (raw images of any size; normalization, padding, crop inside):
2D with ONNX GridSample at opset 19 (TensorRT's parser maps opset-20 "linear" GridSample to nearest); 3D, where
IGridSampleLayer does not exist, with every warp a deepsim_rt::Warp3D plugin node (export.plugin_graph): our
Triton warp kernel compiled to PTX by the plugin's aot_impl and embedded in the engine (export.trt_plugin), so
the 3D registration model is ONE engine that Triton Inference Server serves without Python or a plugin library.
Older flow-only 3D engines (graph="flow": the runtime integrates and warps) still load and run.

Nothing here has run: neither machine available to this project has TensorRT (the GPU box has none, and no network
to install it). Tests here check everything that does not need it; tests/test_export_tensorrt.py's GPU test skips
with the precise reason and runs where TensorRT and a GPU exist (`make gpu-check`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deepsim_rt.export._io import atomic_file
from deepsim_rt.export.metadata import ArtifactInfo, parse_metadata
from deepsim_rt.export.ort import check_inputs
from deepsim_rt.export.verify import FP16_TOL, FP32_TOL, VerifyReport, measure

__all__ = ["TRT_MIN_VERSION", "tensorrt_unavailable_reason", "Profile", "EngineBuild", "build_engine",
           "build_registration_engine", "TrtRunner", "read_engine_info", "network_flags", "configure_builder",
           "REMOVED_IN_TRT11", "onnx_precision"]

# 10.9: tensorrt.plugin with aot_impl (the 3D Warp3D plugin); 2D-only builds work from 10.0.
TRT_MIN_VERSION = (10, 0)
TRT_PLUGIN_MIN_VERSION = (10, 9)
PRECISIONS = ("fp32", "fp16")
# Python API names TensorRT 11 removed (NVIDIA's 10.x -> 11.x migration guide, "Removed Python APIs"): weak typing,
# implicit quantization / calibration, algorithm selection, old engine-size queries, platform capability queries.
REMOVED_IN_TRT11 = (
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO", "int8_calibrator", "set_calibration_profile", "get_calibration_profile",
    "set_quantization_flag", "get_quantization_flag", "quantization_flags", "clear_quantization_flag",
    "algorithm_selector", "IAlgorithmSelector", "IInt8Calibrator", "IInt8EntropyCalibrator2",
    "platform_has_fast_fp16", "platform_has_fast_int8", "device_memory_size", "set_precision", "set_output_type",
    "precision_is_set", "reset_precision",
)


def tensorrt_unavailable_reason() -> str | None:
    """None when engines can be built and run here, else the precise reason (used by tests to skip)."""
    if not torch.cuda.is_available():
        return "TensorRT engines need a CUDA device; torch.cuda.is_available() is False on this machine"
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'tensorrt>=10.9'; the lent GPU box has none)"
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    if version < TRT_MIN_VERSION:
        return f"TensorRT {trt.__version__} is older than the supported {TRT_MIN_VERSION}"
    return None


def _trt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ValueError(f"TensorRT is not usable here: {reason}")
    import tensorrt as trt

    return trt


def _version(trt) -> tuple[int, int]:
    return tuple(int(v) for v in str(trt.__version__).split(".")[:2])


def network_flags(trt) -> int:
    """create_network() flags: STRONGLY_TYPED where the enum has it (10.x needs it for the graph's own types to
    hold; 11.x accepts it, every network being strongly typed there), else 0. EXPLICIT_BATCH is never set (the only
    mode since 10.0, deprecated)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def configure_builder(trt, config, workspace_gib: float = 4.0) -> dict:
    """Set up a builder config for a strongly typed build: workspace pool, TF32 off where the flag exists; no
    precision flag (removed in 11.x, ignored / refused on strongly typed 10.x networks). Returns what was set."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    done = {"workspace_bytes": int(workspace_gib * (1 << 30)), "tf32": "default"}
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 convs would cost ~1e-3: fp32 means fp32
        done["tf32"] = "off"
    return done


def onnx_precision(info: ArtifactInfo) -> str:
    """The precision an ONNX artifact carries in its graph ("fp32" for exports from before precision existed)."""
    return str(info.extra.get("precision", "fp32"))


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min / opt / max spatial size and batch (spatial sizes: multiples of the net's)."""

    min_spatial: tuple[int, ...]
    opt_spatial: tuple[int, ...]
    max_spatial: tuple[int, ...]
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8

    @classmethod
    def around(cls, spatial: tuple[int, ...], multiple: int = 8, max_batch: int = 8) -> Profile:
        """A profile from half to twice `spatial` (rounded to `multiple`), optimized for `spatial`."""
        def rnd(v: float) -> int:
            return max(multiple, int(round(v / multiple)) * multiple)

        return cls(tuple(rnd(s / 2) for s in spatial), tuple(rnd(s) for s in spatial),
                   tuple(rnd(s * 2) for s in spatial), 1, 1, max_batch)

    def check(self, ndim: int, multiple: int, serving: bool = False) -> None:
        """Network-only graphs: every size a positive multiple of `multiple`; serving graphs: any size from
        multiple + 1 (export.serving)."""
        for name, sp in (("min", self.min_spatial), ("opt", self.opt_spatial), ("max", self.max_spatial)):
            if serving:
                if len(sp) != ndim or any(s <= multiple for s in sp):
                    raise ValueError(f"profile {name}_spatial {sp} must be {ndim} sizes > {multiple} (serving graph)")
            elif len(sp) != ndim or any(s <= 0 or s % multiple for s in sp):
                raise ValueError(f"profile {name}_spatial {sp} must be {ndim} positive multiples of {multiple}")
        for a, b, c in zip(self.min_spatial, self.opt_spatial, self.max_spatial, strict=True):
            if not a <= b <= c:
                raise ValueError(f"profile needs min <= opt <= max per axis, got {self}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"profile needs 1 <= min_batch <= opt_batch <= max_batch, got {self}")

    def shapes(self, channels: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return ((self.min_batch, channels, *self.min_spatial), (self.opt_batch, channels, *self.opt_spatial),
                (self.max_batch, channels, *self.max_spatial))


@dataclass(frozen=True)
class EngineBuild:
    path: Path
    info: ArtifactInfo
    precision: str
    profiles: tuple[Profile, ...]
    report: VerifyReport | None
    seconds: float
    extra: dict = field(default_factory=dict)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def build_engine(onnx_path: str | os.PathLike, path: str | os.PathLike, *, precision: str | None = None,
                 profiles: tuple[Profile, ...] | list[Profile] | None = None,
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float = 4.0) -> EngineBuild:
    """Build a strongly typed TensorRT engine from a deepsim_rt ONNX artifact; write it and its `.json` sidecar.

    precision: None (take the ONNX graph's, metadata extra "precision") or a check that it is that one: the graph
    decides (export_onnx(precision="fp16") for an fp16 engine), never a builder flag. profiles: optimization
    profiles over batch and spatial sizes (default: one around 8x the net multiple per axis, Profile.around).
    timing_cache: file read if present and updated after the build (speeds up rebuilds on the same GPU).
    Graphs with deepsim_rt::Warp3D nodes register the plugin first (export.trt_plugin; TensorRT >= 10.9).
    """
    from deepsim_rt.export.onnx import read_onnx_info

    trt = _trt()
    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix not in (".plan", ".engine"):
        raise ValueError(f"engine path must end in .plan or .engine, got {str(path)!r}")
    info = read_onnx_info(onnx_path)
    cfg = info.cfg
    graph_precision = onnx_precision(info)
    if graph_precision not in PRECISIONS:
        raise ValueError(f"{str(onnx_path)!r} is a {graph_precision} graph; TensorRT engines are built from fp32 or "
                         "fp16 graphs here")
    if precision is not None and precision != graph_precision:
        raise ValueError(f"{str(onnx_path)!r} is an {graph_precision} graph, asked for a {precision} engine: the "
                         f"precision is in the graph (strong typing), export it with precision={precision!r}")
    precision = graph_precision
    plugin = info.extra.get("warp_op") == "trt_plugin"
    if (info.artifact == "registration" and cfg.ndim == 3 and info.extra.get("graph", "full") != "flow"
            and not plugin):
        raise ValueError("TensorRT has no 3D GridSample: build 3D registration engines from an ONNX export with "
                         "warp_op='trt_plugin' (build_registration_engine does this) or graph='flow'")
    if plugin:
        if _version(trt) < TRT_PLUGIN_MIN_VERSION:
            raise ValueError(f"the Warp3D plugin needs TensorRT >= {TRT_PLUGIN_MIN_VERSION} (tensorrt.plugin "
                             f"aot_impl), this is {trt.__version__}")
        from deepsim_rt.export.trt_plugin import register_warp_plugin

        register_warp_plugin()
    if info.artifact == "registration" and cfg.ndim == 2 and int(info.extra.get("opset", 0)) >= 20:
        raise ValueError("this 2D ONNX uses opset >= 20, whose 'linear' GridSample TensorRT parses as nearest; "
                         "re-export with target='tensorrt' (opset 19)")
    if profiles is None:
        m = cfg.spatial_multiple
        # serving graphs: any size, so an odd optimum (8m - 3) and no rounding; else multiples of m
        profiles = ((Profile.around((8 * m - 3,) * cfg.ndim, 1),) if info.serving
                    else (Profile.around((8 * m,) * cfg.ndim, m),))
    for p in profiles:
        p.check(cfg.ndim, cfg.spatial_multiple, serving=info.serving)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {str(onnx_path)!r}: {errors}")
    config = builder.create_builder_config()
    configured = configure_builder(trt, config, workspace_gib)
    for p in profiles:
        prof = builder.create_optimization_profile()
        lo, opt, hi = p.shapes(cfg.in_channels)
        for name in info.inputs:
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT failed to build an engine from {str(onnx_path)!r} (see the log above)")

    meta = info.to_metadata()
    extra = dict(info.extra)
    extra.update({"precision": precision, "tensorrt_version": trt.__version__, "strongly_typed": True,
                  "builder": configured, "device_name": torch.cuda.get_device_name(),
                  "profiles": [p.__dict__ for p in profiles]})
    meta["extra"] = json.dumps(extra, sort_keys=True)
    meta["source_sha256"] = info.source_sha256
    atomic_file(path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    atomic_file(_sidecar(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, sort_keys=True)))
    if timing_cache:
        data = bytes(config.get_timing_cache().serialize())
        atomic_file(Path(timing_cache), lambda tmp: Path(tmp).write_bytes(data))
    return EngineBuild(path=path, info=parse_metadata(meta, str(path)), precision=precision,
                       profiles=tuple(profiles), report=None, seconds=time.perf_counter() - t0, extra=extra)


def build_registration_engine(model: nn.Module | str | os.PathLike, path: str | os.PathLike, *,
                              precision: str = "fp32", profiles: tuple[Profile, ...] | None = None,
                              timing_cache: str | os.PathLike | None = None, source_sha256: str | None = None,
                              verify: bool = True) -> EngineBuild:
    """Registration model -> serving ONNX (2D: GridSample, opset 19; 3D: Warp3D plugin nodes) in `precision`
    -> one strongly typed engine, verified against PyTorch.

    Verification runs the engine through TrtRunner against the eager fp32 model (serving graph in PyTorch) on raw
    random and atlas inputs at odd sizes inside the first profile; tolerance 1e-4 for fp32, FP16_TOL for fp16.
    A failure removes the engine and its sidecar.
    """
    import tempfile

    from deepsim_rt.export.onnx import export_onnx, load_source, verification_cases
    from deepsim_rt.export.wrappers import wrap

    _trt()
    path = Path(path)
    net, sha = load_source(model, "registration", source_sha256)
    cfg = net.cfg
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    graph = "serving"
    warp_op = "trt_plugin" if cfg.ndim == 3 else "gridsample"
    with tempfile.TemporaryDirectory(prefix="deepsim_rt_trt_") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_onnx(model if isinstance(model, str | os.PathLike) else net, onnx_file, target="tensorrt",
                    graph=graph, source_sha256=sha, verify=verify, precision=precision, warp_op=warp_op)
        build = build_engine(onnx_file, path, precision=precision, profiles=profiles, timing_cache=timing_cache)
    if not verify:
        return build
    try:
        dev = torch.device("cuda")
        runner = TrtRunner(path, device=dev)
        reference = wrap(net.to(dev).eval(), "registration", graph=graph)
        prof = build.profiles[0]
        cases = []
        for name, xs in verification_cases(cfg, "registration", prof.opt_spatial, graph):
            if all(lo <= s <= hi for s, lo, hi in zip(xs[0].shape[2:], prof.min_spatial, prof.max_spatial,
                                                       strict=True)) and xs[0].shape[0] <= prof.max_batch:
                cases.append((name, tuple(x.to(dev) for x in xs)))
        if not cases:  # the profile excludes the default verification sizes: use its opt shape
            shape = (1, cfg.in_channels, *prof.opt_spatial)
            g = torch.Generator().manual_seed(0)
            cases = [("random opt", (torch.rand(shape, generator=g).to(dev), torch.rand(shape, generator=g).to(dev)))]
        tol = FP32_TOL if precision == "fp32" else FP16_TOL
        report = measure(reference, lambda m, f: runner.run_registration(m, f), cases, ("warped", "displacement"),
                         artifact=f"registration TensorRT {precision} ({graph} engine)", backend="tensorrt",
                         tolerance=tol)
        report.check()
    except BaseException:
        for p in (path, _sidecar(path)):
            if p.exists():
                p.unlink()
        raise
    return EngineBuild(path=build.path, info=build.info, precision=precision, profiles=build.profiles,
                       report=report, seconds=build.seconds, extra=build.extra)


def read_engine_info(path: str | os.PathLike, expect: str | None = None) -> ArtifactInfo:
    """Metadata of an engine from its `.json` sidecar (ValueError: missing / unreadable / foreign)."""
    path = Path(path)
    side = _sidecar(path)
    if not path.is_file():
        raise ValueError(f"TensorRT engine not found: {str(path)!r}")
    if not side.is_file():
        raise ValueError(f"{str(path)!r} has no deepsim_rt metadata: its sidecar {side.name!r} is missing (engines "
                         "carry their metadata beside them; rebuild with deepsim_rt.export.tensorrt)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{str(side)!r} is not valid JSON metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{str(side)!r} must hold a JSON object")
    return parse_metadata({str(k): str(v) for k, v in meta.items()}, str(path), expect=expect)


class TrtRunner:
    """Run a deepsim_rt TensorRT engine on CUDA: `runner(*inputs)` returns the engine's outputs (torch tensors).

    For registration engines `run_registration(moving, fixed)` / `__call__` return (warped, displacement): serving
    and full engines compute both; an older 3D flow-only engine is completed here with integrate
    (cfg.integrate_steps > 0) and warp from deepsim_rt.kernels.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cuda") -> None:
        path = Path(path)
        self.info = read_engine_info(path)
        trt = _trt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT engines run on CUDA devices, got {str(device)!r}")
        data = path.read_bytes()
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            built = self.info.extra.get("tensorrt_version", "?")
            raise ValueError(f"{str(path)!r} is not a loadable TensorRT engine here (corrupt or truncated, or built "
                             f"with TensorRT {built} / another GPU; this is TensorRT {trt.__version__} on "
                             f"{torch.cuda.get_device_name(self.device)})")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.graph = self.info.extra.get("graph", "full")
        want_out = ["flow"] if self.graph == "flow" else list(self.info.outputs)
        if self.inputs != list(self.info.inputs) or self.outputs != want_out:
            raise ValueError(f"{str(path)!r}: engine I/O {self.inputs} -> {self.outputs} disagrees with its metadata "
                             f"{list(self.info.inputs)} -> {want_out}")

    def run_engine(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_inputs(self.info, inputs)
        xs = [x.detach().to(self.device, torch.float32).contiguous() for x in inputs]
        for name, x in zip(self.inputs, xs, strict=True):
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise ValueError(f"input {name!r} shape {tuple(x.shape)} is outside the engine's optimization "
                                 f"profiles {self.info.extra.get('profiles')}")
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            y = torch.empty(shape, device=self.device, dtype=torch.float32)
            self.context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        return tuple(outs)

    def run_registration(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from deepsim_rt.kernels import integrate, warp

        outs = self.run_engine(moving, fixed)
        if self.graph != "flow":  # "full" / "serving": the engine warps (GridSample in 2D, Warp3D plugin in 3D)
            return outs[0], outs[1]
        cfg = self.info.cfg
        flow = outs[0]
        if cfg.integrate_steps > 0:
            flow = integrate(flow, steps=cfg.integrate_steps, padding=cfg.padding)
        mov = moving.to(self.device, torch.float32)
        return warp(mov, flow, mode="linear", padding=cfg.padding), flow

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.info.artifact == "registration":
            return self.run_registration(*inputs)
        return self.run_engine(*inputs)
