"""Voxel-level ROC AUC: the probability that a random changed voxel scores higher than a random unchanged one.

    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)           (Mann-Whitney U / (n_pos n_neg))

R_pos = sum of the ranks (1-based, ascending, TIES GET THEIR AVERAGE RANK) of the positive voxels' scores. Ties
between a positive and a negative count 1/2, exactly as the trapezoidal area under the ROC curve
(sklearn.metrics.roc_auc_score, the tests' reference). Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["roc_auc"]


def _flat(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x.reshape(-1)


def roc_auc(scores, positive, where=None) -> float:
    """AUC of `scores` for the boolean `positive`, optionally only over the voxels where `where` is true.

    scores: float array/tensor of any shape (no NaN); positive, where: bool (or 0/1) of the same shape.
    Returns a float in [0, 1]: 1 = every positive outranks every negative, 0.5 = chance (e.g. constant scores).
    ValueError when the evaluated voxels hold no positive or no negative (AUC undefined).
    """
    s = _flat("scores", scores).astype(np.float64)
    p = _flat("positive", positive)
    if s.shape != p.shape:
        raise ValueError(f"scores and positive must have the same number of elements, got {s.size} and {p.size}")
    if p.dtype != np.bool_:
        if not np.isin(p, (0, 1)).all():
            raise ValueError("positive must be boolean or hold only 0 and 1")
        p = p.astype(bool)
    if where is not None:
        w = _flat("where", where)
        if w.shape != s.shape:
            raise ValueError(f"where must have as many elements as scores ({s.size}), got {w.size}")
        s, p = s[w.astype(bool)], p[w.astype(bool)]
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(p.sum())
    n_neg = int(p.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs positive and negative voxels, got {n_pos} positive and {n_neg} negative")
    from scipy.stats import rankdata

    ranks = rankdata(s, method="average")
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
