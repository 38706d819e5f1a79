"""The real-brain 2D slice pairs: the loss study's and benchmarks/synth_eval.py's test on real scans (issue 19).

Three labelled real brains of deepsim_rt.data.real_brains (REAL: colin27, fsaverage, cat12) are resampled from
world coordinates onto axial slices of the bundled MNI152 2 mm grid at z = +4 and +8 mm (SLICES_MM; 96 x 80, the
default-2d grid): every ordered pair of brains at each slice, 6 x 2 = 12 pairs. No pre-alignment beyond the common
MNI-like space ("none" is that baseline). Sets (`real_pairs`):
  t1  both images the real T1 brains;
  xc  the fixed brain made T2-like by a non-monotone map of ITS OWN T1 intensities (`t2_like`: knots at its own
      CSF / GM / WM means from a 3-class k-means of the slice's brain; background dark, CSF bright, GM mid, WM
      dark), so its edges, noise and partial volume stay the real image's (not re-rendered from the labels that
      score it).
Score (`slice_dice`): mean Dice over the 12 shared subcortical structures (real_brains.STRUCTURES, aseg ids) present
in the fixed slice with >= 5 voxels; the moving labels are warped with nearest neighbour (border padding, as the
first round's synth_eval scored them; the structures lie far from the slice's edges).
The 12 pairs come from 3 brains (two population averages) and 2 neighbouring slices: they are NOT independent, and
paired tests on them overstate the evidence. The brains' licences: real_brains (fsaverage is FreeSurfer-licensed:
fetched at set-up, never committed, no picture of it is written here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from deepsim_rt.data.atlas import load_atlas
from deepsim_rt.data.contrast import t2_like  # one T2-like map for the 2D and 3D sets (re-exported here)
from deepsim_rt.data.synth import robust_normalize
from deepsim_rt.evaluate.metrics import folding_fraction, std_log_jacobian
from deepsim_rt.kernels import warp

__all__ = ["SLICES_MM", "REAL", "SETS", "RealSlicePair", "t2_like", "real_slices", "real_pairs", "slice_dice",
           "evaluate_real_pairs"]

SLICES_MM = (4.0, 8.0)
REAL = ("colin27", "fsaverage", "cat12")
SETS = ("t1", "xc")
MIN_VOXELS = 5  # a structure is scored where the fixed slice has at least this many voxels of it (2 mm: 20 mm^2)


def real_slices(cache: str | None = None) -> dict:
    """name -> list over SLICES_MM of (image (1, 1, H, W) robust-normalized, labels (1, 1, H, W) int64 (aseg ids of
    the 12 shared structures, else 0), brain mask (H, W) bool numpy, head (1, 1, H, W) or None)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    from deepsim_rt.data import real_brains as rb

    atlas = load_atlas(3, 2)
    ids = [aseg for _, aseg, _ in rb.STRUCTURES]
    brains = rb.ensure_real_brains(cache=cache, names=REAL)
    out = {}
    d_, h_, w_ = atlas.shape
    zs = np.array([(atlas.affine @ np.array([d, h_ // 2, w_ // 2, 1.0]))[2] for d in range(d_)])
    for name in REAL:
        b = brains[name]
        vols = {"image": gaussian_filter(b.array("image"), 0.85)}  # anti-alias 1 mm -> 2 mm (sigma 0.85 voxel)
        if b.head is not None:
            vols["head"] = gaussian_filter(b.array("head"), 0.85)
        lab = b.array("labels")
        inv = np.linalg.inv(b.affine)
        per = []
        for z in SLICES_MM:
            k = int(np.argmin(np.abs(zs - z)))  # the tensor index along D whose world z is closest to z
            hh, ww = np.meshgrid(np.arange(h_), np.arange(w_), indexing="ij")
            idx = np.stack([np.full_like(hh, k), hh, ww, np.ones_like(hh)]).reshape(4, -1).astype(np.float64)
            src = (inv @ (atlas.affine @ idx))[:3]
            ims = {key: robust_normalize(torch.from_numpy(map_coordinates(v, src, order=1, mode="constant")
                                                          .reshape(h_, w_))[None, None].float())
                   for key, v in vols.items()}
            lb = map_coordinates(lab, src, order=0, mode="constant").reshape(h_, w_).astype(np.int64)
            lb = np.where(np.isin(lb, ids), lb, 0)
            t = ims["image"]
            per.append((t, torch.from_numpy(lb)[None, None], (t[0, 0] > 0.05).numpy(), ims.get("head")))
        out[name] = per
    return out


@dataclass(frozen=True)
class RealSlicePair:
    """One real 2D pair: images (1, 1, H, W) float in [0, 1] (robust-normalized), labels (1, 1, H, W) int64."""

    name: str  # "colin27->fsaverage z=+4mm"
    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor


def real_pairs(kind: str = "t1", cache: str | None = None, slices: dict | None = None) -> list[RealSlicePair]:
    """The 12 real slice pairs of set `kind` (SETS: "t1" | "xc"), moving-brain-major, slice-minor. slices: a
    `real_slices` result to reuse (else built from the cache)."""
    if kind not in SETS:
        raise ValueError(f"real pair set must be one of {SETS}, got {kind!r}")
    sl = real_slices(cache) if slices is None else slices
    out = []
    for mv in REAL:
        for fx in REAL:
            if mv == fx:
                continue
            for s, z in enumerate(SLICES_MM):
                m, ml, _, _ = sl[mv][s]
                f, fl, fmask, _ = sl[fx][s]
                if kind == "xc":
                    f = torch.from_numpy(t2_like(f[0, 0].numpy(), fmask))[None, None]
                out.append(RealSlicePair(f"{mv}->{fx} z={z:+g}mm", m, f, ml, fl))
    return out


def slice_dice(warped: torch.Tensor, fixed: torch.Tensor) -> tuple[float, dict[int, float]]:
    """(mean, {aseg id: Dice}) over the label ids present in `fixed` with >= MIN_VOXELS voxels; both label maps of
    one shape, any ndim. The mean is NaN when no structure qualifies."""
    if warped.shape != fixed.shape:
        raise ValueError(f"warped and fixed label maps must have one shape, got {tuple(warped.shape)} and "
                         f"{tuple(fixed.shape)}")
    w, f = warped.numpy().ravel(), fixed.numpy().ravel()
    vals = {}
    for v in np.unique(f):
        if v == 0 or (f == v).sum() < MIN_VOXELS:
            continue
        a, b = w == v, f == v
        vals[int(v)] = float(2.0 * (a & b).sum() / (a.sum() + b.sum()))
    return (float(np.mean(list(vals.values()))) if vals else float("nan")), vals


# register(moving (1, 1, H, W), fixed (1, 1, H, W)) -> displacement (1, 2, H, W) voxels; None = no registration
RegisterFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate_real_pairs(pairs: list[RealSlicePair], register: RegisterFn | None) -> list[dict]:
    """Score `register` on real slice pairs; one dict per pair in the study's row format (evaluate.study.summarize
    reads it): pair, dice_fg (= slice_dice mean), dice_paper (the same: background is not scored on real brains),
    dice_per_class {structure name: Dice or None}, folding (%), std_log_jac, epe None, seconds."""
    from deepsim_rt.data.real_brains import STRUCTURES

    names = {aseg: name for name, aseg, _ in STRUCTURES}
    rows = []
    for p in pairs:
        t0 = time.perf_counter()
        if register is None:
            u = torch.zeros((1, 2, *p.moving.shape[2:]), dtype=p.moving.dtype)
        else:
            with torch.no_grad():
                u = register(p.moving, p.fixed)
        seconds = time.perf_counter() - t0
        mean, per = slice_dice(warp(p.moving_labels, u, mode="nearest", padding="border"), p.fixed_labels)
        sld = float(std_log_jacobian(u)[0])
        rows.append({
            "pair": p.name,
            "dice_fg": None if mean != mean else mean,
            "dice_paper": None if mean != mean else mean,
            "dice_per_class": {n: per.get(aseg) for aseg, n in names.items()},
            "folding": 100.0 * float(folding_fraction(u)[0]),
            "std_log_jac": None if sld != sld else sld,
            "epe": None,
            "seconds": seconds,
        })
    return rows
