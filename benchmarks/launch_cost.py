"""Host-side cost of the Triton launches of one registration at 2 mm (80x96x80), measured on a CPU (issue 18 #4).

    python -m benchmarks.launch_cost [--repeats 30] [--json PATH]        # CPU: stand-in sm_90 driver
    python -m benchmarks.launch_cost --cuda-graph [--json PATH]         # GPU: eager vs CUDA-graph replay

CPU mode: the REAL launchers run (checks, allocations, grid, `_triton_common.launch`: wrap_triton, device guard,
`kernel[grid](...)`) with CPU tensors standing in for CUDA ones, at STAND_IN (16x32x32: same specialisations as
80x96x80, 1/37 of the CPU arithmetic); only the last step differs: `JITFunction.run` is
called with warmup=True, i.e. Triton binds and specialises the arguments and looks the compiled kernel up (compiled
once for sm_90 by the stand-in driver of the static gate), then returns instead of calling cuLaunchKernel (~2-5 us
on a GPU, not counted). Reported per op: launches, whole launcher call and the Triton part (`run`) per launch, and
per registration: inference (integrate 7 steps + warp) and one refinement step (DeepSim loss forward + backward).
CPU allocations stand in for the CUDA caching allocator (~1-3 us each there); the launchers' few torch ops (the
integration's scaling and zero fills) run on the CPU here, asynchronous kernels (~5 us of host each) on a GPU.

GPU mode (`--cuda-graph`, part of `make gpu-check`): the same sequences on real CUDA tensors, eager vs replayed
from a CUDA graph (`deepsim_rt.kernels.cuda_graph`), synchronised wall time per registration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

SHAPE = (80, 96, 80)  # the 2 mm grid of the bundled default-3d model
# CPU stand-in of the same Triton specialisation class: every dim and every pyramid level's voxel count a multiple
# of 16, as at 80x96x80 (Triton specialises ints on "== 1" and "% 16" only), so the same compiled kernels are looked
# up with the same arguments, while the launchers' own torch arithmetic on the CPU (the integration's scaling,
# zero fills) is 37x smaller than at the real size (1.7 ms of CPU arithmetic per 7-step integration there).
STAND_IN = (16, 32, 32)
PYRAMID_C = (32, 64, 128)  # DeepSim 3D feature levels at the paper widths, spatial /2, /4, /8 of the image
STEPS = 7


def _inputs(device: str = "cpu", shape: Sequence[int] = SHAPE) -> dict:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, *shape, generator=g).to(device)
    flow = (torch.randn(1, 3, *shape, generator=g) * 0.5).to(device)
    feats = [torch.randn(1, c, *(s >> (lv + 1) for s in shape), generator=g).to(device)
             for lv, c in enumerate(PYRAMID_C)]
    fixed = [torch.randn_like(f) for f in feats]
    return {"img": img, "flow": flow, "feats": feats, "fixed": fixed}


def ops(x: dict) -> dict[str, Callable[[], object]]:
    """Each op of a registration as a launcher call (what the autograd Functions / triton_ops call)."""
    from deepsim_rt.kernels.cosine import cosine_bwd, cosine_fwd
    from deepsim_rt.kernels.integrate_kernel import integrate_bwd, integrate_fwd
    from deepsim_rt.kernels.warp_kernel import warp_bwd, warp_fwd

    img, flow, feats, fixed = x["img"], x["flow"], x["feats"], x["fixed"]
    one = torch.ones((), device=img.device)
    return {
        "integrate_fwd (7 steps)": lambda: integrate_fwd(flow, STEPS),
        "warp_fwd": lambda: warp_fwd(img, flow),
        "cosine_fwd (3 levels, mean)": lambda: cosine_fwd(feats, fixed, 1e-6, "mean"),
        "cosine_bwd (3 levels, moving only)": lambda: cosine_bwd(feats, fixed, one, 1e-6, "mean", True, False),
        "warp_bwd (flow only)": lambda: warp_bwd(img, img, flow, need_image=False),
        "integrate_bwd (7 steps)": lambda: integrate_bwd(flow, flow, STEPS),
    }


# What one registration launches, op by op (the network's convolutions and DeepSim's feature extractor are cuDNN /
# Inductor work, not counted here).
INFERENCE = ("integrate_fwd (7 steps)", "warp_fwd")
REFINE_STEP = ("integrate_fwd (7 steps)", "warp_fwd", "cosine_fwd (3 levels, mean)",
               "cosine_bwd (3 levels, moving only)", "warp_bwd (flow only)", "integrate_bwd (7 steps)")


@contextlib.contextmanager
def stand_in_launches(counter: dict) -> Iterator[None]:
    """Real launchers on CPU tensors; `JITFunction.run` binds + looks up, never launches; counts and times it."""
    from triton.runtime.jit import JITFunction

    from deepsim_rt.kernels import cosine, integrate_kernel, warp_kernel

    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        out = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        counter["run_s"] += time.perf_counter() - t0
        counter["launches"] += 1
        return out

    mods = (cosine, warp_kernel, integrate_kernel)
    saved = [(m, m.check_launch_device) for m in mods if hasattr(m, "check_launch_device")]
    JITFunction.run = run
    for m, _ in saved:
        m.check_launch_device = lambda name, t: None
    try:
        yield
    finally:
        JITFunction.run = real_run
        for m, f in saved:
            m.check_launch_device = f


def _register_ops_on_cpu():
    """The deepsim_rt:: triton_ops, registered in a CPU process with compiled (not interpreted) kernels: the kernel
    modules are imported first (their @triton.jit runs without TRITON_INTERPRET), then dispatch registers the ops
    (it does so where CUDA or TRITON_INTERPRET=1 is present)."""
    import importlib

    from deepsim_rt.kernels import cosine, integrate_kernel, warp_kernel  # noqa: F401  (compiled kernels first)

    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import deepsim_rt.kernels.dispatch as dispatch

        if not dispatch.OPS_REGISTERED:
            dispatch = importlib.reload(dispatch)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
    if not dispatch.OPS_REGISTERED:
        raise RuntimeError("the deepsim_rt:: triton ops could not be registered (torch.library.triton_op missing?)")


def _registration(x: dict) -> dict[str, Callable[[], object]]:
    """Inference and one refinement step as the runtime runs them on CUDA: through the torch.ops.deepsim_rt ops
    (custom-op dispatch, then the op body launches with wrap_triton off), the step with autograd."""
    ops_ = torch.ops.deepsim_rt
    img, flow, feats, fixed = x["img"], x["flow"], x["feats"], x["fixed"]

    def inference():
        with torch.no_grad():
            return ops_.warp(img, ops_.integrate(flow, STEPS, "border"), "linear", "border", False)

    def refine_step():
        p = flow.detach().requires_grad_(True)
        fa = [f.detach().requires_grad_(True) for f in feats]  # stands in for the feature extractor's output
        w = ops_.warp(img, ops_.integrate(p, STEPS, "border"), "linear", "border", False)
        loss = 1.0 - ops_.multilayer_cosine(fa, fixed, 1e-6)
        torch.autograd.backward([loss, w], [None, torch.ones_like(w)])
        return p.grad

    return {"inference (public ops)": inference, "refinement step (public ops, fwd + bwd)": refine_step}


def _time(f: Callable[[], object], counter: dict, repeats: int) -> dict:
    f()  # compiles (stand-in sm_90) once
    calls, runs = [], []
    for _ in range(repeats):
        counter.update(run_s=0.0, launches=0)
        t0 = time.perf_counter()
        f()
        calls.append(time.perf_counter() - t0)
        runs.append(counter["run_s"])
    n = counter["launches"]
    # min: the cost itself (on a shared machine, larger samples are other processes' time slices); median beside it.
    return {"launches": n, "call_us": round(min(calls) * 1e6, 1),
            "call_us_median": round(statistics.median(calls) * 1e6, 1),
            "run_us_per_launch": round(min(runs) * 1e6 / max(n, 1), 1)}


def measure_cpu(repeats: int = 30) -> dict:
    """-> {"ops": {launcher: {launches, call_us, run_us_per_launch}}, "registration": {same, per sequence}}."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from torch._library.triton import set_wrap_triton_enabled

    from benchmarks.gpu_static_driver import stand_in_target

    _register_ops_on_cpu()
    x = _inputs("cpu", STAND_IN)
    counter = {"run_s": 0.0, "launches": 0}
    out: dict = {"triton": triton.__version__, "torch": torch.__version__, "shape": list(SHAPE), "ops": {},
                 "registration": {}}
    with stand_in_target(90), stand_in_launches(counter):
        # As inside the ops: triton_op runs its body with wrap_triton off for real tensors (the HOP dispatch it
        # skips costs ~0.5 ms per launch here).
        with set_wrap_triton_enabled(False):
            for name, f in ops(x).items():
                out["ops"][name] = _time(f, counter, repeats)
        for name, f in _registration(x).items():
            out["registration"][name] = _time(f, counter, repeats)
    for key, seq in (("inference", INFERENCE), ("refine_step", REFINE_STEP)):
        out[f"{key}_us"] = round(sum(out["ops"][o]["call_us"] for o in seq), 1)
        out[f"{key}_launches"] = sum(out["ops"][o]["launches"] for o in seq)
    return out


def format_cpu(res: dict) -> str:
    lines = [f"host cost per launcher call, 80x96x80, triton {res['triton']}, torch {res['torch']} "
             "(stand-in sm_90 driver, CPU tensors of 16x32x32: same specialisations)",
             f"{'op':40s} {'launches':>8s} {'call us min':>12s} {'median':>9s} {'triton run us/launch':>21s}"]
    rows = [*res["ops"].items(), None, *res["registration"].items()]
    for row in rows:
        if row is None:
            lines.append(f"sum of the launchers: inference (integrate + warp) {res['inference_launches']} launches, "
                         f"{res['inference_us']:.0f} us; one refinement step (DeepSim, diffeomorphic) "
                         f"{res['refine_step_launches']} launches, {res['refine_step_us']:.0f} us")
            continue
        name, r = row
        lines.append(f"{name:40s} {r['launches']:8d} {r['call_us']:12.1f} {r['call_us_median']:9.1f} "
                     f"{r['run_us_per_launch']:21.1f}")
    return "\n".join(lines)


def measure_cuda_graph(repeats: int = 50) -> dict:
    """GPU: the inference and one refinement step through the torch.ops.deepsim_rt ops (as the runtime calls them),
    eager vs replayed from a CUDA graph (`GraphedCallable`), synchronised wall time, median of `repeats`."""
    from deepsim_rt.kernels import dispatch
    from deepsim_rt.kernels.cuda_graph import GraphedCallable

    if not dispatch.OPS_REGISTERED:
        raise RuntimeError("torch.ops.deepsim_rt is not registered on this CUDA machine (triton missing?)")
    x = _inputs("cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(SHAPE)}
    for name, fn in _registration(x).items():
        key = name.split(" (")[0].replace(" ", "_")
        graphed = GraphedCallable(fn, device="cuda")
        for mode, f in (("eager", fn), ("graph", graphed)):
            for _ in range(3):
                f()
            torch.cuda.synchronize()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                f()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            res[f"{key}_{mode}_us"] = round(statistics.median(ts) * 1e6, 1)
        res[f"{key}_captured"] = graphed.captured
        res[f"{key}_speedup"] = round(res[f"{key}_eager_us"] / res[f"{key}_graph_us"], 2)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cuda-graph", action="store_true", help="GPU: eager vs CUDA-graph replay")
    a = ap.parse_args(argv)
    if a.cuda_graph:
        if not torch.cuda.is_available():  # only the CPU plumbing run of gpu_check.sh gets here
            print("launch_cost --cuda-graph: skipped, no CUDA device (torch.cuda.is_available() is False)")
            return 5  # gpu_check_parts: "nothing collected/selected", not a failure
        res = measure_cuda_graph(a.repeats)
        print(json.dumps(res, indent=1))
    else:
        torch.set_num_threads(1)
        res = measure_cpu(a.repeats)
        print(format_cpu(res))
    if a.json:
        from deepsim_rt._io import atomic_write

        atomic_write(a.json, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
