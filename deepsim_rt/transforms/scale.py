"""Running a network at its training voxel spacing: input grid -> model grid -> displacement back.

The model grid covers the input grid's field of view (same orientation, same centre, see
`grid.grid_with_spacing`) at the model's spacing. Images go there linearly, after a Gaussian anti-aliasing blur
where the model grid is coarser; the network's displacement (model voxels) comes back by linear interpolation of
each component at the input voxels' model-grid positions, rescaled per axis by s_model / s_input (orientation is
shared, so a displacement of k model voxels along axis i is k s_model,i / s_input,i input voxels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepsim_rt.transforms.grid import Grid, grid_with_spacing
from deepsim_rt.transforms.resample import grid_coords, sample, smooth_for_downsampling

__all__ = ["SpacingPlan", "SPACING_RTOL", "check_spacing", "MAX_SPACING_FACTOR", "MAX_NETWORK_VOXELS"]

SPACING_RTOL = 0.05  # input spacing within 5 % of the model's: run the network on the input grid as is
# How far the input's spacing may be from the model's, per axis: 16x (a 0.125 mm input for a 2 mm model; beyond it
# the spacing is a typo or in the wrong unit: spacing=0.01 mm squeezed a volume into a few network voxels and
# returned a 19.8-voxel field, spacing=50 asked for 25.9 GB), and the model grid at most 2**27 voxels (512^3: 512 MiB
# per float32 copy; the network holds dozens).
MAX_SPACING_FACTOR = 16.0
MAX_NETWORK_VOXELS = 2**27


def check_spacing(name: str, value, nd: int) -> tuple[float, ...]:
    """One voxel size for every axis, or one per axis (mm) -> a tuple of nd positive floats; ValueError else."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, nd)
    if arr.shape != (nd,) or not np.all(np.isfinite(arr)) or not np.all(arr > 0):
        raise ValueError(f"{name} must be {nd} positive finite voxel sizes in mm (or one for every axis), got "
                         f"{np.asarray(value).tolist()}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class SpacingPlan:
    """How an input grid of `input_shape` at `input_spacing` (mm per axis, tensor order) maps to a model trained
    at `model_spacing`. `resample` is False when every axis agrees to SPACING_RTOL (nothing is resampled)."""

    input_shape: tuple[int, ...]
    input_spacing: tuple[float, ...]
    model_spacing: tuple[float, ...]
    model_shape: tuple[int, ...]
    resample: bool

    @classmethod
    def make(cls, input_shape, input_spacing, model_spacing) -> SpacingPlan:
        nd = len(input_shape)
        s_in = check_spacing("spacing", input_spacing, nd)
        s_model = check_spacing("model spacing", model_spacing, nd)
        same = all(abs(a - b) <= SPACING_RTOL * b for a, b in zip(s_in, s_model, strict=True))
        shape = tuple(int(n) for n in input_shape)
        model_shape = shape if same else grid_with_spacing(cls._grid(shape, s_in), s_model).shape
        if not same:
            fov = [round(n * s, 3) for n, s in zip(shape, s_in, strict=True)]
            factor = max(max(a / b, b / a) for a, b in zip(s_in, s_model, strict=True))
            if factor > MAX_SPACING_FACTOR:
                raise ValueError(f"spacing {list(s_in)} mm is {factor:.3g}x from the model's {list(s_model)} mm (the "
                                 f"{list(shape)} input would be a {list(model_shape)} network grid): expected within "
                                 f"{MAX_SPACING_FACTOR:g}x; is the spacing in mm?")
            if int(np.prod(model_shape, dtype=np.int64)) > MAX_NETWORK_VOXELS:
                raise ValueError(f"spacing {list(s_in)} mm makes the {list(shape)} input a {list(model_shape)} grid "
                                 f"at the model's {list(s_model)} mm (field of view {fov} mm): expected at most "
                                 f"{MAX_NETWORK_VOXELS} voxels (512^3); is the spacing in mm?")
        return cls(shape, s_in, s_model, model_shape, not same)

    @staticmethod
    def _grid(shape, spacing) -> Grid:
        return Grid(tuple(shape), np.diag([*spacing, 1.0]))

    @property
    def input_grid(self) -> Grid:
        return self._grid(self.input_shape, self.input_spacing)

    @property
    def model_grid(self) -> Grid:
        return grid_with_spacing(self.input_grid, self.model_spacing)

    @property
    def _factors(self) -> np.ndarray:
        return np.asarray(self.model_spacing) / np.asarray(self.input_spacing)

    def image_to_model(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *input_shape) float -> (B, C, *model_shape): anti-aliased, linear, border padding."""
        if not self.resample:
            return x
        x = smooth_for_downsampling(x, self._factors)
        return sample(x, grid_coords(self.input_grid, self.model_grid, device=x.device), "linear", "border")

    def displacement_to_model(self, u: torch.Tensor) -> torch.Tensor:
        """(B, nd, *input_shape) input voxels -> (B, nd, *model_shape) model voxels (the inverse of
        displacement_to_input up to interpolation; used to test the round trip)."""
        if not self.resample:
            return u
        f = torch.as_tensor(self._factors, dtype=u.dtype, device=u.device).view(1, -1, *([1] * (u.dim() - 2)))
        return self.image_to_model(u) / f

    def displacement_to_input(self, u_model: torch.Tensor) -> torch.Tensor:
        """(B, nd, *model_shape) model voxels -> (B, nd, *input_shape) input voxels (module docstring)."""
        if not self.resample:
            return u_model
        coords = grid_coords(self.model_grid, self.input_grid, device=u_model.device)
        f = torch.as_tensor(self._factors, dtype=u_model.dtype, device=u_model.device)
        return sample(u_model, coords, "linear", "border") * f.view(1, -1, *([1] * (u_model.dim() - 2)))

    def as_dict(self) -> dict:
        """JSON-ready facts for the outputs' summary."""
        return {"input_spacing_mm": [round(s, 6) for s in self.input_spacing],
                "model_spacing_mm": [round(s, 6) for s in self.model_spacing],
                "input_shape": list(self.input_shape), "network_shape": list(self.model_shape),
                "resampled": self.resample}
