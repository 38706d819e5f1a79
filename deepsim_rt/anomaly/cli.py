"""`deepsim-rt changes` (change maps of one registered pair) and `deepsim-rt evaluate-changes` (the AUC table).

    deepsim-rt changes --moving M --fixed F --out DIR [--model default-2d|default-3d|PATH] [--extractor SEG]
                       [--backend auto|eager|compile|onnxruntime|aoti|tensorrt] [--device auto|cpu|cuda]
                       [--overwrite]

Registers M onto F (inputs read as `deepsim-rt register` reads them: NIfTI, PNG or NPY), then scores every FIXED
voxel (deepsim_rt.anomaly.scores):
  semantic  1 - cos of the feature extractor's levels, each upsampled to the image grid, averaged over levels
  residual  |warped - fixed| in min-max normalized intensity units
  jacobian  |log max(det J, 1e-3)| of the displacement (local volume change, growth or shrinkage alike)
NIfTI pairs are used in world space as `register` uses them (deepsim_rt.anomaly.geometry): any grids (moving is
resampled onto the fixed grid from the affines), arrays brought to the model's training orientation by exact axis
flips / permutation, the network run at its training voxel size and the semantic score at the extractor's; every
map comes back on the fixed file's grid and axis order. PNG / NPY arrays (no voxel size) are scored as given, same
shape. An extractor trained at another voxel size than the model is said in the notes.
The extractor: --extractor, else the seg.safetensors bundled with / beside the model (an error names the file).
Outputs in DIR, all or nothing (written into a temporary folder and moved into place together, summary.json
last; existing outputs refused unless --overwrite; inputs never overwritten):
  NIfTI inputs -> change_semantic.nii.gz, change_residual.nii.gz, change_jacobian.nii.gz (float32, the FIXED
      image's affine and header)
  PNG inputs   -> change_<score>.npy (float32) and change_<score>.png (8-bit, 0 .. the map's maximum, which
      summary.json records as png_scale_max)
  NPY inputs   -> change_<score>.npy (float32, the input's shape)
  overlay.png  the fixed image and each map over it (3D: the slice along the last axis through the semantic
               maximum); summary.json: inputs, model, extractor, backend, device, per-map statistics (mean, p99,
               max and its voxel index), per-level semantic means, timings.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write
from deepsim_rt.pipeline.image import Image
from deepsim_rt.pipeline.outputs import commit_files
from deepsim_rt.pipeline.pair import default_model, read_pair

__all__ = ["add_subcommands", "run_changes"]

SCORES = ("semantic", "residual", "jacobian")


def _model_array(img: Image, ndim: int, role: str) -> np.ndarray:
    """The image as an ndim-D float32 array (a single-slice (X, Y, 1) NIfTI is 2D for a 2D model)."""
    data = img.data[..., 0] if ndim == 2 and img.data.ndim == 3 and img.data.shape[-1] == 1 else img.data
    if data.ndim != ndim:
        raise ValueError(f"{role} {img.path} is {data.ndim}D data of shape {img.disk_shape}, but the model is "
                         f"{ndim}D; use a {data.ndim}D model (e.g. --model default-{data.ndim}d)")
    return data.astype(np.float32)


def _write_npy(arr: np.ndarray):
    def write(path: Path) -> None:
        def fill(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)

        atomic_write(path, fill)

    return write


def _write_png8(arr: np.ndarray, vmax: float):
    def write(path: Path) -> None:
        from PIL import Image

        img = np.clip(np.rint(arr / max(vmax, 1e-12) * 255.0), 0, 255).astype(np.uint8)
        atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))

    return write


def _stats(arr: np.ndarray) -> dict[str, Any]:
    return {"mean": float(arr.mean()), "p99": float(np.percentile(arr, 99)), "max": float(arr.max()),
            "argmax_voxel": [int(i) for i in np.unravel_index(int(np.argmax(arr)), arr.shape)]}


def _output_names(fmt: str) -> list[str]:
    """Every file `changes` writes for inputs of format `fmt`, known before any work (summary.json last)."""
    if fmt == "nifti":
        names = [f"change_{n}.nii.gz" for n in SCORES]
    else:
        names = [f"change_{n}.npy" for n in SCORES] + ([f"change_{n}.png" for n in SCORES] if fmt == "png" else [])
    return [*names, "overlay.png", "summary.json"]


def run_changes(moving: str | os.PathLike, fixed: str | os.PathLike, out: str | os.PathLike,
                model: str | None = None, extractor: str | None = None, backend: str = "auto",
                device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Change maps of one pair of files (see the module docstring); returns the summary plus "outputs".

    NIfTI pairs go through world space as `register` does (anomaly.geometry: the model's orientation and
    spacing, other grids resampled from the affines); PNG / NPY arrays are scored as they are."""
    from deepsim_rt.pipeline.outputs import check_out_dir, check_targets

    t0 = time.perf_counter()
    out = check_out_dir(out)  # before any work: `--out file/x`, an unwritable folder, existing outputs
    pair = read_pair(moving, fixed)
    check_targets(out, _output_names(pair.fixed.format), protected=pair.paths, overwrite=overwrite)
    from deepsim_rt.anomaly.detector import ChangeDetector
    from deepsim_rt.anomaly.figures import overlay_figure
    from deepsim_rt.anomaly.scores import COMBINE, JACOBIAN_FLOOR

    model = model or default_model(pair)
    det = ChangeDetector.load(model, extractor=extractor, backend=backend, device=device)
    m_arr = _model_array(pair.moving, det.ndim, "moving")
    f_arr = _model_array(pair.fixed, det.ndim, "fixed")
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    fix = pair.fixed
    notes = list(pair.notes)
    if fix.format == "nifti":
        from deepsim_rt.anomaly.geometry import world_change_maps

        res = world_change_maps(det, m_arr, pair.moving.affine, f_arr, fix.affine,
                                (str(pair.moving.path), str(fix.path)))
        arrays, level_means, grid = res.maps, res.level_means, res.facts
        notes += res.notes
    else:
        from deepsim_rt.anomaly.geometry import extractor_spacing_note
        from deepsim_rt.nn.checkpoint import read_spacing

        maps = det.detect(m_arr, f_arr)
        arrays = {name: getattr(maps, name)[0].numpy().astype(np.float32) for name in SCORES}
        level_means = [float(lv[0].mean()) for lv in maps.levels]
        grid = {"network": "the arrays as given (PNG / NPY carry no voxel size)"}
        src = str(det.extractor_source)
        note = extractor_spacing_note(det.registrator.model_spacing,
                                      read_spacing(src) if src.endswith(".safetensors") else None, src)
        notes += [note] if note else []
    seconds = time.perf_counter() - t0

    files: dict[str, Any] = {}
    summary: dict[str, Any] = {
        "moving": str(pair.moving.path), "fixed": str(fix.path), "model": det.source,
        "extractor": det.extractor_source, "backend": det.registrator.backend_name, "device": str(det.device),
        "shape": list(f_arr.shape), "combine": COMBINE, "jacobian": f"|log max(det J, {JACOBIAN_FLOOR})|",
        "residual": "|warped - fixed|, min-max normalized intensities",
        "scores": {name: _stats(a) for name, a in arrays.items()},
        "semantic_level_means": level_means, "grid": grid, "notes": notes,
        "timings_s": {"load_and_read": t_load, "register_and_score": seconds},
    }
    for name, arr in arrays.items():
        if fix.format == "nifti":
            from deepsim_rt.data.nifti import save_nifti

            files[f"change_{name}.nii.gz"] = (lambda a: lambda p: save_nifti(p, a.reshape(fix.disk_shape),
                                                                            fix.affine, fix.header))(arr)
        else:
            files[f"change_{name}.npy"] = _write_npy(arr.reshape(fix.disk_shape))
            if fix.format == "png":
                files[f"change_{name}.png"] = _write_png8(arr, float(arr.max()))
                summary["scores"][name]["png_scale_max"] = float(arr.max())
    f_disp = f_arr - f_arr.min()
    f_disp = f_disp / max(float(f_disp.max()), 1e-12)
    if det.ndim == 3:  # the slice along the last axis through the semantic maximum
        k = int(np.unravel_index(int(np.argmax(arrays["semantic"])), arrays["semantic"].shape)[-1])
        shown = {n: a[..., k] for n, a in arrays.items()}
        f_disp, where = f_disp[..., k], f" (slice {k} of the last axis)"
    else:
        shown, where = arrays, ""
    title = f"change maps{where}: {Path(fix.path).name}"
    files["overlay.png"] = lambda p: overlay_figure(f_disp, shown, p, title=title)
    files["summary.json"] = _write_json(summary)
    written = commit_files(out, files, protected=pair.paths, overwrite=overwrite)
    summary["outputs"] = [str(p) for p in written]
    return summary


def _write_json(obj: dict):
    def write(path: Path) -> None:
        import json

        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))

    return write


def _changes(args: argparse.Namespace) -> int:
    info = run_changes(args.moving, args.fixed, args.out, model=args.model, extractor=args.extractor,
                       backend=args.backend, device=args.device, overwrite=args.overwrite)
    s = info["scores"]["semantic"]
    print(f"change maps of {args.moving} -> {args.fixed} ({'x'.join(map(str, info['shape']))}) with {info['model']} "
          f"on {info['backend']} ({info['device']}): semantic mean {s['mean']:.4f}, max {s['max']:.4f} at voxel "
          f"{tuple(s['argmax_voxel'])}")
    for note in info["notes"]:
        print(f"  note: {note}")
    for p in info["outputs"]:
        print(f"  wrote {p}")
    return 0


def _evaluate_changes(args: argparse.Namespace) -> int:
    from deepsim_rt.anomaly.config import ChangeEvalConfig
    from deepsim_rt.export._io import check_out_path
    from deepsim_rt.train.cli import config_from_args

    cfg = config_from_args(ChangeEvalConfig, args)
    check_out_path(cfg.out, None)  # before the cases: `--out file/x` was a NotADirectoryError traceback at the end
    from deepsim_rt.anomaly.benchmark import evaluate_changes

    evaluate_changes(cfg, figure=not args.no_figure)
    return 0


# = deepsim_rt.runtime.BACKENDS (pinned by tests/test_cli_help_all.py): importing the runtime for the choices
# imports torch: 3.0 s of `deepsim-rt changes --help` at load 1.2.
BACKENDS = ("auto", "eager", "compile", "onnxruntime", "aoti", "tensorrt")


def add_subcommands(subparsers) -> None:

    p = subparsers.add_parser(
        "changes", help="change maps after registration: semantic score, intensity residual, Jacobian",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moving", required=True, help="moving image (.nii/.nii.gz, .png, .npy)")
    p.add_argument("--fixed", required=True, help="fixed image, same shape (and NIfTI affine) as moving")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="default-2d, default-3d or a .safetensors/.onnx/.pt2/.plan path "
                                                 "(default: the bundled model matching the data)")
    p.add_argument("--extractor", default=None, help="feature extractor .safetensors (default: seg.safetensors "
                                                     "bundled with / beside the model)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="runtime backend (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input file)")
    p.set_defaults(func=_changes)

    from deepsim_rt.anomaly.config import ChangeEvalConfig
    from deepsim_rt.train.cli import add_dataclass_arguments

    p = subparsers.add_parser(
        "evaluate-changes", help="AUC of change scores on the seeded topological-change benchmark",
        description="Voxel-level ROC AUC (mean ± sd over cases) of the semantic score after the DeepSim net, the "
                    "intensity residual after the MSE net, the Jacobian and the semantic score without "
                    "registration, on deepsim_rt.data.changes (see deepsim_rt/anomaly/benchmark.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, ChangeEvalConfig)
    p.add_argument("--no-figure", action="store_true", help="skip changes_auc.png")
    p.set_defaults(func=_evaluate_changes)
