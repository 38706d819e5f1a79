"""torch's mutation analysis of every kernel launch (`benchmarks/gpu_static.py --mutation-only`, issue 18 defect 3).

torch.compile / AOTInductor / triton_op decide what a Triton launch writes from torch's TTIR analysis. A written
buffer it misses can be reordered or dropped; an input it reports (or an analysis that gives up and reports every
tensor) is cloned before every launch. Each kernel declares what it writes (`_triton_common.declare_writes`); the
mode checks every launch of the static gate's variants against that, on the installed torch and on torch 2.11's
analyser (the GPU machines', emulated: scalars handed to Triton as constants, names of tensor arguments only).
These tests run the mode in a subprocess: the test process runs the kernels under TRITON_INTERPRET=1, where
@triton.jit yields interpreter functions torch's analysis cannot read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_static import mutation_check, row_problems

REPO = Path(__file__).resolve().parents[1]
VENV36_PY = REPO / ".venv-triton36" / "bin" / "python"


def _mutation_only(python, mode: str, select: str, tmp_path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / f"mutation-{mode}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([str(python), "-m", "benchmarks.gpu_static", "--mutation-only", mode, "-k", select,
                        "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return r, rows


def _cos_fwd_kw(write_map: bool, levels: int = 3) -> dict:
    return {"NUM_LEVELS": levels, "WRITE_MAP": write_map}


def test_declared_writes_of_the_cosine_kernels():
    pytest.importorskip("triton")
    from deepsim_rt.kernels import cosine
    from deepsim_rt.kernels._triton_common import declared_writes

    assert declared_writes(cosine._cos_fwd_kernel, _cos_fwd_kw(False)) == {"part_ptr"}
    assert declared_writes(cosine._cos_fwd_kernel, _cos_fwd_kw(True, 2)) == {"m0", "m1"}
    assert declared_writes(cosine._cos_bwd_kernel, {"NUM_LEVELS": 2, "NEED_A": False, "NEED_B": True}) == {"gb0",
                                                                                                            "gb1"}


def test_a_missed_write_an_input_written_and_a_given_up_analysis_each_fail_the_launch():
    pytest.importorskip("triton")
    import torch

    from deepsim_rt.kernels import cosine

    part, a0 = torch.zeros(4), torch.zeros(4)
    kw = {**_cos_fwd_kw(False), "part_ptr": part, "a0": a0}
    inputs = {a0.untyped_storage().data_ptr()}
    # What torch 2.11's analyser would do if it mapped TTIR parameters to the wrong names: part_ptr not written.
    row = {"kernel": "_cos_fwd_kernel", "triton": "3.6.0", "arch": "torch<=2.11 (emulated)", "variant": "v",
           "dtype": "fp32", **mutation_check(cosine._cos_fwd_kernel, kw, inputs, analysed=([], None))}
    assert row["missing_writes"] == ["part_ptr"]
    assert row_problems(row) == ["mutation analysis: written buffer(s) part_ptr NOT reported as written "
                                 "(torch.compile may reorder or drop the write)"]
    row.update(mutation_check(cosine._cos_fwd_kernel, kw, inputs, analysed=(["a0", "part_ptr"], None)))
    assert row_problems(row) == ["mutation analysis: input(s) a0 reported as written"]
    row.update(mutation_check(cosine._cos_fwd_kernel, kw, inputs,
                              analysed=(["a0", "part_ptr"], "CompilationError: IndexError('x')")))
    assert row_problems(row) == ["mutation analysis gave up and assumed every input written "
                                 "(CompilationError: IndexError('x'))"]


def test_mutation_only_mode_on_this_torch_reports_every_cosine_write(tmp_path):
    """The installed torch's analysis (2.13 here) finds exactly the declared writes of every cosine launch. Under
    this venv's triton (3.9) the emulated torch 2.11 analyser gives up on _cos_fwd_kernel (Triton's front end
    raises IndexError on the scalar constants), which shows the emulation is in force; torch 2.11 ships with
    triton 3.6, checked by the next test and by `make check-gpu-static`."""
    pytest.importorskip("triton")
    r, rows = _mutation_only(sys.executable, "both", "cosine fwd 3D L=3", tmp_path)
    installed = [x for x in rows if not x["arch"].startswith("torch<=2.11")]
    emulated = [x for x in rows if x["arch"].startswith("torch<=2.11")]
    assert {x["kernel"] for x in installed} == {"_cos_fwd_kernel", "_sum_partials_kernel"}, r.stdout + r.stderr
    for x in installed:
        assert x["problems"] == [] and x["written"] == x["declared_writes"], x
    assert {"fwd 3D L=3 mean", "fwd 3D L=3 none", "fwd 3D L=3 mean channels-last"} <= {x["variant"] for x in installed}
    fwd = [x for x in emulated if x["kernel"] == "_cos_fwd_kernel"]
    if not __import__("triton").__version__.startswith("3.6."):
        assert fwd and all("IndexError" in (x["analysis_error"] or "") for x in fwd), fwd
        assert r.returncode == 1 and "FAIL [torch<=2.11 (emulated)] _cos_fwd_kernel" in r.stdout


@pytest.mark.slow  # ~45 s on 2 loaded cores; `make check-gpu-static` runs the same rows in CI
@pytest.mark.skipif(not VENV36_PY.exists(), reason=".venv-triton36 (triton 3.6, torch 2.11's) is built by "
                                                   "`make check-gpu-static`; absent here")
def test_torch_211_analyser_under_triton_36_reports_every_write_of_every_launch(tmp_path):
    """The GPU machines' pairing (torch 2.11 + triton 3.6), emulated: every launch of every gate variant."""
    r, rows = _mutation_only(VENV36_PY, "emulate-2.11", "", tmp_path)
    assert r.returncode == 0 and rows, r.stdout[-3000:] + r.stderr[-3000:]
    assert {x["kernel"] for x in rows} >= {"_cos_fwd_kernel", "_sum_partials_kernel", "_cos_bwd_kernel",
                                           "_warp_fwd_kernel", "_warp_bwd_kernel"}
    assert all(x["written"] == x["declared_writes"] for x in rows), [x for x in rows
                                                                     if x["written"] != x["declared_writes"]]
