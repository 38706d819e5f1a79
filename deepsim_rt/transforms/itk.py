"""The registration as a displacement field in the two forms deepsim_rt writes, and reading either back.

Voxel form (displacement.nii.gz / displacement.npy), deepsim_rt's own:
    u (*S, nd) float32 on the FIXED grid, vector on the last axis, in FIXED-grid voxels along voxel axis i.
    The moving-space point of fixed voxel p is the world point A_f (p + u(p)) (A_f: the fixed affine). When moving
    and fixed share one grid this is warped(p) = moving(p + u(p)); otherwise moving is sampled at voxel
    A_m^-1 A_f (p + u(p)) (A_m: the moving affine). Any affine pre-alignment is composed into u.

ITK / ANTs form (transform_itk.nii.gz), what antsApplyTransforms, ants.apply_transforms, ITK's
DisplacementFieldTransform and SimpleITK read:
    5D NIfTI (X, Y, Z, 1, 3) float32 (2D: (X, Y, 1, 1, 2)), intent "vector", on the fixed grid (the fixed affine),
    vectors in PHYSICAL millimetres in ITK's LPS world (x, y negated w.r.t. NIfTI's RAS).
    Direction: ITK fields map FIXED-space points to MOVING-space points: T(x) = x + d(x), and the warped image is
    moving(T(x)) on the fixed grid, so `antsApplyTransforms -r fixed -i moving -t transform_itk.nii.gz`
    reproduces warped.nii.gz. (This is ANTs' "1Warp.nii.gz" direction, not the inverse.)

Conversion: d(p) = L A_f,lin u(p) with L = diag(-1, -1, 1) (2D: diag(-1, -1)); u = A_f,lin^-1 L d.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write, write_nifti
from deepsim_rt.transforms.grid import check_affine, spatial_affine

__all__ = ["voxel_to_itk", "itk_to_voxel", "save_itk_displacement", "save_voxel_displacement", "read_displacement",
           "Displacement", "ITK_DESCRIP", "VOXEL_DESCRIP", "NIFTI_INTENT_VECTOR"]

NIFTI_INTENT_VECTOR = 1007
ITK_DESCRIP = b"deepsim_rt ITK displacement, LPS mm, fixed->moving"
VOXEL_DESCRIP = b"deepsim_rt displacement, voxels, last axis=voxel axis i"


def _lps(nd: int) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0][:nd])


def voxel_to_itk(u: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement (*S, nd) on a grid with `affine` -> ITK displacement (*S, nd), LPS millimetres."""
    nd = u.shape[-1]
    a = check_affine(affine, nd, "fixed")
    m = (_lps(nd) @ a[:nd, :nd]).astype(np.float32)
    # float32 products (a 3x3 of mm per voxel applied to voxel vectors: ~1e-7 relative, far below the 1e-3 target of
    # the ANTs round trip); float64 took 2 s of a 1 mm register on the loaded box
    return np.asarray(u, dtype=np.float32) @ m.T


def itk_to_voxel(d: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ITK displacement (*S, nd), LPS mm, on a grid with `affine` -> voxel displacement (*S, nd) of that grid."""
    nd = d.shape[-1]
    a = check_affine(affine, nd, "fixed")
    m = np.linalg.inv(a[:nd, :nd]) @ _lps(nd)
    return (d.astype(np.float64) @ m.T).astype(np.float32)


def _nifti_image(data: np.ndarray, affine: np.ndarray, header: Any):
    import nibabel as nib

    hdr = header.copy() if header is not None else None
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(data, np.asarray(affine, dtype=np.float64), hdr)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def save_itk_displacement(path: str | os.PathLike, u: np.ndarray, affine: np.ndarray, header: Any = None,
                          level: int = 1) -> Path:
    """Write the voxel displacement u (*S, nd) of the fixed grid (`affine`: its 4x4 NIfTI affine, `header`: its
    header, optional) as an ITK displacement field (module docstring). Atomic; a .nii.gz at gzip `level`. Returns
    the path."""
    nd = u.shape[-1]
    if u.ndim != nd + 1 or nd not in (2, 3):
        raise ValueError(f"displacement must be (*S, nd) with nd = len(S) in (2, 3), got shape {u.shape}")
    d = voxel_to_itk(u, affine)
    data = d.reshape(*d.shape[:-1], *([1] * (4 - nd)), nd)  # (X, Y, Z, 1, 3) / (X, Y, 1, 1, 2)
    img = _nifti_image(data, _full_affine(affine), header)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = ITK_DESCRIP
    return write_nifti(path, img, level)


def save_voxel_displacement(path: str | os.PathLike, u: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write the voxel form (*S, nd) float32 with the fixed affine and header (dims follow the data). Atomic."""
    import nibabel as nib

    img = _nifti_image(np.asarray(u, dtype=np.float32), _full_affine(affine), header)
    img.header["descrip"] = VOXEL_DESCRIP
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def _full_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    if a.shape == (3, 3):  # a reduced 2D affine: back into the z = 0 plane
        full = np.eye(4)
        full[np.ix_([0, 1, 3], [0, 1, 3])] = a
        return full
    raise ValueError(f"affine must be (4, 4) (or a reduced 2D (3, 3)), got shape {a.shape}")


class Displacement:
    """A displacement read from disk in either form, as the voxel form of its grid.

    u: (*S, nd) float32 voxel displacement of the grid (see the module docstring); affine: (4, 4) NIfTI affine of
    that (fixed) grid, None for .npy; header: the NIfTI header or None; form: "voxel" | "itk"."""

    def __init__(self, u: np.ndarray, affine: np.ndarray | None, header: Any, form: str, path: Path) -> None:
        self.u, self.affine, self.header, self.form, self.path = u, affine, header, form, path

    @property
    def ndim(self) -> int:
        return self.u.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.u.shape[:-1])


def read_displacement(path: str | os.PathLike) -> Displacement:
    """Read a displacement in voxel form (.nii/.nii.gz (X, Y, Z, 3), (X, Y, 2) or (X, Y, 1, 2); .npy (*S, nd)) or
    ITK form (5D .nii/.nii.gz (X, Y, Z, 1, 3) / (X, Y, 1, 1, 2), intent vector, LPS mm). ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"transform file not found: {path}")
    name = path.name.lower()
    if name.endswith(".npy"):
        try:
            u = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
        if u.ndim not in (3, 4) or u.shape[-1] != u.ndim - 1 or u.dtype.kind != "f":
            raise ValueError(f"{path}: expected a float (*S, nd) voxel displacement with nd = len(S) in (2, 3), "
                             f"got shape {u.shape} dtype {u.dtype}")
        return Displacement(_finite(u.astype(np.float32), path), None, None, "voxel", path)
    if not name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a transform must be .nii, .nii.gz or .npy")
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # ImageFileError, gzip errors, truncation, ...
        raise ValueError(f"{path} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    if data.ndim == 5 and data.shape[3] == 1 and data.shape[4] in (2, 3):
        nd = data.shape[4]
        if nd == 2:
            if data.shape[2] != 1:
                raise ValueError(f"{path}: a 2D ITK field is (X, Y, 1, 1, 2), got shape {data.shape}")
            d = data[:, :, 0, 0, :]
        else:
            d = data[:, :, :, 0, :]
        check_affine(affine, nd, str(path))
        u = itk_to_voxel(_finite(d, path), affine)
        if nd == 3 and u.shape[2] == 1 and float(np.abs(u[..., 2]).max()) <= 1e-4:
            u = u[:, :, 0, :2]  # a single-slice (X, Y, 1) registration's field: in-plane, the 2D voxel form
        return Displacement(u, affine, img.header, "itk", path)
    if data.ndim == 4 and data.shape[2:] == (1, 2):  # a single-slice (X, Y, 1) registration's 2D field
        data = data[:, :, 0, :]
    if (data.ndim == 4 and data.shape[3] == 3) or (data.ndim == 3 and data.shape[2] == 2):
        nd = data.shape[-1]
        check_affine(affine, nd, str(path))
        return Displacement(_finite(data, path), affine, img.header, "voxel", path)
    raise ValueError(f"{path}: expected a displacement field, voxel form (X, Y, Z, 3) / (X, Y, 2) or ITK form "
                     f"(X, Y, Z, 1, 3) / (X, Y, 1, 1, 2), got shape {data.shape}")


def _finite(u: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(u)):
        raise ValueError(f"{path}: displacement contains NaN or Inf")
    return u


def spatial_affine_of(d: Displacement) -> np.ndarray:
    """The displacement grid's reduced affine (identity for .npy)."""
    nd = d.ndim
    return np.eye(nd + 1) if d.affine is None else spatial_affine(d.affine, nd)
