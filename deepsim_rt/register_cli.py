"""`deepsim-rt register`: register one image pair from files, with any model artifact and backend.

    deepsim-rt register --moving m.nii.gz --fixed f.nii.gz --out DIR [--labels m_labels.nii.gz]
                        [--model default-3d|default-2d|PATH] [--backend auto|eager|compile|onnxruntime|aoti|tensorrt]
                        [--device auto|cpu|cuda]

Inputs, any size (the runtime pads to the network's multiple and crops back; intensities are min-max normalized as
the model expects):
  NIfTI (.nii / .nii.gz): 3D volumes for a 3D model; 2D images (X, Y) or single-slice volumes (X, Y, 1) for a 2D
      model. moving and fixed must have the same shape AND the same affine (a learned network registers voxel
      grids: resample moving onto the fixed grid first). Labels: integer-valued, same shape and affine as moving.
  PNG / NPY: 2D only (PNG greyscale, 8 or 16 bit; colour PNGs are converted to luminance; label PNGs keep their
      palette indices). NPY: a 2D or 3D numeric array.
  Without --model, the bundled model matching the data's dimensionality is used.
Outputs in DIR (created if needed), each written to a temporary file and renamed; nothing is written until every
input has been read and checked and the registration has run:
  NIfTI inputs -> warped.nii.gz, displacement.nii.gz, warped_labels.nii.gz (with --labels); all with the FIXED
      image's affine and header. displacement.nii.gz is 4D (X, Y, Z, 3) (2D: (X, Y, 2)), float32, the vector on
      the LAST axis: component i is the displacement along voxel axis i in VOXELS (not mm),
      warped(p) = moving(p + u(p)).
  PNG inputs -> warped.png (the input's bit depth, rounded and clipped), displacement.npy, warped_labels.png.
  NPY inputs -> warped.npy, displacement.npy, warped_labels.npy.
  displacement.npy is (*S, ndim), vector on the last axis, voxels, as the NIfTI.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write

__all__ = ["add_subcommands", "run_register", "read_image", "ImageFile"]

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
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
        if data.dtype.kind not in "biuf" or data.ndim not in (2, 3):
            raise ValueError(f"{path}: expected a 2D or 3D numeric array, got shape {data.shape} dtype {data.dtype}")
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


def run_register(moving: str | os.PathLike, fixed: str | os.PathLike, out: str | os.PathLike,
                 labels: str | os.PathLike | None = None, model: str | None = None, backend: str = "auto",
                 device: str = "auto") -> dict[str, Any]:
    """Register files; returns {"outputs": [paths], "backend", "seconds", "shape", "max_displacement"}."""
    from deepsim_rt.runtime import Registrator

    mov = read_image(moving)
    fix = read_image(fixed)
    _check_same_grid(mov, fix, "moving and fixed")
    lab = None
    if labels is not None:
        lab = read_image(labels, labels=True)
        _check_same_grid(mov, lab, "moving and labels")
    data_ndim = mov.data.ndim
    if mov.kind == "png" and mov.data.ndim != 2:
        raise ValueError(f"{mov.path}: PNG inputs must be greyscale 2D images, got shape {mov.data.shape}")
    model = model or f"default-{data_ndim}d"
    reg = Registrator.load(model, backend=backend, device=device)
    nd = reg.ndim
    m_arr = _spatial(mov, nd, "moving").astype(np.float32)
    f_arr = _spatial(fix, nd, "fixed").astype(np.float32)
    l_arr = _label_array(lab) if lab is not None else None
    if l_arr is not None:
        l_arr = _spatial(ImageFile(lab.path, lab.kind, l_arr, disk_shape=lab.disk_shape), nd, "labels")

    t0 = time.perf_counter()
    res = reg.register(m_arr, f_arr, l_arr)
    seconds = time.perf_counter() - t0

    # Everything is computed: now write (each file atomically).
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    vec = np.moveaxis(res.displacement, 0, -1).astype(np.float32)  # (*S, ndim): vector on the last axis
    warped = res.warped
    warped_labels = res.warped_labels
    written = []
    if mov.kind == "nifti":
        from deepsim_rt.data.nifti import save_nifti

        shape = fix.disk_shape
        written.append(save_nifti(out / "warped.nii.gz", warped.reshape(shape), fix.affine, fix.header))
        vshape = (*shape, nd)
        _save_nifti_vector(out / "displacement.nii.gz", vec.reshape(vshape), fix.affine, fix.header)
        written.append(out / "displacement.nii.gz")
        if warped_labels is not None:
            written.append(save_nifti(out / "warped_labels.nii.gz", warped_labels.reshape(shape), fix.affine,
                                      fix.header))
    elif mov.kind == "png":
        _save_png(out / "warped.png", warped, mov.png_dtype)
        _save_npy(out / "displacement.npy", vec)
        written += [out / "warped.png", out / "displacement.npy"]
        if warped_labels is not None:
            _save_png(out / "warped_labels.png", warped_labels, warped_labels.dtype)
            written.append(out / "warped_labels.png")
    else:
        _save_npy(out / "warped.npy", warped.reshape(mov.disk_shape).astype(np.float32))
        _save_npy(out / "displacement.npy", vec)
        written += [out / "warped.npy", out / "displacement.npy"]
        if warped_labels is not None:
            _save_npy(out / "warped_labels.npy", warped_labels.reshape(mov.disk_shape))
            written.append(out / "warped_labels.npy")
    return {"outputs": [str(p) for p in written], "backend": reg.backend_name, "device": str(reg.device),
            "seconds": seconds, "shape": tuple(m_arr.shape), "max_displacement": float(np.abs(vec).max()),
            "model": str(reg.source)}


def _cmd(args: argparse.Namespace) -> int:
    info = run_register(args.moving, args.fixed, args.out, labels=args.labels, model=args.model,
                        backend=args.backend, device=args.device)
    print(f"registered {args.moving} -> {args.fixed} ({'x'.join(map(str, info['shape']))}) with {info['model']} "
          f"on {info['backend']} ({info['device']}) in {info['seconds'] * 1000:.1f} ms; max |u| = "
          f"{info['max_displacement']:.2f} voxels")
    for p in info["outputs"]:
        print(f"  wrote {p}")
    return 0


def add_subcommands(subparsers) -> None:
    from deepsim_rt.runtime import BACKENDS

    p = subparsers.add_parser(
        "register", help="register a moving image onto a fixed image (NIfTI, PNG or NPY)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moving", required=True, help="moving image (.nii/.nii.gz, .png, .npy)")
    p.add_argument("--fixed", required=True, help="fixed image, same shape (and NIfTI affine) as moving")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default=None, help="label map of the moving image (warped with nearest neighbour)")
    p.add_argument("--model", default=None,
                   help="default-2d, default-3d or a .safetensors/.onnx/.pt2/.plan path (default: the bundled "
                        "model matching the data's dimensionality)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="runtime backend (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: %(default)s)")
    p.set_defaults(func=_cmd)
