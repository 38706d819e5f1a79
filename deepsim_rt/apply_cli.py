"""`deepsim-rt apply`: warp any image or label map by a saved registration, onto the fixed grid.

    deepsim-rt apply --transform DIR/displacement.nii.gz|DIR/transform_itk.nii.gz|displacement.npy
                     --input image.nii.gz --out warped_image.nii.gz [--labels] [--label-mode generic|nearest]
                     [--padding zeros|border] [--overwrite]

The transform is either form `deepsim-rt register` writes (deepsim_rt.transforms.itk): the voxel displacement
(displacement.nii.gz, or displacement.npy for PNG/NPY registrations) or the ITK / ANTs field
(transform_itk.nii.gz, or any ITK displacement field on the fixed grid in that layout). The output lies on the
transform's (fixed) grid, with its affine.
  NIfTI input: any grid; it is sampled through its own affine at A_in^-1 A_f (p + u(p)), so an image on the moving
      image's grid (another contrast, a mask) or on any other grid lands where the registration maps it.
  NPY / PNG input (no affine): must have the transform's shape (the registration's own grid); .npy transforms
      likewise apply to NIfTI inputs of that shape only as arrays (their affine is ignored, with a note).
Images: linear interpolation, float32 out. --labels: a label map, integer-valued, warped with --label-mode
(generic: ANTs' genericLabel, each label's indicator linearly and the arg-max; nearest), in its own integer type.
Outside the input's field of view: --padding zeros (default, as ANTs / ITK) or border (the edge value, as the
registration networks' warp).
The output is written atomically; an existing file is refused unless --overwrite, and an input (the image or the
transform) is never overwritten.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_subcommands", "apply_transform"]


def apply_transform(transform: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
                    labels: bool = False, label_mode: str | None = None, padding: str = "zeros",
                    overwrite: bool = False) -> dict[str, Any]:
    """Warp `image` by `transform` onto the transform's grid and write `out` (see the module docstring).

    Returns {"output", "form" ("voxel" | "itk"), "shape", "labels", "label_mode", "notes"}; ValueError on bad
    input (nothing written)."""
    import torch

    from deepsim_rt.register_cli import _label_array, _save_npy, _save_png, commit_files, read_image
    from deepsim_rt.transforms.compose import source_coords
    from deepsim_rt.transforms.grid import Grid
    from deepsim_rt.transforms.itk import read_displacement
    from deepsim_rt.transforms.resample import DEFAULT_LABEL_MODE, LABEL_MODES, sample, sample_labels

    label_mode = label_mode or DEFAULT_LABEL_MODE
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    out = Path(out)
    disp = read_displacement(transform)
    img = read_image(image, labels=labels)
    nd = disp.ndim
    data = _label_array(img) if labels else img.data
    if nd == 2 and data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != nd:
        raise ValueError(f"{img.path} is {data.ndim}D (shape {img.disk_shape}) but the transform {disp.path} is "
                         f"{nd}D")
    out_kind = img.kind
    name = out.name.lower()
    want = {"nifti": (".nii", ".nii.gz"), "npy": (".npy",), "png": (".png",)}[img.kind]
    if not name.endswith(want):
        raise ValueError(f"--out {out} must end in {' or '.join(want)} like the input {img.path.name}")
    notes = []
    if img.kind == "nifti" and disp.affine is not None:
        fixed, source = Grid.of(disp.shape, disp.affine, str(disp.path)), Grid.of(data.shape, img.affine,
                                                                                 str(img.path))
    else:
        if tuple(data.shape) != disp.shape:
            raise ValueError(f"{img.path} has shape {tuple(data.shape)} but the transform {disp.path} is on a "
                             f"{disp.shape} grid; without affines on both, the input must be on that grid")
        fixed = source = None
        if img.kind == "nifti":
            notes.append(f"{disp.path} has no affine: {img.path} taken as an array on the transform's grid")
    u = torch.from_numpy(np.ascontiguousarray(np.moveaxis(disp.u, -1, 0)))[None]
    q = source_coords(u, fixed, source)
    if labels:
        lab = torch.from_numpy(np.ascontiguousarray(data).astype(np.int64))[None, None]
        result = sample_labels(lab, q, label_mode, padding)[0, 0].numpy().astype(data.dtype)
    else:
        src = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
        result = sample(src, q, "linear", padding)[0, 0].numpy()

    if out_kind == "nifti":
        from deepsim_rt.data.nifti import save_nifti

        affine = disp.affine if disp.affine is not None else img.affine
        header = (disp.header if disp.header is not None else img.header).copy()
        header.set_intent("none")
        header["descrip"] = b"deepsim_rt apply"

        def write(p: Path) -> None:
            save_nifti(p, result, affine, header)
    elif out_kind == "npy":
        def write(p: Path) -> None:
            _save_npy(p, result if labels else result.astype(np.float32))
    else:
        def write(p: Path) -> None:
            _save_png(p, result, result.dtype if labels else img.png_dtype)

    commit_files(out.parent, {out.name: write}, protected=[Path(transform), img.path], overwrite=overwrite)
    return {"output": str(out), "form": disp.form, "shape": list(result.shape), "labels": labels,
            "label_mode": label_mode if labels else None, "notes": notes}


def _cmd(args: argparse.Namespace) -> int:
    info = apply_transform(args.transform, args.input, args.out, labels=args.labels, label_mode=args.label_mode,
                           padding=args.padding, overwrite=args.overwrite)
    what = f"labels ({info['label_mode']})" if info["labels"] else "image (linear)"
    print(f"applied {args.transform} ({info['form']} form) to {args.input}: {what} on the "
          f"{'x'.join(map(str, info['shape']))} fixed grid")
    for note in info["notes"]:
        print(f"  note: {note}")
    print(f"  wrote {info['output']}")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "apply", help="warp an image or label map by a saved displacement (voxel or ITK form) onto the fixed grid",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transform", required=True,
                   help="displacement.nii.gz / transform_itk.nii.gz / displacement.npy written by `register`")
    p.add_argument("--input", required=True, help="image or label map to warp (.nii/.nii.gz, .npy, .png)")
    p.add_argument("--out", required=True, help="output file (same format as the input)")
    p.add_argument("--labels", action="store_true", help="the input is a label map (warped with --label-mode)")
    p.add_argument("--label-mode", default=None, choices=("generic", "nearest"),
                   help="label warping (default: generic, ANTs' genericLabel)")
    p.add_argument("--padding", default="zeros", choices=("zeros", "border"),
                   help="value outside the input's field of view (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    p.set_defaults(func=_cmd)
