"""`deepsim-rt apply`: warp any image or label map by a saved registration, onto the fixed grid.

    deepsim-rt apply --transform DIR/displacement.nii.gz|DIR/transform_itk.nii.gz|displacement.npy
                     --input image.nii.gz --out warped_image.nii.gz [--labels] [--label-mode generic|nearest]
                     [--padding auto|zeros|border] [--overwrite]
    deepsim-rt apply --transform DIR/warp.nii.gz --transform DIR/affine.mat --input ... --out ...
    deepsim-rt apply --transform DIR/affine.mat --reference fixed.nii.gz --input ... --out ...

The transform is any form `deepsim-rt register` writes (deepsim_rt.transforms.itk, .itk_affine): the voxel
displacement (displacement.nii.gz, or displacement.npy for PNG/NPY registrations), the ITK / ANTs field
(transform_itk.nii.gz, or any ITK displacement field on the fixed grid in that layout), or, after --affine, the
ITK affine affine.mat (as ANTs' 0GenericAffine.mat; .txt also read) with its deformable part warp.nii.gz, given in
ANTs' order (field first, then the affine: a fixed point x goes to A(x + d(x))). The output lies on the field's
(fixed) grid, with its affine; an affine alone needs --reference, the fixed image, for that grid (ANTs' -r).
  NIfTI input: any grid; it is sampled through its own affine at A_in^-1 A_f (p + u(p)), so an image on the moving
      image's grid (another contrast, a mask) or on any other grid lands where the registration maps it.
  NPY / PNG input (no affine): must have the transform's shape (the registration's own grid); .npy transforms
      likewise apply to NIfTI inputs of that shape only as arrays (their affine is ignored, with a note).
Images: linear interpolation, float32 out. --labels: a label map, integer-valued, warped with --label-mode
(generic: ANTs' genericLabel, each label's indicator linearly and the arg-max; nearest), in its own integer type.
Outside the input's field of view: --padding auto (default) is what `register` did to the moving image: border
(the edge value, the networks' warp) when the input lies on the fixed grid and no affine is given, else zeros (as
ANTs / ITK always do); zeros or border force one. So `apply` on the moving image reproduces warped.nii.gz.
The output is written atomically; an existing file is refused unless --overwrite, and an input (the image or the
transform) is never overwritten.
"""

from __future__ import annotations

import argparse

__all__ = ["add_subcommands"]

# The work is done in deepsim_rt.pipeline.apply; this module is the argument parser only (fast --help).


def _cmd(args: argparse.Namespace) -> int:
    from deepsim_rt.pipeline.apply import apply_transform

    info = apply_transform(args.transform, args.input, args.out, labels=args.labels, label_mode=args.label_mode,
                           padding=args.padding, overwrite=args.overwrite, reference=args.reference)
    what = f"labels ({info['label_mode']})" if info["labels"] else "image (linear)"
    print(f"applied {' + '.join(args.transform)} ({info['form']} form) to {args.input}: {what} on the "
          f"{'x'.join(map(str, info['shape']))} fixed grid, padding {info['padding']}")
    for note in info["notes"]:
        print(f"  note: {note}")
    print(f"  wrote {info['output']}")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "apply", help="warp an image or label map by a saved displacement (voxel or ITK form) onto the fixed grid",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transform", required=True, action="append",
                   help="displacement.nii.gz / transform_itk.nii.gz / displacement.npy / warp.nii.gz / affine.mat "
                        "written by `register`; give it twice for warp.nii.gz then affine.mat (ANTs order)")
    p.add_argument("--reference", default=None,
                   help="the fixed image (NIfTI): the output grid when --transform is an affine alone")
    p.add_argument("--input", required=True, help="image or label map to warp (.nii/.nii.gz, .npy, .png)")
    p.add_argument("--out", required=True, help="output file (same format as the input)")
    p.add_argument("--labels", action="store_true", help="the input is a label map (warped with --label-mode)")
    p.add_argument("--label-mode", default=None, choices=("generic", "nearest"),
                   help="label warping (default: generic, ANTs' genericLabel)")
    p.add_argument("--padding", default="auto", choices=("auto", "zeros", "border"),
                   help="value outside the input's field of view: auto = what register did (border on the fixed "
                        "grid without an affine, else zeros) (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    p.set_defaults(func=_cmd)
