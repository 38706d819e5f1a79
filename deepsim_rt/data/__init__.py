"""Data: the bundled MNI152 atlas, synthetic subjects with known deformations, and NIfTI folders.

  load_atlas(ndim=3, voxel_size=2, slice_index=None) -> Atlas       bundled template + CSF/GM/WM left/right labels
  SyntheticConfig.preset("tiny-2d" | "default-2d" | "default-3d" | "tiny-3d")
  SyntheticSubjects(config, split)  -> Subject(image, labels, velocity, displacement)
  SyntheticPairs(config, split, pairs="all" | "random" | [(m, f), ...]) -> dict(moving, fixed, moving_labels,
                                                                               fixed_labels, true_displacement)
  evaluation_pairs(config), label_names(config), num_classes(config)
  load_nifti(path, allow_2d=False), save_nifti(path, array, affine, header=None), NiftiFolderDataset(root, ...)
nibabel is imported only when a NIfTI function runs.
"""

from deepsim_rt.data.atlas import LABEL_NAMES, MIRROR_LABELS, Atlas, atlas_shape, default_slice_index, load_atlas
from deepsim_rt.data.nifti import NiftiFolderDataset, load_nifti, normalize_intensity, save_nifti
from deepsim_rt.data.synthetic import (
    PRESETS,
    SPLITS,
    Subject,
    SyntheticConfig,
    SyntheticPairs,
    SyntheticSubjects,
    evaluation_pairs,
    label_names,
    num_classes,
    subject_seed,
    true_displacement,
)

__all__ = [
    "Atlas",
    "load_atlas",
    "atlas_shape",
    "default_slice_index",
    "LABEL_NAMES",
    "MIRROR_LABELS",
    "SyntheticConfig",
    "Subject",
    "SyntheticSubjects",
    "SyntheticPairs",
    "PRESETS",
    "SPLITS",
    "evaluation_pairs",
    "label_names",
    "num_classes",
    "subject_seed",
    "true_displacement",
    "load_nifti",
    "save_nifti",
    "normalize_intensity",
    "NiftiFolderDataset",
]
