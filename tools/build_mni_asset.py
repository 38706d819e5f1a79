"""Build the compact MNI152 asset committed at deepsim_rt/data/assets/mni152_sym09a_1mm.npz.

Source: the ICBM 2009a nonlinear symmetric template (T1 + GM + WM probability maps, 1 mm, 197x233x189) that the
`nilearn` wheel ships as package data (nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz).
The files are read with nibabel from nilearn's package folder; no nilearn fetcher runs and nothing is downloaded.
Note the release: the file names (and the original MNI archive nilearn cites, mni_icbm152_nlin_sym_09a_nifti.zip)
say *2009a symmetric*, not 2009c.

What the builder does (every step deterministic; re-running it gives identical arrays):
1. Loads T1, GM, WM (uint8, 0..255) and checks the template is exactly left/right symmetric (x -> 196 - x).
2. Half-voxel shift in x: the mid-sagittal plane (world x = 0) is voxel column 98, a voxel CENTRE, so no crop of
   even width can be mirror-symmetric. Each output column is the mean of two neighbouring input columns, i.e. the
   template linearly resampled at x = +-0.5, +-1.5, ... mm. Afterwards the mid-plane lies between columns W/2-1 and
   W/2, the grid is exactly mirror-symmetric, and 2x / 4x block downsampling stays symmetric (no block straddles
   the mid-plane). Cost: a [0.5, 0.5] blur along x only.
3. Labels (argmax of three tissue probabilities inside the brain mask):
     brain mask = T1 > 0 (the nilearn T1 is skull-stripped; its support has no holes),
     p_csf = clip(1 - p_gm - p_wm, 0, 1)   -- the template ships no CSF map: inside the brain, what is neither GM
                                              nor WM is CSF (ventricles, sulci, cisterns; T1-dark there: median
                                              T1 0.40 vs 0.66 in GM and 0.84 in WM, measured on the template),
     tissue = argmax(p_csf, p_gm, p_wm) (ties -> first), then split by hemisphere: world x < 0 -> left, > 0 -> right
     (no voxel lies on x = 0 after step 2).
   Labels: 0 background, 1 left CSF, 2 left GM, 3 left WM, 4 right CSF, 5 right GM, 6 right WM (mirror: l <-> l+3).
   No finer regions: a "ventricles" split tried from distance-to-surface + connected components leaked into the
   interhemispheric and Sylvian fissures, so it would not be an honest label.
4. Crop: the bounding box of the labels (brain), centred, padded/cropped to multiples of 32 per axis
   (-> 160 x 192 x 160 at 1 mm; 80 x 96 x 80 at 2 mm and 40 x 48 x 40 at 4 mm, all divisible by 8). The x crop is
   centred on the mid-plane. Voxels outside the template are zero/background.
5. Axis order: arrays are stored in the package's tensor order (D, H, W) = (z, y, x) = (inferior->superior,
   posterior->anterior, left->right); `affine` maps a tensor index (d, h, w, 1) to RAS+ world mm.
6. Saves uint8 `t1` and `labels`, `label_names` (unicode array), `affine` (float64 4x4), `voxel_size` (float64 (3,),
   mm, tensor order), `mirror_labels` (label after an x flip), `source` (file names + nilearn version), written to a
   temp file and renamed. Loadable with np.load(..., allow_pickle=False).

Usage: python tools/build_mni_asset.py [--out PATH] [--check]
  --check rebuilds in memory and compares with the committed asset (exit 1 on any difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "deepsim_rt" / "data" / "assets" / "mni152_sym09a_1mm.npz"
FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
LABEL_NAMES = ("background", "csf_left", "gm_left", "wm_left", "csf_right", "gm_right", "wm_right")
MIRROR = (0, 4, 5, 6, 1, 2, 3)  # label after a left/right flip
MULTIPLE = 32  # 1 mm size multiple: 2 mm and 4 mm volumes then divide by 16 and 8
FORMAT_VERSION = 1


def nilearn_data_dir() -> Path:
    """nilearn's package-data folder, found without importing nilearn (importing it is slow and not needed)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("nilearn is not installed: `pip install nilearn` (only this tool needs it)")
    return Path(spec.origin).parent / "datasets" / "data"


def _nilearn_version() -> str:
    from importlib.metadata import version

    return version("nilearn")


def load_template(data_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Returns {'t1','gm','wm'} uint8 arrays in file order (x, y, z) and the shared affine."""
    import nibabel as nib

    arrays, affine = {}, None
    for key, name in FILES.items():
        img = nib.load(str(data_dir / name))
        arr = np.asanyarray(img.dataobj)
        if arr.dtype != np.uint8 or arr.shape != (197, 233, 189):
            raise ValueError(f"{name}: expected uint8 (197, 233, 189), got {arr.dtype} {arr.shape}")
        if affine is None:
            affine = img.affine.copy()
        elif not np.array_equal(affine, img.affine):
            raise ValueError(f"{name}: affine differs from the T1's")
        arrays[key] = arr
    # The builder relies on exact symmetry (voxel 98 at world x = 0, axes aligned, 1 mm): check, don't assume.
    expected = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]], dtype=float)
    if not np.array_equal(affine, expected):
        raise ValueError(f"unexpected template affine {affine.tolist()}")
    for key, arr in arrays.items():
        if not np.array_equal(arr, arr[::-1]):
            raise ValueError(f"{key} is not left/right symmetric; the label split assumes it is")
    return arrays, affine


def _centred_window(lo: int, hi: int, size: int) -> int:
    """Start index of a window of `size` centred on the inclusive range [lo, hi] (may be < 0: padded)."""
    return int(np.floor((lo + hi) / 2.0 - (size - 1) / 2.0))


def _take(arr: np.ndarray, axis: int, start: int, size: int) -> np.ndarray:
    """arr[start:start+size] along axis, zero-padded where the window leaves the array."""
    n = arr.shape[axis]
    lo, hi = max(start, 0), min(start + size, n)
    out_shape = list(arr.shape)
    out_shape[axis] = size
    out = np.zeros(out_shape, dtype=arr.dtype)
    src = [slice(None)] * arr.ndim
    dst = [slice(None)] * arr.ndim
    src[axis] = slice(lo, hi)
    dst[axis] = slice(lo - start, hi - start)
    out[tuple(dst)] = arr[tuple(src)]
    return out


def build_arrays(data_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The asset's arrays, computed from nilearn's template files. Deterministic."""
    data_dir = Path(data_dir) if data_dir is not None else nilearn_data_dir()
    raw, affine = load_template(data_dir)
    nx = raw["t1"].shape[0]
    mid = int(round(-affine[0, 3]))  # voxel column of world x = 0 (98)

    # Step 2: half-voxel shift in x. Sums of two uint8 fit in uint16; column c of `pair` is world x = c - mid + 0.5.
    pair = {k: v[:-1].astype(np.uint16) + v[1:].astype(np.uint16) for k, v in raw.items()}
    # T1 mean of the two columns, rounded half up (sums are symmetric, so any fixed rounding keeps symmetry).
    t1 = ((pair["t1"] + 1) // 2).astype(np.uint8)
    gm = pair["gm"].astype(np.float32) / 510.0
    wm = pair["wm"].astype(np.float32) / 510.0
    brain = pair["t1"] > 0

    # Step 3: tissue argmax inside the brain; CSF is the residual probability.
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1  # 1 CSF, 2 GM, 3 WM
    tissue[~brain] = 0
    x_world = np.arange(nx - 1, dtype=np.float64) - mid + 0.5
    right = (x_world > 0)[:, None, None]
    labels = np.where(right & (tissue > 0), tissue + 3, tissue).astype(np.uint8)

    # Step 4: crop. x: centred on the mid-plane (between pair columns mid-1 and mid), y/z: centred on the brain.
    nz = np.argwhere(labels > 0)
    lo, hi = nz.min(axis=0), nz.max(axis=0)
    half_x = max(mid - lo[0], hi[0] - (mid - 1))
    size = [int(np.ceil(2 * half_x / MULTIPLE) * MULTIPLE)]
    size += [int(np.ceil((hi[a] - lo[a] + 1) / MULTIPLE) * MULTIPLE) for a in (1, 2)]
    start = [mid - size[0] // 2, _centred_window(lo[1], hi[1], size[1]), _centred_window(lo[2], hi[2], size[2])]

    def crop(a: np.ndarray) -> np.ndarray:
        for axis in range(3):
            a = _take(a, axis, start[axis], size[axis])
        return a

    t1_c, labels_c = crop(t1), crop(labels)
    # File order (x, y, z) -> tensor order (z, y, x).
    t1_c = np.ascontiguousarray(t1_c.transpose(2, 1, 0))
    labels_c = np.ascontiguousarray(labels_c.transpose(2, 1, 0))

    # World mm of tensor index (d, h, w): x = w + start_x - mid + 0.5, y = h + start_y + y0, z = d + start_z + z0.
    crop_affine = np.zeros((4, 4), dtype=np.float64)
    crop_affine[0, 2] = 1.0
    crop_affine[1, 1] = 1.0
    crop_affine[2, 0] = 1.0
    crop_affine[0, 3] = start[0] - mid + 0.5
    crop_affine[1, 3] = start[1] + affine[1, 3]
    crop_affine[2, 3] = start[2] + affine[2, 3]
    crop_affine[3, 3] = 1.0

    return {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "t1": t1_c,
        "labels": labels_c,
        "label_names": np.array(LABEL_NAMES),
        "mirror_labels": np.array(MIRROR, dtype=np.uint8),
        "affine": crop_affine,
        "voxel_size": np.ones(3, dtype=np.float64),
        "source": np.array(
            f"ICBM 2009a nonlinear symmetric template from nilearn {_nilearn_version()} package data: "
            + ", ".join(FILES.values())
            + "; built by tools/build_mni_asset.py (see its docstring)"
        ),
    }


def save_asset(arrays: dict[str, np.ndarray], out: Path) -> None:
    """np.savez_compressed to a temp file in the same folder, then rename (never a half-written asset)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def compare(arrays: dict[str, np.ndarray], path: Path) -> list[str]:
    """Names of arrays that differ between `arrays` and the asset at `path` (source string excluded: versions)."""
    with np.load(path, allow_pickle=False) as saved:
        keys = set(saved.files) | set(arrays)
        bad = []
        for k in sorted(keys - {"source"}):
            if k not in saved.files or k not in arrays:
                bad.append(k)
            elif saved[k].dtype != arrays[k].dtype or not np.array_equal(saved[k], arrays[k]):
                bad.append(k)
        return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="compare a fresh build with --out; write nothing")
    args = parser.parse_args(argv)
    arrays = build_arrays()
    if args.check:
        bad = compare(arrays, args.out)
        print("identical" if not bad else f"differs: {bad}")
        return 1 if bad else 0
    save_asset(arrays, args.out)
    counts = np.bincount(arrays["labels"].ravel(), minlength=len(LABEL_NAMES))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), shape {arrays['t1'].shape}")
    for name, c in zip(LABEL_NAMES, counts, strict=True):
        print(f"  {name:11s} {c:9d} voxels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
