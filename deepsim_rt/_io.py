"""Atomic file writes: nothing half-written on disk, whatever the writer.

Every file deepsim_rt writes (checkpoints, NIfTI, ONNX, .pt2, engines, figures) goes through `atomic_write`:
the writer fills a temporary file beside the target, which is renamed over the target only once complete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "full_suffix"]


def full_suffix(path: Path) -> str:
    """'.nii.gz' for 'a.nii.gz', '.pt2' for 'm.pt2': writers that dispatch on the suffix must see all of it."""
    return "".join(path.suffixes[-2:]) if path.suffixes[-1:] == [".gz"] else path.suffix


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a fresh temporary name beside `path`, then rename it over `path`.

    The temporary name keeps the target's suffix (nibabel picks the format from it, AOTInductor wants '.pt2') and
    does not exist beforehand (some writers refuse to overwrite). On any exception the temporary file is removed
    and `path` is left untouched. Returns `path` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{full_suffix(path)}"
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path
