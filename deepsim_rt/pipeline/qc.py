"""Quality control of one registration: Jacobian determinant map, folding, displacement statistics, and warnings
for inputs far from what the model was trained on.

    jac, stats = displacement_qc(u, affine)              # u (ndim, *S) voxels -> det J map (*S) + JSON-able figures
    profile = training_profile("reg.safetensors")         # spacing / grid / orientation of the training data
    warnings = input_warnings("moving", image, profile, affine)

Conventions: u is the runtime's displacement, (ndim, *S), float, VOXELS, channel i along array axis i,
phi(p) = p + u(p). det J(phi) is computed in voxel units (deepsim_rt.evaluate.metrics.jacobian_determinant); it
equals the determinant in world units for any affine grid (J_world = A J_voxel A^-1 has the same determinant), so
the map needs no spacing. Displacement lengths are reported in voxels and, given the grid's affine, in mm.

Warnings are strings (never errors): the registration runs, and the caller prints them and stores them in
summary.json. Thresholds (each stated in its message):
  voxel size     more than SPACING_FACTOR (1.5x) from the model's training spacing on any axis: a network's capture
                 range is a number of voxels, so at 1 mm a model trained at 4 mm sees deformations 4x too large;
  grid size      (without a spacing to compare) any axis more than GRID_FACTOR (2x) above or below the training grid;
  orientation    the array axes' anatomical directions (nibabel aff2axcodes) differ from the training data's;
  intensities    min-max scaled, 99 % of the voxels below BRIGHT_OUTLIER_P99 (0.3) of the range (training images:
                 0.95; a few hot voxels compress the contrast the network saw; "minmax" models only: a
                 "percentile" model's scaling ignores them), or fewer than FEW_LEVELS (8)
                 distinct values (a label map or mask given as the image). Constant images are warned about by
                 the runtime itself (deepsim_rt.runtime.Registrator.register) and pipeline.register.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TrainingProfile", "training_profile", "displacement_qc", "input_warnings", "SPACING_FACTOR",
           "GRID_FACTOR", "BRIGHT_OUTLIER_P99", "FEW_LEVELS"]

SPACING_FACTOR = 1.5
GRID_FACTOR = 2.0
BRIGHT_OUTLIER_P99 = 0.3  # the bundled atlas at 2 / 4 mm: 99th percentile of min-max scaled T1 = 0.948 / 0.956
FEW_LEVELS = 8


@dataclass(frozen=True)
class TrainingProfile:
    """What is known about a model's training data; None where unknown.

    spacing_mm: voxel size per array axis (tensor order); train_grid: spatial shape; axcodes: anatomical direction
    of each array axis (nibabel aff2axcodes letters, e.g. ("S", "A", "R") for the bundled atlas volumes).
    intensity: the network's input contract (NetConfig.intensity: "minmax" | "percentile"); None when unknown,
    treated as "minmax" (the bright-outlier warning only concerns min-max scaling). Not in `as_dict`.
    """

    spacing_mm: tuple[float, ...] | None = None
    train_grid: tuple[int, ...] | None = None
    axcodes: tuple[str, ...] | None = None
    intensity: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
                "train_grid": None if self.train_grid is None else list(self.train_grid),
                "axcodes": None if self.axcodes is None else list(self.axcodes)}


def _atlas_axcodes(ndim: int) -> tuple[str, ...]:
    """Axis directions of the synthetic training data (the bundled MNI152 atlas; 2D: its axial slice)."""
    import nibabel as nib

    from deepsim_rt.data.atlas import ASSET_PATH

    # Only the affine of the 1 mm asset (0.4 s; building a resampled atlas took 15 s under load): block averaging
    # keeps the axis directions, and the 2D data are axial (H, W) slices, i.e. the volume's last two axes.
    with np.load(ASSET_PATH, allow_pickle=False) as z:
        codes = tuple(nib.aff2axcodes(z["affine"]))
    return codes if ndim == 3 else codes[1:]


def training_profile(model: str | os.PathLike) -> TrainingProfile:
    """The training profile recorded in a .safetensors checkpoint (spacing_mm / train_grid metadata; orientation
    when it was trained on the synthetic atlas data). Other artifacts and older checkpoints: what is known."""
    path = Path(model)
    if path.suffix != ".safetensors" or not path.is_file():
        return TrainingProfile()
    from deepsim_rt.data.synthetic import PRESETS
    from deepsim_rt.nn.checkpoint import read_metadata, read_scale
    from deepsim_rt.nn.config import NetConfig

    meta = read_metadata(path)
    spacing, grid = read_scale(path)
    axcodes = None
    try:
        data = json.loads(meta.get("train", "{}")).get("config", {}).get("data")
    except (json.JSONDecodeError, AttributeError):
        data = None
    cfg = NetConfig.from_json(meta["config"])
    if isinstance(data, str) and data in PRESETS:
        axcodes = _atlas_axcodes(cfg.ndim)
    return TrainingProfile(spacing, grid, axcodes, cfg.intensity)


def displacement_qc(u: np.ndarray, affine: np.ndarray | None = None, world: np.ndarray | None = None,
                    mask: np.ndarray | None = None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Jacobian determinant map and summary figures of one displacement.

    u: (ndim, *S) displacement in voxels (the runtime's convention); every spatial size >= 2.
    affine: (4, 4) voxel -> world mm of the grid (NIfTI), or None (no mm figures).
    Returns (det J map (*S) float32, figures): folding_percent (% voxels with det J <= 0), sd_log_jacobian (over
    det J > 0, ddof 0; None when no voxel has det J > 0), jacobian min/max/mean, displacement mean / p99 / max
    length in voxels (and in mm with an affine).
    world: for a purely affine map (no deformable part), its (nd + 1)^2 world matrix: det J is then one number,
    det of its linear part (A^-1 W A has W's determinant), no map is computed (None is returned for it) and
    sd_log_jacobian is 0.
    mask: (*S) bool, or None: the figures (not the map) over the voxels inside only (a brain mask), and
    "mask_voxels" says how many.
    """
    import torch

    from deepsim_rt.evaluate.metrics import jacobian_determinant

    u = np.asarray(u, dtype=np.float32)
    nd = u.ndim - 1
    if nd not in (2, 3) or u.shape[0] != nd:
        raise ValueError(f"u must be (ndim, *S) with ndim 2 or 3 and ndim channels, got shape {u.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != u.shape[1:] or not mask.any():
            raise ValueError(f"mask must be a non-empty bool array of the field's shape {u.shape[1:]}, got "
                             f"{mask.shape}")
    if world is None:
        t = torch.from_numpy(np.ascontiguousarray(u))[None]
        det = jacobian_determinant(t)[0].numpy().astype(np.float32, copy=False)
        d = det if mask is None else det[mask]
        # evaluate.metrics.std_log_jacobian's statistic (ddof 0 over det > 0) from this det: it would compute the
        # Jacobian a second time (1.1 s of a 1 mm register on the loaded box)
        logd = np.log(d[d > 0].astype(np.float64))
        sd = float(logd.std()) if logd.size else float("nan")
        folding = float((d <= 0).mean() * 100.0)
        lo, hi, mean = float(d.min()), float(d.max()), float(d.mean())
    else:
        det = None
        value = float(np.linalg.det(np.asarray(world, dtype=np.float64)[:nd, :nd]))
        sd, folding, lo, hi, mean = 0.0, 100.0 * (value <= 0), value, value, value
    length = np.sqrt(np.einsum("i...,i...->...", u, u, dtype=np.float64))
    if mask is not None:
        length = length[mask]
    stats: dict[str, Any] = {
        "folding_percent": folding,
        "sd_log_jacobian": None if not np.isfinite(sd) else sd,
        "jacobian_min": lo, "jacobian_max": hi, "jacobian_mean": mean,
        "displacement_voxels": {"mean": float(length.mean()), "p99": float(np.percentile(length, 99)),
                                "max": float(length.max())},
    }
    if affine is not None:
        lin = np.asarray(affine, dtype=np.float64)[:3, :nd]  # world vector of a voxel-axis displacement
        mm = np.sqrt((np.tensordot(lin, u.astype(np.float64), axes=(1, 0)) ** 2).sum(axis=0))
        if mask is not None:
            mm = mm[mask]
        stats["displacement_mm"] = {"mean": float(mm.mean()), "p99": float(np.percentile(mm, 99)),
                                    "max": float(mm.max())}
    if mask is not None:
        stats["mask_voxels"] = int(mask.sum())
    return det, stats


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def input_warnings(role: str, data: np.ndarray, profile: TrainingProfile, affine: np.ndarray | None = None,
                   path: str | os.PathLike | None = None, spacing_handled: bool = False) -> list[str]:
    """Warnings for one input image (array in the model's spatial layout, (H, W) or (D, H, W)) far from the
    training data; see the module docstring for the thresholds. `affine`: its (4, 4) voxel -> mm (NIfTI, with the
    array's axes as the file's first axes), None for PNG / NPY. spacing_handled: the caller runs the network at
    the training spacing (Registrator.register(..., spacing=...)), so no voxel-size warning. Constant images are
    left to the runtime."""
    name = f"{role} {path}" if path is not None else role
    out: list[str] = []
    nd = data.ndim
    if affine is not None:
        lin = np.asarray(affine, dtype=np.float64)[:3, :3]
        spacing = tuple(float(v) for v in np.linalg.norm(lin, axis=0)[:nd])
        if not spacing_handled and profile.spacing_mm is not None and len(profile.spacing_mm) == nd:
            ratio = np.array(spacing) / np.array(profile.spacing_mm)
            if np.any(ratio > SPACING_FACTOR) or np.any(ratio < 1 / SPACING_FACTOR):
                out.append(f"{name}: voxel size {_fmt(spacing)} mm is more than {SPACING_FACTOR:g}x from the model's "
                           f"training spacing {_fmt(profile.spacing_mm)} mm (its capture range is in voxels): "
                           "resample to the training spacing for reliable results")
        if profile.axcodes is not None and len(profile.axcodes) == nd:
            import nibabel as nib

            codes = tuple(nib.aff2axcodes(affine))[:nd]
            if codes != profile.axcodes:
                out.append(f"{name}: array axes point {''.join(codes)}, the model was trained on "
                           f"{''.join(profile.axcodes)} arrays: reorient (e.g. nibabel as_reoriented) to match")
    elif profile.train_grid is not None and len(profile.train_grid) == nd:
        ratio = np.array(data.shape) / np.array(profile.train_grid)
        if np.any(ratio > GRID_FACTOR) or np.any(ratio < 1 / GRID_FACTOR):
            out.append(f"{name}: grid {_fmt(data.shape)} is more than {GRID_FACTOR:g}x from the model's training grid "
                       f"{_fmt(profile.train_grid)}; with no voxel size in the file, check the image's scale")
    lo, hi = float(data.min()), float(data.max())
    if hi > lo:
        flat = data.ravel()
        levels = np.unique(flat[:: max(1, flat.size // 1_000_000)]).size  # a 1M-voxel sample: a lower bound
        if levels < FEW_LEVELS:
            out.append(f"{name}: only {levels} distinct intensities (fewer than {FEW_LEVELS}); is it a label map or "
                       "mask rather than an image?")
        else:
            # a "percentile" model scales by the 0.5 / 99.5 % percentiles (nn.intensity): outliers do not matter
            p99 = (float(np.percentile(data, 99)) - lo) / (hi - lo) if profile.intensity != "percentile" else 1.0
            if p99 < BRIGHT_OUTLIER_P99:
                out.append(f"{name}: 99 % of voxels lie below {p99:.2f} of the intensity range [{lo:g}, {hi:g}] "
                           f"(training images: 0.95; warned below {BRIGHT_OUTLIER_P99:g}): a few bright outliers "
                           "set the min-max scaling; clip them (e.g. at the 99.5th percentile) first")
    return out
