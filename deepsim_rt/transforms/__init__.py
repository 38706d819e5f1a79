"""World-space transforms: grids from NIfTI affines, resampling (images, label maps), ITK/ANTs displacement
fields, composition of the registration's parts, affine pre-alignment and the model-spacing round trip.

Layers: built on deepsim_rt.data (NIfTI) and deepsim_rt.kernels (warp); used by the runtime and the CLIs.
"""

from deepsim_rt.transforms.grid import Grid, grid_with_spacing, same_grid, spacing_of
from deepsim_rt.transforms.itk import read_displacement, save_itk_displacement, save_voxel_displacement
from deepsim_rt.transforms.resample import (
    DEFAULT_LABEL_MODE,
    LABEL_MODES,
    resample_labels_to_grid,
    resample_to_grid,
    sample,
    sample_labels,
    warp_labels,
)

__all__ = ["Grid", "grid_with_spacing", "same_grid", "spacing_of", "read_displacement", "save_itk_displacement",
           "save_voxel_displacement", "DEFAULT_LABEL_MODE", "LABEL_MODES", "resample_labels_to_grid",
           "resample_to_grid", "sample", "sample_labels", "warp_labels"]
