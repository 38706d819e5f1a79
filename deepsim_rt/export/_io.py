"""Atomic writes for exporters whose tools insist on a file suffix (.pt2, .onnx, .plan) or write a whole folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from deepsim_rt._io import atomic_write

__all__ = ["atomic_file", "atomic_dir", "atomic_named_file"]


def atomic_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp) on a temporary file beside `path` with the SAME suffix (AOTInductor wants '.pt2'), then rename."""
    return atomic_write(path, write)


def atomic_named_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp) where tmp has the SAME NAME as `path`, inside a temporary folder beside it; then rename.

    For writers that record their file name inside the file: AOTInductor names the archive's inner folder after the
    package file, so a package written as '.reg.pt2.1a2b.tmp.pt2' would carry that temp name forever (issue 11 #14).
    On failure the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(str(tmp_dir / path.name))
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """write(tmp_dir) fills a temporary folder beside `path`, which is then renamed to `path`.

    An existing `path` is refused unless overwrite=True (then replaced only after write succeeded). On failure the
    temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
