"""Diffusion regularizer of a displacement field (the paper's smoothness term)."""

from __future__ import annotations

import torch

from deepsim_rt._checks import check_displacement
from deepsim_rt.losses._inputs import acc_dtype

__all__ = ["diffusion_regularizer"]


def diffusion_regularizer(u: torch.Tensor) -> torch.Tensor:
    """Mean squared forward-difference gradient of u, as the DeepSim code.

    u: (B, ndim, *S) displacement in voxel units (ndim 2 or 3). For each spatial axis the field is padded by
    REPLICATING its last slice at the end of that axis, so the forward difference has the size of u and is 0 on
    the last slice; the squared differences are summed over axes, divided by ndim, and averaged over everything
    (batch, channels, voxels):
        reg = mean_{b,c,p} [ sum_i (u(p + e_i) - u(p))^2 ] / ndim         (voxels^2 per voxel^2)
    A constant field gives 0; a linear field u_c = sum_j A_cj x_j gives sum_{c,j} A_cj^2 (n_j - 1)/n_j / (ndim * ndim).
    Convention where peers differ: the mean is over the n voxels of each axis (the last forward difference is 0),
    whereas VoxelMorph / neurite Grad('l2') average over the n - 1 differences, so for a linear field ours is
    (n - 1)/n of theirs; MONAI's DiffusionLoss uses central differences instead (pinned in
    tests/test_conventions.py). Weights lambda tuned on one convention transfer to the other up to that factor.
    Returns a 0-dim tensor (fp32, or fp64 for fp64 input).
    """
    nsp = check_displacement("u", u)
    x = u.to(acc_dtype(u))
    total = None
    for ax in range(2, 2 + nsp):
        # diff with the last slice appended == replicate-pad at the end + forward difference (0 on the last slice).
        d = torch.diff(x, dim=ax, append=x.narrow(ax, x.shape[ax] - 1, 1))
        total = d * d if total is None else total + d * d
    return total.mean() / nsp
