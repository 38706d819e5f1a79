"""Composing the registration's parts into one fixed-voxel displacement, and sampling any image through it.

Pieces (all on the fixed grid, fixed voxel indices p):
  W       (nd + 1)-square world map, fixed-world mm -> moving-world mm (the affine pre-alignment; identity without)
  u_net   the network's displacement (nd, *S) in fixed voxels, computed on the moving image resampled onto the
          fixed grid through W: that image is moving(A_m^-1 W A_f p)
  u       the composed displacement (voxel form, see transforms.itk): A_f (p + u(p)) = W A_f (p + u_net(p)),
          so the moving voxel of fixed voxel p is A_m^-1 A_f (p + u(p)) and one sampling reproduces the result.
"""

from __future__ import annotations

import numpy as np
import torch

from deepsim_rt.transforms.grid import Grid
from deepsim_rt.transforms.resample import identity_coords

__all__ = ["compose_world", "source_coords"]


def _affine_apply(m: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """(nd + 1)-square m applied to points x (B, nd, *S) (fp64 math, result in x's dtype)."""
    nd = m.shape[0] - 1
    lin = torch.as_tensor(m[:nd, :nd], dtype=torch.float64, device=x.device)
    off = torch.as_tensor(m[:nd, nd], dtype=torch.float64, device=x.device)
    y = torch.einsum("ij,bj...->bi...", lin, x.to(torch.float64)) + off.view(1, nd, *([1] * nd))
    return y.to(x.dtype)


def compose_world(u_net: torch.Tensor, fixed: Grid, world: np.ndarray | None) -> torch.Tensor:
    """u (B, nd, *S) fixed voxels with A_f (p + u) = W A_f (p + u_net) (module docstring); u_net when W is None."""
    if world is None:
        return u_net
    m = np.linalg.inv(fixed.affine) @ np.asarray(world, dtype=np.float64) @ fixed.affine
    p = identity_coords(u_net.shape[2:], device=u_net.device, dtype=torch.float64)[None]
    return (_affine_apply(m, p + u_net.to(torch.float64)) - p).to(u_net.dtype)


def source_coords(u: torch.Tensor, fixed: Grid | None, source: Grid | None) -> torch.Tensor:
    """Voxel indices (B, nd, *S) in a source image (grid `source`) of fixed voxels p moved by u (B, nd, *S):
    A_s^-1 A_f (p + u). Without grids (arrays), or on the same grid, just p + u."""
    p = identity_coords(u.shape[2:], device=u.device, dtype=torch.float64)[None]
    q = p + u.to(torch.float64)
    if fixed is None or source is None:
        return q.to(torch.float32)
    return _affine_apply(np.linalg.inv(source.affine) @ fixed.affine, q).to(torch.float32)
