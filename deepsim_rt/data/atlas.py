"""The bundled MNI152 atlas (T1 + tissue labels) at 1, 2 or 4 mm, as a 3D volume or an axial 2D slice.

The asset `assets/mni152_sym09a_1mm.npz` is built once by `tools/build_mni_asset.py` from the ICBM 2009a nonlinear
symmetric template that nilearn ships (licence: `assets/MNI152_LICENSE.txt`); loading it needs only numpy, never
nilearn, and never unpickles (allow_pickle=False).

Grid (tensor order, see the builder's docstring):
  1 mm: (D, H, W) = 160 x 192 x 160,  2 mm: 80 x 96 x 80,  4 mm: 40 x 48 x 40 (every size divisible by 8 at 2/4 mm)
  D = z (inferior -> superior), H = y (posterior -> anterior), W = x (left -> right); the mid-sagittal plane lies
  between columns W/2 - 1 and W/2, so `labels.flip(-1)` equals the labels with left and right swapped.
Labels: 0 background, 1 csf_left, 2 gm_left, 3 wm_left, 4 csf_right, 5 gm_right, 6 wm_right.
Downsampling: the image by averaging f^3 blocks; the labels by MAJORITY vote in each block (ties -> the lowest label
value), which keeps thin structures better than nearest-at-centre (with an even factor there is no centre voxel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Atlas",
    "load_atlas",
    "atlas_shape",
    "LABEL_NAMES",
    "MIRROR_LABELS",
    "ASSET_PATH",
    "VOXEL_SIZES",
    "DEFAULT_AXIAL_Z_MM",
    "default_slice_index",
]

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "mni152_sym09a_1mm.npz"
LABEL_NAMES = ("background", "csf_left", "gm_left", "wm_left", "csf_right", "gm_right", "wm_right")
MIRROR_LABELS = (0, 4, 5, 6, 1, 2, 3)  # label value after a left/right flip
VOXEL_SIZES = (1, 2, 4)
# Axial plane of the default 2D slice: world z = +8 mm passes through the bodies of the lateral ventricles, the
# basal ganglia and the thalami (the most informative single slice for CSF/GM/WM Dice).
DEFAULT_AXIAL_Z_MM = 8.0
_ASSET_KEYS = ("format_version", "t1", "labels", "label_names", "mirror_labels", "affine", "voxel_size")


@dataclass(frozen=True)
class Atlas:
    """The atlas at one resolution.

    image: float32 (1, 1, *spatial) in [0, 1] (T1 / 255). labels: int64 (1, 1, *spatial), values 0..len(names)-1.
    label_names: one name per label value. affine: float64 (4, 4), tensor index -> RAS+ world mm; for 2D the index
    is (h, w, k, 1) with k along the slice normal (k = 0 is the slice). voxel_size: mm (isotropic).
    slice_index: the axial slice (index along D at this voxel size) for 2D, None for 3D.
    """

    image: torch.Tensor
    labels: torch.Tensor
    label_names: tuple[str, ...]
    affine: np.ndarray
    voxel_size: float
    slice_index: int | None = None

    @property
    def ndim(self) -> int:
        return self.image.dim() - 2

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[2:])


def _read_asset(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"atlas asset not found at {path}; rebuild it with `python tools/build_mni_asset.py`")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _ASSET_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"atlas asset {path} lacks arrays {missing}; rebuild it with tools/build_mni_asset.py")
            return {k: z[k] for k in _ASSET_KEYS}
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError, ...: a damaged file
        raise ValueError(f"atlas asset {path} is unreadable ({type(exc).__name__}: {exc})") from exc


@functools.lru_cache(maxsize=1)
def _asset() -> dict[str, np.ndarray]:
    raw = _read_asset(ASSET_PATH)
    if int(raw["format_version"]) != 1:
        raise ValueError(f"atlas asset format_version 1 expected, got {int(raw['format_version'])}")
    if tuple(str(s) for s in raw["label_names"]) != LABEL_NAMES:
        raise ValueError(f"atlas asset label names {raw['label_names'].tolist()} != expected {LABEL_NAMES}")
    for v in raw.values():
        v.setflags(write=False)  # cached: callers get copies, nobody mutates the cache
    return raw


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    d, h, w = (s // f for s in a.shape)
    return a.reshape(d, f, h, f, w, f).mean(axis=(1, 3, 5), dtype=np.float64)


def _block_majority(labels: np.ndarray, f: int, num_labels: int) -> np.ndarray:
    d, h, w = (s // f for s in labels.shape)
    blocks = labels.reshape(d, f, h, f, w, f)
    counts = np.stack([(blocks == c).sum(axis=(1, 3, 5), dtype=np.int32) for c in range(num_labels)])
    return np.argmax(counts, axis=0).astype(np.uint8)  # argmax takes the first maximum: ties -> lowest label


@functools.lru_cache(maxsize=len(VOXEL_SIZES))
def _volume(voxel_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 [0,1], labels uint8, affine) at voxel_size mm, tensor order (D, H, W). Cached, read-only."""
    raw = _asset()
    image = raw["t1"].astype(np.float64) / 255.0
    labels = raw["labels"]
    f = voxel_size
    if f > 1:
        image = _block_mean(image, f)
        labels = _block_majority(labels, f, len(LABEL_NAMES))
    # Block (i) covers fine voxels f*i .. f*i + f-1, so its centre is at fine index f*i + (f-1)/2.
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2.0
    affine = raw["affine"] @ scale
    out = (image.astype(np.float32), np.ascontiguousarray(labels), affine)
    for a in out:
        a.setflags(write=False)
    return out


def _check_voxel_size(voxel_size) -> int:
    if isinstance(voxel_size, bool) or not isinstance(voxel_size, (int, float)) or voxel_size not in VOXEL_SIZES:
        raise ValueError(f"voxel_size must be one of {VOXEL_SIZES} (mm), got {voxel_size!r}")
    return int(voxel_size)


def atlas_shape(ndim: int = 3, voxel_size: int = 2) -> tuple[int, ...]:
    """Spatial shape of `load_atlas(ndim, voxel_size)` without building tensors: 3D (D, H, W), 2D (H, W)."""
    f = _check_voxel_size(voxel_size)
    shape = tuple(s // f for s in _asset()["t1"].shape)
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    return shape if ndim == 3 else shape[1:]


def default_slice_index(voxel_size: int = 2) -> int:
    """Index along D (at voxel_size mm) of the axial slice nearest world z = DEFAULT_AXIAL_Z_MM."""
    _, _, affine = _volume(_check_voxel_size(voxel_size))
    # World z of index d is affine[2, 0] * d + affine[2, 3] (the D axis is world z).
    return int(round((DEFAULT_AXIAL_Z_MM - affine[2, 3]) / affine[2, 0]))


def load_atlas(ndim: int = 3, voxel_size: int = 2, slice_index: int | None = None) -> Atlas:
    """The bundled MNI152 atlas.

    Args:
        ndim: 3 -> volume (1, 1, D, H, W); 2 -> axial slice (1, 1, H, W).
        voxel_size: 1, 2 or 4 mm (image block-averaged, labels by block majority).
        slice_index: 2D only, index along D at this voxel size; default `default_slice_index(voxel_size)`
            (world z = +8 mm: lateral ventricles, basal ganglia, thalami).
    Returns an Atlas with fresh tensors (safe to modify).
    """
    if isinstance(ndim, bool) or ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    f = _check_voxel_size(voxel_size)
    image, labels, affine = _volume(f)
    if ndim == 3:
        if slice_index is not None:
            raise ValueError(f"slice_index is for ndim=2 only, got slice_index={slice_index!r} with ndim=3")
        return Atlas(
            image=torch.from_numpy(image.copy())[None, None],
            labels=torch.from_numpy(labels.astype(np.int64))[None, None],
            label_names=LABEL_NAMES,
            affine=affine.copy(),
            voxel_size=float(f),
        )
    depth = image.shape[0]
    if slice_index is None:
        slice_index = default_slice_index(f)
    if isinstance(slice_index, bool) or not isinstance(slice_index, (int, np.integer)) or not 0 <= slice_index < depth:
        raise ValueError(f"slice_index must be an int in [0, {depth}) at {f} mm, got {slice_index!r}")
    slice_index = int(slice_index)
    # (h, w, k, 1) -> (d = slice_index + k, h, w, 1) -> world.
    perm = np.zeros((4, 4))
    perm[0, 2] = 1.0
    perm[1, 0] = 1.0
    perm[2, 1] = 1.0
    perm[0, 3] = slice_index
    perm[3, 3] = 1.0
    return Atlas(
        image=torch.from_numpy(image[slice_index].copy())[None, None],
        labels=torch.from_numpy(labels[slice_index].astype(np.int64))[None, None],
        label_names=LABEL_NAMES,
        affine=affine @ perm,
        voxel_size=float(f),
        slice_index=slice_index,
    )
