"""`deepsim-rt register`: register one image pair from files, with any model artifact and backend.

    deepsim-rt register --moving m.nii.gz --fixed f.nii.gz --out DIR [--labels m_labels.nii.gz]
                        [--model default-3d|default-2d|PATH] [--backend auto|eager|compile|onnxruntime|aoti|tensorrt]
                        [--device auto|cpu|cuda] [--affine rigid|affine] [--label-mode generic|nearest]
                        [--overwrite]
    deepsim-rt register --pairs pairs.csv --out DIR [same options]     (a batch: deepsim_rt.batch; columns
                        moving, fixed[, labels][, name]; resumable; rows shared among torchrun ranks)

Inputs, any size (the runtime pads to the network's multiple and crops back; intensities are min-max normalized as
the model expects):
  NIfTI (.nii / .nii.gz): 3D volumes for a 3D model; 2D images (X, Y) or single-slice volumes (X, Y, 1) for a 2D
      model. When moving and fixed differ in shape or affine, moving is resampled onto the fixed grid from the two
      affines (linear; said in the warnings and summary.json "grid"). --affine runs a rigid / affine
      pre-alignment first (deepsim_rt.transforms.affine). Both images then go to the model's training voxel
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
  PNG inputs -> warped.png (the input's bit depth, rounded and clipped), displacement.npy, warped_labels.png.
  NPY inputs -> warped.npy, displacement.npy, warped_labels.npy.
  displacement.npy is (*S, ndim), vector on the last axis, voxels, as the NIfTI.
  QC (deepsim_rt.qc): jacobian.nii.gz (NIfTI inputs, fixed affine) or jacobian.npy: det J of p -> p + u(p) per
  voxel (voxel units; equal to the world-unit determinant); summary.json: inputs, model, backend, device, timings
  (s), qc (folding_percent, sd_log_jacobian, Jacobian range, displacement mean / p99 / max in voxels and mm), the
  model's training profile and warnings (inputs far from the training data: voxel size, orientation, intensity
  range; constant images). Warnings are printed and never stop the registration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write

__all__ = ["add_subcommands", "run_register", "read_image", "ImageFile", "Pair", "PairResult", "read_pair",
           "default_model", "load_registrator", "register_pair", "commit_outputs", "commit_files"]

_NIFTI = (".nii.gz", ".nii")
_AFFINE_ATOL_MM = 1e-3  # affines agreeing to a micrometre describe the same grid (float32 header round-off ~1e-5)


@dataclass
class ImageFile:
    """An image read from disk: data (spatial array), its format, and (NIfTI) affine / header / on-disk shape."""

    path: Path
    kind: str  # "nifti" | "png" | "npy"
    data: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    disk_shape: tuple[int, ...] = ()
    png_dtype: Any = None


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(".png"):
        return "png"
    if name.endswith(".npy"):
        return "npy"
    raise ValueError(f"{path}: unsupported file type; expected .nii, .nii.gz, .png or .npy")


def read_image(path: str | os.PathLike, labels: bool = False) -> ImageFile:
    """Read one input file (see the module docstring); ValueError on anything unreadable."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    if kind == "nifti":
        from deepsim_rt.data.nifti import load_nifti

        data, affine, header = load_nifti(path, allow_2d=True)
        return ImageFile(path, kind, data, affine, header, tuple(data.shape))
    if kind == "npy":
        try:
            data = np.load(path, allow_pickle=False)
        except MemoryError:
            raise ValueError(f"{path}: not enough memory to load it ({path.stat().st_size / 2**20:.0f} MiB on "
                             "disk)") from None
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
        if data.dtype.kind not in "biuf" or data.ndim not in (2, 3):
            raise ValueError(f"{path}: expected a 2D or 3D numeric array, got shape {data.shape} dtype {data.dtype}")
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise ValueError(f"{path}: contains {int((~np.isfinite(data)).sum())} NaN or Inf values")
        return ImageFile(path, kind, data, disk_shape=tuple(data.shape))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if labels and img.mode == "P":
                data = np.array(img)  # palette indices are the labels
            elif img.mode in ("L", "I;16", "I;16B", "I", "F", "1"):
                data = np.array(img)
            else:
                data = np.array(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path} is not a readable PNG image: {exc}") from exc
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):  # mode "F" PNGs can hold NaN
        raise ValueError(f"{path}: contains {int((~np.isfinite(data)).sum())} NaN or Inf values")
    return ImageFile(path, kind, data, disk_shape=tuple(data.shape), png_dtype=data.dtype)


def _spatial(img: ImageFile, ndim: int, role: str) -> np.ndarray:
    """The image as an ndim-dimensional array for the model (a (X, Y, 1) NIfTI is a 2D image for a 2D model)."""
    data = img.data
    if ndim == 2 and data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise ValueError(f"{role} {img.path} is {data.ndim}D data of shape {img.disk_shape}, but the model is "
                         f"{ndim}D; use a {data.ndim}D model (e.g. --model default-{data.ndim}d)")
    return data


def _check_same_grid(a: ImageFile, b: ImageFile, what: str) -> None:
    if a.kind != b.kind:
        raise ValueError(f"{what}: {a.path} is {a.kind.upper()} but {b.path} is {b.kind.upper()}; give both in the "
                         "same format")
    if a.disk_shape != b.disk_shape:
        raise ValueError(f"{what}: shapes differ: {a.path} {a.disk_shape} vs {b.path} {b.disk_shape}")
    if a.affine is not None and b.affine is not None:
        diff = float(np.abs(a.affine - b.affine).max())
        if diff > _AFFINE_ATOL_MM:
            raise ValueError(f"{what}: affines differ (max element difference {diff:.4g} mm > {_AFFINE_ATOL_MM}): "
                             f"{a.path} and {b.path} are on different voxel grids; resample the moving image onto "
                             "the fixed grid first")


def _label_array(img: ImageFile) -> np.ndarray:
    data = img.data
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise ValueError(f"labels {img.path} must be integer-valued, got non-integer values")
        lo, hi = float(data.min()), float(data.max())
        disk = np.dtype(img.header.get_data_dtype()) if img.header is not None else None
        if disk is not None and disk.kind in "iu" and np.iinfo(disk).min <= lo and hi <= np.iinfo(disk).max:
            return data.astype(disk)  # keep the label file's own integer type
        dtype = np.uint8 if lo >= 0 and hi <= 255 else np.int16 if -32768 <= lo and hi <= 32767 else np.int32
        return data.astype(dtype)
    return data


def _save_nifti_vector(path: Path, vec: np.ndarray, affine: np.ndarray, header: Any) -> None:
    """(*S, ndim) float32 displacement as a NIfTI with the fixed image's affine and header (dims follow data)."""
    import nibabel as nib

    hdr = header.copy()
    img = (nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image)(vec, affine, hdr)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = b"deepsim_rt displacement, voxels, last axis=voxel axis i"
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def _save_png(path: Path, arr: np.ndarray, dtype: Any) -> None:
    from PIL import Image

    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(np.uint16 if np.dtype(dtype).itemsize > 1 else np.uint8)
        arr = np.clip(np.rint(arr), info.min, info.max).astype(info.dtype)
    elif np.dtype(dtype) == np.bool_:
        arr = (arr > 0).astype(np.uint8) * 255
    else:
        arr = arr.astype(np.float32)
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# One pair: read -> register -> collect outputs (in memory) -> commit (temp folder, moved into place together)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One pair's inputs, read and checked; `notes` are said to the user and land in summary.json."""

    moving: ImageFile
    fixed: ImageFile
    labels: ImageFile | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def data_ndim(self) -> int:
        """Dimensionality of the data: 2 for 2D arrays and single-slice (X, Y, 1) NIfTI volumes, else 3."""
        shape = self.moving.disk_shape
        return 2 if len(shape) == 2 or (self.moving.kind == "nifti" and shape[-1] == 1) else len(shape)

    @property
    def paths(self) -> list[Path]:
        return [img.path for img in (self.moving, self.fixed, self.labels) if img is not None]


@dataclass
class PairResult:
    """What one registration produced, still in memory.

    files:   output file name (inside the pair's folder) -> writer(path) that writes that file at `path`; the
             commit step calls every writer inside a temporary folder and moves the files into place together
             (summary.json last: its presence marks a finished pair).
    summary: JSON-able facts for summary.json (inputs, model, backend, timings_s, qc, warnings); steps may add
             keys. Its writer is added by the commit step and serializes the dict as it is then.
    """

    files: dict[str, Callable[[Path], Any]]
    summary: dict[str, Any]


def read_pair(moving: str | os.PathLike, fixed: str | os.PathLike,
              labels: str | os.PathLike | None = None) -> Pair:
    """Read and check a pair's input files (no model needed yet); ValueError on anything unusable."""
    mov = read_image(moving)
    fix = read_image(fixed)
    notes = []
    if mov.kind == fix.kind == "nifti":  # other grids are resampled from the affines (deepsim_rt.transforms)
        if mov.disk_shape != fix.disk_shape or float(np.abs(mov.affine - fix.affine).max()) > _AFFINE_ATOL_MM:
            notes.append(f"moving {mov.disk_shape} and fixed {fix.disk_shape} are on different voxel grids: moving "
                         "resampled onto the fixed grid from the two affines (linear; labels: the label mode)")
    else:
        _check_same_grid(mov, fix, "moving and fixed")
    lab = None
    if labels is not None:
        lab = read_image(labels, labels=True)
        _check_same_grid(mov, lab, "moving and labels")
    if mov.kind == "png" and mov.data.ndim != 2:
        raise ValueError(f"{mov.path}: PNG inputs must be greyscale 2D images, got shape {mov.data.shape}")
    return Pair(mov, fix, lab, notes)


def default_model(pair: Pair) -> str:
    """The bundled model for the pair's dimensionality (a single-slice (X, Y, 1) volume is 2D)."""
    return f"default-{pair.data_ndim}d"


def load_registrator(model: str, backend: str = "auto", device: str = "auto"):
    """Registrator.load for the CLI (lazy import: `deepsim-rt --help` must not import torch)."""
    from deepsim_rt.runtime import Registrator

    return Registrator.load(model, backend=backend, device=device)


def register_pair(reg, pair: Pair, affine: str | None = None, label_mode: str | None = None,
                  refine: Any = None) -> PairResult:
    """Register a read pair with a loaded Registrator; returns the outputs (in memory) and the summary.
    affine: None | "rigid" | "affine" pre-alignment (NIfTI only); label_mode: "generic" | "nearest" (None: the
    default, deepsim_rt.transforms.resample.DEFAULT_LABEL_MODE)."""
    from deepsim_rt.transforms.resample import DEFAULT_LABEL_MODE

    label_mode = label_mode or DEFAULT_LABEL_MODE
    nd = reg.ndim
    m_arr = _spatial(pair.moving, nd, "moving").astype(np.float32)
    f_arr = _spatial(pair.fixed, nd, "fixed").astype(np.float32)
    l_arr = None
    if pair.labels is not None:
        lab = pair.labels
        l_arr = _spatial(ImageFile(lab.path, lab.kind, _label_array(lab), disk_shape=lab.disk_shape), nd, "labels")

    def run(m, f, lab, spacing=None):
        return reg.register(m, f, lab, spacing=spacing, label_mode=label_mode, refine=refine)

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if pair.moving.kind == "nifti":  # world space: grids, pre-alignment, the model's spacing, ITK transform
            from deepsim_rt.transforms.pipeline import register_world

            warped, u, warped_labels, grid = _guard_memory(lambda: register_world(
                run, m_arr, pair.moving.affine, f_arr, pair.fixed.affine, l_arr, affine, label_mode,
                (str(pair.moving.path), str(pair.fixed.path))), f_arr.shape, reg.device)
        else:
            if affine is not None:
                raise ValueError(f"--affine needs NIfTI inputs (world coordinates from their affines), got "
                                 f"{pair.moving.kind.upper()} files")
            res = _guard_memory(lambda: run(m_arr, f_arr, l_arr), m_arr.shape, reg.device)
            warped, u, warped_labels, grid = res.warped, res.displacement, res.warped_labels, {"network": res.scale}
    seconds = time.perf_counter() - t0

    vec = np.moveaxis(u, 0, -1).astype(np.float32)  # (*S, ndim): vector on the last axis
    summary: dict[str, Any] = {
        "moving": str(pair.moving.path), "fixed": str(pair.fixed.path),
        "labels": None if pair.labels is None else str(pair.labels.path),
        "model": str(reg.source), "backend": reg.backend_name, "device": str(reg.device),
        "shape": list(m_arr.shape), "timings_s": {"register": seconds},
        "max_displacement_voxels": float(np.abs(vec).max()),
        "warnings": [*pair.notes, *(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))],
    }
    summary["grid"] = {**grid, "label_mode": label_mode}
    result = PairResult(_image_outputs(pair, nd, warped, vec, warped_labels), summary)
    if pair.moving.kind == "nifti":
        from deepsim_rt.transforms.itk import save_itk_displacement

        fix = pair.fixed
        itk_vec = vec
        if len(fix.disk_shape) == 3 and nd == 2:  # a single-slice (X, Y, 1) file: ITK reads it as 3D, so 3D field
            itk_vec = np.concatenate([vec, np.zeros_like(vec[..., :1])], -1).reshape(*fix.disk_shape, 3)
        result.files["transform_itk.nii.gz"] = lambda p: save_itk_displacement(p, itk_vec, fix.affine, fix.header)
    # QC holds ~10 copies of the field (Jacobian entries): out of memory there is one line too
    _guard_memory(lambda: _add_qc(result, reg, pair, m_arr, f_arr, u), f_arr.shape, "cpu")
    return result


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


def _add_qc(result: PairResult, reg, pair: Pair, m_arr: np.ndarray, f_arr: np.ndarray, u: np.ndarray) -> None:
    """QC (deepsim_rt.qc): training-data warnings, the Jacobian determinant map and figures into `result`."""
    from deepsim_rt import qc

    t0 = time.perf_counter()
    profile = qc.training_profile(reg.source)
    warn = result.summary["warnings"]
    # NIfTI inputs run at the model's training spacing when it is recorded (runtime, spacing=): no size warning
    handled = pair.fixed.kind == "nifti" and getattr(reg, "model_spacing", None) is not None
    for role, img, arr in (("moving", pair.moving, m_arr), ("fixed", pair.fixed, f_arr)):
        warn += qc.input_warnings(role, arr, profile, img.affine, img.path, spacing_handled=handled)
    result.summary["training_profile"] = profile.as_dict()
    if min(u.shape[1:]) < 2:
        warn.append(f"no Jacobian map: a spatial size below 2 in {list(u.shape[1:])}")
        return
    det, stats = qc.displacement_qc(u, pair.fixed.affine)
    result.summary["qc"] = stats
    fix = pair.fixed
    if fix.kind == "nifti":
        from deepsim_rt.data.nifti import save_nifti

        result.files["jacobian.nii.gz"] = lambda p: save_nifti(p, det.reshape(fix.disk_shape), fix.affine,
                                                                fix.header)
    else:
        result.files["jacobian.npy"] = lambda p: _save_npy(p, det)
    result.summary["timings_s"]["qc"] = time.perf_counter() - t0


def _image_outputs(pair: Pair, nd: int, warped: np.ndarray, vec: np.ndarray,
                   warped_labels: np.ndarray | None) -> dict[str, Callable[[Path], Any]]:
    """File name -> writer for the warped image, the voxel displacement and the warped labels, in the input's
    format (see the module docstring)."""
    mov, fix = pair.moving, pair.fixed
    files: dict[str, Callable[[Path], Any]] = {}
    if mov.kind == "nifti":
        from deepsim_rt.data.nifti import save_nifti

        shape = fix.disk_shape
        files["warped.nii.gz"] = lambda p: save_nifti(p, warped.reshape(shape), fix.affine, fix.header)
        files["displacement.nii.gz"] = lambda p: _save_nifti_vector(p, vec.reshape(*shape, nd), fix.affine,
                                                                     fix.header)
        if warped_labels is not None:
            files["warped_labels.nii.gz"] = lambda p: save_nifti(p, warped_labels.reshape(shape), fix.affine,
                                                                  fix.header)
    elif mov.kind == "png":
        files["warped.png"] = lambda p: _save_png(p, warped, mov.png_dtype)
        files["displacement.npy"] = lambda p: _save_npy(p, vec)
        if warped_labels is not None:
            files["warped_labels.png"] = lambda p: _save_png(p, warped_labels, warped_labels.dtype)
    else:
        files["warped.npy"] = lambda p: _save_npy(p, warped.reshape(mov.disk_shape).astype(np.float32))
        files["displacement.npy"] = lambda p: _save_npy(p, vec)
        if warped_labels is not None:
            files["warped_labels.npy"] = lambda p: _save_npy(p, warped_labels.reshape(mov.disk_shape))
    return files


SUMMARY_NAME = "summary.json"


def commit_outputs(out: str | os.PathLike, result: PairResult, inputs: list[Path],
                   overwrite: bool = False) -> list[Path]:
    """Write every file of `result` (plus summary.json) into `out`, all or nothing.

    The files are written into a temporary folder inside `out`, then moved into place together (summary.json
    last). Refuses (ValueError, nothing written) when a target exists and not `overwrite`, and ALWAYS when a target
    is one of `inputs`. On any failure nothing new is left behind: the temporary folder and any folder created
    here are removed, and files replaced with `overwrite` are restored. OSErrors become one-line ValueErrors
    naming the path. Returns the written paths.
    """
    files = dict(result.files)
    files[SUMMARY_NAME] = lambda p: _save_json(p, result.summary)
    return commit_files(out, files, protected=inputs, overwrite=overwrite)


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _os_error_line(exc: OSError, fallback: Path) -> str:
    where = exc.filename or fallback
    return f"cannot write {where}: {exc.strerror or type(exc).__name__}"


def commit_files(out: str | os.PathLike, files: dict[str, Callable[[Path], Any]], protected: list[Path] = (),
                 overwrite: bool = False) -> list[Path]:
    """Write `files` (name -> writer(path)) into folder `out`, all or nothing; the last name is moved last.

    Every writer runs inside a fresh temporary folder in `out` (same file system: the moves are renames); only
    when all have succeeded are the files moved into place, in order. Refuses with ValueError, before writing,
    when a target is one of `protected` (inputs; even with `overwrite`), when a target exists and not
    `overwrite`, or when a target is a folder. On any failure the temporary folder, folders created here and
    files already moved are removed, and files replaced with `overwrite` are restored. An OSError becomes a
    one-line ValueError naming the path. Returns the target paths in order.
    """
    out = Path(out)
    targets = {name: out / name for name in files}
    for name, target in targets.items():
        if Path(name).name != name:
            raise ValueError(f"output names must be plain file names, got {name!r}")  # pragma: no cover
        for src in protected:
            if _same_file(target, Path(src)):
                raise ValueError(f"refusing to write {target}: it is an input ({src}); choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    existing = [t for t in targets.values() if t.exists() or t.is_symlink()]
    for t in existing:
        if t.is_dir():
            raise ValueError(f"output {t} exists and is a folder")
    if existing and not overwrite:
        names = ", ".join(t.name for t in existing)
        raise ValueError(f"outputs already exist in {out} ({names}); pass --overwrite to replace them")
    created: list[Path] = []
    tmp: Path | None = None
    done = False
    try:
        for parent in reversed([out, *out.parents]):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        tmp = Path(tempfile.mkdtemp(prefix=".deepsim_rt-partial-", dir=out))
        for name, write in files.items():
            write(tmp / name)
            if not (tmp / name).is_file():
                raise ValueError(f"internal error: the writer of {name} wrote no file")  # pragma: no cover
        backup = tmp / ".replaced"
        backup.mkdir()
        placed: list[str] = []
        replaced: list[str] = []
        try:
            for name, target in targets.items():
                if target.exists() or target.is_symlink():
                    os.replace(target, backup / name)
                    replaced.append(name)
                os.replace(tmp / name, target)
                placed.append(name)
        except BaseException:
            for name in placed:
                targets[name].unlink(missing_ok=True)
            for name in replaced:
                os.replace(backup / name, targets[name])
            raise
        done = True
    except OSError as exc:
        raise ValueError(_os_error_line(exc, out)) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return list(targets.values())


def _save_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def registrator_for(pair: Pair, model: str | None, backend: str = "auto", device: str = "auto", refine: Any = None):
    """The Registrator for a pair: `model` (None: the bundled model for its dimensionality; "none": no network,
    pure optimisation with `refine`), on `backend` / `device`."""
    if model == "none":  # pure optimisation (deepsim_rt.refine): no network
        from deepsim_rt.refine.runtime import no_model_registrator

        if refine is None:
            raise ValueError("--model none (no network) needs --refine ITERS: pure optimisation from zero")
        return no_model_registrator(pair.data_ndim, device=device)
    return load_registrator(model or default_model(pair), backend=backend, device=device)


def run_register(moving: str | os.PathLike, fixed: str | os.PathLike, out: str | os.PathLike,
                 labels: str | os.PathLike | None = None, model: str | None = None, backend: str = "auto",
                 device: str = "auto", overwrite: bool = False, affine: str | None = None,
                 label_mode: str | None = None, refine: Any = None) -> dict[str, Any]:
    """Register files; returns the pair's summary plus "outputs" (written paths) and "seconds" (registration).
    affine / label_mode: see `register_pair`.

    Nothing is written until every input has been read and checked and the registration has run; then all
    outputs appear together (see `commit_outputs`).
    """
    t0 = time.perf_counter()
    pair = read_pair(moving, fixed, labels)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    reg = registrator_for(pair, model, backend, device, refine)
    t_load = time.perf_counter() - t0
    result = register_pair(reg, pair, affine=affine, label_mode=label_mode, refine=refine)
    result.summary["timings_s"].update(read=t_read, load_model=t_load)
    written = commit_outputs(out, result, pair.paths, overwrite=overwrite)
    info = dict(result.summary)
    info["outputs"] = [str(p) for p in written]
    info["seconds"] = info["timings_s"]["register"]
    return info


def _cmd(args: argparse.Namespace) -> int:
    from deepsim_rt.refine.cli import refine_config_from_args

    if args.pairs is not None:
        return _batch_cmd(args, refine_config_from_args(args))
    if args.moving is None or args.fixed is None:
        raise ValueError("give --moving and --fixed (one pair) or --pairs CSV (a batch)")
    info = run_register(args.moving, args.fixed, args.out, labels=args.labels, model=args.model,
                        backend=args.backend, device=args.device, overwrite=args.overwrite, affine=args.affine,
                        label_mode=args.label_mode, refine=refine_config_from_args(args))
    print(f"registered {args.moving} -> {args.fixed} ({'x'.join(map(str, info['shape']))}) with {info['model']} "
          f"on {info['backend']} ({info['device']}) in {info['seconds'] * 1000:.1f} ms; max |u| = "
          f"{info['max_displacement_voxels']:.2f} voxels")
    for w in info["warnings"]:
        print(f"  warning: {w}")
    for p in info["outputs"]:
        print(f"  wrote {p}")
    return 0


def _batch_cmd(args: argparse.Namespace, refine: Any) -> int:
    from deepsim_rt.batch import run_batch

    if args.moving is not None or args.fixed is not None or args.labels is not None:
        raise ValueError("--pairs takes moving, fixed and labels from the CSV; drop --moving / --fixed / --labels")
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


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "register", help="register a moving image onto a fixed image (NIfTI, PNG or NPY)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moving", default=None, help="moving image (.nii/.nii.gz, .png, .npy)")
    p.add_argument("--fixed", default=None, help="fixed image (NIfTI: any grid; PNG / NPY: the moving's shape)")
    p.add_argument("--pairs", default=None, metavar="CSV",
                   help="batch: a CSV with columns moving, fixed[, labels][, name]; each pair goes to OUT/<name>/, "
                        "finished pairs are skipped, rows are shared among torchrun ranks; OUT/summary.csv and "
                        "summary.json tabulate them (deepsim_rt.batch)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default=None, help="label map of the moving image (warped with --label-mode)")
    p.add_argument("--label-mode", default=None, choices=("generic", "nearest"),
                   help="label warping: generic (ANTs genericLabel: each label's indicator linearly, arg-max) or "
                        "nearest (default: generic)")
    p.add_argument("--affine", default=None, choices=("rigid", "affine"),
                   help="NIfTI only: rigid or affine pre-alignment (moments + Adam on NCC at 8 and 4 mm) before the "
                        "network, composed into the saved transforms (default: none)")
    p.add_argument("--model", default=None,
                   help="default-2d, default-3d, a .safetensors/.onnx/.pt2/.plan path, or none (with --refine: "
                        "pure optimisation from zero) (default: the bundled model matching the data's "
                        "dimensionality)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="runtime backend (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs in --out (never an input file; default: refuse)")
    from deepsim_rt.refine.cli import add_refine_arguments

    add_refine_arguments(p)
    p.set_defaults(func=_cmd)
