"""Shared test setup.

Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be set before any
@triton.jit decorator runs, i.e. before deepsim_rt's Triton modules are imported: hence here, at conftest import.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="session")
def _private_export_cache(tmp_path_factory):
    """Exports made by tests (backend="onnxruntime"/"aoti" without a cache_dir) go to a per-run folder, never to
    the user's ~/.cache/deepsim_rt: a stale entry there must not make a test pass, and tests must not litter."""
    old = os.environ.get("DEEPSIM_RT_CACHE")
    os.environ["DEEPSIM_RT_CACHE"] = str(tmp_path_factory.mktemp("export_cache"))
    yield
    if old is None:
        os.environ.pop("DEEPSIM_RT_CACHE", None)
    else:
        os.environ["DEEPSIM_RT_CACHE"] = old


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); run `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded CPU generator: every test draws fresh, reproducible random inputs."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def run_cli(capsys):
    """Run the real `deepsim-rt` entry point in-process: run_cli("train-features", ...) -> (exit code, output)."""
    from deepsim_rt import cli

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        cap = capsys.readouterr()
        return code, cap.out + cap.err

    return run
