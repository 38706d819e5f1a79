"""Input checks shared by the losses (ValueError naming expected vs got; built on deepsim_rt._checks)."""

from __future__ import annotations

import torch

from deepsim_rt._checks import (
    check_finite,
    check_float,
    check_not_empty,
    check_same_device,
    check_spatial_ndim,
    check_tensor,
)


def check_image(name: str, x: object) -> int:
    """x must be a float (B, C, *spatial) image with 2 or 3 spatial dims and no NaN; returns the spatial ndim."""
    check_tensor(name, x)
    nsp = check_spatial_ndim(name, x)
    check_float(name, x)
    check_not_empty(name, x)
    check_finite(name, x)
    return nsp


def check_image_pair(names: tuple[str, str], a: object, b: object) -> int:
    """Two float images of identical shape (B, C, *spatial) on one device; returns the spatial ndim."""
    nsp = check_image(names[0], a)
    check_image(names[1], b)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (B, C, *spatial), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    check_same_device(names, a, b)
    return nsp


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64, everything else is computed in fp32 (fp16 sums of 729 voxels overflow
    precision long before they overflow range)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
