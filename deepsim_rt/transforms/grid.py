"""Voxel grids in world space: NIfTI affines (RAS mm), voxel <-> world, spacing, and grids of a chosen spacing.

A grid is a spatial shape (tensor order, the file's voxel axes i, j[, k]) and an affine mapping homogeneous voxel
indices to world millimetres in NIfTI's RAS+ convention. 2D images use the in-plane part of the NIfTI 4x4 affine
(rows/columns x, y and the translation), i.e. they are taken to lie in one plane z = const; `spatial_affine`
reduces a 4x4 to that (ndim + 1)-square matrix.

Voxel centres sit at integer indices (align_corners=True everywhere in deepsim_rt), so a grid of n voxels at
spacing s covers n * s mm (voxel edges) and its centre is the index (n - 1) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "spatial_affine", "check_affine", "spacing_of", "voxel_to_world", "world_to_voxel",
           "grid_with_spacing", "same_grid", "AFFINE_ATOL_MM"]

AFFINE_ATOL_MM = 1e-3  # affines agreeing to a micrometre describe the same grid (float32 header round-off ~1e-5)


def spatial_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """(4, 4) NIfTI affine -> (ndim + 1, ndim + 1) float64: the 4x4 itself for 3D, the in-plane x/y part for 2D.

    An (ndim + 1)-square input is returned as float64 unchanged (already reduced)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (ndim + 1, ndim + 1):
        return a
    if a.shape != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {a.shape}")
    if ndim == 3:
        return a
    if ndim == 2:
        return a[np.ix_([0, 1, 3], [0, 1, 3])]
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def check_affine(affine: np.ndarray, ndim: int, name: str = "affine") -> np.ndarray:
    """The reduced affine (see spatial_affine) after checking it is a usable grid: finite, with a non-zero, finite
    spacing on every axis and an invertible linear part. ValueError (one line, naming `name`) otherwise."""
    a = spatial_affine(affine, ndim)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: affine must be finite, got {np.asarray(affine).tolist()}")
    sp = np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0))
    if not np.all(sp > 1e-6):
        raise ValueError(f"{name}: degenerate affine, voxel spacing {sp.round(6).tolist()} mm (every axis needs a "
                         "non-zero spacing)")
    if abs(np.linalg.det(a[:ndim, :ndim])) < 1e-12 * float(np.prod(sp)):
        raise ValueError(f"{name}: degenerate affine (singular direction matrix) {np.asarray(affine).tolist()}")
    return a


def spacing_of(affine: np.ndarray, ndim: int, name: str = "affine") -> tuple[float, ...]:
    """Voxel spacing (mm) per voxel axis: the lengths of the affine's columns; degenerate affines are errors."""
    a = check_affine(affine, ndim, name)
    return tuple(float(v) for v in np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0)))


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices (..., nd) -> world mm (..., nd) through a reduced (nd + 1)-square affine."""
    a = np.asarray(affine, dtype=np.float64)
    nd = a.shape[0] - 1
    return ijk @ a[:nd, :nd].T + a[:nd, nd]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """World mm (..., nd) -> voxel indices (..., nd) (inverse of voxel_to_world)."""
    return voxel_to_world(np.linalg.inv(np.asarray(affine, dtype=np.float64)), xyz)


@dataclass(frozen=True)
class Grid:
    """A voxel grid: spatial shape (tensor order) and reduced affine ((ndim + 1)-square, voxel -> world mm RAS)."""

    shape: tuple[int, ...]
    affine: np.ndarray

    @classmethod
    def of(cls, shape, affine, name: str = "grid") -> Grid:
        shape = tuple(int(s) for s in shape)
        return cls(shape, check_affine(affine, len(shape), name))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        return spacing_of(self.affine, self.ndim)

    def as_dict(self) -> dict:
        """JSON-ready description: shape, spacing (mm), and the reduced affine."""
        return {"shape": list(self.shape), "spacing_mm": [round(s, 6) for s in self.spacing],
                "affine": np.round(self.affine, 6).tolist()}


def same_grid(a: Grid, b: Grid, atol: float = AFFINE_ATOL_MM) -> bool:
    """Same shape and affines equal to `atol` mm per element."""
    return a.shape == b.shape and bool(np.abs(a.affine - b.affine).max() <= atol)


def grid_with_spacing(grid: Grid, spacing) -> Grid:
    """A grid over the same field of view as `grid` (same orientation, same centre) at voxel size `spacing` (mm,
    one per axis, tensor order). Each axis gets n' = max(2, round(n * s / s')) voxels of exactly s'; the extent
    n' s' differs from n s by less than one new voxel."""
    nd = grid.ndim
    new = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if new.shape != (nd,) or not np.all(np.isfinite(new)) or not np.all(new > 0):
        raise ValueError(f"spacing must be {nd} positive finite numbers (mm), got {np.asarray(spacing).tolist()}")
    old = np.asarray(grid.spacing)
    n = np.asarray(grid.shape, dtype=np.float64)
    n_new = np.maximum(2, np.rint(n * old / new)).astype(int)
    lin = grid.affine[:nd, :nd] * (new / old)[None, :]  # same directions, new lengths
    centre_world = voxel_to_world(grid.affine, (n - 1) / 2)
    aff = np.eye(nd + 1)
    aff[:nd, :nd] = lin
    aff[:nd, nd] = centre_world - lin @ ((n_new - 1) / 2)
    return Grid(tuple(int(v) for v in n_new), aff)
