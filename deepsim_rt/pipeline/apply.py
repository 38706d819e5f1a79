"""Apply a saved registration to any image or label map, onto the fixed grid (`deepsim-rt apply`).

    info = apply_transform("out/transform_itk.nii.gz", "t2.nii.gz", "t2_on_fixed.nii.gz")
    info = apply_transform(["out/warp.nii.gz", "out/affine.mat"], "aseg.nii.gz", "aseg_fix.nii.gz", labels=True)
    info = apply_transform("out/affine.mat", "t2.nii.gz", "t2_fix.nii.gz", reference="fixed.nii.gz")

The forms, grids and padding it accepts: `deepsim-rt apply --help` (deepsim_rt.apply_cli).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt.pipeline.image import read_image
from deepsim_rt.pipeline.outputs import commit_files
from deepsim_rt.pipeline.write import save_npy, save_png

__all__ = ["apply_transform", "PADDINGS", "split_chain"]

PADDINGS = ("auto", "zeros", "border")
_AFFINE_SUFFIXES = (".mat", ".txt", ".tfm")


def split_chain(transforms: list[Path]) -> tuple[Path | None, Path | None]:
    """(field, affine) of a transform list in ANTs order: [field], [affine] or [field, affine] (a fixed point x
    goes to A(x + d(x))). ValueError for anything else."""
    kinds = ["affine" if p.name.lower().endswith(_AFFINE_SUFFIXES) else "field" for p in transforms]
    if kinds in (["field"], ["affine"], ["field", "affine"]):
        field = transforms[0] if kinds[0] == "field" else None
        affine = transforms[-1] if kinds[-1] == "affine" else None
        return field, affine
    names = " ".join(p.name for p in transforms)
    raise ValueError(f"--transform takes a displacement field, an ITK affine (.mat / .txt), or both in ANTs order "
                     f"(-t warp.nii.gz -t affine.mat), got {len(transforms)}: {names or 'none'}")


def apply_transform(transform: str | os.PathLike | list, image: str | os.PathLike, out: str | os.PathLike,
                    labels: bool = False, label_mode: str | None = None, padding: str = "auto",
                    overwrite: bool = False, reference: str | os.PathLike | None = None) -> dict[str, Any]:
    """Warp `image` by `transform` (one path, or a list in ANTs order: see `split_chain`) onto the fixed grid and
    write `out` (see `deepsim-rt apply --help`). The fixed grid is the field's; an affine alone needs `reference`
    (a NIfTI on the fixed grid). padding "auto": "border" when the input lies on the fixed grid and no affine is
    given (what `register` does on a same-grid pair: the networks' warp), else "zeros" (what `register` does
    for a moving image on another grid, and ANTs / ITK always).

    Returns {"output", "form" ("voxel" | "itk" | "affine" | "itk+affine"), "shape", "labels", "label_mode",
    "padding", "notes"}; ValueError on bad input (nothing written)."""
    import torch

    from deepsim_rt.transforms.compose import source_coords
    from deepsim_rt.transforms.grid import Grid
    from deepsim_rt.transforms.itk import read_displacement
    from deepsim_rt.transforms.itk_affine import read_itk_affine
    from deepsim_rt.transforms.resample import DEFAULT_LABEL_MODE, LABEL_MODES, sample, sample_labels

    label_mode = label_mode or DEFAULT_LABEL_MODE
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if str(out).strip() == "":
        raise ValueError("--out must name a file, got an empty string")
    out = Path(out)
    chain = [Path(t) for t in (transform if isinstance(transform, (list, tuple)) else [transform])]
    field_path, affine_path = split_chain(chain)
    img = read_image(image, kind="labels" if labels else "image")
    name = out.name.lower()
    want = {"nifti": (".nii", ".nii.gz"), "npy": (".npy",), "png": (".png",)}[img.format]
    if not name.endswith(want):
        raise ValueError(f"--out {out} must end in {' or '.join(want)} like the input {img.path.name}")
    world = read_itk_affine(affine_path) if affine_path is not None else None
    notes = []
    if field_path is not None:
        disp = read_displacement(field_path)
        nd, grid_shape, grid_affine, header = disp.ndim, disp.shape, disp.affine, disp.header
        u_np, form = disp.u, disp.form + ("+affine" if world is not None else "")
    else:
        if reference is None:
            raise ValueError("an affine alone has no grid: give --reference FIXED.nii.gz (the fixed image) as ANTs' "
                             "-r")
        ref = read_image(reference)
        if ref.format != "nifti":
            raise ValueError(f"--reference must be a NIfTI image (the fixed grid), got {ref.path}")
        nd = world.shape[0] - 1
        grid_shape = tuple(ref.data.shape[:nd])
        grid_affine, header, u_np, form = ref.affine, ref.header, None, "affine"
    data = img.label_array() if labels else img.data
    if nd == 2 and data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != nd:
        raise ValueError(f"{img.path} is {data.ndim}D (shape {img.disk_shape}) but the transform is {nd}D")
    if world is not None and (img.format != "nifti" or grid_affine is None):
        raise ValueError(f"an ITK affine works in world coordinates: the input and the field need NIfTI affines, got "
                         f"{img.path.name}{'' if field_path is None else ' and ' + field_path.name}")
    if u_np is None:
        u_np = np.zeros((*grid_shape, nd), dtype=np.float32)
    on_grid = tuple(data.shape) == tuple(grid_shape) and (
        img.affine is None or grid_affine is None
        or float(np.abs(img.affine - grid_affine).max()) <= 1e-3)
    if img.format == "nifti" and grid_affine is not None:
        fixed = Grid.of(grid_shape, grid_affine, "fixed grid")
        src_affine = Grid.of(data.shape, img.affine, str(img.path)).affine
        if world is not None:  # sample at A_in^-1 W A_f (p + u(p)): the source grid seen through W
            w = np.asarray(world, dtype=np.float64)
            if w.shape[0] != nd + 1:
                raise ValueError(f"the affine {affine_path} is {w.shape[0] - 1}D but the image is {nd}D")
            src_affine = np.linalg.inv(w) @ src_affine
        source = Grid(tuple(data.shape), src_affine)
    else:
        if not on_grid:
            raise ValueError(f"{img.path} has shape {tuple(data.shape)} but the transform {field_path} is on a "
                             f"{tuple(grid_shape)} grid; without affines on both, the input must be on that grid")
        fixed = source = None
        if img.format == "nifti":
            notes.append(f"{field_path} has no affine: {img.path} taken as an array on the transform's grid")
    if padding == "auto":
        padding = "border" if on_grid and world is None else "zeros"
    u = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u_np, -1, 0)))[None]
    q = source_coords(u, fixed, source)
    if labels:
        lab = torch.from_numpy(np.ascontiguousarray(data).astype(np.int64))[None, None]
        result = sample_labels(lab, q, label_mode, padding)[0, 0].numpy().astype(data.dtype)
    else:
        src = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
        result = sample(src, q, "linear", padding)[0, 0].numpy()

    if img.format == "nifti":
        from deepsim_rt.data.nifti import save_nifti

        affine = grid_affine if grid_affine is not None else img.affine
        hdr = (header if header is not None else img.header).copy()
        hdr.set_intent("none")
        hdr["descrip"] = b"deepsim_rt apply"

        def write(p: Path) -> None:
            save_nifti(p, result, affine, hdr)
    elif img.format == "npy":
        def write(p: Path) -> None:
            save_npy(p, result if labels else result.astype(np.float32))
    else:
        def write(p: Path) -> None:
            save_png(p, result, result.dtype if labels else img.png_dtype)

    protected = [*chain, img.path, *([Path(reference)] if reference is not None else [])]
    commit_files(out.parent, {out.name: write}, protected=protected, overwrite=overwrite)
    return {"output": str(out), "form": form, "shape": list(result.shape), "labels": labels,
            "label_mode": label_mode if labels else None, "padding": padding, "notes": notes}
