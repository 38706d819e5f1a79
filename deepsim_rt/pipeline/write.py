"""Writers for pipeline outputs: one function per file format, each writing atomically (deepsim_rt._io).

A writer takes the target path and writes exactly that file; `outputs.commit_files` calls them inside a temporary
folder and moves the set into place together. NIfTI outputs (.nii.gz) are gzip-compressed at `gzip_level()`
(default 1, as nibabel; `with gzip_level_set(0..9)` changes it, `register --compress`) by ISA-L when python-isal is
installed (deepsim_rt._io.gzip_compress: 12x faster than zlib at the same size), else by zlib.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write, write_nifti

__all__ = ["save_png", "save_npy", "save_json", "save_nifti_like", "save_nifti_vector", "gzip_level",
           "gzip_level_set", "COMPRESS_LEVELS"]

COMPRESS_LEVELS = {"fast": 1, "small": 6, "none": 0}  # `register --compress`: gzip levels of the .nii.gz outputs
_LEVEL = [1]


def gzip_level() -> int:
    """The gzip level NIfTI outputs are written at now (0 = stored, 1 = fast, the default, .. 9)."""
    return _LEVEL[0]


@contextlib.contextmanager
def gzip_level_set(level: int) -> Iterator[None]:
    """Write NIfTI outputs at gzip `level` (0..9) inside the block."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"gzip level must be an int in 0..9, got {level!r}")
    old, _LEVEL[0] = _LEVEL[0], level
    try:
        yield
    finally:
        _LEVEL[0] = old


def save_png(path: Path, arr: np.ndarray, dtype: Any) -> None:
    """A 2D array as PNG in `dtype`'s depth: integers rounded and clipped to 8 / 16 bit, bool as 0 / 255, else
    32-bit float (mode F)."""
    from PIL import Image

    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(np.uint16 if np.dtype(dtype).itemsize > 1 else np.uint8)
        arr = np.clip(np.rint(arr), info.min, info.max).astype(info.dtype)
    elif np.dtype(dtype) == np.bool_:
        arr = (arr > 0).astype(np.uint8) * 255
    else:
        arr = arr.astype(np.float32)
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    atomic_write(path, write)


def save_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_nifti_like(path: Path, arr: np.ndarray, affine: np.ndarray, header: Any) -> None:
    """`arr` as a NIfTI with `affine` and a copy of `header` (other fields kept; the on-disk type is the array's
    own, scaling reset, as deepsim_rt.data.nifti.save_nifti), at `gzip_level()`."""
    import nibabel as nib

    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # NIfTI-1 has no float16 code
    hdr = header.copy() if header is not None else None
    img = (nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image)(arr, affine, hdr)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    write_nifti(path, img, gzip_level())


def save_nifti_vector(path: Path, vec: np.ndarray, affine: np.ndarray, header: Any) -> None:
    """(*S, ndim) float32 displacement as a NIfTI with the fixed image's affine and header (dims follow data)."""
    import nibabel as nib

    hdr = header.copy()
    img = (nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image)(vec, affine, hdr)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = b"deepsim_rt displacement, voxels, last axis=voxel axis i"
    write_nifti(path, img, gzip_level())
