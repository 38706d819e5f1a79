"""Scores of a registration between real brains: Dice per named structure, local NCC inside a mask, folding.

Arrays are numpy on one (fixed) grid, in the file's voxel order. Label maps carry arbitrary integer ids (aseg /
IBSR ids here, e.g. 10 = left thalamus): `structure_dice` maps the ids it is asked about onto 1..K and calls
deepsim_rt.evaluate.metrics.dice_per_class, so both share one Dice definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from deepsim_rt.evaluate.metrics import dice_per_class, folding_fraction

__all__ = ["structure_dice", "mean_dice", "masked_local_ncc", "folding_percent", "foreground_mask"]


def _label_array(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind == "f":
        if not np.all(x == np.round(x)):
            raise ValueError(f"{name} must be an integer label map, got non-integer values")
        x = x.astype(np.int64)
    if x.dtype.kind not in "iub":
        raise ValueError(f"{name} must be an integer label map, got dtype {x.dtype}")
    return x


def structure_dice(pred: np.ndarray, true: np.ndarray, ids: Sequence[int]) -> dict[int, float]:
    """Dice 2|P & T| / (|P| + |T|) of each label id in `ids` between two label maps on one grid.

    pred, true: integer arrays of one shape (any ndim). Every other id counts as background. Returns {id: Dice};
    NaN where the id is absent from both maps; 0.0 where it is in one map only.
    """
    pred, true = _label_array("pred", pred), _label_array("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {pred.shape} and {true.shape}")
    ids = [int(i) for i in ids]
    if not ids or len(set(ids)) != len(ids) or min(ids) <= 0:
        raise ValueError(f"ids must be distinct positive label ids, got {ids}")
    hi = max(int(pred.max(initial=0)), int(true.max(initial=0)), max(ids))
    lo = min(int(pred.min(initial=0)), int(true.min(initial=0)))
    if lo < 0:
        raise ValueError(f"label ids must be >= 0, got minimum {lo}")
    lut = np.zeros(hi + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    p = torch.from_numpy(lut[pred]).reshape(1, 1, 1, 1, -1)  # dice_per_class takes (B, 1, *S), S 2D or 3D
    t = torch.from_numpy(lut[true]).reshape(1, 1, 1, 1, -1)
    d = dice_per_class(p, t, len(ids) + 1)[0, 1:].tolist()
    return dict(zip(ids, d, strict=True))


def mean_dice(per_id: dict[int, float]) -> float:
    """Mean over the ids present in either map (NaN entries skipped); NaN when none is."""
    vals = [v for v in per_id.values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def foreground_mask(image: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """image > fraction * max(image): the head / body of an image without a brain mask (bool, same shape)."""
    image = np.asarray(image, dtype=np.float32)
    return image > fraction * float(image.max(initial=0.0))


def masked_local_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, window: int = 9) -> float:
    """Mean local (windowed) NCC, cross / sqrt(var_a var_b) in [-1, 1], over the voxels of `mask`.

    a, b: images on one grid (2D or 3D); mask: bool, same shape (None: every voxel). window: odd box size per
    axis in voxels (9: the refinement's NCC window). Windows where either image is flat (variance < 1e-6 of the
    image variance) score 0. Unlike the training loss (losses.intensity.ncc_map, squared) the sign is kept, so
    an anti-correlated match scores below 0.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"a and b must be 2D or 3D arrays of one shape, got {a.shape} and {b.shape}")
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    if mask is not None and np.asarray(mask).shape != a.shape:
        raise ValueError(f"mask must have the images' shape {a.shape}, got {np.asarray(mask).shape}")
    pool = torch.nn.functional.avg_pool3d if a.ndim == 3 else torch.nn.functional.avg_pool2d
    ta = torch.from_numpy(a).double()
    tb = torch.from_numpy(b).double()
    ta = (ta - ta.mean()) / ta.std().clamp_min(1e-12)  # scale-free: the eps below is relative
    tb = (tb - tb.mean()) / tb.std().clamp_min(1e-12)
    x = torch.stack([ta, tb, ta * ta, tb * tb, ta * tb])[None]
    m = pool(x, window, stride=1, padding=window // 2, count_include_pad=False)[0]
    va = (m[2] - m[0] ** 2).clamp_min(0)
    vb = (m[3] - m[1] ** 2).clamp_min(0)
    cov = m[4] - m[0] * m[1]
    ok = (va > 1e-6) & (vb > 1e-6)
    cc = torch.where(ok, cov / (va * vb).clamp_min(1e-12).sqrt(), torch.zeros_like(cov))
    if mask is None:
        return float(cc.mean())
    mk = torch.from_numpy(np.asarray(mask).astype(bool))
    if not bool(mk.any()):
        raise ValueError("mask is empty: nothing to score")
    return float(cc[mk].mean())


def folding_percent(u: np.ndarray) -> float:
    """% of voxels where det J of p -> p + u(p) is <= 0; u: (ndim, *S) displacement in voxels."""
    t = torch.from_numpy(np.asarray(u, dtype=np.float32))[None]
    return float(folding_fraction(t)[0]) * 100.0
