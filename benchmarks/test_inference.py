"""End-to-end registration inference per backend: `Registrator.register(moving, fixed)` as a user calls it.

Backends: eager, compile (torch.compile, dynamic shapes), onnxruntime, aoti (AOTInductor .pt2), tensorrt; a backend
that cannot run here is skipped with the reason (missing package, export not landed, no CUDA). Exports and
compilation happen untimed, before the warm-up; their wall time is recorded as extra_info["setup_s"]. Artifacts are
cached in $BENCH_CACHE (default /tmp/deepsim_rt_bench_cache), keyed by the checkpoint's sha256, so a second
`make bench` reuses them.

Model: the bundled default-2d / default-3d registration nets; if their weights are not installed, a freshly
initialised net of the same preset ("small"), which has the same latency (extra_info["model"] says which).
The timed call includes what `register` does around the network (min-max normalisation, padding to the network's
multiple, the NaN check, cropping): the number a user sees. Sizes: benchmarks/shapes.py INFER_SIZES.
On the GPU box, ONNX Runtime is a CPU build: its case runs on the CPU (extra_info["device"] = "cpu").
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks.harness import bench_device, bench_threads, shape_str
from benchmarks.shapes import INFER_SIZES

DEV = bench_device()
ON_GPU = DEV.type == "cuda"
BACKENDS = ("eager", "compile", "onnxruntime", "aoti", "tensorrt")
CACHE = Path(os.environ.get("BENCH_CACHE", "/tmp/deepsim_rt_bench_cache"))


def _cases() -> list:
    # Backends with a cheap setup first, the ones that compile (seconds to minutes) last, 3D before 2D: when a
    # time box (gpu_check.sh) cuts the suite short, it cuts the least important cases.
    out = []
    for backend in ("eager", "onnxruntime", "tensorrt", "compile", "aoti"):
        for nd in sorted(INFER_SIZES[DEV.type], reverse=True):
            for spatial in INFER_SIZES[DEV.type][nd]:
                marks = [pytest.mark.gpu] if (ON_GPU or backend == "tensorrt") else []
                out.append(pytest.param(nd, spatial, backend, marks=marks,
                                        id=f"{nd}d-{shape_str(spatial)}-{backend}"))
    return out


def model_source(nd: int) -> tuple[str, str]:
    """(model argument for Registrator.load, description): the bundled weights, or a same-preset stand-in."""
    from deepsim_rt.runtime import bundled_model_path

    name = f"default-{nd}d"
    if bundled_model_path(name).is_file():
        return name, name
    from deepsim_rt.nn import NetConfig, RegNet, save_model

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"standin-reg{nd}d-small.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_model(path, RegNet(NetConfig.make("reg", nd, "small")))
    return str(path), f"random-init small reg{nd}d (bundled {name} weights not installed)"


def _backend_device(backend: str) -> torch.device:
    if backend == "onnxruntime" and ON_GPU:
        # The GPU box has the CPU build of onnxruntime only; say so instead of timing an implicit fallback.
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return torch.device("cpu")
    return DEV


def _load(model: str, backend: str, device: torch.device):
    """Registrator for `backend`, or pytest.skip with the reason it cannot run here."""
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed here")
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed here")
    try:
        from deepsim_rt.runtime import Registrator
    except ImportError as exc:
        pytest.skip(f"deepsim_rt.runtime is not importable: {exc}")
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        return Registrator.load(model, backend=backend, device=device, cache_dir=CACHE, verify=False,
                                threads=bench_threads())
    except (ImportError, NotImplementedError) as exc:
        pytest.skip(f"backend {backend!r} unavailable: {type(exc).__name__}: {exc}")


def _flops(reg, moving: torch.Tensor, fixed: torch.Tensor) -> int | None:
    """FLOPs of one eager `register` call (torch.utils.flop_counter: convolutions dominate), untimed."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            reg.register(moving, fixed)
    except Exception:  # noqa: BLE001 - the count is optional extra information
        return None
    return int(counter.get_total_flops())


@pytest.mark.parametrize("nd,spatial,backend", _cases())
def test_register(bench, nd, spatial, backend):
    model, desc = model_source(nd)
    dev = _backend_device(backend)
    t0 = time.perf_counter()
    reg = _load(model, backend, dev)
    seed = iter(range(1000))

    def make():
        g = torch.Generator().manual_seed(next(seed))
        mov = torch.rand((1, 1, *spatial), generator=g).to(dev)
        fix = torch.rand((1, 1, *spatial), generator=g).to(dev)
        return mov, fix

    m0, f0 = make()
    reg.register(m0, f0)  # first call: compile / session warm-up, counted in setup_s
    setup_s = time.perf_counter() - t0

    def target(mov, fix):
        return reg.register(mov, fix)

    flops = _flops(reg, m0, f0) if backend == "eager" else None
    extra = {"model": desc, "backend_device": dev.type, "setup_s": round(setup_s, 2), "source": reg.source,
             "threads": bench_threads() or "default"}
    if backend == "onnxruntime":
        sess = getattr(reg.backend, "session", None)
        if sess is not None:
            extra["ort_providers"] = list(sess.get_providers())
    bench.run(target, make, op=f"register{nd}d", pass_="infer", provider=backend, shape=shape_str((1, 1, *spatial)),
              dtype="float32", flops=flops, rotate=False, extra=extra, device=dev)
