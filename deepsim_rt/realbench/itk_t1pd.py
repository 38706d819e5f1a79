"""Cross-contrast registration in 2D on ITK's simulated T1 / PD slices (data.itk_slices), scored against a known field.

    python -m deepsim_rt.realbench.itk_t1pd --out OUT [--seeds 8] [--fixed pd] [--methods all] [--md PATH]

The two slices are aligned by construction, so the truth is known: for each seed a smooth random displacement w
(fixed -> moving, voxels, `smooth_field`) is drawn, the moving image is the T1 slice resampled so that
moving(x + w(x)) = T1(x) (w inverted by fixed-point iteration, `invert_field`; its residual is recorded), and the
fixed image is the PD slice (`--fixed t1`: the T1 slice itself, the same-contrast control). Every method returns a
displacement u on the fixed grid (moving sampled at x + u(x)); the score is the mean end-point error |u - w| in mm
inside the head mask (`mean_epe`), and folding % (det J <= 0) inside it (`folding_pct`). No tissue segmentation of
these slices ships, so there is no Dice. The slices are given in the 2D nets' training axis order (`model_axes`).

Ours run through the file pipeline (`run_register`: 2D NIfTI at 1 mm, the net at its training spacing, refinement
on the model grid) exactly as `deepsim-rt register --model M [--refine 25 --refine-loss L]`; ANTs SyN through
antspyx with its defaults (Mattes mutual information for the affine and the SyN stages, random_seed 1), its
displacement read back by warping coordinate images. One thread; one JSON per (fixed, seed, method) under OUT:
resumable.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write

__all__ = ["smooth_field", "invert_field", "warp_image", "mean_epe", "folding_pct", "model_axes", "METHODS", "run",
           "markdown", "main"]

FIELD_SIGMA_PX = 12.0  # Gaussian smoothing of the white noise (px = mm): gyri-scale, max |grad w| ~ 0.5 at 5 mm
FIELD_MAX_MM = 5.0  # largest displacement in the head: inter-subject scale of a 2D slice
_SYNTH = "deepsim_rt/weights/synth-2d/"
# name -> (model: a bundled name or a .safetensors path relative to the repository; refine loss or None; ANTs)
METHODS: dict[str, tuple[str | None, str | None]] = {
    "none": (None, None),
    "net:default-2d": ("default-2d", None),
    "net:synth-2d/reg": (_SYNTH + "reg.safetensors", None),
    "net:synth-2d/reg_ncc": (_SYNTH + "reg_ncc.safetensors", None),
    "net:synth-2d/reg_mse": (_SYNTH + "reg_mse.safetensors", None),
    **{f"default-2d+refine:{loss}": ("default-2d", loss) for loss in ("deepsim_seg", "ncc", "mind", "nmi")},
    **{f"synth-2d/reg+refine:{loss}": (_SYNTH + "reg.safetensors", loss)
       for loss in ("deepsim_seg", "ncc", "mind", "nmi")},
    "ants:SyN": (None, None),
}


def smooth_field(shape: tuple[int, int], seed: int, max_mm: float = FIELD_MAX_MM,
                 sigma_px: float = FIELD_SIGMA_PX, mask: np.ndarray | None = None) -> np.ndarray:
    """A seeded smooth random displacement (2, X, Y) float64 in voxels (1 mm): white noise per component, Gaussian-
    smoothed (sigma_px), scaled so that the largest |w| inside `mask` (everywhere when None) is max_mm."""
    from scipy.ndimage import gaussian_filter

    if max_mm < 0 or sigma_px <= 0:
        raise ValueError(f"smooth_field: need max_mm >= 0 and sigma_px > 0, got {max_mm!r}, {sigma_px!r}")
    rng = np.random.default_rng(seed)
    w = np.stack([gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect") for _ in range(2)])
    mag = np.sqrt((w ** 2).sum(0))
    peak = float(mag[mask].max() if mask is not None else mag.max())
    return w * (max_mm / peak) if peak > 0 else w


def _sample(img: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    return map_coordinates(img, coords, order=order, mode="nearest")


def warp_image(img: np.ndarray, u: np.ndarray, order: int = 1) -> np.ndarray:
    """img (X, Y) sampled at x + u(x): u (2, X, Y) voxels -> (X, Y) (border values outside)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in img.shape), indexing="ij")).astype(np.float64)
    return _sample(img, grid + u, order)


def invert_field(w: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, float]:
    """z with y + z(y) = (id + w)^-1(y), by the fixed point z(y) = -w(y + z(y)); -> (z (2, X, Y), residual: max over
    the grid of |z(y) + w(y + z(y))| in voxels)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in w.shape[1:]), indexing="ij")).astype(np.float64)
    z = -w.copy()
    for _ in range(iterations):
        z = -np.stack([_sample(w[c], grid + z) for c in range(2)])
    res = z + np.stack([_sample(w[c], grid + z) for c in range(2)])
    return z, float(np.sqrt((res ** 2).sum(0)).max())


def mean_epe(u: np.ndarray, truth: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0)) -> float:
    """Mean end-point error in mm: mean over mask of |(u - truth) * spacing|; u, truth (nd, *S) voxels, mask (*S)."""
    u, truth, mask = np.asarray(u, dtype=np.float64), np.asarray(truth, dtype=np.float64), np.asarray(mask, bool)
    if u.shape != truth.shape or u.shape[1:] != mask.shape or len(spacing) != u.shape[0]:
        raise ValueError(f"mean_epe: expected u and truth (nd, *S) with mask (*S) and nd spacings, got {u.shape}, "
                         f"{truth.shape}, {mask.shape}, {len(spacing)} spacings")
    if not mask.any():
        raise ValueError("mean_epe: the mask is empty")
    d = (u - truth) * np.asarray(spacing, dtype=np.float64).reshape(-1, *([1] * mask.ndim))
    return float(np.sqrt((d ** 2).sum(0))[mask].mean())


def model_axes(a: np.ndarray) -> np.ndarray:
    """A slice of data.itk_slices, (X, Y) = (PNG columns, rows top to bottom), -> the 2D nets' training axis order
    (A, R): axis 0 = the rows bottom to top (the PNG's top is anterior), axis 1 = the columns; (217, 181). 2D NIfTI
    files are not reoriented by the pipeline, and the nets were trained on (A, R) slices of the atlas: on 3 fields,
    T1 -> T1, default-2d's EPE was 1.35 mm with the slices as stored and 1.24 mm in this order."""
    return np.ascontiguousarray(np.flip(a, 1).T)


def folding_pct(u: np.ndarray, mask: np.ndarray) -> float:
    """% of the voxels in `mask` with det J(x + u(x)) <= 0 (u (2, *S) voxels; central differences on the full grid).
    Inside the head only: ANTs' field read back through coordinate images is 0 where it maps outside the image,
    which would count as folding at the border of the field of view."""
    import torch

    from deepsim_rt.evaluate.metrics import jacobian_determinant

    det = jacobian_determinant(torch.from_numpy(u.astype(np.float32))[None])[0].numpy()
    return float((det[np.asarray(mask, bool)] <= 0).mean() * 100.0)


def _save(path: Path, a: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(a.astype(np.float32), np.eye(4)), str(path))


def _ours(model: str, loss: str | None, mov: Path, fix: Path, work: Path) -> np.ndarray:
    import nibabel as nib

    from deepsim_rt.pipeline.register import run_register
    from deepsim_rt.refine.config import RefineConfig

    root = Path(__file__).resolve().parents[2]
    if model.endswith(".safetensors"):
        model = str(root / model)
    refine = None if loss is None else RefineConfig(loss=loss, progress=False)
    run_register(mov, fix, work, model=model, refine=refine, overwrite=True, outputs=["displacement"])
    d = np.asanyarray(nib.load(str(work / "displacement.nii.gz")).dataobj).astype(np.float64)
    return np.moveaxis(d, -1, 0)


def _ants_syn(mov: np.ndarray, fix: np.ndarray, work: Path) -> np.ndarray:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    f, m = ants.from_numpy(fix.astype(np.float32)), ants.from_numpy(mov.astype(np.float32))
    r = ants.registration(f, m, type_of_transform="SyN", outprefix=str(work / "ants_"), random_seed=1)
    # the displacement, exactly: warp the coordinate images (linear in x, so linear interpolation is exact)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in fix.shape), indexing="ij")).astype(np.float32)
    mapped = [ants.apply_transforms(f, ants.from_numpy(grid[c]), r["fwdtransforms"], interpolator="linear").numpy()
              for c in range(2)]
    return np.stack(mapped).astype(np.float64) - grid


def run(out: str | os.PathLike, seeds: int = 8, fixed: str = "pd", methods: list[str] | None = None,
        cache: str | os.PathLike | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    """Every (seed, method) not yet done under OUT/<fixed>/seed<k>/<method>.json; -> every row there."""
    import torch

    from deepsim_rt.data.itk_slices import ensure_itk_slices

    if fixed not in ("pd", "t1"):
        raise ValueError(f"fixed must be pd or t1, got {fixed!r}")
    methods = list(METHODS) if methods is None else methods
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    torch.set_num_threads(1)
    t1, pd, mask = (model_axes(a) for a in ensure_itk_slices(cache).arrays())
    fix_img = pd if fixed == "pd" else t1
    rows = []
    for seed in range(seeds):
        w = smooth_field(t1.shape, seed, mask=mask)
        z, residual = invert_field(w)
        mov_img = warp_image(t1, z)
        folder = Path(out) / fixed / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in methods:
            dest = folder / f"{name.replace(':', '_').replace('/', '_')}.json"
            if dest.is_file():
                rows.append(json.loads(dest.read_text()))
                continue
            model, loss = METHODS[name]
            row: dict[str, Any] = {"fixed": fixed, "seed": seed, "method": name, "field_max_mm": FIELD_MAX_MM,
                                   "field_sigma_px": FIELD_SIGMA_PX, "inverse_residual_vox": residual,
                                   "truth_mean_mm": mean_epe(np.zeros_like(w), w, mask)}
            with tempfile.TemporaryDirectory(prefix=".work-", dir=folder) as tmp:
                work = Path(tmp)
                _save(work / "moving.nii.gz", mov_img)
                _save(work / "fixed.nii.gz", fix_img)
                t0, c0 = time.perf_counter(), time.process_time()
                if name == "none":
                    u = np.zeros_like(w)
                elif name == "ants:SyN":
                    u = _ants_syn(mov_img, fix_img, work)
                else:
                    u = _ours(model, loss, work / "moving.nii.gz", work / "fixed.nii.gz", work / "out")
                row.update(wall_seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
            row.update(epe_mm=mean_epe(u, w, mask), folding_percent=folding_pct(u, mask), loadavg=list(os.getloadavg()),
                       finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            text = json.dumps(row, indent=1) + "\n"
            atomic_write(dest, lambda tmp, text=text: Path(tmp).write_text(text))
            rows.append(row)
            if verbose:
                print(f"[{fixed} seed {seed}] {name:32s} EPE {row['epe_mm']:.3f} mm (truth mean "
                      f"{row['truth_mean_mm']:.2f}), folding {row['folding_percent']:.3f} %, "
                      f"{row['cpu_seconds']:.1f} s CPU", flush=True)
    return rows


def _wilcoxon(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import wilcoxon

    x, y = np.asarray(a), np.asarray(b)
    if len(x) < 5 or np.allclose(x, y):
        return None
    return float(wilcoxon(x, y).pvalue)


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per fixed contrast: EPE mean +- sd over seeds, folding max, CPU s; Wilcoxon p vs NCC refinement."""
    lines = []
    for fixed in ("pd", "t1"):
        sel = [r for r in rows if r["fixed"] == fixed]
        if not sel:
            continue
        seeds = sorted({r["seed"] for r in sel})
        lines += [f"### T1 moving -> {'PD' if fixed == 'pd' else 'T1 (same-contrast control)'} fixed, "
                  f"{len(seeds)} fields", "",
                  "| method | EPE mm (mean ± sd) | n | folding % (max) | CPU s (mean) | Wilcoxon p vs the same "
                  "start's NCC refinement |", "|---|---|---|---|---|---|"]
        for m in METHODS:
            rs = sorted((r for r in sel if r["method"] == m), key=lambda r: r["seed"])
            if not rs:
                continue
            e = [r["epe_mm"] for r in rs]
            p = None
            if "+refine:" in m and not m.endswith(":ncc"):
                ref = {r["seed"]: r["epe_mm"] for r in sel if r["method"] == m.rsplit(":", 1)[0] + ":ncc"}
                both = [(r["epe_mm"], ref[r["seed"]]) for r in rs if r["seed"] in ref]
                p = _wilcoxon([a for a, _ in both], [b for _, b in both]) if both else None
            lines.append(f"| {m} | {np.mean(e):.3f} ± {np.std(e):.3f} | {len(rs)} | "
                         f"{max(r['folding_percent'] for r in rs):.3f} | {np.mean([r['cpu_seconds'] for r in rs]):.1f}"
                         f" | {'—' if p is None else f'{p:.2g}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepsim_rt.realbench.itk_t1pd", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder (one JSON per fixed, seed, method)")
    p.add_argument("--seeds", type=int, default=8, help="number of random fields (seeds 0..N-1)")
    p.add_argument("--fixed", default="pd", choices=("pd", "t1"), help="fixed slice (t1: same-contrast control)")
    p.add_argument("--methods", default="all", help=f"comma list or all: {', '.join(METHODS)}")
    p.add_argument("--cache", default=None, help="cache root (default: $DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt)")
    p.add_argument("--md", default=None, help="write the tables (markdown) of every row under OUT here")
    a = p.parse_args(argv)
    methods = None if a.methods == "all" else [m.strip() for m in a.methods.split(",") if m.strip()]
    run(a.out, a.seeds, a.fixed, methods, a.cache)
    if a.md:
        rows = [json.loads(q.read_text()) for q in sorted(Path(a.out).glob("*/seed*/*.json"))]
        text = markdown(rows)
        atomic_write(Path(a.md), lambda tmp: Path(tmp).write_text(text))
        print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
