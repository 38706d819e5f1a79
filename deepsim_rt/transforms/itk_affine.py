"""The affine part of a registration as an ITK affine transform file, the way ANTs writes `0GenericAffine.mat`.

    save_itk_affine("affine.mat", world)        # world: (4, 4) fixed world -> moving world, NIfTI RAS mm
    world = read_itk_affine("affine.mat")       # the same matrix back (also ITK's text form, .txt / .tfm)

Formats (ITK's MatrixOffsetTransformBase, read by antsApplyTransforms, ants.read_transform, SimpleITK):
  .mat  MATLAB v4 file with two double column vectors: "AffineTransform_double_3_3" (12 = the 3x3 matrix row by
        row, then the translation) and "fixed" (3 = the centre of rotation); 2D: "..._2_2" with 6 and 2 values.
  .txt / .tfm  "#Insight Transform File V1.0" text with the same Parameters / FixedParameters.
ITK maps FIXED-space points to MOVING-space points in LPS millimetres: T(x) = M (x - c) + c + t. Written with the
centre c = 0, so T(x) = M x + t with [M t] = L W L, L = diag(-1, -1, 1) (NIfTI RAS -> ITK LPS).
With a deformable part: `antsApplyTransforms -r fixed -i moving -t warp.nii.gz -t affine.mat`: ANTs applies the
last listed first to the image, i.e. a fixed point x goes to moving point A(x + d(x)): the field d lives on the
fixed grid and the affine follows it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from deepsim_rt._io import atomic_write

__all__ = ["save_itk_affine", "read_itk_affine", "ITK_AFFINE_SUFFIXES"]

ITK_AFFINE_SUFFIXES = (".mat", ".txt", ".tfm")


def _lps(nd: int) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0][:nd] + [1.0])


def _params(world: np.ndarray, nd: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(world, dtype=np.float64)
    if w.shape == (4, 4) and nd == 2:
        w = w[np.ix_([0, 1, 3], [0, 1, 3])]
    if w.shape != (nd + 1, nd + 1) or not np.all(np.isfinite(w)):
        raise ValueError(f"an ITK affine needs a finite ({nd + 1}, {nd + 1}) or (4, 4) matrix, got shape {w.shape}")
    m = _lps(nd) @ w @ _lps(nd)
    return np.concatenate([m[:nd, :nd].ravel(), m[:nd, nd]]), np.zeros(nd)


def _v4_var(name: str, values: np.ndarray) -> bytes:
    """One MATLAB v4 variable: a little-endian double column vector (type 0000, real)."""
    raw = name.encode("ascii") + b"\0"
    return struct.pack("<5i", 0, values.size, 1, 0, len(raw)) + raw + values.astype("<f8").tobytes()


def save_itk_affine(path: str | os.PathLike, world: np.ndarray, nd: int = 3) -> Path:
    """Write the fixed -> moving world map `world` (RAS mm; (nd + 1)^2 or (4, 4)) as an ITK affine file (.mat
    binary or .txt / .tfm text, by suffix). Atomic. Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ITK_AFFINE_SUFFIXES:
        raise ValueError(f"{path}: an ITK affine file ends in {' / '.join(ITK_AFFINE_SUFFIXES)}")
    params, fixed = _params(world, nd)
    kind = f"AffineTransform_double_{nd}_{nd}"
    if suffix == ".mat":
        blob = _v4_var(kind, params) + _v4_var("fixed", fixed)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: {kind}\nParameters: {' '.join(repr(float(v)) for v in params)}\n"
            f"FixedParameters: {' '.join(repr(float(v)) for v in fixed)}\n")
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_v4(blob: bytes, path: Path) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    while pos < len(blob):
        if pos + 20 > len(blob):
            raise ValueError(f"{path}: truncated MATLAB v4 file")
        mopt, rows, cols, imag, namelen = struct.unpack_from("<5i", blob, pos)
        pos += 20
        if mopt != 0 or imag != 0 or rows * cols > 64 or namelen > 128:
            raise ValueError(f"{path}: not an ITK affine .mat (expected little-endian real double vectors)")
        name = blob[pos:pos + namelen].rstrip(b"\0").decode("ascii", "replace")
        pos += namelen
        n = rows * cols
        if pos + 8 * n > len(blob):
            raise ValueError(f"{path}: truncated MATLAB v4 file")
        out[name] = np.frombuffer(blob, "<f8", n, pos).copy()
        pos += 8 * n
    return out


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK affine transform file (.mat as ANTs writes it, or ITK's text form) -> the fixed -> moving world
    map, RAS mm, (4, 4) for 3D or (3, 3) for 2D. ValueError on anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"transform file not found: {path}")
    if path.suffix.lower() == ".mat":
        vars_ = _read_v4(path.read_bytes(), path)
        kind = next((k for k in vars_ if k.startswith(("AffineTransform_", "MatrixOffsetTransformBase_"))), None)
        params, fixed = (vars_.get(kind), vars_.get("fixed")) if kind else (None, None)
    else:
        try:
            lines = path.read_text(encoding="ascii").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not an ITK transform text file: {exc}") from exc
        fields = dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
        kind = fields.get("Transform", "").strip() or None
        try:
            params = np.array(fields.get("Parameters", "").split(), dtype=np.float64)
            fixed = np.array(fields.get("FixedParameters", "").split(), dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"{path}: unreadable transform parameters: {exc}") from exc
    if kind is None or params is None or fixed is None or params.size not in (6, 12) or \
            fixed.size != {6: 2, 12: 3}[params.size]:
        raise ValueError(f"{path}: expected an ITK affine transform (AffineTransform_double_3_3 or _2_2 with "
                         f"12 / 6 parameters and a centre), got {kind!r}")
    nd = 3 if params.size == 12 else 2
    m = np.eye(nd + 1)
    m[:nd, :nd] = params[: nd * nd].reshape(nd, nd)
    c = fixed
    m[:nd, nd] = params[nd * nd:] + c - m[:nd, :nd] @ c  # T(x) = M (x - c) + c + t
    return _lps(nd) @ m @ _lps(nd)
