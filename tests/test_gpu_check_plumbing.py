"""benchmarks/gpu_check.sh's plumbing, run here as on a GPU machine that lacks the optional packages.

The first GPU run must not be spent on the script itself: collection errors (a test module importing nibabel),
results left in a temp folder, a failing part stopping the rest. The end-to-end test runs the real script with
GPU_CHECK_ALLOW_CPU=1 while nibabel, tritonclient, onnxruntime and antspyx are hidden from every Python process
it starts (a sitecustomize on PYTHONPATH), and checks exit 0, one record per part, at most 8 files under $OUT.
The bookkeeping module's pieces are checked on their own below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import gpu_check_parts as P

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("nibabel", "tritonclient", "onnxruntime", "ants")
# What a GPU machine lacks: hidden from the finder every import goes through (find_spec says "absent" too).
SITECUSTOMIZE = f"""\
import importlib.machinery as _m
import sys

_HIDDEN = {set(HIDDEN)!r}


class _Hide(_m.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_Hide if f is _m.PathFinder else f for f in sys.meta_path]
"""
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="5" time="1.0"><testcase classname="t" name="a"/><testcase classname="t" name="b"><failure
message="x"/></testcase></testsuite></testsuites>"""


def test_exit_codes_map_to_a_status_and_a_verdict():
    assert P.status_of("tests", 0) == ("ok", False)
    assert P.status_of("tests", 5) == ("nothing collected/selected", False)
    assert P.status_of("tests", 1) == ("rc=1", True)
    assert P.status_of("kernels", 124) == ("TIME BOX HIT (partial results kept)", False)
    assert P.status_of("tests", 124) == ("TIME BOX HIT", True)  # correctness unchecked: a failure
    assert P.status_of("preflight", 2) == ("rc=2", True)


def test_record_folds_each_part_into_one_json_and_one_junit(tmp_path):
    dest, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    (work / "tests.xml").write_text(JUNIT)
    (work / "env.json").write_text(json.dumps({"card": "NVIDIA H200", "torch": "2.13.0"}))
    rec = P.record(dest, work, "tests", 1, 12.0, 90)
    assert rec["tests"] == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2} and rec["failed"]
    P.record(dest, work, "report", 0, 1.0, 15)  # a script part: one synthetic testcase
    P.record(dest, work, "tests", 0, 11.0, 90)  # a part recorded again replaces its record
    state = json.loads((dest / "gpu_check.json").read_text())
    assert state["env"]["card"] == "NVIDIA H200"
    assert [p["part"] for p in state["parts"]] == ["report", "tests"]
    suites = ET.parse(dest / "gpu_check.xml").getroot().findall("testsuite")
    assert sorted(s.get("name") for s in suites) == ["report", "tests"]
    lines = P.summary_lines(dest, 30.0, 450.0)
    assert "card: NVIDIA H200" in lines[1]
    assert any(ln.startswith("tests") and "2/1/0/2" in ln for ln in lines)
    assert lines[-1] == "verdict: all parts passed"
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_check.json", "gpu_check.xml"]  # temp files renamed


def test_a_script_part_s_figures_ride_in_its_record(tmp_path):
    dest, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    (work / "graphs.result.json").write_text(json.dumps({"inference_eager_us": 310.0, "inference_graph_us": 41.0}))
    rec = P.record(dest, work, "graphs", 0, 4.0, 20)
    assert rec["results"] == {"inference_eager_us": 310.0, "inference_graph_us": 41.0} and not rec["failed"]
    assert P.status_of("graphs", 5) == ("nothing collected/selected", False)  # skipped without CUDA
    assert "results" not in P.record(dest, work, "report", 0, 1.0, 15)


def test_preflight_stops_with_one_line_without_cuda_and_without_the_cpu_flag(tmp_path):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CUDA machine: the no-CUDA message cannot be produced here")
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check_parts", "preflight", "--work", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check PREFLIGHT FAILED: no CUDA device visible to torch") and \
        "GPU_CHECK_ALLOW_CPU=1" in last
    assert json.loads((tmp_path / "env.json").read_text())["error"] in last


def _run_gpu_check(tmp_path, select: str) -> tuple[subprocess.CompletedProcess, Path]:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_ALLOW_CPU": "1", "PYTHON": sys.executable,
           "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_TIME_SCALE": "6",
           "PYTHONPATH": str(hide), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # as on a fresh machine: the script's preflight sets what it needs
    env["GPU_CHECK_SELECT"] = select
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=env)
    return r, out


def _check_run(r, out):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    state = json.loads((out / "gpu_check.json").read_text())
    parts = {p["part"]: p for p in state["parts"]}
    want = ["preflight", "tests", "mutation", "kernels", "kernels-compile", "train-step", "inference",
            *(["refine"] if (REPO / "benchmarks" / "test_refine.py").exists() else []), "graphs", "report"]
    assert list(parts) == want
    assert not [p for p in parts.values() if p["failed"]], parts
    assert parts["tests"]["tests"].get("errors") == 0  # no collection error: nothing imports a hidden package
    # torch's mutation analysis ran on this torch, beside the preflight, and reported every declared write
    assert parts["mutation"]["status"] == "ok" and "0 failing" in (out / "gpu_check.log").read_text()
    env = state["env"]
    assert env["mode"] == "cpu-plumbing" and set(env["smoke"]) == {"warp", "integrate", "cosine"}
    assert all(env[m] == "absent" for m in ("nibabel", "onnxruntime", "tritonclient"))
    suites = {s.get("name") for s in ET.parse(out / "gpu_check.xml").getroot().findall("testsuite")}
    assert suites == set(want)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what a lent GPU machine sends back
    assert {"gpu_check.json", "gpu_check.xml", "gpu_check.log"} <= set(files)
    assert r.stdout.strip().splitlines()[-1] == "verdict: all parts passed"


@pytest.mark.slow
def test_gpu_check_plumbing_without_optional_packages(tmp_path):
    """~1 min on 2 idle cores (one torch start per part): slow, so `.ci/run` runs it as a step of its own.
    GPU_CHECK_SELECT narrows every pytest part to no test: each module is still imported (collection is what
    broke on the GPU machine) and the preflight still launches every kernel (interpreter)."""
    _check_run(*_run_gpu_check(tmp_path, "-k no_such_test"))
