"""Bookkeeping for benchmarks/gpu_check.sh: preflight, per-part records under $OUT, the closing summary.

    python -m benchmarks.gpu_check_parts preflight --work DIR [--allow-cpu]
    python -m benchmarks.gpu_check_parts record --dest DIR --work DIR --name N --rc RC --seconds S --budget B
    python -m benchmarks.gpu_check_parts summary --dest DIR

The lent GPU machine sends back at most 8 files from $OUT, so every part folds its results into three files
there as soon as it ends (rewritten atomically, so a kill leaves the previous complete version):
  gpu_check.json   environment (card, versions) + one record per finished part (rc, seconds, budget, test counts)
  gpu_check.xml    JUnit XML: every part's testsuite (pytest's own, or one synthetic testcase for a script part)
  gpu_check.log    every part's output (appended live by the shell script)
next to the pytest-benchmark JSON files of the benchmark parts (gpu-*.json), 8 files at most in all.
`record` and `summary` use the standard library only (no torch import: ~0.05 s per call).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

STATUS = {0: "ok", 5: "nothing collected/selected", 124: "TIME BOX HIT", 130: "TIME BOX HIT", 137: "TIME BOX HIT"}
# Parts whose time-box hit keeps its partial results and is not a failure (benchmarks: the slowest cases come
# last, so a hit cuts the tail); a hit in the preflight or the CUDA tests leaves correctness unchecked: failure.
PARTIAL_OK = ("kernels", "kernels-compile", "train-step", "inference", "refine", "graphs", "report")


def status_of(name: str, rc: int) -> tuple[str, bool]:
    """(what happened, counts as a failure) for a part's exit code."""
    what = STATUS.get(rc, f"rc={rc}")
    if rc in (0, 5):
        return what, False
    if what == "TIME BOX HIT":
        return what + (" (partial results kept)" if name in PARTIAL_OK else ""), name not in PARTIAL_OK
    return what, True


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped summed over a JUnit XML file's testsuites ({} if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def record(dest: Path, work: Path, name: str, rc: int, seconds: float, budget: float) -> dict:
    """Fold one finished part into dest/gpu_check.json and dest/gpu_check.xml; returns the part's record."""
    dest.mkdir(parents=True, exist_ok=True)
    what, failed = status_of(name, rc)
    junit = work / f"{name}.xml"
    rec = {"part": name, "rc": rc, "status": what, "failed": failed, "seconds": round(seconds, 1),
           "budget_s": budget, "tests": junit_counts(junit) if junit.exists() else {}}
    # A script part's figures (e.g. graphs: eager vs CUDA-graph microseconds) ride in its record: the lent machine
    # sends back 8 files at most, all taken.
    results = _load(work / f"{name}.result.json", None)
    if results is not None:
        rec["results"] = results
    state = _load(dest / "gpu_check.json", {"env": {}, "parts": []})
    env = _load(work / "env.json", None)
    if env is not None:
        state["env"] = env
    state["parts"] = [p for p in state["parts"] if p["part"] != name] + [rec]
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _atomic_write(dest / "gpu_check.json", json.dumps(state, indent=1) + "\n")

    xml_path = dest / "gpu_check.xml"
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        root = ET.Element("testsuites")
    for s in [s for s in root if s.get("name") == name]:
        root.remove(s)
    suites = []
    if junit.exists():
        try:
            jr = ET.parse(junit).getroot()
            suites = [jr] if jr.tag == "testsuite" else list(jr.iter("testsuite"))
        except ET.ParseError:
            suites = []
    if not suites:  # a script part (preflight, report): one synthetic testcase carrying its verdict
        s = ET.Element("testsuite", name=name, tests="1", failures=str(int(failed)), errors="0", skipped="0",
                       time=f"{seconds:.1f}")
        case = ET.SubElement(s, "testcase", classname="gpu_check", name=name, time=f"{seconds:.1f}")
        if failed:
            ET.SubElement(case, "failure", message=what)
        suites = [s]
    for s in suites:
        s.set("name", name)
        root.append(s)
    _atomic_write(xml_path, ET.tostring(root, encoding="unicode") + "\n")
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Preflight: ~10 s, one clear message on the first thing a GPU run would trip over
# ----------------------------------------------------------------------------------------------------------------
class PreflightError(Exception):
    pass


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise PreflightError(msg)


def _toolchain() -> dict:
    cc = os.environ.get("CC") or next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    _need(cc is not None, "no C compiler (cc/gcc/clang, or $CC): Triton builds its CUDA launcher with one "
                          "(apt-get install gcc)")
    inc = sysconfig.get_paths()["include"]
    _need(Path(inc, "Python.h").exists(), f"no Python.h under {inc}: Triton's launcher needs the Python headers "
                                          f"(apt-get install python3-dev, or the matching python{sys.version_info[0]}"
                                          f".{sys.version_info[1]}-dev)")
    cxx = os.environ.get("CXX") or next((shutil.which(c) for c in ("g++", "clang++") if shutil.which(c)), None)
    _need(cxx is not None, "no C++ compiler (g++/clang++, or $CXX): AOTInductor compiles its package with one "
                           "(apt-get install g++)")
    return {"cc": cc, "cxx": cxx, "python_include": inc}


def _smoke_launches(device: str) -> list[str]:
    """One forward + backward of each op through the public dispatch (Triton ops on CUDA, interpreter on CPU),
    compared with the float64 reference. Returns what ran."""
    import torch

    import deepsim_rt.kernels as K
    from deepsim_rt.kernels import reference as R

    g = torch.Generator().manual_seed(0)
    steps = 7 if device == "cuda" else 2
    img = torch.rand(1, 1, 6, 7, 8, generator=g).to(device)
    flow = (torch.randn(1, 3, 6, 7, 8, generator=g) * 1.5).to(device)
    fa = [torch.randn(1, c, *s, generator=g).to(device) for c, s in ((8, (6, 7, 8)), (16, (3, 4, 4)))]
    fb = [torch.randn_like(f) for f in fa]
    # op -> (differentiable input, kernel path, float64 reference)
    cases = {
        "warp": (flow, lambda x: K.warp(img, x), lambda x: R.warp(img.double(), x)),
        # 7 steps on the GPU (the default); 2 under the interpreter, where every launch costs ~0.3 s of CPU.
        "integrate": (flow, lambda x: K.integrate(x, steps), lambda x: R.integrate(x, steps)),
        "cosine": (fa[0], lambda x: K.multilayer_cosine([x, fa[1]], fb),
                   lambda x: R.multilayer_cosine([x, fa[1].double()], [f.double() for f in fb])),
    }
    ran = []
    for name, (x, kern, ref) in cases.items():
        xk = x.clone().requires_grad_()
        xr = x.double().requires_grad_()
        out, want = kern(xk), ref(xr)
        out.sum().backward()
        want.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        err = (out.double() - want).abs().max().item()
        gerr = (xk.grad.double() - xr.grad).abs().max().item()
        _need(err < 1e-4 and gerr < 1e-3, f"{name}: the Triton kernel launched but disagrees with the float64 "
                                          f"reference (max |diff| {err:.2e} forward, {gerr:.2e} gradient)")
        ran.append(name)
    return ran


def preflight(work: Path, allow_cpu: bool) -> int:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    env: dict = {"mode": "gpu"}
    try:
        if allow_cpu:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU runs the interpreter
        import torch

        env |= {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            raise PreflightError("triton is not installed: the kernels cannot run (pip install triton)") from None
        for mod in ("nibabel", "onnxruntime", "tensorrt", "tritonclient", "pytest_benchmark"):
            env[mod] = "present" if __import__("importlib").util.find_spec(mod) else "absent"
        cuda = torch.cuda.is_available()
        if cuda:
            p = torch.cuda.get_device_properties(0)
            env |= {"card": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "devices": torch.cuda.device_count()}
        else:
            _need(allow_cpu, "no CUDA device visible to torch (torch.cuda.is_available() is False; torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}): nothing to check. "
                             "GPU_CHECK_ALLOW_CPU=1 runs the plumbing on the CPU")
            env |= {"mode": "cpu-plumbing", "card": "none (CPU plumbing run)"}
            os.environ["DEEPSIM_RT_BACKEND"] = "triton"
        env |= _toolchain()
        env["smoke"] = _smoke_launches("cuda" if cuda else "cpu")
    except PreflightError as e:
        env["error"] = str(e)
        _atomic_write(work / "env.json", json.dumps(env, indent=1) + "\n")
        print(f"gpu_check PREFLIGHT FAILED: {e}")
        return 2
    env["preflight_s"] = round(time.perf_counter() - t0, 1)
    _atomic_write(work / "env.json", json.dumps(env, indent=1) + "\n")
    print("preflight ok:", ", ".join(f"{k}={v}" for k, v in env.items()))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Summary: the last screen of the run
# ----------------------------------------------------------------------------------------------------------------
def summary_lines(dest: Path, total_s: float, budget_s: float) -> list[str]:
    state = _load(dest / "gpu_check.json", {"env": {}, "parts": []})
    env = state.get("env", {})
    out = [f"==== gpu_check summary: {total_s:.0f} s of {budget_s:.0f} s; results in {dest} ====",
           f"card: {env.get('card', '?')} (capability {env.get('capability', '-')}, {env.get('sms', '-')} SMs, "
           f"{env.get('memory_gib', '-')} GiB) | python {env.get('python', '?')} torch {env.get('torch', '?')} "
           f"cuda {env.get('cuda', '-')} triton {env.get('triton', '?')}"]
    if env.get("error"):
        out.append(f"PREFLIGHT: {env['error']}")
    out.append(f"{'part':16s} {'s':>5s} / {'budget':>6s}  {'tests (pass/fail/err/skip)':28s} status")
    for p in state.get("parts", []):
        t = p.get("tests") or {}
        counts = (f"{t['tests'] - t['failures'] - t['errors'] - t['skipped']}/{t['failures']}/{t['errors']}/"
                  f"{t['skipped']}" if t else "-")
        out.append(f"{p['part']:16s} {p['seconds']:5.0f} / {p['budget_s']:6.0f}  {counts:28s} "
                   f"{'FAIL ' if p['failed'] else ''}{p['status']}")
    failed = [p["part"] for p in state.get("parts", []) if p["failed"]]
    out.append(f"verdict: {'FAILED parts: ' + ', '.join(failed) if failed else 'all parts passed'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--allow-cpu", action="store_true")
    r = sub.add_parser("record")
    for a in ("--dest", "--work"):
        r.add_argument(a, type=Path, required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--budget", type=float, required=True)
    s = sub.add_parser("summary")
    s.add_argument("--dest", type=Path, required=True)
    s.add_argument("--total", type=float, required=True)
    s.add_argument("--budget", type=float, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "preflight":
        return preflight(a.work, a.allow_cpu)
    if a.cmd == "record":
        rec = record(a.dest, a.work, a.name, a.rc, a.seconds, a.budget)
        return 1 if rec["failed"] else 0
    print("\n".join(summary_lines(a.dest, a.total, a.budget)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
