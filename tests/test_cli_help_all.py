"""Every `deepsim-rt <command> --help` imports no torch (issue 20 item 4: export / evaluate / study / demo /
changes / evaluate-changes / train-* imported it, 1.8-3.8 s at load 8, 16-22 s on the busy box). Each command runs
in a fresh interpreter, as a user's shell would; the check is on what was imported, not on time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepsim_rt.cli import SUBCOMMAND_MODULES, declared_commands

COMMANDS = sorted(c for m in SUBCOMMAND_MODULES for c in declared_commands(m))

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from deepsim_rt import cli
try:
    cli.main([sys.argv[1], "--help"])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "triton", "onnx", "onnxruntime", "matplotlib", "scipy") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy, "seconds": time.perf_counter() - t0}))
"""


def test_every_command_is_checked():
    # the commands the issue names, so that a renamed module cannot silently shrink the list
    assert {"export", "evaluate", "study", "demo", "changes", "evaluate-changes", "train-features",
            "train-registration", "register", "apply"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_torch(command):
    proc = subprocess.run([sys.executable, "-c", _PROBE, command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    info = json.loads(lines[-1])
    assert info["code"] == 0 and any("usage: deepsim-rt" in ln for ln in lines), proc.stdout[:500]
    assert info["heavy"] == [], f"`deepsim-rt {command} --help` imported {info['heavy']}"


def test_literal_copies_match_the_runtime():
    """Parsers keep literal copies of lists that live in torch modules; pinned here."""
    from deepsim_rt.anomaly.cli import BACKENDS as anomaly_backends
    from deepsim_rt.losses.names import SIMILARITIES
    from deepsim_rt.losses.registry import SIMILARITIES as registry_similarities
    from deepsim_rt.runtime import BACKENDS

    assert anomaly_backends == BACKENDS
    assert SIMILARITIES is registry_similarities
