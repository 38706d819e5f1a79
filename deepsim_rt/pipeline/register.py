"""Register one pair of files: read -> register (grids, pre-alignment, the model's spacing) -> QC -> commit.

    info = run_register("m.nii.gz", "f.nii.gz", "out/", labels="m_aseg.nii.gz", model="default-3d")

or stage by stage (what the batch does, one model load for many pairs):

    pair = read_pair(moving, fixed, labels)                 # pipeline.pair
    reg = registrator_for(pair, model, backend, device)    # a deepsim_rt.runtime.Registrator (array level)
    result = register_pair(reg, pair, affine=..., label_mode=..., refine=...)   # outputs in memory
    commit_outputs(out, result, pair.paths)                 # pipeline.outputs: all or nothing

What is written, in which format and convention: `deepsim-rt register --help` (deepsim_rt.register_cli).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt.pipeline.outputs import PairResult, check_out_dir, check_targets, commit_outputs
from deepsim_rt.pipeline.pair import Pair, default_model, read_pair
from deepsim_rt.pipeline.write import gzip_level, save_nifti_like, save_nifti_vector, save_npy, save_png
from deepsim_rt.refine.config import NO_MODEL

__all__ = ["run_register", "register_pair", "registrator_for", "load_registrator", "output_names", "select_outputs",
           "OUTPUT_KINDS"]

# `register --outputs`: which files each kind names (summary.json is always written)
OUTPUT_KINDS = {"warped": ("warped.",), "labels": ("warped_labels.",), "displacement": ("displacement.",),
                "transform": ("transform_itk.", "affine.mat", "warp.nii.gz"), "jacobian": ("jacobian.",),
                "picture": ("qc.png",)}


# Every file a pair folder can hold, per input format (summary.json apart): what a run does not write is removed
# from the folder when it overwrites an earlier run (outputs.PairResult.stale).
_OUTPUTS = {
    "nifti": ("warped.nii.gz", "displacement.nii.gz", "warped_labels.nii.gz", "transform_itk.nii.gz",
              "affine.mat", "warp.nii.gz", "jacobian.nii.gz", "qc.png"),
    "png": ("warped.png", "displacement.npy", "warped_labels.png", "jacobian.npy", "qc.png"),
    "npy": ("warped.npy", "displacement.npy", "warped_labels.npy", "jacobian.npy", "qc.png"),
}


def output_names(pair: Pair) -> list[str]:
    """The files a registration of `pair` writes (summary.json last), known before it runs."""
    names = [n for n in _OUTPUTS[pair.moving.format] if pair.labels is not None or "labels" not in n]
    return [*names, "summary.json"]


def select_outputs(result: PairResult, outputs: list[str] | tuple[str, ...] | None) -> PairResult:
    """Keep only the files of the `outputs` kinds (OUTPUT_KINDS; None: all); the others are not written, and a
    previous run's copies of them are removed on --overwrite (they would not match this summary)."""
    if outputs is None:
        return result
    bad = sorted(set(outputs) - set(OUTPUT_KINDS))
    if bad or not outputs:
        raise ValueError(f"--outputs takes a comma-separated list of {', '.join(OUTPUT_KINDS)}, got "
                         f"{','.join(outputs) or 'nothing'}")
    prefixes = tuple(p for k in outputs for p in OUTPUT_KINDS[k])
    dropped = tuple(n for n in result.files if not n.startswith(prefixes))
    result.files = {n: w for n, w in result.files.items() if n.startswith(prefixes)}
    result.stale = tuple(dict.fromkeys((*result.stale, *dropped)))
    result.summary["outputs_written"] = [*result.files, "summary.json"]
    return result


def load_registrator(model: str, backend: str = "auto", device: str = "auto"):
    """Registrator.load (lazy import: `deepsim-rt --help` must not import torch)."""
    from deepsim_rt.runtime import Registrator

    return Registrator.load(model, backend=backend, device=device)


def registrator_for(pair: Pair, model: str | None, backend: str = "auto", device: str = "auto", refine: Any = None):
    """The Registrator for a pair: `model` (None: the bundled model for its dimensionality; "none": no network,
    pure optimisation with `refine`), on `backend` / `device`."""
    if model == NO_MODEL:
        from deepsim_rt.runtime import Registrator

        if refine is None:
            raise ValueError("--model none (no network) needs --refine ITERS: pure optimisation from zero")
        return Registrator.no_network(pair.data_ndim, device=device)
    return load_registrator(model or default_model(pair), backend=backend, device=device)


def _constant_warning(role: str, arr: np.ndarray) -> str | None:
    """The runtime's constant-image warning, said here too: after a pre-alignment or a grid change the network
    sees a resampled image (zeros outside the field of view) that is no longer constant."""
    if arr.size and float(arr.min()) == float(arr.max()):
        return (f"{role} image is constant (every voxel {float(arr.flat[0]):g}): there is nothing to register, the "
                "displacement is not meaningful")
    return None


def register_pair(reg, pair: Pair, affine: str | None = None, label_mode: str | None = None,
                  refine: Any = None) -> PairResult:
    """Register a read pair with a loaded Registrator; returns the outputs (in memory) and the summary.
    affine: None | "rigid" | "affine" | "rigid-nmi" | "affine-nmi" pre-alignment (NIfTI only; -nmi: mutual
    information, across contrasts); label_mode: "generic" | "nearest" (None: the default,
    deepsim_rt.transforms.resample.DEFAULT_LABEL_MODE)."""
    from deepsim_rt.transforms.resample import DEFAULT_LABEL_MODE

    label_mode = label_mode or DEFAULT_LABEL_MODE
    nd = reg.ndim
    m_arr = pair.moving.spatial(nd, "moving").astype(np.float32)
    f_arr = pair.fixed.spatial(nd, "fixed").astype(np.float32)
    l_arr = None if pair.labels is None else pair.labels.spatial(nd, "labels")

    def run(m, f, lab, spacing=None, mask=None):  # the masks restrict the refinement's similarity (with refine)
        return reg.register(m, f, lab, spacing=spacing, label_mode=label_mode, refine=refine,
                            mask=mask if refine is not None else None)

    from deepsim_rt.pipeline import qc

    # An exported artifact (.onnx/.pt2) has no checkpoint profile to read the contract from: take it from the config.
    profile = dataclasses.replace(qc.training_profile(reg.source), intensity=reg.cfg.intensity)
    seen = {"moving": (m_arr, pair.moving.affine), "fixed": (f_arr, pair.fixed.affine)}  # what the network sees
    orientation = world = u_net = mask = None
    masks = {role: None if img is None else (img.spatial(nd, f"{role} mask"), img.affine)
             for role, img in (("fixed_mask", pair.fixed_mask), ("moving_mask", pair.moving_mask))}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if pair.moving.format == "nifti":  # world space: grids, pre-alignment, the model's spacing, ITK transform
            from deepsim_rt.pipeline.world import register_world_parts

            m_in, m_aff, f_in, f_aff, l_in = m_arr, pair.moving.affine, f_arr, pair.fixed.affine, l_arr
            if nd == 3:  # the model's training axis order, exactly (permutation + flips); outputs come back
                from deepsim_rt.pipeline.orientation import DEFAULT_AXCODES, Reorientation
                from deepsim_rt.transforms.grid import Grid

                file_grids = {"moving_grid": Grid.of(m_arr.shape, m_aff, str(pair.moving.path)).as_dict(),
                              "fixed_grid": Grid.of(f_arr.shape, f_aff, str(pair.fixed.path)).as_dict()}
                target = profile.axcodes if profile.axcodes is not None else DEFAULT_AXCODES
                r_m = Reorientation.of(m_aff, m_arr.shape, target)
                r_f = Reorientation.of(f_aff, f_arr.shape, target)
                m_in, m_aff = r_m.to_model(m_arr), r_m.affine_to_model(m_aff)
                f_in, f_aff = r_f.to_model(f_arr), r_f.affine_to_model(f_aff)
                l_in = None if l_arr is None else r_m.to_model(l_arr)
                orientation = {"moving": r_m.as_dict(), "fixed": r_f.as_dict(),
                               "model_axcodes_known": profile.axcodes is not None}
                seen = {"moving": (m_in, m_aff), "fixed": (f_in, f_aff)}
            wr = _guard_memory(lambda: register_world_parts(
                run, m_in, m_aff, f_in, f_aff, l_in, affine, label_mode,
                (str(pair.moving.path), str(pair.fixed.path)), **masks), f_arr.shape, reg.device)
            warped, u, warped_labels, grid, world, u_net = wr.warped, wr.u, wr.warped_labels, wr.facts, wr.world, \
                wr.u_net
            mask = wr.mask
            if orientation is not None:  # back onto the fixed file's own axes (world coordinates are unchanged)
                grid = {**grid, **file_grids}  # the files' grids; "network" is in the model's axis order
                warped, u, u_net = r_f.from_model(warped), r_f.vector_from_model(u), r_f.vector_from_model(u_net)
                warped_labels = None if warped_labels is None else r_f.from_model(warped_labels)
                mask = None if mask is None else r_f.from_model(mask)
        else:
            if affine is not None:
                raise ValueError(f"--affine needs NIfTI inputs (world coordinates from their affines), got "
                                 f"{pair.moving.format.upper()} files")
            res = _guard_memory(lambda: run(m_arr, f_arr, l_arr), m_arr.shape, reg.device)
            warped, u, warped_labels, grid = res.warped, res.displacement, res.warped_labels, {"network": res.scale}
    seconds = time.perf_counter() - t0

    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    for role, arr in (("moving", m_arr), ("fixed", f_arr)):
        text = _constant_warning(role, arr)
        if text is not None and not any(s.startswith(f"{role} image is constant") for s in said):
            said.append(text)
    vec = np.moveaxis(u, 0, -1).astype(np.float32)  # (*S, ndim): vector on the last axis
    summary: dict[str, Any] = {
        "moving": str(pair.moving.path), "fixed": str(pair.fixed.path),
        "labels": None if pair.labels is None else str(pair.labels.path),
        "model": str(reg.source), "backend": reg.backend_name, "device": str(reg.device),
        "shape": list(m_arr.shape), "timings_s": {"register": seconds},
        "max_displacement_voxels": float(np.abs(vec).max()),
        "warnings": [*pair.notes, *said],
    }
    summary["grid"] = {**grid, "label_mode": label_mode}
    if orientation is not None:
        summary["orientation"] = orientation
    if mask is not None:
        summary["masks"] = {"fixed": None if pair.fixed_mask is None else str(pair.fixed_mask.path),
                            "moving": None if pair.moving_mask is None else str(pair.moving_mask.path),
                            "union_on_fixed_grid_voxels": int(mask.sum()),
                            "restricts": ["qc statistics", *(["refinement similarity"] if refine is not None else [])]}
    # an affine-only registration (--model none --affine, no refinement) has no deformable part: no dense field
    dense = world is None or u_net is None or bool(np.any(u_net != 0))
    files = _image_outputs(pair, nd, warped, vec if dense else None, warped_labels)
    result = PairResult(files, summary, stale=())
    if pair.moving.format == "nifti":
        summary["transforms"] = _transform_files(result, pair, nd, vec, world, u_net, dense)
    # QC holds ~10 copies of the field (Jacobian entries): out of memory there is one line too
    det = _guard_memory(lambda: _add_qc(result, reg, pair, profile, seen, u, None if dense else world, mask),
                        f_arr.shape, "cpu")
    fixed_view, warped_view = f_arr, np.asarray(warped).reshape(f_arr.shape)

    def picture(p: Path) -> None:  # fixed / warped overlay, checkerboard, det J (pipeline.qc_page); NCC -> summary
        from deepsim_rt.pipeline.qc_page import write_pair_picture

        write_pair_picture(p, fixed_view, warped_view, None if det is None else det.reshape(f_arr.shape),
                           result.summary)

    result.files["qc.png"] = picture
    result.stale = tuple(n for n in _OUTPUTS[pair.moving.format] if n not in result.files)
    return result


def _itk_vectors(pair: Pair, nd: int, vec: np.ndarray) -> np.ndarray:
    """(*S, nd) voxel vectors for an ITK field of the fixed file: a single-slice (X, Y, 1) file is read by ITK as
    3D, so its 2D field gets a zero third component."""
    shape = pair.fixed.disk_shape
    if len(shape) == 3 and nd == 2:
        return np.concatenate([vec, np.zeros_like(vec[..., :1])], -1).reshape(*shape, 3)
    return vec


def _transform_files(result: PairResult, pair: Pair, nd: int, vec: np.ndarray, world: np.ndarray | None,
                     u_net: np.ndarray | None, dense: bool) -> dict[str, Any]:
    """The registration for ANTs / ITK users, into `result.files`; returns the summary's "transforms" entry.

    Without a pre-alignment: transform_itk.nii.gz, the whole map as one ITK displacement field. With one (--affine):
    affine.mat (ITK affine, as ANTs' 0GenericAffine.mat; transforms.itk_affine) and, when there is a deformable
    part, warp.nii.gz (its ITK field on the fixed grid): `antsApplyTransforms -t warp.nii.gz -t affine.mat`."""
    from deepsim_rt.transforms.itk import save_itk_displacement
    from deepsim_rt.transforms.itk_affine import save_itk_affine

    fix = pair.fixed
    if world is None:
        itk_vec = _itk_vectors(pair, nd, vec)
        result.files["transform_itk.nii.gz"] = lambda p: save_itk_displacement(p, itk_vec, fix.affine, fix.header,
                                                                                gzip_level())
        chain = ["transform_itk.nii.gz"]
    else:
        w = np.asarray(world, dtype=np.float64)
        w_nd = nd
        if nd == 2 and len(fix.disk_shape) == 3:  # single-slice file: ITK sees 3D, the slice axis untouched
            w = np.eye(4)
            w[np.ix_([0, 1, 3], [0, 1, 3])] = np.asarray(world, dtype=np.float64)
            w_nd = 3
        result.files["affine.mat"] = lambda p: save_itk_affine(p, w, w_nd)
        chain = ["affine.mat"]
        if dense:
            net_vec = _itk_vectors(pair, nd, np.moveaxis(u_net, 0, -1).astype(np.float32))
            result.files["warp.nii.gz"] = lambda p: save_itk_displacement(p, net_vec, fix.affine, fix.header,
                                                                          gzip_level())
            chain = ["warp.nii.gz", "affine.mat"]
    return {"ants": chain, "dense_field": dense,
            "command": "antsApplyTransforms -r FIXED -i MOVING " + " ".join(f"-t {c}" for c in chain)}


def _guard_memory(fn: Callable[[], Any], shape: tuple[int, ...], device: Any) -> Any:
    """Run fn; out-of-memory (host or GPU) becomes a one-line ValueError naming the image size and device."""
    import torch

    try:
        return fn()
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "alloc" not in text.lower():
            raise
        mib = int(np.prod(shape)) * 4 / 2**20
        raise ValueError(f"out of memory registering a {'x'.join(map(str, shape))} image on {device} "
                         f"({mib:.0f} MiB per float32 copy; the network holds dozens): use a smaller or "
                         "resampled image, another device, or free memory") from None


def _add_qc(result: PairResult, reg, pair: Pair, profile, seen: dict[str, tuple[np.ndarray, Any]],
            u: np.ndarray, affine_only: np.ndarray | None = None, mask: np.ndarray | None = None
            ) -> np.ndarray | None:
    """QC (pipeline.qc): training-data warnings on what the network saw (`seen`: role -> (array, affine) in the
    model's axis order), the Jacobian determinant map and figures (on the fixed file's grid) into `result`.
    affine_only: the pre-alignment of a registration without a deformable part: its Jacobian is one number, the
    determinant of the linear part, and no map is written. Returns the det J map (None without one)."""
    from deepsim_rt.pipeline import qc

    t0 = time.perf_counter()
    warn = result.summary["warnings"]
    # NIfTI inputs run at the model's training spacing when it is recorded (runtime, spacing=): no size warning
    handled = pair.fixed.format == "nifti" and getattr(reg, "model_spacing", None) is not None
    for role, img in (("moving", pair.moving), ("fixed", pair.fixed)):
        arr, aff = seen[role]
        warn += qc.input_warnings(role, arr, profile, aff, img.path, spacing_handled=handled)
    result.summary["training_profile"] = profile.as_dict()
    if min(u.shape[1:]) < 2:
        warn.append(f"no Jacobian map: a spatial size below 2 in {list(u.shape[1:])}")
        return None
    det, stats = qc.displacement_qc(u, pair.fixed.affine, affine_only, mask=mask)
    result.summary["qc"] = stats
    if affine_only is not None:
        result.summary["timings_s"]["qc"] = time.perf_counter() - t0
        return None
    fix = pair.fixed
    if fix.format == "nifti":
        result.files["jacobian.nii.gz"] = lambda p: save_nifti_like(p, det.reshape(fix.disk_shape), fix.affine,
                                                                     fix.header)
    else:
        result.files["jacobian.npy"] = lambda p: save_npy(p, det)
    result.summary["timings_s"]["qc"] = time.perf_counter() - t0
    return det


def _image_outputs(pair: Pair, nd: int, warped: np.ndarray, vec: np.ndarray | None,
                   warped_labels: np.ndarray | None) -> dict[str, Callable[[Path], Any]]:
    """File name -> writer for the warped image, the voxel displacement (not with vec None: an affine-only NIfTI
    registration) and the warped labels, in the input's format (see `deepsim-rt register --help`)."""
    mov, fix = pair.moving, pair.fixed
    files: dict[str, Callable[[Path], Any]] = {}
    if mov.format == "nifti":
        shape = fix.disk_shape
        files["warped.nii.gz"] = lambda p: save_nifti_like(p, warped.reshape(shape), fix.affine, fix.header)
        if vec is not None:
            files["displacement.nii.gz"] = lambda p: save_nifti_vector(p, vec.reshape(*shape, nd), fix.affine,
                                                                        fix.header)
        if warped_labels is not None:
            files["warped_labels.nii.gz"] = lambda p: save_nifti_like(p, warped_labels.reshape(shape), fix.affine,
                                                                       fix.header)
    elif mov.format == "png":
        files["warped.png"] = lambda p: save_png(p, warped, mov.png_dtype)
        files["displacement.npy"] = lambda p: save_npy(p, vec)
        if warped_labels is not None:
            files["warped_labels.png"] = lambda p: save_png(p, warped_labels, warped_labels.dtype)
    else:
        files["warped.npy"] = lambda p: save_npy(p, warped.reshape(mov.disk_shape).astype(np.float32))
        files["displacement.npy"] = lambda p: save_npy(p, vec)
        if warped_labels is not None:
            files["warped_labels.npy"] = lambda p: save_npy(p, warped_labels.reshape(mov.disk_shape))
    return files


def run_register(moving: str | os.PathLike, fixed: str | os.PathLike, out: str | os.PathLike,
                 labels: str | os.PathLike | None = None, model: str | None = None, backend: str = "auto",
                 device: str = "auto", overwrite: bool = False, affine: str | None = None,
                 label_mode: str | None = None, refine: Any = None, outputs: list[str] | None = None,
                 fixed_mask: str | os.PathLike | None = None, moving_mask: str | os.PathLike | None = None
                 ) -> dict[str, Any]:
    """Register files; returns the pair's summary plus "outputs" (written paths) and "seconds" (registration).
    affine / label_mode: see `register_pair`; outputs: the kinds of file to write (`select_outputs`; None: all).
    fixed_mask / moving_mask: brain masks (NIfTI, any grid): their union on the fixed grid restricts the QC
    statistics and, with refine, the refinement's similarity (summary.json "masks").

    `out` is checked first (an empty name, a file, an unwritable folder, outputs that exist without `overwrite`:
    ValueError before any work). Nothing is written until every input has been read and checked and the
    registration has run; then all outputs appear together (see `outputs.commit_outputs`).
    """
    out_dir = check_out_dir(out)
    if outputs is not None:
        select_outputs(PairResult({}, {}), outputs)  # bad names: before any work
    t0 = time.perf_counter()
    pair = read_pair(moving, fixed, labels, fixed_mask, moving_mask)
    check_targets(out_dir, output_names(pair), pair.paths, overwrite)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    reg = registrator_for(pair, model, backend, device, refine)
    t_load = time.perf_counter() - t0
    result = select_outputs(register_pair(reg, pair, affine=affine, label_mode=label_mode, refine=refine), outputs)
    result.summary["timings_s"].update(read=t_read, load_model=t_load)
    t0 = time.perf_counter()
    written = commit_outputs(out_dir, result, pair.paths, overwrite=overwrite)
    result.summary["timings_s"]["write"] = time.perf_counter() - t0  # not in summary.json: it is written by then
    info = dict(result.summary)
    info["outputs"] = [str(p) for p in written]
    info["seconds"] = info["timings_s"]["register"]
    return info
