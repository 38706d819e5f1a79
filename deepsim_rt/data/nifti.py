"""NIfTI input/output and a folder data set of user images (+ labels) for registration pairs.

Arrays keep the file's voxel-axis order (i, j, k); the affine maps (i, j, k, 1) to world mm as stored in the file.
Loading never unpickles and reports every failure (missing, not NIfTI, corrupt, truncated, wrong dimensionality)
as ValueError naming the file. Saving writes a temp file in the target folder, then renames it: a failed save
leaves no file behind and never a half-written one.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from deepsim_rt._io import atomic_write

__all__ = ["load_nifti", "save_nifti", "NiftiFolderDataset", "NIFTI_SUFFIXES", "normalize_intensity"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nifti_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES:
        if name.endswith(s):
            return s
    return None


def _stem(path: Path | str) -> str:
    p = Path(path)
    s = _nifti_suffix(p)
    return p.name[: -len(s)] if s else p.name


def load_nifti(path: str | os.PathLike, allow_2d: bool = False):
    """Read a NIfTI-1/2 file (.nii or .nii.gz).

    Returns (data, affine, header): data float32 array (X, Y, Z) — or (X, Y) when allow_2d and the file is 2D —
    with scaling (scl_slope/scl_inter) applied; trailing singleton dims beyond the 3rd (e.g. (X, Y, Z, 1)) are
    dropped; affine float64 (4, 4) voxel -> world mm; header the nibabel header.
    Raises ValueError: missing file, not a NIfTI file, corrupt or truncated data, non-finite affine, 4D+ data with
    more than one volume, 2D data unless allow_2d.
    """
    import nibabel as nib  # lazy: the GPU machine has no nibabel, and only NIfTI users need it

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"NIfTI file not found: {p}")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # ImageFileError, gzip/zlib errors, OSError, ...
        raise ValueError(f"{p} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{p} is a {type(img).__name__}, expected a NIfTI-1/2 image")
    _check_data_size(p, img)
    try:
        # Reading the data is where truncation shows (the header parses fine): force it here.
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except MemoryError:
        raise ValueError(f"{p}: not enough memory to read the image data: {_size_text(img)}") from None
    except Exception as exc:  # EOFError, OSError, ValueError ('buffer is too small'), zlib.error, ...
        raise ValueError(f"{p}: image data is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise ValueError(f"{p}: expected a 3D image (X, Y, Z), got {data.ndim}D data of shape {data.shape} "
                         "(time series / multi-volume files are not supported)")
    if data.ndim == 2 and not allow_2d:
        raise ValueError(f"{p}: expected a 3D image (X, Y, Z), got 2D data of shape {data.shape}; pass "
                         "allow_2d=True to read 2D images")
    if data.ndim < 2:
        raise ValueError(f"{p}: expected a 2D or 3D image, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{p}: affine must be a finite 4x4 matrix, got {affine.tolist()}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{p}: image data contains NaN or Inf")
    return data, affine, img.header


def _data_bytes(img) -> tuple[int, int]:
    """(bytes of the data as stored, bytes of the float32 array load_nifti returns) per the header."""
    n = int(np.prod([int(v) for v in img.header.get_data_shape()], dtype=np.float64))
    return n * np.dtype(img.header.get_data_dtype()).itemsize, n * 4


def _size_text(img) -> str:
    stored, out = _data_bytes(img)
    shape = "x".join(str(int(v)) for v in img.header.get_data_shape())
    return (f"the header claims {shape} {np.dtype(img.header.get_data_dtype())} voxels, which need "
            f"{(stored + out) / 2**30:.1f} GiB to read ({stored / 2**30:.1f} GiB stored + {out / 2**30:.1f} GiB as "
            "float32)")


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_data_size(p: Path, img) -> None:
    """Refuse, before reading, data the header describes but the file (uncompressed) or memory cannot hold: a
    wrong header must say so, not fail inside numpy with an empty MemoryError."""
    stored, out = _data_bytes(img)
    if _nifti_suffix(p) == ".nii":
        offset = int(getattr(img.dataobj, "offset", 0))
        size = p.stat().st_size
        if size < offset + stored:
            raise ValueError(f"{p}: image data is corrupt or truncated: {_size_text(img)}, but the file holds only "
                             f"{max(size - offset, 0)} bytes of data")
    avail = _available_memory()
    if avail is not None and stored + out > avail:
        raise ValueError(f"{p}: {_size_text(img)}, more than the {avail / 2**30:.1f} GiB of memory available "
                         "(a wrong header, or an image too large for this machine)")


def save_nifti(path: str | os.PathLike, array, affine, header=None) -> Path:
    """Write `array` (2D/3D, numeric; a torch tensor is accepted) with `affine` (4, 4) to a .nii or .nii.gz file.

    The on-disk data type is the array's own (the header's stored dtype and scaling are replaced), so a round trip
    returns the same values. `header` fields (voxel sizes, description, units, ...) are kept otherwise. Writes a
    temp file in the same folder, then renames it (atomic on POSIX). Returns the path.
    """
    import nibabel as nib

    p = Path(path)
    suffix = _nifti_suffix(p)
    if suffix is None:
        raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {p.name!r}")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim not in (2, 3) or array.size == 0:
        raise ValueError(f"array must be a non-empty 2D or 3D array, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"array must be numeric (bool/int/uint/float), got dtype {array.dtype}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)  # NIfTI-1 has no float16 code
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite (4, 4) array, got shape {affine.shape}")
    if header is not None and not isinstance(header, nib.Nifti1Header):
        raise ValueError(f"header must be a nibabel Nifti1Header (or None), got {type(header).__name__}")
    if not p.parent.is_dir():
        raise ValueError(f"folder {p.parent} does not exist")
    hdr = header.copy() if header is not None else None
    img_cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = img_cls(array, affine, hdr)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    atomic_write(p, lambda tmp: nib.save(img, tmp))
    return p


def normalize_intensity(x: np.ndarray, method: str = "minmax", percentiles: tuple[float, float] = (0.5, 99.5)):
    """Map intensities to [0, 1]: "minmax" (min -> 0, max -> 1) or "percentile" (clip to the given percentiles
    first; robust to hot voxels). A constant image maps to zeros. Returns float32."""
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, percentiles))
    else:
        raise ValueError(f"normalize must be 'minmax' or 'percentile', got {method!r}")
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _nifti_suffix(p))


def _header_shape(path: Path, allow_2d: bool) -> tuple[int, ...]:
    """Spatial shape from the header only (no data read), with the same squeeze rules as load_nifti."""
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3 or (len(shape) == 2 and not allow_2d) or len(shape) < 2:
        raise ValueError(f"{path}: expected a {'2D or ' if allow_2d else ''}3D image, got shape {shape}")
    return shape


class NiftiFolderDataset(torch.utils.data.Dataset):
    """Registration pairs from a folder of NIfTI images.

    Args:
        root: folder of images (*.nii / *.nii.gz; hidden files ignored).
        pairs_csv: CSV with a header row holding `moving` and `fixed` columns; entries are file names in `root`,
            with or without the .nii/.nii.gz suffix. Either this or `atlas` is required.
        atlas: all-to-atlas pairs: every image of `root` with the atlas. A NIfTI path, or an `Atlas` from
            `load_atlas` (its image/labels tensors; spatial axes must match the files' (i, j, k)).
        atlas_labels: label NIfTI of a path atlas (optional).
        atlas_role: "fixed" (default: every image moves onto the atlas) or "moving" (the atlas moves onto each
            image, as in atlas-based segmentation).
        labels_dir: folder of label maps with the SAME file names as the images (optional; every image needs one).
        normalize: "minmax" or "percentile" (see normalize_intensity); percentiles for the latter.
        allow_2d: accept 2D images.
    Items: dict(moving, fixed (1, *S) float32 in [0, 1]; with labels: moving_labels, fixed_labels (1, *S) int64;
        moving_name, fixed_name str). All images (and labels, and the atlas) must share one spatial shape.
    """

    def __init__(self, root, pairs_csv=None, atlas=None, labels_dir=None, atlas_labels=None,
                 atlas_role: str = "fixed", normalize: str = "minmax",
                 percentiles: tuple[float, float] = (0.5, 99.5), allow_2d: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder not found: {self.root}")
        if normalize not in ("minmax", "percentile"):
            raise ValueError(f"normalize must be 'minmax' or 'percentile', got {normalize!r}")
        if atlas_role not in ("fixed", "moving"):
            raise ValueError(f"atlas_role must be 'fixed' or 'moving', got {atlas_role!r}")
        if pairs_csv is None and atlas is None:
            raise ValueError("give pairs_csv (moving,fixed file names) or atlas (all-to-atlas pairs)")
        if pairs_csv is not None and atlas is not None:
            raise ValueError("give pairs_csv or atlas, not both")
        self.normalize, self.percentiles, self.allow_2d = normalize, tuple(percentiles), allow_2d
        self.images = _list_images(self.root)
        if not self.images:
            raise ValueError(f"no .nii/.nii.gz images in {self.root}")
        self._by_name = {}
        for p in self.images:
            for key in (p.name, _stem(p)):
                if key in self._by_name and self._by_name[key] != p:
                    raise ValueError(f"ambiguous image name {key!r} in {self.root}: {self._by_name[key].name} and "
                                     f"{p.name}")
                self._by_name[key] = p

        self.labels_dir = Path(labels_dir) if labels_dir is not None else None
        self._labels: dict[Path, Path] = {}
        if self.labels_dir is not None:
            if not self.labels_dir.is_dir():
                raise ValueError(f"labels folder not found: {self.labels_dir}")
            missing = [p.name for p in self.images if not (self.labels_dir / p.name).is_file()]
            if missing:
                raise ValueError(f"labels_dir {self.labels_dir} lacks label maps for {missing} (same file names as "
                                 "the images expected)")
            self._labels = {p: self.labels_dir / p.name for p in self.images}

        # Shapes from headers only: every file must agree before any data is read.
        shapes = {p: _header_shape(p, allow_2d) for p in self.images}
        shapes.update({lp: _header_shape(lp, allow_2d) for lp in self._labels.values()})
        self._atlas_image = self._atlas_labels = None
        self.atlas_name = None
        if atlas is not None:
            self._setup_atlas(atlas, atlas_labels, shapes)
        distinct = sorted(set(shapes.values()))
        if len(distinct) > 1:
            detail = ", ".join(f"{p.name if isinstance(p, Path) else p}: {s}" for p, s in shapes.items())
            raise ValueError(f"all images, labels and the atlas must have one spatial shape, got {distinct} ({detail})")
        self.shape = distinct[0]

        if pairs_csv is not None:
            self.pairs = self._read_pairs(Path(pairs_csv))
        else:
            a = "__atlas__"
            self.pairs = [(p, a) if atlas_role == "fixed" else (a, p) for p in self.images]
        # Labels need both sides of every pair. An Atlas object always has labels (used only with labels_dir).
        self.has_labels = self.labels_dir is not None
        if atlas is not None and self.has_labels and self._atlas_labels is None:
            raise ValueError("labels_dir is given but the atlas has no labels: pass atlas_labels (or an Atlas)")
        if atlas_labels is not None and not self.has_labels:
            raise ValueError("atlas_labels is given but labels_dir is not: the images need labels too")

    def _setup_atlas(self, atlas, atlas_labels, shapes: dict) -> None:
        from deepsim_rt.data.atlas import Atlas

        if isinstance(atlas, Atlas):
            if atlas_labels is not None:
                raise ValueError("atlas_labels is for a NIfTI atlas path; an Atlas carries its own labels")
            self._atlas_image = atlas.image[0].to(torch.float32).clone()
            self._atlas_labels = atlas.labels[0].to(torch.int64).clone()
            self.atlas_name = "atlas"
            shapes["atlas"] = tuple(atlas.image.shape[2:])
            return
        ap = Path(atlas)
        data, _, _ = load_nifti(ap, allow_2d=self.allow_2d)
        self._atlas_image = torch.from_numpy(normalize_intensity(data, self.normalize, self.percentiles))[None]
        self.atlas_name = ap.name
        shapes[ap] = data.shape
        if atlas_labels is not None:
            lab = self._load_labels(Path(atlas_labels))
            shapes[Path(atlas_labels)] = tuple(lab.shape[1:])
            self._atlas_labels = lab

    def _read_pairs(self, csv_path: Path) -> list[tuple[Path, Path]]:
        if not csv_path.is_file():
            raise ValueError(f"pairs CSV not found: {csv_path}")
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "moving" not in fields or "fixed" not in fields:
                raise ValueError(f"{csv_path}: header must name 'moving' and 'fixed' columns, got {fields}")
            pairs = []
            for row_no, row in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                names = (row["moving"], row["fixed"])
                found = []
                for n in names:
                    if n not in self._by_name:
                        raise ValueError(f"{csv_path}, line {row_no}: no image {n!r} in {self.root}")
                    found.append(self._by_name[n])
                pairs.append((found[0], found[1]))
        if not pairs:
            raise ValueError(f"{csv_path}: no pairs listed")
        return pairs

    def _load_labels(self, path: Path) -> torch.Tensor:
        data, _, _ = load_nifti(path, allow_2d=self.allow_2d)
        rounded = np.rint(data)
        if not np.array_equal(rounded, data) or (data < 0).any():
            raise ValueError(f"{path}: label maps must hold non-negative integers")
        return torch.from_numpy(rounded.astype(np.int64))[None]

    def _image(self, key) -> torch.Tensor:
        if key == "__atlas__":
            return self._atlas_image
        data, _, _ = load_nifti(key, allow_2d=self.allow_2d)
        return torch.from_numpy(normalize_intensity(data, self.normalize, self.percentiles))[None]

    def _label(self, key) -> torch.Tensor:
        if key == "__atlas__":
            return self._atlas_labels
        return self._load_labels(self._labels[key])

    def _name(self, key) -> str:
        return self.atlas_name if key == "__atlas__" else key.name

    def __len__(self) -> int:
        return len(self.pairs)

    def pair_names(self) -> list[tuple[str, str]]:
        return [(self._name(m), self._name(f)) for m, f in self.pairs]

    def __getitem__(self, k: int) -> dict:
        m, f = self.pairs[k]
        item = {"moving": self._image(m), "fixed": self._image(f),
                "moving_name": self._name(m), "fixed_name": self._name(f)}
        if self.has_labels:
            item["moving_labels"] = self._label(m)
            item["fixed_labels"] = self._label(f)
        return item

