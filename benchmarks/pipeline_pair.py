"""The 1 mm NIfTI pair the README times end to end: a deformed copy of the 1 mm template onto the template.

    python -m benchmarks.pipeline_pair DIR      # writes DIR/{moving,moving_labels,fixed,fixed_labels}.nii.gz

Fixed: the bundled MNI152 2009a template at 1 mm (160 x 192 x 160, SAR arrays, deepsim_rt.data.atlas), T1 x 255 and
its GM/WM labels. Moving: test subject 0 of the default-3d synthetic deformations rebuilt at 1 mm with the 1 mm
scale of the 2 mm preset (max 16 mm, control spacing 24, bias spacing 48 voxels; deepsim_rt.data.synthetic).
Deterministic; an existing complete set is reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NAMES = ("moving.nii.gz", "moving_labels.nii.gz", "fixed.nii.gz", "fixed_labels.nii.gz")


def build(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    paths = {n.split(".")[0]: out / n for n in NAMES}
    if all(p.is_file() for p in paths.values()):
        return paths
    import nibabel as nib

    from deepsim_rt.data.synthetic import SyntheticConfig, SyntheticSubjects

    cfg = SyntheticConfig.preset("default-3d", voxel_size=1, max_displacement=16.0, control_spacing=24,
                                 bias_spacing=48)
    subjects = SyntheticSubjects(cfg, "test", cache=False)
    s = subjects[0]
    atlas = subjects.atlas
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"moving": s.image[0].numpy() * 255, "moving_labels": s.labels[0].numpy().astype(np.uint8),
              "fixed": atlas.image[0, 0].numpy() * 255, "fixed_labels": atlas.labels[0, 0].numpy().astype(np.uint8)}
    for key, arr in arrays.items():
        img = nib.Nifti1Image(np.ascontiguousarray(arr), atlas.affine)
        img.set_sform(atlas.affine, code=1)
        img.set_qform(atlas.affine, code=1)
        nib.save(img, str(paths[key]))
    return paths


if __name__ == "__main__":
    for p in build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/deepsim_rt_pipeline_pair").values():
        print(p)
