"""Fixtures of the benchmark suites: the session's machine info and the one harness (benchmarks/harness.py).

`pytest benchmarks` collects the suites (pyproject's testpaths = ["tests"], so `make test` never does).
GPU-only cases carry the `gpu` marker and are skipped without CUDA; `make bench` deselects them with -m "not gpu".
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import Bench, apply_threads, bench_device, session_info

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    apply_threads()  # BENCH_THREADS, before anything compiles (Inductor's C++ bakes the thread count in)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); run `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def info():
    """Measured once per session: copy bandwidth, machine name, versions, git sha."""
    return session_info()


@pytest.fixture
def bench(benchmark, info) -> Bench:
    return Bench(benchmark, info)


def pytest_benchmark_update_machine_info(config, machine_info):
    # The report groups results by this block's "machine" (GPU name, or CPU model + threads): never across cards.
    machine_info["deepsim_rt"] = session_info().as_dict()
