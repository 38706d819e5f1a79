"""Where does registration inference spend its time, per backend? Profiles of eager PyTorch and ONNX Runtime.

    python benchmarks/profile_inference.py [--ndim 3] [--size 80 96 80] [--runs 3] [--threads N]

For the bundled model (or its same-preset stand-in, as benchmarks/test_inference.py) at one size on the CPU:
  - eager: torch.profiler over `runs` network calls, self CPU time per ATen op (which convolution algorithm ATen
    picked shows up as the op name: mkldnn_convolution = oneDNN, slow_conv3d_forward / thnn_conv2d = im2col+GEMM);
  - onnxruntime: ORT's own profiler (SessionOptions.enable_profiling) over the same calls, kernel time per ONNX op
    type, and the execution provider of each node.
Prints two tables (op, total ms per call, share). Not a benchmark (pytest does not collect it): it explains one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.test_inference import CACHE, model_source  # noqa: E402


def eager_profile(reg, mov, fix, runs: int) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    reg.backend(mov, fix)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            reg.backend(mov, fix)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / runs, e.count // runs) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def ort_profile(onnx_path: str, mov, fix, runs: int, threads: int | None) -> tuple[list, dict]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in sess.get_inputs()], [mov.numpy(), fix.numpy()], strict=True))
    sess.run(None, feeds)
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    eps: dict[str, int] = defaultdict(int)
    # The first run (warm-up) is in the profile too: keep the last `runs` SequentialExecutor::Execute windows.
    runs_ev = sorted((e for e in events if e.get("name") == "SequentialExecutor::Execute"), key=lambda e: e["ts"])
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs_ev[-runs:]]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if windows and not any(a <= e["ts"] <= b for a, b in windows):
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_op[op] += e["dur"] / 1e3 / runs
        count[op] += 1
        eps[e.get("args", {}).get("provider", "?")] += 1
    rows = sorted(((k, v, count[k] // max(runs, 1)) for k, v in per_op.items()), key=lambda r: -r[1])
    return rows, dict(eps)


def _print(title: str, rows, top: int = 12) -> None:
    total = sum(r[1] for r in rows) or 1.0
    print(f"\n{title}: {total:.1f} ms per call (sum of op times)")
    print(f"  {'op':44s} {'ms/call':>9s} {'share':>7s} {'calls':>6s}")
    for name, ms, n in rows[:top]:
        print(f"  {name[:44]:44s} {ms:9.2f} {100 * ms / total:6.1f}% {n:6d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ndim", type=int, default=3, choices=(2, 3))
    ap.add_argument("--size", type=int, nargs="+", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size) if args.size else ((80, 96, 80) if args.ndim == 3 else (192, 160))
    from deepsim_rt.runtime import Registrator, pad_to_multiple

    model, desc = model_source(args.ndim)
    CACHE.mkdir(parents=True, exist_ok=True)
    eager = Registrator.load(model, backend="eager", device="cpu")
    onnx = Registrator.load(model, backend="onnxruntime", device="cpu", cache_dir=CACHE, verify=False,
                            threads=args.threads)
    g = torch.Generator().manual_seed(0)
    mov = pad_to_multiple(torch.rand((1, 1, *size), generator=g), eager.cfg.spatial_multiple)[0]
    fix = pad_to_multiple(torch.rand((1, 1, *size), generator=g), eager.cfg.spatial_multiple)[0]
    print(f"model: {desc}; input {tuple(mov.shape)}; torch threads {torch.get_num_threads()}")
    with torch.inference_mode():
        _print("eager PyTorch (self CPU time per ATen op)", eager_profile(eager, mov, fix, args.runs))
    rows, eps = ort_profile(onnx.source, mov, fix, args.runs, args.threads)
    _print(f"ONNX Runtime (kernel time per ONNX op; nodes per provider {eps})", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
