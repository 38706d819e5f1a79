"""Persistent cache of exported artifacts, keyed by checkpoint hash: `--backend onnxruntime|aoti` pays the export once.

    path = cached_export("reg.safetensors", "onnxruntime", torch.device("cpu"))   # exports on the first call only

Location: $DEEPSIM_RT_CACHE if set, else $XDG_CACHE_HOME/deepsim_rt, else ~/.cache/deepsim_rt. Layout:
    <root>/<sha256 of the checkpoint, 16 hex>/<backend>-<device type>.<onnx|pt2|plan>
An entry is written atomically (temporary name + rename, by the exporters), and only after the export verified
itself against PyTorch: a file in the cache was verified once, when it was made. On reuse its metadata is read and
its recorded source_sha256 must equal the checkpoint's full hash (a stale or foreign file is re-exported in place).
Two processes exporting the same entry at once both write complete files; the last rename wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deepsim_rt._io import ENV_CACHE, cache_root, file_sha256  # the folder rule lives on floor 0 (shared with data)

__all__ = ["cache_root", "cache_path", "cached_export", "ENV_CACHE"]

_SUFFIX = {"onnxruntime": ".onnx", "aoti": ".pt2", "tensorrt": ".plan"}


def cache_path(root: Path, sha256: str, backend: str, device: torch.device) -> Path:
    """Where the `backend` artifact of the checkpoint with hash `sha256` lives under `root`."""
    if backend not in _SUFFIX:
        raise ValueError(f"no exported artifact for backend {backend!r}; expected one of {tuple(_SUFFIX)}")
    if len(sha256) != 64:
        raise ValueError(f"expected a sha256 hex digest of 64 characters, got {sha256!r}")
    return Path(root) / sha256[:16] / f"{backend}-{device.type}{_SUFFIX[backend]}"


def _recorded_sha(path: Path, backend: str) -> str | None:
    """source_sha256 in an existing entry's metadata, or None when it cannot be read (then: re-export)."""
    try:
        if backend == "onnxruntime":
            from deepsim_rt.export.onnx import read_onnx_info

            return read_onnx_info(path, expect="registration").source_sha256
        if backend == "tensorrt":
            from deepsim_rt.export.tensorrt import read_engine_info

            return read_engine_info(path, expect="registration").source_sha256
        from deepsim_rt.export.aoti import read_aoti_info

        return read_aoti_info(path, expect="registration").source_sha256
    except ValueError:
        return None


def cached_export(checkpoint: str | os.PathLike, backend: str, device: torch.device,
                  root: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """The cached registration artifact of the RegNet checkpoint `checkpoint` (.safetensors) for `backend` on
    `device`; exported from the checkpoint (so its hash and training metadata travel into the artifact) and verified
    unless verify=False, when absent or stale. Returns its path."""

    sha = file_sha256(checkpoint)
    root = cache_root() if root is None else Path(root)
    out = cache_path(root, sha, backend, device)
    if out.is_file() and _recorded_sha(out, backend) == sha:
        return out
    if backend == "onnxruntime":
        from deepsim_rt.export.onnx import export_onnx

        export_onnx(checkpoint, out, artifact="registration", verify=verify)
    elif backend == "aoti":
        from deepsim_rt.export.aoti import export_aoti

        export_aoti(checkpoint, out, device=device, verify=verify)
    else:
        from deepsim_rt.export.tensorrt import build_registration_engine

        build_registration_engine(checkpoint, out, verify=verify)
    return out
