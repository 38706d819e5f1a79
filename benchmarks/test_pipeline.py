"""The whole `deepsim-rt register` command on the 1 mm template pair (benchmarks/pipeline_pair.py), one thread:
end to end as a user runs it (a fresh process, torch import and all) and by stage in-process.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_pipeline.py --benchmark-only -s

One round each (a run is 10-50 s); extra_info holds the stage times (read, load_model, register, qc, write: from
summary.json and the commit), the outputs' bytes, the gzip backend (python-isal or zlib) and the 1-minute load
average at the start, because a number without its load means little on a shared box. No "op" key: the kernel /
inference report (benchmarks/report.py) leaves these rows out. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.pipeline_pair import build

CACHE = Path(os.environ.get("BENCH_CACHE", "/tmp/deepsim_rt_bench_cache")) / "pipeline_pair"


@pytest.fixture(scope="module")
def pair():
    return build(CACHE)


def _argv(pair, out: Path, *extra: str) -> list[str]:
    return ["register", "--moving", str(pair["moving"]), "--fixed", str(pair["fixed"]), "--labels",
            str(pair["moving_labels"]), "--model", "default-3d", "--device", "cpu", "--out", str(out), "--overwrite",
            *extra]


def _facts(out: Path, wall: float) -> dict:
    from deepsim_rt._io import GZIP_BACKEND

    s = json.loads((out / "summary.json").read_text())
    t = s["timings_s"]
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    return {"wall_s": wall, **{f"{k}_s": v for k, v in t.items()},
            "rest_s": wall - sum(t.values()), "bytes": files, "gzip": GZIP_BACKEND, "load1": os.getloadavg()[0],
            "threads": os.environ.get("OMP_NUM_THREADS")}


@pytest.mark.parametrize("extra", [(), ("--outputs", "warped,labels,transform")], ids=["all-outputs", "fewer"])
def test_register_1mm_end_to_end(benchmark, pair, tmp_path, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "o"

    def run() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "deepsim_rt.cli", *_argv(pair, out, *extra)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    wall = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(_facts(out, wall))
    print(json.dumps(benchmark.extra_info, indent=1))


def test_register_1mm_by_stage(benchmark, pair, tmp_path):
    import torch

    from deepsim_rt.pipeline.register import run_register

    torch.set_num_threads(1)
    out = tmp_path / "o"

    def run() -> float:
        t0 = time.perf_counter()
        run_register(pair["moving"], pair["fixed"], out, labels=pair["moving_labels"], model="default-3d",
                     device="cpu", overwrite=True)
        return time.perf_counter() - t0

    wall = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)  # warm: imports, model file cache
    benchmark.extra_info.update(_facts(out, wall))
    print(json.dumps(benchmark.extra_info, indent=1))
