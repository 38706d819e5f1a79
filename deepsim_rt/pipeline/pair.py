"""A registration pair read from files: moving, fixed (and the moving image's labels), checked before any model
loads. Stages take a `Pair` and never re-read the files.

    pair = read_pair("m.nii.gz", "f.nii.gz", labels="m_aseg.nii.gz")
    pair.moving, pair.fixed, pair.labels      # pipeline.image.Image values (array + affine + kind)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from deepsim_rt.pipeline.image import AFFINE_ATOL_MM, Image, read_image

__all__ = ["Pair", "read_pair", "default_model", "check_same_grid"]


@dataclass
class Pair:
    """One pair's inputs, read and checked; `notes` are said to the user and land in summary.json."""

    moving: Image
    fixed: Image
    labels: Image | None = None
    notes: list[str] = field(default_factory=list)
    fixed_mask: Image | None = None   # kind "mask", NIfTI, any grid (pipeline.world puts it on the fixed grid)
    moving_mask: Image | None = None

    @property
    def data_ndim(self) -> int:
        """Dimensionality of the data: 2 for 2D arrays and single-slice (X, Y, 1) NIfTI volumes, else 3."""
        shape = self.moving.disk_shape
        return 2 if len(shape) == 2 or (self.moving.format == "nifti" and shape[-1] == 1) else len(shape)

    @property
    def paths(self) -> list[Path]:
        return [img.path for img in (self.moving, self.fixed, self.labels, self.fixed_mask, self.moving_mask)
                if img is not None]


def check_same_grid(a: Image, b: Image, what: str) -> None:
    """ValueError unless a and b share format, on-disk shape and (NIfTI) affine within AFFINE_ATOL_MM."""
    if a.format != b.format:
        raise ValueError(f"{what}: {a.path} is {a.format.upper()} but {b.path} is {b.format.upper()}; give both in "
                         "the same format")
    if a.disk_shape != b.disk_shape:
        raise ValueError(f"{what}: shapes differ: {a.path} {a.disk_shape} vs {b.path} {b.disk_shape}")
    if not a.same_grid(b):
        diff = float(abs(a.affine - b.affine).max())
        raise ValueError(f"{what}: affines differ (max element difference {diff:.4g} mm > {AFFINE_ATOL_MM}): "
                         f"{a.path} and {b.path} are on different voxel grids; resample the moving image onto "
                         "the fixed grid first")


def read_pair(moving: str | os.PathLike, fixed: str | os.PathLike,
              labels: str | os.PathLike | None = None, fixed_mask: str | os.PathLike | None = None,
              moving_mask: str | os.PathLike | None = None) -> Pair:
    """Read and check a pair's input files (no model needed yet); ValueError on anything unusable. Masks (brain
    masks: non-zero = inside) are NIfTI on any grid, for NIfTI pairs."""
    mov = read_image(moving)
    fix = read_image(fixed)
    notes = []
    if mov.format == fix.format == "nifti":  # other grids are resampled from the affines (pipeline.world)
        if not mov.same_grid(fix):
            notes.append(f"moving {mov.disk_shape} and fixed {fix.disk_shape} are on different voxel grids: moving "
                         "resampled onto the fixed grid from the two affines (linear; labels: the label mode)")
    else:
        check_same_grid(mov, fix, "moving and fixed")
    lab = None
    if labels is not None:
        lab = read_image(labels, kind="labels")
        check_same_grid(mov, lab, "moving and labels")
    if mov.format == "png" and mov.data.ndim != 2:
        raise ValueError(f"{mov.path}: PNG inputs must be greyscale 2D images, got shape {mov.data.shape}")
    masks = {}
    for role, path in (("fixed", fixed_mask), ("moving", moving_mask)):
        if path is None:
            continue
        m = read_image(path, kind="mask")
        if m.format != "nifti" or mov.format != "nifti":
            raise ValueError(f"--{role}-mask needs NIfTI images (a mask on any grid is placed by its affine), got "
                             f"{m.path.name} for {mov.format.upper()} inputs")
        if len(m.disk_shape) != len(fix.disk_shape if role == "fixed" else mov.disk_shape):
            raise ValueError(f"--{role}-mask {m.path} is {len(m.disk_shape)}D, the {role} image "
                             f"{len(fix.disk_shape if role == 'fixed' else mov.disk_shape)}D")
        if not (m.data != 0).any():
            raise ValueError(f"--{role}-mask {m.path} is empty (no non-zero voxel)")
        masks[role] = m
    return Pair(mov, fix, lab, notes, masks.get("fixed"), masks.get("moving"))


def default_model(pair: Pair) -> str:
    """The bundled model for the pair's dimensionality (a single-slice (X, Y, 1) volume is 2D)."""
    return f"default-{pair.data_ndim}d"
