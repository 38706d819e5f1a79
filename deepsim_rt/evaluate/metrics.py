"""Registration metrics: Dice (two conventions), Jacobian determinant statistics, endpoint error.

Label maps are integer (B, 1, *S); displacements are (B, ndim, *S) in voxel units, channel i along spatial axis i
(tensor order), phi(p) = p + u(p). Every function returns one value per batch element (B,) or a map (B, *S);
average over the batch yourself. 2D (H, W) and 3D (D, H, W).
"""

from __future__ import annotations

import torch

from deepsim_rt._checks import (
    check_displacement,
    check_not_empty,
    check_same_device,
    check_spatial_ndim,
    check_tensor,
)

__all__ = [
    "dice_per_class",
    "dice_paper",
    "dice_foreground",
    "jacobian_determinant",
    "folding_fraction",
    "std_log_jacobian",
    "endpoint_error",
]


# ----------------------------------------------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------------------------------------------
def _check_labels(name: str, x: object) -> None:
    check_tensor(name, x)
    check_spatial_ndim(name, x)
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer label map, got dtype {x.dtype}")
    if x.shape[1] != 1:
        raise ValueError(f"{name} must be (B, 1, *spatial) with one label channel, got shape {tuple(x.shape)}")
    check_not_empty(name, x)


def dice_per_class(pred: torch.Tensor, true: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Dice 2|P_k & T_k| / (|P_k| + |T_k|) per batch element and class k in [0, n_classes).

    pred, true: integer label maps (B, 1, *S), same shape (pred is usually the moving labels warped with nearest).
    Returns (B, n_classes) float64; NaN where class k is absent from BOTH maps (undefined; each convention below
    decides what that means). Labels outside [0, n_classes) raise ValueError.
    Convention where peers differ: a class absent from the truth but present in pred scores 0 (a false positive),
    where MONAI's DiceMetric (ignore_empty=True) returns NaN and so leaves it out of its means (pinned in
    tests/test_conventions.py).
    """
    _check_labels("pred", pred)
    _check_labels("true", true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape (B, 1, *S), got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")
    check_same_device(("pred", "true"), pred, true)
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    for name, x in (("pred", pred), ("true", true)):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{name} labels must lie in [0, {n_classes}), got range [{lo}, {hi}]")
    b = pred.shape[0]
    p = pred.reshape(b, -1).long()
    t = true.reshape(b, -1).long()
    # Per-class counts by bincount over (batch, class) bins: one pass, no (B, K, N) one-hot in memory.
    offs = (torch.arange(b, device=p.device) * n_classes).unsqueeze(1)
    nbins = b * n_classes
    size_p = torch.bincount((p + offs).reshape(-1), minlength=nbins).view(b, n_classes)
    size_t = torch.bincount((t + offs).reshape(-1), minlength=nbins).view(b, n_classes)
    both = torch.where(p == t, p + offs, torch.full_like(p, nbins))  # mismatches go to an overflow bin
    inter = torch.bincount(both.reshape(-1), minlength=nbins + 1)[:nbins].view(b, n_classes)
    denom = (size_p + size_t).double()
    return torch.where(denom > 0, 2.0 * inter.double() / denom.clamp_min(1), torch.full_like(denom, float("nan")))


def dice_paper(pred: torch.Tensor, true: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The paper's mean Dice: over ALL classes including background (0), a class absent from both maps scoring 0.

    (B, 1, *S) x2 -> (B,) float64. Note the absent-scores-0 rule lowers the mean when a class is missing from a
    pair; compare numbers only under the same convention.
    """
    d = dice_per_class(pred, true, n_classes)
    return torch.nan_to_num(d, nan=0.0).mean(dim=1)


def dice_foreground(pred: torch.Tensor, true: torch.Tensor, n_classes: int, background: int = 0) -> torch.Tensor:
    """The usual mean Dice: over foreground classes (all but `background`), skipping classes absent from both.

    (B, 1, *S) x2 -> (B,) float64; NaN for a batch element where every foreground class is absent from both maps
    (nothing to score).
    """
    if not isinstance(background, int) or isinstance(background, bool) or not 0 <= background < max(n_classes, 1):
        raise ValueError(f"background must be a class index in [0, {n_classes}), got {background!r}")
    d = dice_per_class(pred, true, n_classes)
    keep = torch.ones(n_classes, dtype=torch.bool, device=d.device)
    keep[background] = False
    return d[:, keep].nanmean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Jacobian
# ----------------------------------------------------------------------------------------------------------------
def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """det(d phi / d x) of phi = id + u at every voxel, (B, ndim, *S) -> (B, *S).

    Derivatives of u by central differences in the interior and one-sided (first-order) differences on the
    boundary slices (torch.gradient, unit spacing = voxel units). Exact for affine maps. Every spatial size must be
    >= 2. Computed in fp64 for fp64 input, else fp32.
    """
    nsp = check_displacement("u", u)
    if min(u.shape[2:]) < 2:
        raise ValueError(f"jacobian_determinant needs every spatial size >= 2, got {tuple(u.shape[2:])}")
    x = u.double() if u.dtype == torch.float64 else u.float()
    # grads[j][:, c] = d u_c / d x_j; J[c][j] = delta_cj + d u_c / d x_j.
    grads = torch.gradient(x, dim=tuple(range(2, 2 + nsp)))
    J = [[grads[j][:, c] + (1.0 if c == j else 0.0) for j in range(nsp)] for c in range(nsp)]
    if nsp == 2:
        return J[0][0] * J[1][1] - J[0][1] * J[1][0]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def folding_fraction(u: torch.Tensor) -> torch.Tensor:
    """Fraction of voxels with det J(phi) <= 0 (folding), per batch element: (B, ndim, *S) -> (B,) in [0, 1]."""
    det = jacobian_determinant(u)
    return (det <= 0).flatten(1).double().mean(dim=1)


def std_log_jacobian(u: torch.Tensor) -> torch.Tensor:
    """Standard deviation (population, ddof=0) of log det J(phi) over the voxels with det > 0 ONLY (folded voxels
    have no log and are left out; report `folding_fraction` beside it). (B, ndim, *S) -> (B,) float64; NaN if no
    voxel has det > 0.
    """
    det = jacobian_determinant(u).flatten(1).double()
    pos = det > 0
    logd = torch.where(pos, det.clamp_min(torch.finfo(torch.float64).tiny).log(), torch.zeros_like(det))
    n = pos.sum(dim=1).double()
    mean = logd.sum(dim=1) / n
    var = torch.where(pos, (logd - mean.unsqueeze(1)) ** 2, torch.zeros_like(det)).sum(dim=1) / n
    return var.sqrt()  # n == 0 -> 0/0 = NaN


# ----------------------------------------------------------------------------------------------------------------
# Endpoint error
# ----------------------------------------------------------------------------------------------------------------
def endpoint_error(u: torch.Tensor, u_true: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Euclidean distance |u(p) - u_true(p)| in VOXELS over all voxels (or those where mask is true).

    u, u_true: (B, ndim, *S) displacements, same convention. mask: optional bool / 0-1 tensor (B, 1, *S).
    Returns (B,) float64; NaN for a batch element whose mask is empty.
    """
    check_displacement("u", u)
    check_displacement("u_true", u_true)
    if u.shape != u_true.shape:
        raise ValueError(f"u and u_true must have the same shape (B, ndim, *S), got {tuple(u.shape)} and "
                         f"{tuple(u_true.shape)}")
    check_same_device(("u", "u_true"), u, u_true)
    err = (u.double() - u_true.double()).square().sum(dim=1).sqrt()  # (B, *S)
    if mask is None:
        return err.flatten(1).mean(dim=1)
    check_tensor("mask", mask)
    if mask.shape != (u.shape[0], 1, *u.shape[2:]):
        raise ValueError(f"mask must be (B, 1, *S) = {(u.shape[0], 1, *u.shape[2:])}, got {tuple(mask.shape)}")
    check_same_device(("u", "mask"), u, mask)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or hold only 0 and 1")
        mask = mask != 0
    m = mask[:, 0].flatten(1)
    return (err.flatten(1) * m).sum(dim=1) / m.sum(dim=1).double()
