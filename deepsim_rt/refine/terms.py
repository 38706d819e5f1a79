"""The loop's loss terms, without per-call data checks, with the fixed image's share computed once per level.

Why not deepsim_rt.losses directly: every public loss scans its inputs for NaN (`bool(isnan(x).any())`), a host
sync per call -- on CUDA that is a sync per step, and inside a CUDA graph capture it is an error. Here the inputs are
checked once, at `refine`'s entry, and non-finite values are caught on the loss (NonFiniteLossError). The formulas
are those of deepsim_rt.losses (ncc_map, mse, diffusion_regularizer); tests/test_refine.py pins them equal.
NCC also keeps the fixed image's window sums (S(J), S(J^2)) per level: 3 box-filtered channels per step instead of 5.
"""

from __future__ import annotations

import math

import torch

from deepsim_rt.losses.intensity import DEFAULT_NCC_EPS, _box_sum, _window
from deepsim_rt.losses.multimodal import mind_ssc

__all__ = ["FixedNCC", "FixedMIND", "mse_term", "diffusion_term", "masked_mean"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (B, C, *S) over every element, with the elements outside mask (B, 1, *S) in [0, 1] counted as 0
    (a brain mask: the similarity there does not count). Divided by all the voxels, not the mask's: each voxel's
    gradient keeps the size it has without a mask, so the balance with the regulariser (a mean over the whole
    field) stays the measured one. Dividing by the mask's voxels made a head's brain mask (15 % of a 256^3 grid)
    a 6.8x weaker lam: 0.83 % folding and Dice 0.576 vs 0.654 unmasked (Colin27 -> fsaverage)."""
    if mask is None:
        return x.mean()
    return (x * mask.to(x.dtype)).mean()


class FixedNCC:
    """loss(warped) = 1 - mean local squared NCC(warped, fixed) (= deepsim_rt.losses.ncc), fixed's sums cached.

    fixed: (B, C, *S) float; window: odd int per axis (9 as the losses). The fixed image needs no gradient.
    mask: (B, 1, *S) weights in [0, 1] or None: the mean runs over the mask's voxels only (`masked_mean`).
    """

    def __init__(self, fixed: torch.Tensor, window: int, eps: float = DEFAULT_NCC_EPS,
                 mask: torch.Tensor | None = None) -> None:
        self.mask = mask
        nsp = fixed.dim() - 2
        self.win = _window(window, nsp)
        self.n = float(math.prod(self.win))
        self.eps = eps
        self.c = fixed.shape[1]
        j = fixed.detach()
        self.j = j
        s_j, s_jj = _box_sum(torch.cat([j, j * j], dim=1), self.win).split(self.c, dim=1)
        self.s_j = s_j
        self.var_j = s_jj - s_j * s_j / self.n

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        i = warped
        s_i, s_ii, s_ij = _box_sum(torch.cat([i, i * i, i * self.j], dim=1), self.win).split(self.c, dim=1)
        cross = s_ij - s_i * self.s_j / self.n
        var_i = s_ii - s_i * s_i / self.n
        return 1.0 - masked_mean(cross * cross / (var_i * self.var_j).clamp_min(self.eps), self.mask)


class FixedMIND:
    """loss(warped) = mean squared difference of MIND-SSC descriptors (= deepsim_rt.losses.mind), the fixed image's
    descriptor computed once. fixed: (B, C, *S); every channel is described separately. mask: (B, 1, *S) or None,
    as `masked_mean` (voxels outside count 0)."""

    def __init__(self, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.shape = tuple(fixed.shape)
        with torch.no_grad():
            self.fixed_desc = mind_ssc(fixed.flatten(0, 1).unsqueeze(1))
        self.mask = None if mask is None else mask.repeat_interleave(fixed.shape[1], dim=0)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        if tuple(warped.shape) != self.shape:
            raise ValueError(f"warped must have the fixed image's shape {self.shape}, got {tuple(warped.shape)}")
        diff = (mind_ssc(warped.flatten(0, 1).unsqueeze(1)) - self.fixed_desc).square()
        return masked_mean(diff.mean(dim=1, keepdim=True), self.mask)


def mse_term(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference (= deepsim_rt.losses.mse), over the mask's voxels when given."""
    return masked_mean((warped - fixed).square(), mask)


def diffusion_term(u: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference, last slice replicated, / ndim (= deepsim_rt.losses.diffusion_regularizer)."""
    nsp = u.dim() - 2
    total = None
    for ax in range(2, 2 + nsp):
        d = torch.diff(u, dim=ax, append=u.narrow(ax, u.shape[ax] - 1, 1))
        total = d * d if total is None else total + d * d
    return total.mean() / nsp
