"""ITK's simulated T1 / proton-density brain slices (2D, perfectly aligned across the two contrasts), fetched from
a package registry and cached as 2D NIfTI.

Source: Debian `insighttoolkit5-examples` (the same pinned .deb as the rat-lung pair of data.real_brains, sha256
checked there; usr/share/doc/insighttoolkit5-examples/examples/Data/). Licence: the package's Debian copyright file
puts every upstream file not listed otherwise (`Files: *`, which covers examples/Data/) under Apache-2.0, Copyright
1999-2019 Insight Software Consortium, 2020 NumFOCUS. The package itself does not say how the slices were made; the
ITK Software Guide's registration chapters use them as simulated (BrainWeb-like) T1 / PD slices of one head. No
tissue segmentation of these slices ships in the package (its examples/Data/BrainWeb/ holds only checksum pointers
to ITK's external data), so the benchmark scores them by displacement error, not Dice.

  t1:   BrainT1Slice.png (stored as RGB with three equal channels: one channel kept), 181 x 217, uint8
  pd:   BrainProtonDensitySlice.png, 181 x 217, uint8
  mask: BrainProtonDensitySliceBorder20Mask.png with its 20-pixel border removed (the head, an ellipse), bool
Every PNG's sha256 is pinned (FILES). Arrays are (X, Y) = the PNG's columns, rows (as the rat lung's), 1 mm
pixels (181 x 217 is BrainWeb's 1 mm in-plane grid); NIfTI affine diag(1, 1, 1, 1).

Cache: <cache>/itk_slices/v1/{t1,pd,mask}.nii.gz (cache root: $DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt); the .deb is
shared with the real brains' downloads folder. `python -m deepsim_rt.data.itk_slices` (make itk-data) fills it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepsim_rt._io import atomic_write, file_sha256

__all__ = ["FILES", "ItkSlices", "extract_slices", "ensure_itk_slices", "itk_slices_dir", "main"]

FORMAT_VERSION = "v1"
_DATA = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
# name -> (member of the .deb, sha256 of that member as shipped in insighttoolkit5-examples 5.2.1-5+deb12u1)
FILES: dict[str, tuple[str, str]] = {
    "t1": (_DATA + "BrainT1Slice.png", "43f5d1bdb8130c3327dd4496568aed8c4b5ac4229e1a7d04fad412d55fd1ca18"),
    "pd": (_DATA + "BrainProtonDensitySlice.png", "f23b1322c71248617341bb41b312c60c222eb65c5d06df9d1a093b96e45e1db9"),
    "mask": (_DATA + "BrainProtonDensitySliceBorder20Mask.png",
             "fde1be49ae8d9c65314b583fdc87d83873a85107e85029c503ea8ca7a6ebdaa4"),
}
SHAPE = (181, 217)  # (X, Y), 1 mm
BORDER = 20  # the mask ships for the slices padded by 20 pixels on each side


@dataclass(frozen=True)
class ItkSlices:
    """The cached NIfTI paths; `arrays()` -> (t1, pd, mask): float32, float32, bool, each (181, 217)."""

    t1: Path
    pd: Path
    mask: Path

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import nibabel as nib

        t1, pd, mask = (np.asanyarray(nib.load(str(p)).dataobj) for p in (self.t1, self.pd, self.mask))
        return t1.astype(np.float32), pd.astype(np.float32), mask.astype(bool)


def itk_slices_dir(cache: str | os.PathLike | None = None) -> Path:
    from deepsim_rt._io import cache_root

    return Path(cache if cache is not None else cache_root()) / "itk_slices" / FORMAT_VERSION


def _png(path: Path, name: str) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(path))
    if a.ndim == 3:  # BrainT1Slice.png is RGB with equal channels
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise ValueError(f"{path.name}: expected a grey image (equal RGB channels), got colour")
        a = a[..., 0]
    want = (SHAPE[1] + 2 * BORDER, SHAPE[0] + 2 * BORDER) if name == "mask" else (SHAPE[1], SHAPE[0])
    if a.shape != want:
        raise ValueError(f"{path.name}: expected {want[0]} x {want[1]} pixels (rows x columns), got {a.shape}")
    if name == "mask":
        a = a[BORDER:-BORDER, BORDER:-BORDER] > 0
    return a.T.copy()  # (rows = y, columns = x) -> (X, Y)


def _save(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def extract_slices(deb: str | os.PathLike, out: str | os.PathLike) -> ItkSlices:
    """Extract the three PNGs from the .deb, check each one's sha256 (FILES), write {t1,pd,mask}.nii.gz in OUT.
    ValueError (one line) naming the file, the expected and the found sha256 when a member differs."""
    import subprocess

    deb, out = Path(deb), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".itk-", dir=out) as tmp:
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            raise ValueError("cannot extract the ITK slices: the client `dpkg-deb` is not installed") from None
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr or exc.stdout or "no output").strip().splitlines()[-1]
            raise ValueError(f"cannot extract the ITK slices from {deb.name} (dpkg-deb exit {exc.returncode}): "
                             f"{last}") from None
        arrays = {}
        for name, (member, sha) in FILES.items():
            path = Path(tmp) / member
            if not path.is_file():
                raise ValueError(f"{deb.name}: expected member {member}, not found")
            got = file_sha256(path)
            if got != sha:
                raise ValueError(f"{Path(member).name}: sha256 {got} differs from the expected {sha}")
            arrays[name] = _png(path, name)
    for name, a in arrays.items():
        _save(out / f"{name}.nii.gz", a.astype(np.uint8))
    return ItkSlices(out / "t1.nii.gz", out / "pd.nii.gz", out / "mask.nii.gz")


def ensure_itk_slices(cache: str | os.PathLike | None = None) -> ItkSlices:
    """The cached slices; fetched (apt-get download of the pinned .deb, sha256-checked) and extracted when missing.
    ValueError (one line) when the registry cannot be reached, a client is missing or a checksum differs."""
    from deepsim_rt.data import real_brains as rb

    out = itk_slices_dir(cache)
    got = ItkSlices(out / "t1.nii.gz", out / "pd.nii.gz", out / "mask.nii.gz")
    if all(p.is_file() for p in (got.t1, got.pd, got.mask)):
        return got
    deb = rb.fetch_source(rb.SOURCES["insighttoolkit5-examples"], rb.real_brains_dir(cache).parent / "downloads")
    return extract_slices(deb, out)


def main(argv: list[str] | None = None) -> int:
    """`make itk-data`: fetch and convert the slices into the cache; one line, or one error line."""
    p = argparse.ArgumentParser(prog="python -m deepsim_rt.data.itk_slices", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="cache root (default: $DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = ensure_itk_slices(args.cache)
    except ValueError as exc:
        print(f"itk-data: error: {exc}", file=sys.stderr)
        return 2
    print(f"ITK T1/PD slices ready in {s.t1.parent} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
