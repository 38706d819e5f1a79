"""The coarse-to-fine pyramid: level sizes, image downsampling, field resampling between levels, bending energy.

Geometry: level k has sizes n_k = n // 2**k per axis. Images are downsampled by area averaging (voxel j of level k
covers full-resolution voxels [j f, (j + 1) f), the align_corners=False convention), so a displacement in voxels
of level k is the full-resolution one times n_k / n, per axis; fields are resampled with align_corners=False
interpolation and their vector components scaled by the size ratio of their axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepsim_rt.losses._inputs import acc_dtype
from deepsim_rt.refine.config import MIN_LEVEL_SIZE

__all__ = ["level_sizes", "downsample_image", "resample_field", "bending_energy"]


def level_sizes(spatial: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    """Sizes from coarsest to finest (the last is `spatial`); ValueError if an axis falls below 4 voxels."""
    sizes = []
    for k in range(levels - 1, -1, -1):
        size = tuple(int(n) >> k for n in spatial)
        small = [(ax, n) for ax, n in enumerate(spatial) if int(n) >> k < MIN_LEVEL_SIZE]
        if small:
            ax, n = small[0]
            raise ValueError(f"refine levels={levels} would shrink spatial axis {ax} (size {n}) to {int(n) >> k} "
                             f"voxels at the coarsest level (need >= {MIN_LEVEL_SIZE}); use levels <= "
                             f"{max(1, max_levels(spatial))}")
        sizes.append(size)
    return sizes


def max_levels(spatial: tuple[int, ...]) -> int:
    """The most pyramid levels that keep every axis at >= 4 voxels (0 if the image itself is smaller)."""
    n = min(int(s) for s in spatial)
    k = 0
    while n >> k >= MIN_LEVEL_SIZE:
        k += 1
    return k


def _interp_mode(nd: int) -> str:
    return "bilinear" if nd == 2 else "trilinear"


def downsample_image(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *size) by area averaging (identity when the size is unchanged)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="area")


def resample_field(u: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A displacement / velocity (B, ndim, *S) in voxels of its grid -> (B, ndim, *size) in voxels of the new grid.

    Finer: linear interpolation (align_corners=False); coarser: area averaging. Component i is multiplied by
    size[i] / S[i] (voxel units change with the grid).
    """
    old = tuple(u.shape[2:])
    size = tuple(int(s) for s in size)
    if old == size:
        return u
    nd = len(size)
    if all(s <= o for s, o in zip(size, old, strict=True)):
        out = F.interpolate(u, size=size, mode="area")
    else:
        out = F.interpolate(u, size=size, mode=_interp_mode(nd), align_corners=False)
    scale = torch.tensor([s / o for s, o in zip(size, old, strict=True)], dtype=u.dtype, device=u.device)
    return out * scale.view(1, nd, *([1] * nd))


def bending_energy(u: torch.Tensor) -> torch.Tensor:
    """Mean bending energy of (B, ndim, *S): sum_i (d_ii u)^2 + 2 sum_{i<j} (d_ij u)^2, second differences on the
    valid interior (forward differences twice), each term averaged over its voxels, summed over terms, averaged
    over channels; / ndim^2 (voxels^2 per voxel^4). A linear field gives 0. 0-dim, fp32 (fp64 for fp64 input).
    """
    x = u.to(acc_dtype(u))
    nd = x.dim() - 2
    total = x.new_zeros(())
    for i in range(nd):
        di = torch.diff(x, dim=2 + i)
        for j in range(i, nd):
            dij = torch.diff(di, dim=2 + j)
            term = dij.square().mean()
            total = total + (term if i == j else 2.0 * term)
    return total / (nd * nd)
