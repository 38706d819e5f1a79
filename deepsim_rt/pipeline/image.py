"""One image with its geometry, as every pipeline stage passes it: `Image` (array + affine + header + kind).

    img = read_image("t1.nii.gz")                     # kind "image"
    lab = read_image("aseg.nii.gz", kind="labels")    # integer-valued, keeps its integer type
    arr = img.spatial(3, "moving")                    # the array as a 3D model sees it

Formats: NIfTI (.nii / .nii.gz; affine and header kept), PNG (2D greyscale, 8 or 16 bit; colour converted to
luminance; a label PNG keeps its palette indices), NPY (2D or 3D numeric). Kinds (as TorchIO's ScalarImage /
LabelMap): "image" (intensities, sampled linearly), "labels" (integer label map, warped with a label mode),
"mask" (non-zero = inside). Every unreadable file is one ValueError naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Image", "read_image", "file_format", "KINDS", "FORMATS", "AFFINE_ATOL_MM"]

KINDS = ("image", "labels", "mask")
FORMATS = ("nifti", "png", "npy")
_NIFTI = (".nii.gz", ".nii")
AFFINE_ATOL_MM = 1e-3  # affines agreeing to a micrometre describe the same grid (float32 header round-off ~1e-5)


@dataclass
class Image:
    """An image read from disk (or derived from one): the array, its file format and kind, and (NIfTI) its affine
    (4, 4) voxel -> world mm, header and on-disk shape. `data` keeps the file's voxel-axis order."""

    path: Path
    format: str  # "nifti" | "png" | "npy"
    data: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    disk_shape: tuple[int, ...] = ()
    png_dtype: Any = None
    kind: str = "image"  # "image" | "labels" | "mask"

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None) -> Image:
        """The same image (path, format, kind, header) holding other data, and optionally another affine."""
        return replace(self, data=data, affine=self.affine if affine is None else affine,
                       disk_shape=tuple(data.shape))

    def spatial(self, ndim: int, role: str) -> np.ndarray:
        """The array as an ndim-dimensional model sees it: a (X, Y, 1) NIfTI is a 2D image for a 2D model; labels
        come back integer-typed (`label_array`), masks as bool. ValueError when the dimensionality differs."""
        data = self.label_array() if self.kind == "labels" else self.data
        if self.kind == "mask":
            data = data != 0
        if ndim == 2 and data.ndim == 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != ndim:
            raise ValueError(f"{role} {self.path} is {data.ndim}D data of shape {self.disk_shape}, but the model is "
                             f"{ndim}D; use a {data.ndim}D model (e.g. --model default-{data.ndim}d)")
        return data

    def label_array(self) -> np.ndarray:
        """The data as integer labels: float files must hold integers (ValueError otherwise) and come back in the
        file's own integer type when it has one, else the smallest of uint8 / int16 / int32 that holds them."""
        data = self.data
        if data.dtype.kind != "f":
            return data
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise ValueError(f"labels {self.path} must be integer-valued, got non-integer values")
        lo, hi = float(data.min()), float(data.max())
        disk = np.dtype(self.header.get_data_dtype()) if self.header is not None else None
        if disk is not None and disk.kind in "iu" and np.iinfo(disk).min <= lo and hi <= np.iinfo(disk).max:
            return data.astype(disk)  # keep the label file's own integer type
        dtype = np.uint8 if lo >= 0 and hi <= 255 else np.int16 if -32768 <= lo and hi <= 32767 else np.int32
        return data.astype(dtype)

    def same_grid(self, other: Image) -> bool:
        """Same on-disk shape and (where both have one) affines within AFFINE_ATOL_MM."""
        if self.disk_shape != other.disk_shape:
            return False
        if self.affine is None or other.affine is None:
            return True
        return float(np.abs(self.affine - other.affine).max()) <= AFFINE_ATOL_MM


def file_format(path: Path) -> str:
    """"nifti" | "png" | "npy" from the file name; ValueError for anything else."""
    name = path.name.lower()
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(".png"):
        return "png"
    if name.endswith(".npy"):
        return "npy"
    raise ValueError(f"{path}: unsupported file type; expected .nii, .nii.gz, .png or .npy")


def read_image(path: str | os.PathLike, kind: str = "image") -> Image:
    """Read one image file (module docstring); ValueError on anything unreadable or an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"image kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    if fmt == "nifti":
        from deepsim_rt.data.nifti import load_nifti

        data, affine, header = load_nifti(path, allow_2d=True)
        return Image(path, fmt, data, affine, header, tuple(data.shape), kind=kind)
    if fmt == "npy":
        try:
            data = np.load(path, allow_pickle=False)
        except MemoryError:
            raise ValueError(f"{path}: not enough memory to load it ({path.stat().st_size / 2**20:.0f} MiB on "
                             "disk)") from None
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
        if data.dtype.kind not in "biuf" or data.ndim not in (2, 3):
            raise ValueError(f"{path}: expected a 2D or 3D numeric array, got shape {data.shape} dtype {data.dtype}")
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise ValueError(f"{path}: contains {int((~np.isfinite(data)).sum())} NaN or Inf values")
        return Image(path, fmt, data, disk_shape=tuple(data.shape), kind=kind)
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(path) as img:
            img.load()
            if kind == "labels" and img.mode == "P":
                data = np.array(img)  # palette indices are the labels
            elif img.mode in ("L", "I;16", "I;16B", "I", "F", "1"):
                data = np.array(img)
            else:
                data = np.array(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path} is not a readable PNG image: {exc}") from exc
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):  # mode "F" PNGs can hold NaN
        raise ValueError(f"{path}: contains {int((~np.isfinite(data)).sum())} NaN or Inf values")
    return Image(path, fmt, data, disk_shape=tuple(data.shape), png_dtype=data.dtype, kind=kind)
