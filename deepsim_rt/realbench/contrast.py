"""Cross-contrast pairs for the real-brain benchmark: a real brain made T2-like from ITS OWN T1 intensities.

`t2_like` / `t2like_array` (deepsim_rt.data.contrast, re-exported here) map a robust-normalized T1 image through
a non-monotone piecewise-linear curve with knots at the image's own CSF / grey / white means: background dark, CSF
bright, grey mid, white dark; the image only, never a label map.

`t2like_brain` writes a brain's T2-like image as NIfTI (same grid and affine) and returns a copy of the brain whose
`image` is that file; the benchmark registers a real T1 moving brain to it (`deepsim-rt evaluate-real --contrast
t2like`). benchmarks/synth_eval.py (2D, issue 19) uses the same map.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from deepsim_rt.data.contrast import T2LIKE_KNOTS_Y, kmeans3, t2_like, t2like_array  # the map itself (floor 2)

__all__ = ["kmeans3", "t2_like", "t2like_array", "t2like_brain", "run_ants_affine_then_ours", "CONTRASTS",
           "T2LIKE_KNOTS_Y"]

CONTRASTS = ("t1", "t2like")


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
