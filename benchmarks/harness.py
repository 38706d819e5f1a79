"""The one benchmark harness: every suite in benchmarks/ sets up inputs and calls `Bench.run`; nothing else times.

Method (../.library/device/METHOD.md):
- Inputs are allocated before timing, never inside the timed region. Each round's `prepare` (clearing .grad,
  running the forward whose backward is timed) runs untimed, followed by a device synchronize.
- Warm-up is excluded: every input set runs once (torch.compile / Triton autotuning / ORT session setup happen
  there), then a few more calls estimate the per-call time that sizes the number of timed rounds.
- CUDA: each round is bracketed by CUDA events and followed by a synchronize; the event median is the time
  reported (host timers would add the launch/synchronize latency, several microseconds, to small kernels).
  pytest-benchmark's own host-timer statistics are kept too. CPU: time.perf_counter via pytest-benchmark.
- Median and spread (IQR, min, max, rounds) are reported; the median is the number every table uses.
- Rotation: when one input set fits in the last-level cache (GPU L2, CPU L3), rounds cycle through enough sets
  to exceed 4x the cache, so the cache cannot flatter the bandwidth.
- extra_info on every benchmark: op, pass, provider, shape, dtype, bytes moved (benchmarks/roofline.py), GB/s,
  the session's measured copy bandwidth and the % of it reached, FLOPs and GFLOP/s where given, peak memory where
  measured, device/machine name, torch/triton/onnxruntime versions, git sha.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = [
    "SessionInfo",
    "session_info",
    "bench_device",
    "bench_threads",
    "apply_threads",
    "measure_copy_bandwidth",
    "Bench",
    "sync",
    "use_provider",
    "peak_memory",
    "compiled",
    "shape_str",
]

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Machine and session
# ----------------------------------------------------------------------------------------------------------------
def bench_device() -> torch.device:
    """CUDA when present (override with BENCH_DEVICE=cpu|cuda), else CPU."""
    want = os.environ.get("BENCH_DEVICE", "").strip().lower()
    if want == "cpu":
        return torch.device("cpu")
    if want == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def bench_threads() -> int | None:
    """BENCH_THREADS=n pins torch's intra-op threads (and ONNX Runtime's) to n; unset = the libraries' defaults.

    Why it exists: on a shared machine, torch's OpenMP pool with one thread per core stalls whenever another
    process holds a core (seen here, 2 cores + two niced training jobs: the 2D registration forward took 700 ms
    with 2 threads and 24 ms with 1). The thread count is part of the machine label, so runs with different
    counts are reported separately, never merged.
    """
    text = os.environ.get("BENCH_THREADS", "").strip()
    if not text:
        return None
    n = int(text)
    if n < 1:
        raise ValueError(f"BENCH_THREADS must be a positive int, got {text!r}")
    return n


def apply_threads() -> None:
    n = bench_threads()
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux) + usable thread count."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return f"{model} ({n} threads)"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def git_sha() -> str:
    """Short sha of HEAD (+ '-dirty' when tracked files changed); BENCH_GIT_SHA wins (a copied tree has no .git)."""
    env = os.environ.get("BENCH_GIT_SHA")
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device (CPU: memory-to-memory) copy bandwidth in GB/s, counting bytes read + bytes written.

    GPU: 1 GiB fp32 copied `reps` times, CUDA events, median. CPU: 256 MiB (8x a 32 MB L3), perf_counter, median.
    Random data, not zeros (zeros can run faster than real data: METHOD.md).
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):  # warm-up: page faults on the CPU, context/allocator on the GPU
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / statistics.median(times) / 1e9


@dataclass(frozen=True)
class SessionInfo:
    """What every benchmark of one session shares; `machine` is the key the report groups by (never mixed)."""

    device: str             # "cuda" or "cpu": where the benchmarked tensors live
    machine: str            # GPU name on a GPU box, else the CPU model + threads
    device_name: str        # GPU name or CPU model
    cpu: str
    torch_threads: int
    copy_gbps: float        # measured once in this session, bytes read + written
    copy_bytes: int
    llc_bytes: int          # last-level cache (GPU L2 / CPU L3), sizes the input rotation
    versions: dict = field(default_factory=dict)
    git_sha: str = "unknown"

    def as_dict(self) -> dict:
        return asdict(self)


def _llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 32 << 20
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        sizes = []
        for idx in base.glob("index*"):
            text = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        if sizes:
            best = max(sizes)
    except (OSError, ValueError):
        pass
    return best


@functools.lru_cache(maxsize=2)
def session_info(device: str | None = None) -> SessionInfo:
    dev = torch.device(device) if device else bench_device()
    cpu = cpu_name()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        machine = name
    else:
        apply_threads()
        name = cpu.rsplit(" (", 1)[0]
        t = torch.get_num_threads()
        machine = f"{cpu}, torch {t} thread{'s' if t > 1 else ''}"
    copy_bytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    gbps = measure_copy_bandwidth(dev, copy_bytes)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "tensorrt": _version("tensorrt"),
        "pytest-benchmark": _version("pytest-benchmark"),
    }
    return SessionInfo(device=dev.type, machine=machine, device_name=name, cpu=cpu,
                       torch_threads=torch.get_num_threads(), copy_gbps=round(gbps, 2), copy_bytes=2 * copy_bytes,
                       llc_bytes=_llc_bytes(dev), versions=versions, git_sha=git_sha())


# ----------------------------------------------------------------------------------------------------------------
# Helpers for suites
# ----------------------------------------------------------------------------------------------------------------
def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def tensors_bytes(obj) -> int:
    """Bytes of all tensors in a (nested) tuple/list/dict: what one input set occupies."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensors_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensors_bytes(o) for o in obj.values())
    return 0


def compiled(fn: Callable, **kwargs) -> Callable:
    """torch.compile(fn) with a fresh Dynamo cache: each benchmark compiles its own graph for its own shapes.

    Without the reset, one function compiled across many shapes/dtypes hits Dynamo's recompile limit (8) and
    silently falls back to eager, and "automatic dynamic" shapes would time a different (dynamic) graph.
    """
    torch._dynamo.reset()
    kwargs.setdefault("dynamic", False)
    return torch.compile(fn, **kwargs)


# Public names of the three hot ops, as modules import them (`from deepsim_rt.kernels import warp`).
_OPS = ("multilayer_cosine", "warp", "integrate")


@contextmanager
def use_provider(provider: str):
    """Run deepsim_rt's models and losses on one provider of the hot ops.

    "kernels": the public dispatching ops (CUDA -> Triton, CPU -> reference), i.e. what users get.
    "reference": every deepsim_rt module that imported a dispatching op gets `deepsim_rt.kernels.reference`'s
    function instead for the duration (the training step's baseline on the GPU), then it is restored.
    """
    if provider == "kernels":
        yield
        return
    if provider != "reference":
        raise ValueError(f"provider must be 'kernels' or 'reference', got {provider!r}")
    import sys

    import deepsim_rt.kernels as public
    from deepsim_rt.kernels import reference

    dispatching = {name: getattr(public, name) for name in _OPS}
    patched = []
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("deepsim_rt") or mod is None or modname == "deepsim_rt.kernels.reference":
            continue
        for name, fn in dispatching.items():
            if getattr(mod, name, None) is fn:
                patched.append((mod, name, fn))
                setattr(mod, name, getattr(reference, name))
    old_env = os.environ.get("DEEPSIM_RT_BACKEND")
    os.environ["DEEPSIM_RT_BACKEND"] = "reference"
    try:
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)
        if old_env is None:
            os.environ.pop("DEEPSIM_RT_BACKEND", None)
        else:
            os.environ["DEEPSIM_RT_BACKEND"] = old_env


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _profiler_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated during fn: torch.profiler's memory timeline (allocator events,
    autograd's backward included), maximum over time of the sum over categories."""
    import json
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: deprecated for CUDA snapshots
        path = os.path.join(tmp, "timeline.json")
        p.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return int(max((sum(s) for s in sizes), default=0))


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Peak extra memory of one untimed call of fn: (bytes, method).

    CUDA: torch.cuda.max_memory_allocated above the allocated baseline (exact, allocator-level).
    CPU: torch.profiler's memory timeline (allocator events of the call, tensors alive before it not counted).
    tracemalloc does not see torch's allocations; if the profiler route fails, the resident set size sampled every
    1 ms in a thread (peak minus the level before; glibc keeps freed pages, so it underestimates once warm).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), "cuda.max_memory_allocated"
    try:
        return _profiler_peak(fn), "torch.profiler memory timeline"
    except Exception:  # noqa: BLE001 - the profiler API is private-ish; fall back rather than lose the benchmark
        pass
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return int(peak[0] - base), "rss-delta-sampled-1ms"


# ----------------------------------------------------------------------------------------------------------------
# The timed run
# ----------------------------------------------------------------------------------------------------------------
def _budget() -> tuple[float, int, int]:
    """(seconds of timed rounds per benchmark, min rounds, max rounds); env BENCH_BUDGET_S overrides the time."""
    dev = bench_device()
    budget = float(os.environ.get("BENCH_BUDGET_S", "0.4" if dev.type == "cuda" else "1.0"))
    return budget, (10 if dev.type == "cuda" else 5), (2000 if dev.type == "cuda" else 200)


class Bench:
    """Wraps pytest-benchmark's fixture: `bench.run(target, make_inputs, ...)` times target(*prepare(inputs))."""

    def __init__(self, benchmark, info: SessionInfo) -> None:
        self.benchmark = benchmark
        self.info = info
        self.device = torch.device(info.device)

    def n_sets(self, one_set_bytes: int, max_sets: int = 32, max_bytes: int = 1 << 30) -> int:
        """Input sets to rotate: 1 when one set already exceeds the last-level cache, else enough for 4x it
        (at most `max_sets` sets and `max_bytes` in all)."""
        if one_set_bytes <= 0 or one_set_bytes >= self.info.llc_bytes:
            return 1
        want = -(-4 * self.info.llc_bytes // one_set_bytes)
        return int(max(1, min(max_sets, want, max_bytes // one_set_bytes)))

    def run(
        self,
        target: Callable,
        make_inputs: Callable[[], tuple],
        *,
        op: str,
        pass_: str,
        provider: str,
        shape: str,
        dtype: str,
        prepare: Callable[[tuple], tuple] | None = None,
        bytes_moved: int | None = None,
        flops: int | None = None,
        rotate: bool = True,
        budget_s: float | None = None,
        extra: dict | None = None,
        memory: Callable[[], object] | None = None,
        device: torch.device | None = None,
    ):
        """Time `target(*prepare(inputs))` over rotating input sets; returns the last target result.

        make_inputs() -> tuple: one input set (allocated here, outside any timed region).
        prepare(inputs) -> tuple: per-round untimed step (default: the inputs themselves).
        memory: a callable run once, untimed, to measure peak memory (see peak_memory).
        device: where the timed work runs when it differs from the session's device (ONNX Runtime's CPU build on
            the GPU box): CUDA events would time an idle GPU, so such a case is timed with the host clock.
        """
        prepare = prepare or (lambda inputs: inputs)
        first = make_inputs()
        n = self.n_sets(tensors_bytes(first)) if rotate else 1
        sets = [first] + [make_inputs() for _ in range(n - 1)]
        dev = device if device is not None else self.device

        # Warm-up, untimed: each set once (compilation, autotuning, caches of every set's shapes), then time a few
        # calls to size the rounds.
        for s in sets:
            target(*prepare(s))
        sync(dev)
        budget, min_rounds, max_rounds = _budget()
        budget = budget_s if budget_s is not None else budget
        est: list[float] = []
        while len(est) < 3 and sum(est) < 0.5 * budget:  # slow cases (seconds per call) estimate from one call
            args = prepare(sets[len(est) % n])
            sync(dev)
            t0 = time.perf_counter()
            target(*args)
            sync(dev)
            est.append(time.perf_counter() - t0)
        per_call = max(min(est), 1e-6)
        rounds = int(max(min_rounds, min(max_rounds, budget // per_call)))

        events: list[tuple] = []
        counter = [0]

        def setup():
            args = prepare(sets[counter[0] % n])
            counter[0] += 1
            sync(dev)
            return args, {}

        if dev.type == "cuda":
            def timed(*args):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                out = target(*args)
                e.record()
                torch.cuda.synchronize(dev)
                events.append((s, e))
                return out
        else:
            def timed(*args):
                return target(*args)

        self.benchmark.group = f"{op} {pass_} {shape} {dtype}"
        result = self.benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)

        info = {"op": op, "pass": pass_}
        info.update(provider=provider, shape=shape, dtype=dtype, device=dev.type,
                    machine=self.info.machine, device_name=self.info.device_name, cpu=self.info.cpu,
                    torch_threads=self.info.torch_threads, copy_gbps=self.info.copy_gbps, n_sets=n, rounds=rounds,
                    versions=self.info.versions, git_sha=self.info.git_sha)
        if events:
            dts = sorted(s.elapsed_time(e) / 1e3 for s, e in events)
            q = statistics.quantiles(dts, n=4) if len(dts) >= 2 else [dts[0]] * 3
            info.update(timer="cuda-events", median_s=statistics.median(dts), iqr_s=q[2] - q[0], min_s=dts[0],
                        max_s=dts[-1])
        else:
            st = getattr(self.benchmark.stats, "stats", None)
            if st is not None:
                info.update(timer="perf_counter", median_s=st.median, iqr_s=st.iqr, min_s=st.min, max_s=st.max)
        med = info.get("median_s")
        if bytes_moved is not None:
            info["bytes"] = int(bytes_moved)
            if med:
                gbps = bytes_moved / med / 1e9
                info["gbps"] = round(gbps, 3)
                info["pct_copy_bw"] = round(100.0 * gbps / self.info.copy_gbps, 2)
        if flops is not None:
            info["flops"] = int(flops)
            if med:
                info["gflops"] = round(flops / med / 1e9, 3)
        if memory is not None:
            peak, how = peak_memory(memory, dev)
            info["peak_mem_bytes"] = peak
            info["peak_mem_method"] = how
        if extra:
            info.update(extra)
        self.benchmark.extra_info.update(info)
        return result
