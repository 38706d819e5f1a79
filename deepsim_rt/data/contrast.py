"""The T2-like contrast of a real T1 image (issue 19, item 3): a non-monotone map of the image's OWN intensities.

`t2_like` maps a robust-normalized T1 image (2D slice or 3D volume, values in [0, 1]) through a piecewise-linear
curve whose knots sit at the image's own CSF / grey / white means (a 3-class k-means of the brain voxels):
background dark, CSF bright, grey mid, white dark. It reads the image only (never a label map), so the T2-like
image keeps the real scan's edges, noise and partial volume; rendering from the labels would put intensity edges
exactly on the boundaries Dice scores and flatter every method. Floor 2 (data), so that the study (evaluate, floor
7), the real-brain benchmark (realbench.contrast, floor 9) and benchmarks/synth_eval.py share this one map.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans3", "t2_like", "t2like_array", "T2LIKE_KNOTS_Y", "FOREGROUND"]

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
