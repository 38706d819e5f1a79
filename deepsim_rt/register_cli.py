"""`deepsim-rt register`: register one image pair from files, with any model artifact and backend.

    deepsim-rt register --moving m.nii.gz --fixed f.nii.gz --out DIR [--labels m_labels.nii.gz]
                        [--model default-3d|default-2d|PATH] [--backend auto|eager|compile|onnxruntime|aoti|tensorrt]
                        [--device auto|cpu|cuda] [--affine rigid|affine] [--label-mode generic|nearest]
                        [--outputs KINDS] [--compress fast|small|none] [--overwrite]
    deepsim-rt register --pairs pairs.csv --out DIR [same options]     (a batch: deepsim_rt.pipeline.batch; columns
                        moving, fixed[, labels][, name]; resumable; rows shared among torchrun ranks)

Inputs, any size (the runtime pads to the network's multiple and crops back; intensities are min-max normalized as
the model expects):
  NIfTI (.nii / .nii.gz): 3D volumes for a 3D model; 2D images (X, Y) or single-slice volumes (X, Y, 1) for a 2D
      model. When moving and fixed differ in shape or affine, moving is resampled onto the fixed grid from the two
      affines (linear; said in the warnings and summary.json "grid"). 3D arrays are brought to the model's
      training axis order (S, A, R for the bundled models) by exact flips and permutation, never resampled, and
      every output comes back in the fixed file's own axis order (oblique files: the closest axes, the rotation
      stays in the affine; deepsim_rt.pipeline.orientation; summary.json "orientation"). --affine runs a rigid /
      affine pre-alignment first (deepsim_rt.transforms.affine). Both images then go to the model's training voxel
      spacing (checkpoint metadata "spacing_mm"; same field of view), the network runs there and its displacement
      comes back to the fixed grid (deepsim_rt.transforms.scale). The original moving image and labels are
      sampled once through the composed map. Labels: integer-valued, same shape and affine as moving; warped
      with --label-mode (generic: ANTs' genericLabel; nearest).
  PNG / NPY: 2D only (PNG greyscale, 8 or 16 bit; colour PNGs are converted to luminance; label PNGs keep their
      palette indices). NPY: a 2D or 3D numeric array.
  Without --model, the bundled model matching the data's dimensionality is used.
Outputs in DIR (created if needed), all or nothing: nothing is written until every input has been read and
checked and the registration has run; then every file is written into a temporary folder inside DIR and the set is
moved into place together (summary.json last). Existing outputs are refused unless --overwrite; an input file is
never overwritten, even with --overwrite. A failed write leaves nothing new behind.
  NIfTI inputs -> warped.nii.gz, displacement.nii.gz, warped_labels.nii.gz (with --labels); all with the FIXED
      image's affine and header. displacement.nii.gz is 4D (X, Y, Z, 3) (2D: (X, Y, 2)), float32, the vector on
      the LAST axis: component i is the displacement along voxel axis i in VOXELS (not mm),
      warped(p) = moving(p + u(p)) (other grids: moving sampled at voxel A_m^-1 A_f (p + u(p)); the affine
      pre-alignment is composed in). transform_itk.nii.gz: the same map as an ITK / ANTs displacement field, 5D
      (X, Y, Z, 1, 3), intent vector, LPS millimetres, fixed -> moving points (deepsim_rt.transforms.itk):
      `antsApplyTransforms -r fixed -i moving -t transform_itk.nii.gz` reproduces warped.nii.gz.
      With --affine the two parts are written as ANTs writes them instead of transform_itk.nii.gz: affine.mat, the
      pre-alignment as an ITK affine (as ANTs' 0GenericAffine.mat; deepsim_rt.transforms.itk_affine), and
      warp.nii.gz, the deformable part as an ITK field on the fixed grid:
      `antsApplyTransforms -r fixed -i moving -t warp.nii.gz -t affine.mat`
      `deepsim-rt apply --transform warp.nii.gz --transform affine.mat --input moving --out ...` (the same). An
      affine-only run (--model none --affine ... --refine 0) writes no dense field: affine.mat and warped.*.
  PNG inputs -> warped.png (the input's bit depth, rounded and clipped), displacement.npy, warped_labels.png.
  NPY inputs -> warped.npy, displacement.npy, warped_labels.npy.
  Every input -> qc.png: fixed / warped overlay, checkerboard and det J per view (deepsim_rt.pipeline.qc_page); a
  batch adds DIR/qc.html, every pair's picture with the outliers (folding, low similarity, failed) first.
  --outputs picks the kinds written (warped, labels, displacement, transform, jacobian, picture); --compress sets
  the gzip level of .nii.gz outputs (fast: level 1, by ISA-L when python-isal is installed).
  displacement.npy is (*S, ndim), vector on the last axis, voxels, as the NIfTI.
  QC (deepsim_rt.pipeline.qc): jacobian.nii.gz (NIfTI inputs, fixed affine) or jacobian.npy: det J of p -> p + u(p) per
  voxel (voxel units; equal to the world-unit determinant); summary.json: inputs, model, backend, device, timings
  (s), qc (folding_percent, sd_log_jacobian, Jacobian range, displacement mean / p99 / max in voxels and mm), the
  model's training profile and warnings (inputs far from the training data: voxel size, orientation, intensity
  range; constant images). Warnings are printed and never stop the registration.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "BACKEND_CHOICES"]

# The work is done in deepsim_rt.pipeline (register: pipeline.register, batch: pipeline.batch); this module is the
# argument parser only, so `deepsim-rt register --help` imports neither torch nor the pipeline.


def _cmd(args: argparse.Namespace) -> int:
    from deepsim_rt.refine.cli import refine_config_from_args

    if args.pairs is not None:
        return _batch_cmd(args, refine_config_from_args(args))
    if args.moving is None or args.fixed is None:
        raise ValueError("give --moving and --fixed (one pair) or --pairs CSV (a batch)")
    from deepsim_rt.pipeline.register import run_register
    from deepsim_rt.pipeline.write import COMPRESS_LEVELS, gzip_level_set

    outputs = None if args.outputs is None else [k.strip() for k in args.outputs.split(",") if k.strip()]
    with gzip_level_set(COMPRESS_LEVELS[args.compress]):
        info = run_register(args.moving, args.fixed, args.out, labels=args.labels, model=args.model,
                            backend=args.backend, device=args.device, overwrite=args.overwrite, affine=args.affine,
                            label_mode=args.label_mode, refine=refine_config_from_args(args), outputs=outputs,
                            fixed_mask=args.fixed_mask, moving_mask=args.moving_mask)
    print(f"registered {args.moving} -> {args.fixed} ({'x'.join(map(str, info['shape']))}) with {info['model']} "
          f"on {info['backend']} ({info['device']}) in {info['seconds'] * 1000:.1f} ms; max |u| = "
          f"{info['max_displacement_voxels']:.2f} voxels")
    for w in info["warnings"]:
        print(f"  warning: {w}")
    for p in info["outputs"]:
        print(f"  wrote {p}")
    return 0


def _batch_cmd(args: argparse.Namespace, refine: Any) -> int:
    from deepsim_rt.pipeline.batch import run_batch

    if args.moving is not None or args.fixed is not None or args.labels is not None:
        raise ValueError("--pairs takes moving, fixed and labels from the CSV; drop --moving / --fixed / --labels")
    from deepsim_rt.pipeline.write import COMPRESS_LEVELS, gzip_level_set

    if args.outputs is not None or args.fixed_mask is not None or args.moving_mask is not None:
        raise ValueError("--outputs, --fixed-mask and --moving-mask apply to one pair (--moving / --fixed)")
    with gzip_level_set(COMPRESS_LEVELS[args.compress]):
        rows = run_batch(args.pairs, args.out, model=args.model, backend=args.backend, device=args.device,
                         overwrite=args.overwrite, pair_options={"affine": args.affine, "label_mode": args.label_mode,
                                                                 "refine": refine})
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    if os.environ.get("RANK", "0") == "0":
        for r in rows:
            if r["status"] == "failed":
                print(f"  failed {r['name']}: {r['error']}")
        print(f"{len(rows)} pairs: {counts['done']} registered, {counts['skipped']} already done (skipped), "
              f"{counts['failed']} failed; table: {Path(args.out) / 'summary.csv'}")
    return 1 if counts["failed"] else 0


# = deepsim_rt.runtime.BACKENDS (pinned by tests/test_cli_help.py): importing the runtime for the choices cost
# `deepsim-rt register --help` 16.8 s of torch import on the loaded 2-core box.
BACKEND_CHOICES = ("auto", "eager", "compile", "onnxruntime", "aoti", "tensorrt")


# transforms.affine.AFFINE_CHOICES, written out so that --help imports no torch (tests/test_register_cli.py checks)
AFFINE_CHOICES = ("rigid", "affine", "rigid-nmi", "affine-nmi")


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "register", help="register a moving image onto a fixed image (NIfTI, PNG or NPY)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moving", default=None, help="moving image (.nii/.nii.gz, .png, .npy)")
    p.add_argument("--fixed", default=None, help="fixed image (NIfTI: any grid; PNG / NPY: the moving's shape)")
    p.add_argument("--pairs", default=None, metavar="CSV",
                   help="batch: a CSV with columns moving, fixed[, labels][, name]; each pair goes to OUT/<name>/, "
                        "finished pairs are skipped, rows are shared among torchrun ranks; OUT/summary.csv and "
                        "summary.json tabulate them (deepsim_rt.pipeline.batch)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default=None, help="label map of the moving image (warped with --label-mode)")
    p.add_argument("--fixed-mask", default=None, metavar="NIFTI",
                   help="brain mask of the fixed image (non-zero = inside; NIfTI, any grid): the pre-alignment and "
                        "the network see the fixed image times its mask (a head registers as its brain), and the QC "
                        "statistics and the --refine similarity count the mask only (with --moving-mask: their "
                        "union); summary.json \"masks\" says what was used (default: none)")
    p.add_argument("--moving-mask", default=None, metavar="NIFTI",
                   help="brain mask of the moving image (NIfTI, any grid): the pre-alignment and the network see "
                        "the moving image times its mask; the outputs warp the original image; put on the fixed "
                        "grid through the affines and the pre-alignment for the QC and --refine (default: none)")
    p.add_argument("--label-mode", default=None, choices=("generic", "nearest"),
                   help="label warping: generic (ANTs genericLabel: each label's indicator linearly, arg-max) or "
                        "nearest (default: generic)")
    p.add_argument("--affine", default=None, choices=AFFINE_CHOICES,
                   help="NIfTI only: rigid or affine pre-alignment (moments + Adam on global NCC at 8 and 4 mm) "
                        "before the network, composed into the saved transforms; rigid-nmi / affine-nmi optimise "
                        "normalized mutual information instead, for images of different contrast (T1 -> T2: NCC's "
                        "affine can end worse than none) (default: none)")
    p.add_argument("--model", default=None,
                   help="default-2d, default-3d, a .safetensors/.onnx/.pt2/.plan path, or none (with --refine: "
                        "pure optimisation from zero) (default: the bundled model matching the data's "
                        "dimensionality)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="runtime backend (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs in --out (never an input file; default: refuse)")
    p.add_argument("--outputs", default=None, metavar="KINDS",
                   help="one pair: write only these, comma-separated: warped, labels, displacement, transform "
                        "(transform_itk.nii.gz / affine.mat + warp.nii.gz), jacobian, picture (qc.png); summary.json "
                        "always (default: all)")
    p.add_argument("--compress", default="fast", choices=("fast", "small", "none"),
                   help="gzip level of the .nii.gz outputs: fast = 1 (ISA-L when python-isal is installed), small = "
                        "6, none = 0 (stored; still .nii.gz) (default: %(default)s)")
    from deepsim_rt.refine.cli import add_refine_arguments

    add_refine_arguments(p)
    p.set_defaults(func=_cmd)
