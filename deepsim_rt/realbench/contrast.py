"""Cross-contrast pairs for the real-brain benchmark: a real brain made T2-like from ITS OWN T1 intensities.

`t2_like` maps a robust-normalized T1 image (2D slice or 3D volume, values in [0, 1]) through a non-monotone
piecewise-linear curve whose knots sit at the image's own CSF / grey / white means (a 3-class k-means of the brain
voxels): background dark, CSF bright, grey mid, white dark. The map reads the image only (never a label map), so
the T2-like image keeps the real scan's edges, noise and partial volume; rendering from the labels would put
intensity edges exactly on the boundaries Dice scores and flatter every method.

`t2like_brain` writes a brain's T2-like image as NIfTI (same grid and affine) and returns a copy of the brain whose
`image` is that file; the benchmark registers a real T1 moving brain to it (`deepsim-rt evaluate-real --contrast
t2like`). benchmarks/synth_eval.py (2D, issue 19) uses the same map.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

__all__ = ["kmeans3", "t2_like", "t2like_array", "t2like_brain", "CONTRASTS", "T2LIKE_KNOTS_Y"]

CONTRASTS = ("t1", "t2like")
# Output values at the knots 0, CSF/2, CSF, GM, WM, max(1, WM): background 0, CSF 1.0 (brightest), GM 0.6, WM 0.3
# (white darker than grey, as in T2), anything above WM (fat, vessels) 0.25.
T2LIKE_KNOTS_Y = (0.0, 0.1, 1.0, 0.6, 0.3, 0.25)
FOREGROUND = 0.05  # brain voxels: robust-normalized intensity above 5 % (as benchmarks/synth_eval.py's slices)


def kmeans3(v: np.ndarray) -> np.ndarray:
    """Sorted 3-class 1D k-means centres (CSF < GM < WM in a T1) of the values v (N,); 30 Lloyd steps from the
    15th / 50th / 85th percentiles (an empty class keeps its centre)."""
    v = np.asarray(v).ravel()  # dtype kept: the 2D results of synth.md were computed so
    if v.size < 3:
        raise ValueError(f"kmeans3 needs at least 3 values, got {v.size}")
    c = np.percentile(v, [15, 50, 85])
    for _ in range(30):
        lab = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        c = np.array([v[lab == k].mean() if np.any(lab == k) else c[k] for k in range(3)])
    return np.sort(c)


def t2_like(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Non-monotone map of a robust-normalized T1 image's own intensities, any shape (2D slice or 3D volume).

    img: float array in [0, 1] (deepsim_rt.data.synth.robust_normalize); mask: bool, same shape, the brain voxels
    whose k-means gives the knots (CSF / GM / WM means). -> float32, same shape, values in [0, 1].
    """
    img = np.asarray(img)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != img.shape:
        raise ValueError(f"t2_like: mask shape must equal the image's {img.shape}, got {mask.shape}")
    csf, gm, wm = kmeans3(img[mask])
    xs = np.array([0.0, 0.5 * csf, csf, gm, wm, max(1.0, wm + 1e-3)])
    return np.interp(img, xs, np.asarray(T2LIKE_KNOTS_Y)).astype(np.float32)


def t2like_array(t1: np.ndarray) -> np.ndarray:
    """A raw T1 image (any intensity scale, 2D or 3D) -> its T2-like version: robust-normalized (0.5 / 99.5
    percentiles, as the synthesis and the nets), the brain = normalized > 5 %, then `t2_like`. Reads the image only."""
    import torch

    from deepsim_rt.data.synth import robust_normalize

    t1 = np.asarray(t1, dtype=np.float32)
    if t1.ndim not in (2, 3):
        raise ValueError(f"t2like_array: expected a 2D or 3D image, got shape {t1.shape}")
    norm = robust_normalize(torch.from_numpy(np.ascontiguousarray(t1))[None, None])[0, 0].numpy()
    return t2_like(norm, norm > FOREGROUND)


def t2like_brain(brain, out: str | os.PathLike):
    """A copy of `brain` (data.real_brains.RealBrain) whose `image` is its T2-like version, written as
    OUT/<name>_t2like.nii.gz (float32, the brain's grid and affine; reused when present). Head, labels and mask
    are the brain's own (the labels score, they never shape the image)."""
    import nibabel as nib

    from deepsim_rt._io import atomic_write

    out = Path(out)
    dst = out / f"{Path(brain.image).name.split('.nii')[0]}_t2like.nii.gz"
    if not dst.is_file():
        src = nib.load(str(brain.image))
        t2 = t2like_array(np.asanyarray(src.dataobj))
        img = nib.Nifti1Image(t2, np.asarray(src.affine, dtype=np.float64))
        img.header.set_qform(img.affine, code=1)
        img.header.set_sform(img.affine, code=1)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(dst, lambda tmp: nib.save(img, tmp))
    return dataclasses.replace(brain, image=dst, description=f"{brain.description}, T2-like from its own T1",
                               _arrays={})


def run_ants_affine_then_ours(method, mov: Path, fix: Path, labels: Path | None, ndim: int, work: Path,
                              run_ours, ants) -> dict:
    """kind "antsaff+ours": ANTs `Affine` (Mattes mutual information, random_seed 1; intensity-agnostic, unlike our
    global-NCC pre-alignment) resamples the moving image (linear) and its labels (genericLabel) onto the fixed grid,
    then ours runs from there with no pre-alignment of its own (`method` with affine None). -> the runner's result
    dict; seconds / CPU seconds cover both steps, folding is of our deformable field (an affine does not fold).
    run_ours / ants: the runner's `_run_ours` and its antspyx module (passed in: runner imports this module)."""
    import time

    t0, c0 = time.perf_counter(), time.process_time()
    f, mo = ants.image_read(str(fix)), ants.image_read(str(mov))
    reg = ants.registration(f, mo, type_of_transform="Affine", outprefix=str(work / "aff_"), random_seed=1)
    mov_a = work / "moving_antsaffine.nii.gz"
    ants.image_write(reg["warpedmovout"], str(mov_a))
    lab_a = None
    if labels is not None:
        lab_a = work / "labels_antsaffine.nii.gz"
        wl = ants.apply_transforms(f, ants.image_read(str(labels)), reg["fwdtransforms"], interpolator="genericLabel")
        ants.image_write(wl, str(lab_a))
    wall_a, cpu_a = time.perf_counter() - t0, time.process_time() - c0
    (work / "ours").mkdir(exist_ok=True)
    res = run_ours(dataclasses.replace(method, affine=None), mov_a, fix, lab_a, ndim, work / "ours")
    res["seconds"] += wall_a
    res["wall_seconds"] += wall_a
    res["cpu_seconds"] += cpu_a
    res["ants_affine_seconds"] = wall_a
    return res
