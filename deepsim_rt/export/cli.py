"""`deepsim-rt export`: turn a checkpoint into a verified deployment artifact (filled in below)."""

from __future__ import annotations

import argparse


def _cmd(args: argparse.Namespace) -> int:
    raise ValueError("export is not available yet")


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX / AOTInductor / TensorRT / a Triton repo")
    p.set_defaults(func=_cmd)
