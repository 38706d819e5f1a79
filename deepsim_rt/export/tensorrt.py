"""TensorRT engines built from our ONNX export: fp32 / fp16, optimization profiles over spatial sizes, timing cache.

    result = build_engine("reg.onnx", "reg.plan", precision="fp16", profile=Profile.around((96, 80)))
    runner = TrtRunner("reg.plan")                 # reads reg.plan.json (metadata sidecar)
    result = build_registration_engine(model_or_checkpoint, "reg.plan")   # ONNX export + build + verify

Engine files are what TensorRT serializes (Triton Inference Server's model.plan takes them as is), so the deepsim_rt
metadata lives in a JSON sidecar `<engine>.json` (same keys as every other artifact plus the engine's I/O, profile and
precision). An engine runs only with the TensorRT version and GPU model it was built with; TensorRT itself refuses
others, and we report that as a clear error.

3D: TensorRT has no 5D GridSample. Chosen path: a FLOW-ONLY engine (the U-Net and flow head, ONNX graph="flow") and,
at run time, integration (if the model has it) and the warp with deepsim_rt.kernels, i.e. the Triton kernels on
the same CUDA stream. The alternative, a TensorRT plugin compiled from the Triton warp kernel (`tensorrt.plugin`,
`@trtp.register` + `@trtp.aot_impl`, TensorRT >= 10.9), was not taken, for these reasons:
  * neither machine available to this project has TensorRT (the GPU box has none, and no network to install it),
    so a plugin could not be built, loaded or checked against the reference even once; unvalidated plugin code
    would look finished without being so;
  * the warp is one memory-bound pass (~1 % of the network's FLOPs at the paper's sizes): running it in Triton
    between the engine and the output costs one kernel launch, no extra copy (the engine writes the flow into a
    torch tensor that the warp reads in place);
  * the engine stays a standard one that Triton Inference Server loads without a plugin library.
2D: the full model (GridSample opset <= 19, which TensorRT's parser maps to its bilinear GridSample) is one engine.

Tests here skip with the precise reason (no CUDA / no tensorrt package); `make gpu-check` runs them where both exist.
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
           "build_registration_engine", "TrtRunner", "read_engine_info"]

TRT_MIN_VERSION = (10, 0)
PRECISIONS = ("fp32", "fp16")


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

    def check(self, ndim: int, multiple: int) -> None:
        for name, sp in (("min", self.min_spatial), ("opt", self.opt_spatial), ("max", self.max_spatial)):
            if len(sp) != ndim or any(s <= 0 or s % multiple for s in sp):
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


def build_engine(onnx_path: str | os.PathLike, path: str | os.PathLike, *, precision: str = "fp32",
                 profiles: tuple[Profile, ...] | list[Profile] | None = None,
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float = 4.0) -> EngineBuild:
    """Build a serialized TensorRT engine from a deepsim_rt ONNX artifact; write it and its `.json` sidecar.

    precision: "fp32" or "fp16" (TF32 off for fp32, so it can be compared at 1e-4). profiles: optimization
    profiles over batch and spatial sizes (default: one around 2x the net multiple per axis... see Profile.around).
    timing_cache: file read if present and updated after the build (speeds up rebuilds on the same GPU).
    """
    from deepsim_rt.export.onnx import read_onnx_info

    trt = _trt()
    t0 = time.perf_counter()
    path = Path(path)
    if path.suffix not in (".plan", ".engine"):
        raise ValueError(f"engine path must end in .plan or .engine, got {str(path)!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    info = read_onnx_info(onnx_path)
    cfg = info.cfg
    if info.artifact == "registration" and cfg.ndim == 3 and info.extra.get("graph", "full") != "flow":
        raise ValueError("TensorRT has no 3D GridSample: build 3D registration engines from a graph='flow' ONNX "
                         "export (build_registration_engine does this)")
    if info.artifact == "registration" and cfg.ndim == 2 and int(info.extra.get("opset", 0)) >= 20:
        raise ValueError("this 2D ONNX uses opset >= 20, whose 'linear' GridSample TensorRT parses as nearest; "
                         "re-export with target='tensorrt' (opset 19)")
    if profiles is None:
        m = cfg.spatial_multiple
        profiles = (Profile.around((8 * m,) * cfg.ndim, m),)
    for p in profiles:
        p.check(cfg.ndim, cfg.spatial_multiple)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {str(onnx_path)!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 convs would cost ~1e-3: fp32 means fp32
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
    extra.update({"precision": precision, "tensorrt_version": trt.__version__,
                  "device_name": torch.cuda.get_device_name(), "profiles": [p.__dict__ for p in profiles]})
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
    """Registration model -> ONNX (2D full graph opset 19; 3D flow-only) -> engine, verified against PyTorch.

    Verification runs the engine through TrtRunner (which adds integration + warp in 3D) against the eager model
    on random and atlas inputs inside the first profile; tolerance 1e-4 for fp32, FP16_TOL for fp16. A failure
    removes the engine and its sidecar.
    """
    import tempfile

    from deepsim_rt.export.onnx import export_onnx, load_source, verification_cases
    from deepsim_rt.export.wrappers import wrap

    _trt()
    path = Path(path)
    net, sha = load_source(model, "registration", source_sha256)
    cfg = net.cfg
    graph = "flow" if cfg.ndim == 3 else "full"
    with tempfile.TemporaryDirectory(prefix="deepsim_rt_trt_") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_onnx(net, onnx_file, target="tensorrt", graph=graph, source_sha256=sha, verify=verify)
        build = build_engine(onnx_file, path, precision=precision, profiles=profiles, timing_cache=timing_cache)
    if not verify:
        return build
    try:
        dev = torch.device("cuda")
        runner = TrtRunner(path, device=dev)
        reference = wrap(net.to(dev).eval(), "registration")
        prof = build.profiles[0]
        cases = []
        for name, xs in verification_cases(cfg, "registration", prof.opt_spatial):
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

    For registration engines `run_registration(moving, fixed)` / `__call__` return (warped, displacement): a 3D
    flow-only engine is completed here with integrate (cfg.integrate_steps > 0) and warp from deepsim_rt.kernels.
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
        if self.graph == "full":
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
