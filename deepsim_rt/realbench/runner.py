"""Run registration methods on real-brain pairs and score them; one JSON per (pair, method), resumable.

Ours go through the file pipeline exactly as a user's `deepsim-rt register` call (run_register: read the NIfTI files
as shipped, affine pre-alignment, the network at its training spacing, refinement, labels warped with genericLabel,
QC); ANTs through antspyx (`ants.registration`, labels with `genericLabel`). Both are timed on one thread
(torch.set_num_threads(1), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1; wall seconds of the registration call and the
process's CPU seconds over it, which the load of a shared machine barely moves) and scored on the fixed image's grid:
  Dice over the 12 shared structures (real_brains.STRUCTURES) and, for fsaverage <-> cat12, over every label id both
  maps carry; local NCC (window 9) of warped vs fixed inside the fixed brain mask (the fixed foreground where it
  has none: s1, the rat lung); folding % (det J <= 0 over the fixed grid).
Grids: "1mm" = the files as shipped; "2mm" / "4mm" = every 3D file block-downsampled x2 / x4 (real_brains.downsampled)
so that every method fits the time on 2 shared cores; 2D pairs always run as shipped.
Layout: OUT/<grid>/<pair>/<method>.json (+ .npz: one axial slice of fixed / warped / labels for the figures).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write
from deepsim_rt.data import real_brains as rb
from deepsim_rt.evaluate.real_metrics import (
    foreground_mask,
    masked_local_ncc,
    mean_dice,
    structure_dice,
)
from deepsim_rt.refine.config import LAM_SCALE

__all__ = ["PairSpec", "Method", "PAIRS", "PAIR_SETS", "METHODS", "GRIDS", "SYNTH3D_DIR", "select_pairs",
           "select_methods", "file_method", "run_benchmark", "run_one"]

GRIDS = {"1mm": 1, "2mm": 2, "4mm": 4}
# The 3D nets trained on brains synthesized from label maps (issue 19): not the bundled default, loaded by path.
SYNTH3D_DIR = Path(__file__).resolve().parents[1] / "weights" / "synth-3d"
_MODEL_SUFFIXES = (".safetensors", ".onnx", ".pt2")


@dataclass(frozen=True)
class PairSpec:
    """moving -> fixed; `*_part` is "image" (the brain) or "head"; score: "dice" (the 12 structures), "dice+full"
    (also the full shared aseg/IBSR set) or "ncc" (no labels on one side)."""

    moving: str
    fixed: str
    moving_part: str = "image"
    fixed_part: str = "image"
    score: str = "dice"
    tier: str = "labelled"

    @property
    def name(self) -> str:
        m = self.moving + ("_head" if self.moving_part == "head" else "")
        f = self.fixed + ("_head" if self.fixed_part == "head" else "")
        return f"{m}->{f}"


def _pairs() -> dict[str, PairSpec]:
    out: list[PairSpec] = []
    for m in rb.LABELLED:
        for f in rb.LABELLED:
            if m != f:
                full = {m, f} == {"fsaverage", "cat12"}
                out.append(PairSpec(m, f, score="dice+full" if full else "dice", tier="labelled"))
    for other in ("fsaverage", "cat12"):  # Colin27's head (ch2, with skull) as moving and as fixed
        out.append(PairSpec("colin27", other, moving_part="head", tier="heads"))
        out.append(PairSpec(other, "colin27", fixed_part="head", tier="heads"))
    for other in rb.LABELLED:  # S1 (a real head, no labels) both ways
        out.append(PairSpec("s1", other, score="ncc", tier="unlabelled"))
        out.append(PairSpec(other, "s1", score="ncc", tier="unlabelled"))
    for m in (*rb.LABELLED, "s1"):  # each brain -> the bundled MNI152
        out.append(PairSpec(m, "mni152", score="ncc", tier="unlabelled"))
    for m in rb.LABELLED:  # 2D: axial slices through each brain's thalami
        for f in rb.LABELLED:
            if m != f:
                full = {m, f} == {"fsaverage", "cat12"}
                out.append(PairSpec(f"{m}_axial", f"{f}_axial", score="dice+full" if full else "dice", tier="2d"))
    out.append(PairSpec("ratlung1", "ratlung2", score="ncc", tier="2d"))
    out.append(PairSpec("ratlung2", "ratlung1", score="ncc", tier="2d"))
    return {p.name: p for p in out}


PAIRS = _pairs()
PAIR_SETS = {t: tuple(n for n, p in PAIRS.items() if p.tier == t) for t in ("labelled", "heads", "unlabelled", "2d")}


@dataclass(frozen=True)
class Method:
    """kind "identity" | "ours" | "ants" | "antsaff+ours". ours: model ("none" = no network), affine pre-alignment,
    refine (RefineConfig keyword arguments or None). ants: the antspyx type_of_transform. antsaff+ours: ANTs' MI
    affine, then ours from it (realbench.contrast.run_ants_affine_then_ours)."""

    name: str
    label: str
    kind: str
    model: str | None = None
    affine: str | None = "affine"
    refine: dict[str, Any] | None = None
    ants: str | None = None
    ndims: tuple[int, ...] = (2, 3)
    extra: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "no registration (world coordinates)", "identity"),
    Method("affine", "affine only (ours: --model none --refine 0)", "ours", model="none",
           refine={"iterations": 0}, ndims=(3,)),
    Method("net:default-3d", "default-3d after affine", "ours", model="default-3d", ndims=(3,)),
    Method("net:default-3d-4mm", "default-3d-4mm after affine", "ours", model="default-3d-4mm", ndims=(3,)),
    Method("net:default-2d", "default-2d", "ours", model="default-2d", affine=None, ndims=(2,)),
    Method("net:synth-3d", "synth-3d DeepSim_seg net after affine", "ours",
           model=str(SYNTH3D_DIR / "reg.safetensors"), ndims=(3,)),
    Method("net:synth-3d-ncc", "synth-3d NCC net after affine", "ours",
           model=str(SYNTH3D_DIR / "reg_ncc.safetensors"), ndims=(3,)),
    Method("net+refine", "default net + refine (defaults)", "ours", model="default", refine={}),
    Method("net+refine-long", "default net + refine (100 steps/level)", "ours", model="default",
           refine={"iterations": 100}),
    Method("none+refine", "--model none --refine (defaults), after affine", "ours", model="none", refine={}),
    Method("ants:Affine", "ANTs Affine", "ants", ants="Affine"),
    Method("ants:SyN", "ANTs SyN (defaults)", "ants", ants="SyN"),
    Method("ants:SyNOnlyCC", "ANTs Affine, then SyNOnly with CC (radius 4, 40x20x0)", "ants", ants="SyNOnly",
           extra={"after_affine": True, "syn_metric": "CC", "syn_sampling": 4, "reg_iterations": (40, 20, 0)}),
    Method("ants:SyNCC", "ANTs SyNCC (rigid + affine + SyN with CC, 2100x1200x1200x20)", "ants", ants="SyNCC"),
    # cross-contrast (--contrast t2like): the default net, then refinement with each loss at its LAM_SCALE lambda
    *(Method(f"net+refine:{loss}", f"default net + refine, {loss} (lam x{LAM_SCALE[loss]:g})", "ours",
             model="default", refine={"loss": loss}) for loss in ("deepsim_seg", "ncc", "mind", "nmi")),
    # the same without the pre-alignment (world coordinates: every labelled brain is in MNI-like space), because
    # the global-NCC affine is intensity-based and cross-contrast pairs can mislead it
    Method("world+net", "default-3d, no affine (world coordinates)", "ours", model="default-3d", affine=None,
           ndims=(3,)),
    *(Method(f"world+net+refine:{loss}", f"default net + refine, {loss}, no affine (world coordinates)", "ours",
             model="default", affine=None, refine={"loss": loss}, ndims=(3,))
      for loss in ("deepsim_seg", "ncc", "mind", "nmi")),
    # ... and from our own mutual-information affine (--affine affine-nmi, transforms.affine metric "nmi")
    Method("affine-nmi", "affine only, mutual information (ours: --affine affine-nmi --model none)", "ours",
           model="none", affine="affine-nmi", refine={"iterations": 0}, ndims=(3,)),
    Method("nmiaff+net", "default-3d after --affine affine-nmi", "ours", model="default-3d", affine="affine-nmi",
           ndims=(3,)),
    *(Method(f"nmiaff+net+refine:{loss}", f"--affine affine-nmi, default net + refine, {loss}", "ours",
             model="default", affine="affine-nmi", refine={"loss": loss}, ndims=(3,))
      for loss in ("deepsim_seg", "ncc", "mind")),
    # ... and from ANTs' mutual-information affine instead of ours (realbench.contrast.run_ants_affine_then_ours)
    Method("antsaff+net", "ANTs Affine (MI), then default-3d", "antsaff+ours", model="default-3d", ndims=(3,)),
    *(Method(f"antsaff+net+refine:{loss}", f"ANTs Affine (MI), then default net + refine, {loss}", "antsaff+ours",
             model="default", refine={"loss": loss}, ndims=(3,)) for loss in ("deepsim_seg", "ncc", "mind", "nmi")),
)}


def select_pairs(spec: str) -> list[PairSpec]:
    """Comma-separated pair names or set names (labelled, heads, unlabelled, 2d, all)."""
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",") if t.strip()):
        if tok == "all":
            out += list(PAIRS)
        elif tok in PAIR_SETS:
            out += list(PAIR_SETS[tok])
        elif tok in PAIRS:
            out.append(tok)
        else:
            raise ValueError(f"unknown pair {tok!r}; valid: all, {', '.join(PAIR_SETS)} or a pair name "
                             f"({', '.join(PAIRS)})")
    return [PAIRS[n] for n in dict.fromkeys(out)]


def file_method(spec: str) -> Method:
    """"file:PATH" -> the registration model file PATH (.safetensors / .onnx / .pt2) after the affine pre-alignment,
    3D pairs only (a candidate checkpoint before it is copied anywhere). Its name (and JSON file stem) is
    "file:<folder>-<stem>" of PATH, so model_step100 of two runs stay apart; the path itself is checked when it runs
    (a missing file is a recorded error, as for any method)."""
    path = Path(spec.split(":", 1)[1]) if spec.startswith("file:") else None
    if path is None or path.suffix not in _MODEL_SUFFIXES:
        raise ValueError(f"a model-file method is file:PATH with PATH ending in {', '.join(_MODEL_SUFFIXES)}, got "
                         f"{spec!r}")
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{path.parent.name}-{path.stem}")
    return Method(f"file:{slug}", f"{path} after affine", "ours", model=str(path), ndims=(3,))


def select_methods(spec: str) -> list[Method]:
    """Comma-separated method names (METHODS), "file:PATH" model files (file_method) or "all"."""
    names = list(METHODS) if spec.strip() == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [n for n in names if n not in METHODS and not n.startswith("file:")]
    if bad or not names:
        raise ValueError(f"unknown method(s) {bad or spec!r}; valid: all, {', '.join(METHODS)} or file:PATH")
    return [METHODS[n] if n in METHODS else file_method(n) for n in dict.fromkeys(names)]


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _run_register():
    from deepsim_rt.pipeline.register import run_register  # the file pipeline, as `deepsim-rt register` runs it

    return run_register


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _axial_axis(affine: np.ndarray, ndim: int) -> int:
    """The voxel axis closest to world z (the axial slice normal)."""
    return int(np.argmax(np.abs(affine[2, :ndim])))


def _slice(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(arr, index, axis=axis) if arr.ndim == 3 else arr


def _run_ours(m: Method, mov: Path, fix: Path, labels: Path | None, ndim: int, work: Path) -> dict[str, Any]:
    from deepsim_rt.refine.config import RefineConfig

    model = m.model
    if model == "default":
        model = f"default-{ndim}d"
    refine = None if m.refine is None else RefineConfig(**m.refine)
    t0, c0 = time.perf_counter(), time.process_time()
    info = _run_register()(mov, fix, work, labels=labels, model=model, affine=m.affine if ndim == 3 else None,
                           refine=refine, label_mode="generic", overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    warped, _ = _load(work / "warped.nii.gz")
    wl = _load(work / "warped_labels.nii.gz")[0] if labels is not None else None
    qc = info.get("qc", {})
    return {"seconds": float(info["timings_s"]["register"]), "wall_seconds": wall, "cpu_seconds": cpu,
            "folding_percent": float(qc.get("folding_percent", float("nan"))), "warped": warped,
            "warped_labels": wl, "warnings": info.get("warnings", []), "timings_s": info["timings_s"]}


def _ants():
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # read by ITK when ants is first imported
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    return ants


def _run_ants(m: Method, mov: Path, fix: Path, labels: Path | None, ndim: int, work: Path) -> dict[str, Any]:
    ants = _ants()
    f = ants.image_read(str(fix))
    mo = ants.image_read(str(mov))
    lab = ants.image_read(str(labels)) if labels is not None else None
    if m.kind == "identity":
        t0, c0 = time.perf_counter(), time.process_time()
        warped = ants.resample_image_to_target(mo, f, interp_type="linear")
        wl = None if lab is None else ants.resample_image_to_target(lab, f, interp_type="genericLabel")
        return {"seconds": time.perf_counter() - t0, "wall_seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                "folding_percent": 0.0, "warped": warped.numpy(), "warped_labels": None if wl is None else wl.numpy()}
    t0, c0 = time.perf_counter(), time.process_time()
    kw = dict(m.extra)
    if kw.pop("after_affine", False):  # antsRegistrationSyNQuick-like: ANTs Affine, then SyN alone from it
        aff = ants.registration(f, mo, type_of_transform="Affine", outprefix=str(work / "aff_"), random_seed=1)
        kw["initial_transform"] = aff["fwdtransforms"]
    r = ants.registration(f, mo, type_of_transform=m.ants, outprefix=str(work / "ants_"), random_seed=1, **kw)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    wl = None if lab is None else ants.apply_transforms(f, lab, r["fwdtransforms"], interpolator="genericLabel")
    fold = 0.0
    warps = [t for t in r["fwdtransforms"] if t.endswith((".nii", ".nii.gz"))]
    if warps:
        jac = ants.create_jacobian_determinant_image(f, warps[0], do_log=False)
        fold = float((jac.numpy() <= 0).mean() * 100.0)
    return {"seconds": seconds, "wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "folding_percent": fold,
            "warped": r["warpedmovout"].numpy(), "warped_labels": None if wl is None else wl.numpy()}


def run_one(pair: PairSpec, method: Method, brains: dict[str, rb.RealBrain], work: Path,
            fixed_brains: dict[str, rb.RealBrain] | None = None) -> dict[str, Any]:
    """Run one method on one pair (files from `brains`), score it; -> the JSON-able row (arrays under "_slices").
    fixed_brains: where the fixed image comes from when it is not `brains` (--contrast t2like: the fixed brain made
    T2-like, realbench.contrast); the local NCC and the figure slices still use the fixed brain of `brains`."""
    bm, bf = brains[pair.moving], brains[pair.fixed]
    mov = getattr(bm, pair.moving_part)
    fix = getattr((fixed_brains or brains)[pair.fixed], pair.fixed_part)
    labels = bm.labels if pair.score.startswith("dice") else None
    ndim = bm.ndim
    if method.kind == "ours":
        res = _run_ours(method, mov, fix, labels, ndim, work)
    elif method.kind == "antsaff+ours":
        from deepsim_rt.realbench.contrast import run_ants_affine_then_ours

        res = run_ants_affine_then_ours(method, mov, fix, labels, ndim, work, _run_ours, _ants())
    else:
        res = _run_ants(method, mov, fix, labels, ndim, work)
    fixed_img, f_aff = _load(getattr(bf, pair.fixed_part))
    fixed_img = fixed_img.astype(np.float32)
    warped = np.asarray(res["warped"], dtype=np.float32).reshape(fixed_img.shape)
    row: dict[str, Any] = {"seconds": res["seconds"], "wall_seconds": res["wall_seconds"],
                           "cpu_seconds": res["cpu_seconds"],
                           "folding_percent": res["folding_percent"], "warnings": res.get("warnings", []),
                           "shape": list(fixed_img.shape)}
    mask = bf.array("mask") if bf.mask is not None else foreground_mask(fixed_img)
    row["ncc_mask"] = "brain mask" if bf.mask is not None else "fixed foreground (> 5 % of max)"
    row["ncc"] = masked_local_ncc(warped, fixed_img, mask)
    axis = _axial_axis(f_aff, ndim)
    fl = None
    if labels is not None:
        fl = bf.array("labels")
        wl = np.rint(np.asarray(res["warped_labels"])).astype(np.int64).reshape(fl.shape)
        ids = [s for _, s, _ in rb.STRUCTURES]
        d12 = structure_dice(wl, fl, ids)
        names = {s: n for n, s, _ in rb.STRUCTURES}
        row["dice"] = {names[i]: v for i, v in d12.items()}
        row["mean_dice12"] = mean_dice(d12)
        if pair.score == "dice+full":
            shared = rb.shared_labels(bm.array("labels"), fl)
            row["mean_dice_full"] = mean_dice(structure_dice(wl, fl, shared))
            row["n_full"] = len(shared)
        thal = np.argwhere(fl == 10)
        index = int(np.median(thal[:, axis])) if ndim == 3 and len(thal) else fixed_img.shape[axis] // 2
    else:
        wl = None
        index = fixed_img.shape[axis] // 2 if ndim == 3 else 0
    row["_slices"] = {"fixed": _slice(fixed_img, axis, index), "warped": _slice(warped, axis, index)}
    if wl is not None:
        row["_slices"]["fixed_labels"] = _slice(fl, axis, index).astype(np.int16)
        row["_slices"]["warped_labels"] = _slice(wl, axis, index).astype(np.int16)
    return row


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def run_benchmark(out: str | os.PathLike, grid: str = "2mm", pairs: list[PairSpec] | None = None,
                  methods: list[Method] | None = None, cache: str | os.PathLike | None = None,
                  verbose: bool = True, contrast: str = "t1") -> list[dict[str, Any]]:
    """Run every (pair, method) not yet done under OUT/<grid>/; -> every row there (done now or before).

    contrast "t2like": every fixed 3D brain is replaced by its T2-like version (realbench.contrast.t2like_brain,
    written under OUT/<grid>/_inputs/); rows are recorded with "contrast" and scored as usual (Dice of the moving
    labels on the fixed labels; local NCC against the fixed brain's T1).

    One thread (torch and ITK). A method that fails is recorded with its error (one line) and counts as a failed
    pair-method; the run goes on (and a later run tries it again).
    """
    import torch

    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    from deepsim_rt.realbench.contrast import CONTRASTS, t2like_brain

    if contrast not in CONTRASTS:  # before any fetch or work
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    pairs = list(PAIRS.values()) if pairs is None else pairs
    methods = list(METHODS.values()) if methods is None else methods
    torch.set_num_threads(1)
    _ants()  # set ITK's thread count before anything imports ants
    names = sorted({n for p in pairs for n in (p.moving, p.fixed)})
    brains = rb.ensure_real_brains(cache, names=tuple(names))
    root = Path(out) / grid
    factor = GRIDS[grid]
    if factor > 1:
        brains = {n: (rb.downsampled(b, factor, root / "_inputs") if b.ndim == 3 else b) for n, b in brains.items()}
    fixed_brains = None
    if contrast != "t1":
        fixed_brains = {n: (t2like_brain(b, root / "_inputs") if b.ndim == 3 else b) for n, b in brains.items()}
    sha = _git_sha()
    rows = []
    for pair in pairs:
        ndim = brains[pair.moving].ndim
        for method in methods:
            if ndim not in method.ndims:
                continue
            dest = root / pair.name / f"{method.name.replace(':', '_')}.json"
            if dest.is_file():  # resumable: a finished row is kept, a failed one is run again
                done = json.loads(dest.read_text())
                if "error" not in done:
                    rows.append(done)
                    continue
            row: dict[str, Any] = {"pair": pair.name, "tier": pair.tier, "method": method.name,
                                   "label": method.label, "grid": grid, "git": sha}
            if contrast != "t1":
                row["contrast"] = contrast
            dest.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=".work-", dir=dest.parent) as work:
                try:
                    row.update(run_one(pair, method, brains, Path(work), fixed_brains))
                except Exception as exc:  # noqa: BLE001 - a failed method is a result, recorded in one line
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    row["traceback"] = traceback.format_exc(limit=3)
            row["total_seconds"] = time.perf_counter() - t0
            row["loadavg"] = list(os.getloadavg())
            row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            slices = row.pop("_slices", None)
            if slices is not None:
                atomic_write(dest.with_suffix(".npz"), lambda tmp, s=slices: np.savez_compressed(tmp, **s))
            text = json.dumps(row, indent=1, default=_json_default) + "\n"
            atomic_write(dest, lambda tmp, text=text: Path(tmp).write_text(text))
            rows.append(row)
            if verbose:
                score = row.get("mean_dice12", row.get("ncc"))
                what = ("error: " + row["error"]) if "error" in row else (
                    f"{'Dice12' if 'mean_dice12' in row else 'NCC'} {score:.3f}, {row['seconds']:.1f} s "
                    f"({row['cpu_seconds']:.1f} s CPU), "
                    f"folding {row['folding_percent']:.3f} %")
                print(f"[{grid}] {pair.name:28s} {method.name:20s} {what}", flush=True)
    shutil.rmtree(root / "_tmp", ignore_errors=True)
    return rows
