"""benchmarks/report.py: parse saved pytest-benchmark JSON, group by machine (never mixed), speed-ups, markdown."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


report = _load("report")

GPU = "NVIDIA H100 80GB HBM3"
CPU = "AMD EPYC (2 threads)"


def _bench(machine, op, pass_, provider, median, *, shape="1x1x8x8", dtype="float32", **extra):
    ex = {"op": op, "pass": pass_, "provider": provider, "shape": shape, "dtype": dtype, "machine": machine,
          "device": "cuda" if machine == GPU else "cpu", "median_s": median, "iqr_s": median / 10, "rounds": 10,
          "copy_gbps": 3000.0 if machine == GPU else 10.0}
    ex.update(extra)
    # pytest-benchmark's own stats hold a different (host-timer) median: the report must use extra_info's.
    return {"name": f"test_{op}[{provider}]", "group": op, "stats": {"median": 99.0, "iqr": 9.0, "rounds": 10},
            "extra_info": ex}


def _file(tmp_path, name, machine, benchmarks, when):
    session = {"machine": machine, "device": "cuda" if machine == GPU else "cpu", "device_name": machine,
               "cpu": CPU, "copy_gbps": 3000.0 if machine == GPU else 10.0, "copy_bytes": 1 << 31,
               "versions": {"torch": "2.11.0"}, "git_sha": "abc123"}
    data = {"machine_info": {"deepsim_rt": session, "node": "box"}, "commit_info": {}, "datetime": when,
            "version": "5.3.1", "benchmarks": benchmarks}
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.fixture
def files(tmp_path):
    gpu = _file(tmp_path, "gpu.json", GPU, [
        _bench(GPU, "deepsim3d", "fwd+bwd", "reference", 0.010),
        _bench(GPU, "deepsim3d", "fwd+bwd", "compile", 0.004),
        _bench(GPU, "deepsim3d", "fwd+bwd", "triton", 0.002),
        _bench(GPU, "deepsim3d", "fwd", "triton", 0.0001, gbps=2700.0, pct_copy_bw=90.0),
        _bench(GPU, "warp3d", "fwd", "reference", 0.003),
        _bench(GPU, "warp3d", "fwd", "triton", 0.0015),
        _bench(GPU, "train3d-ncc", "step", "reference", 0.2, peak_mem_bytes=3 << 20),
        _bench(GPU, "train3d-ncc", "step", "kernels", 0.1, peak_mem_bytes=2 << 20),
        {"name": "not_ours", "stats": {"median": 1.0}, "extra_info": {}},
    ], "2026-11-26T10:00:00+00:00")
    cpu_old = _file(tmp_path, "cpu_old.json", CPU, [
        _bench(CPU, "deepsim3d", "fwd+bwd", "reference", 5.0),
    ], "2026-11-25T10:00:00+00:00")
    cpu = _file(tmp_path, "cpu.json", CPU, [
        # same case as on the GPU, much slower: must never be compared with the GPU rows
        _bench(CPU, "deepsim3d", "fwd+bwd", "reference", 1.0),
        _bench(CPU, "deepsim3d", "fwd+bwd", "compile", 0.5),
        _bench(CPU, "register3d", "infer", "eager", 2.0, setup_s=1.5, model="default-3d"),
        _bench(CPU, "register3d", "infer", "onnxruntime", 1.0, setup_s=9.0, backend_device="cpu"),
        _bench(CPU, "register3d", "infer", "compile", 2.5),
    ], "2026-11-26T11:00:00+00:00")
    return [gpu, cpu_old, cpu]


def test_rows_use_extra_info_median_and_skip_foreign_benchmarks(files):
    rows, session = report.load_rows(files[0])
    assert len(rows) == 8  # "not_ours" has no op
    assert session["machine"] == GPU
    r = rows[0]
    assert (r.machine, r.op, r.pass_, r.provider, r.median_s) == (GPU, "deepsim3d", "fwd+bwd", "reference", 0.010)
    assert r.kind == "kernels" and rows[6].kind == "training"


def test_machines_are_never_mixed_and_newest_file_wins(files):
    machines = report.collect(files)
    assert set(machines) == {GPU, CPU}
    gpu, cpu = machines[GPU].rows, machines[CPU].rows
    assert all(r.machine == GPU for r in gpu) and all(r.machine == CPU for r in cpu)
    # the CPU reference for deepsim3d fwd+bwd comes from cpu.json (1.0 s), not the older cpu_old.json (5.0 s)
    ref = [r for r in cpu if r.op == "deepsim3d" and r.provider == "reference"]
    assert len(ref) == 1 and ref[0].median_s == 1.0 and ref[0].source == "cpu.json"
    tri = next(r for r in gpu if r.op == "deepsim3d" and r.pass_ == "fwd+bwd" and r.provider == "triton")
    assert report.speedup(gpu, tri, "reference") == pytest.approx(5.0)
    assert report.speedup(gpu, tri, "compile") == pytest.approx(2.0)
    cmp_cpu = next(r for r in cpu if r.op == "deepsim3d" and r.provider == "compile")
    assert report.speedup(cpu, cmp_cpu, "reference") == pytest.approx(2.0)
    # no triton row on the CPU: nothing to compare with, whatever the GPU file holds
    assert report.speedup(cpu, cmp_cpu, "triton") is None
    assert machines[CPU].copy_gbps == {"cpu.json": 10.0, "cpu_old.json": 10.0}


def test_targets(files):
    machines = report.collect(files)
    t = {(row[0], row[1]): row for row in report.target_rows(machines[GPU].rows)}
    assert t[("DeepSim fwd+bwd ≥ 5× eager", "deepsim3d fwd+bwd 1x1x8x8 float32")][3] == "met"  # exactly 5.00x
    assert t[("DeepSim fwd+bwd ≥ 1.5× compiled", "deepsim3d fwd+bwd 1x1x8x8 float32")][2] == "2.00×"
    assert t[("DeepSim fwd ≥ 85 % of copy bandwidth", "deepsim3d fwd 1x1x8x8 float32")][3] == "met"
    warp = t[("warp3d fwd ≥ 3× eager grid + grid_sample", "warp3d fwd 1x1x8x8 float32")]
    assert warp[2] == "2.00×" and warp[3].startswith("NOT met (67%")
    c = {row[0]: row for row in report.target_rows(machines[CPU].rows)}
    assert c["best exported backend ≥ 1.3× eager (CPU)"][2] == "2.00× (onnxruntime)"


def test_markdown_and_plot(files, tmp_path):
    machines = report.collect(files)
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nHand-written notes above.\n\n" + report.BEGIN + "\nold tables\n" + report.END
                   + "\n\nHand-written notes below.\n")
    report.write_markdown(machines, out)
    text = out.read_text()
    assert "Hand-written notes above." in text and "Hand-written notes below." in text
    assert "old tables" not in text
    assert f"### {GPU}" in text and f"### {CPU}" in text
    assert text.index(f"### {GPU}") < text.index(f"### {CPU}")  # GPUs first
    assert "| deepsim3d | fwd+bwd | 1x1x8x8 | float32 | triton | 2 ms | 200 µs | 5.00× | 2.00× |" in text
    assert "| register3d | 1x1x80x96x80" not in text  # shapes come from the data, nothing invented
    assert "| register3d | 1x1x8x8 | onnxruntime | cpu | 1 s |" in text
    assert "3.0 MiB" in text and "2.0 MiB" in text  # training peak memory
    png = tmp_path / "plot.png"
    assert report.plot(machines, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run replaces the generated block only
    report.write_markdown(machines, out)
    assert out.read_text() == text


def test_main_writes_both(files, tmp_path, capsys):
    out, png = tmp_path / "R.md", tmp_path / "p.png"
    assert report.main([str(f) for f in files] + ["--out", str(out), "--plot", str(png), "--summary"]) == 0
    assert out.is_file() and png.is_file()
    printed = capsys.readouterr().out
    assert "2 machine(s)" in printed and "triton median" in printed


def test_not_a_benchmark_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.load_rows(bad)
