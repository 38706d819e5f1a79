"""Orientation: bring a NIfTI volume's array to the model's training axis order by exact permutation and flips
(no resampling; nibabel.orientations), and every output back to the file's own axes.

    r = Reorientation.of(affine, shape, target=("S", "A", "R"))
    arr_m, aff_m = r.to_model(arr), r.affine_to_model(affine)       # the same world positions, model axes
    arr_f = r.from_model(arr_m)                                       # exactly arr again
    u_f = r.vector_from_model(u_m)                                    # (nd, *S) voxel displacement, file axes

Oblique affines go to the closest axis orientation (nibabel io_orientation); the residual rotation stays in the
reoriented affine (`affine_to_model`), so world coordinates, and everything computed from them, are unchanged.
The bundled models were trained on arrays of the MNI152 atlas, whose axes point S, A, R (pipeline.qc
`training_profile(...).axcodes`); a model that records no orientation is given that order too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Reorientation", "axcodes_of", "DEFAULT_AXCODES"]

DEFAULT_AXCODES = ("S", "A", "R")  # the atlas arrays every bundled model was trained on (qc._atlas_axcodes)


def axcodes_of(affine: np.ndarray) -> tuple[str, ...]:
    """The anatomical direction of each array axis (closest axis for oblique affines), e.g. ("R", "A", "S")."""
    import nibabel as nib

    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


@dataclass(frozen=True)
class Reorientation:
    """An exact axis permutation + flips from a file's array axes to the model's (and back).

    ornt: (nd, 2) nibabel orientation transform: file axis i goes to model axis ornt[i, 0], flipped when
    ornt[i, 1] == -1. shape: the file's spatial shape. source / target: axis codes before / after."""

    ornt: np.ndarray
    shape: tuple[int, ...]
    source: tuple[str, ...]
    target: tuple[str, ...]

    @classmethod
    def of(cls, affine: np.ndarray, shape: tuple[int, ...], target: tuple[str, ...] = DEFAULT_AXCODES
           ) -> Reorientation:
        """The reorientation of a 3D grid (affine (4, 4), spatial shape) to `target` axis codes."""
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        if len(shape) != 3 or len(target) != 3:
            raise ValueError(f"reorientation needs a 3D grid and 3 target axis codes, got shape {tuple(shape)} and "
                             f"{target}")
        start = io_orientation(np.asarray(affine, dtype=np.float64))
        ornt = ornt_transform(start, axcodes2ornt(tuple(target)))
        return cls(ornt, tuple(int(n) for n in shape), axcodes_of(affine), tuple(target))

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.ornt[:, 0], np.arange(len(self.shape))) and np.all(self.ornt[:, 1] == 1))

    @property
    def model_shape(self) -> tuple[int, ...]:
        out = [0] * len(self.shape)
        for i, n in enumerate(self.shape):
            out[int(self.ornt[i, 0])] = n
        return tuple(out)

    def to_model(self, arr: np.ndarray) -> np.ndarray:
        """(*shape) file-axis array -> (*model_shape), contiguous; the identity returns `arr` itself."""
        from nibabel.orientations import apply_orientation

        return arr if self.identity else np.ascontiguousarray(apply_orientation(arr, self.ornt))

    def from_model(self, arr: np.ndarray) -> np.ndarray:
        """(*model_shape) -> (*shape): the exact inverse of `to_model`."""
        from nibabel.orientations import apply_orientation

        return arr if self.identity else np.ascontiguousarray(apply_orientation(arr, self._inverse()))

    def affine_to_model(self, affine: np.ndarray) -> np.ndarray:
        """The affine of the reoriented array: every voxel keeps its world position (oblique rotation included)."""
        from nibabel.orientations import inv_ornt_aff

        return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(self.ornt, self.shape)

    def vector_from_model(self, u: np.ndarray) -> np.ndarray:
        """A voxel displacement (nd, *model_shape), component k along model axis k, -> (nd, *shape) along the
        file's axes: u_file[i] = flip_i * u_model[ornt[i, 0]], each component reoriented like an array."""
        if self.identity:
            return u
        out = np.empty((len(self.shape), *self.shape), dtype=u.dtype)
        for i, (k, flip) in enumerate(self.ornt):
            out[i] = self.from_model(u[int(k)]) * (-1 if flip < 0 else 1)
        return out

    def _inverse(self) -> np.ndarray:
        inv = np.empty_like(self.ornt)
        for i, (k, flip) in enumerate(self.ornt):
            inv[int(k)] = (i, flip)
        return inv

    def as_dict(self) -> dict:
        return {"file_axcodes": "".join(self.source), "model_axcodes": "".join(self.target),
                "reoriented": not self.identity}
