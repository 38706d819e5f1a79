"""`evaluate_changes`: voxel-level ROC AUC of change scores on the topological-change benchmark (data/changes.py).

Per case (a moving subject and a fixed subject carrying one inserted / removed structure with its exact mask),
every score map is computed on the fixed grid and its AUC taken over the fixed subject's BRAIN voxels (changed
labels > 0: the background would add a mass of trivially unchanged voxels to every method alike). Methods (the
rows of the Spot-the-Difference table, on our data):

  semantic_deepsim   semantic score (1 - cos, levels averaged; anomaly/scores.py) after the DeepSim-trained net
  residual_mse       |warped - fixed| after the MSE-trained net (reg_mse.safetensors beside the DeepSim net)
  jacobian_deepsim   |log det J| of the DeepSim-trained net's displacement
  semantic_none      semantic score WITHOUT registration (moving vs fixed as they are)
and, as diagnostics: the other score / network combinations and the semantic score of each extractor level alone.
Per method: mean +- sd (sample sd, ddof 1) over cases, and a paired two-sided Wilcoxon signed-rank test of the
per-case AUCs against semantic_deepsim; p >= 0.05 is reported as a TIE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from deepsim_rt._io import atomic_write, file_sha256
from deepsim_rt.anomaly.config import ChangeEvalConfig
from deepsim_rt.anomaly.detector import load_extractor, resolve_extractor
from deepsim_rt.anomaly.roc import roc_auc
from deepsim_rt.anomaly.scores import COMBINE, JACOBIAN_FLOOR, change_maps
from deepsim_rt.data.changes import ChangeBenchmark
from deepsim_rt.data.synthetic import gaussian_blur
from deepsim_rt.nn.intensity import normalize
from deepsim_rt.runtime import Registrator, resolve_model

__all__ = ["ChangeEvalConfig", "evaluate_changes", "METHODS", "HEADLINE", "markdown_table", "TIE_P"]

# name -> (network, score, label)
METHODS: dict[str, tuple[str, str, str]] = {
    "semantic_deepsim": ("deepsim", "semantic", "semantic score after DeepSim net"),
    "residual_mse": ("mse", "residual", "intensity residual after MSE net"),
    "jacobian_deepsim": ("deepsim", "jacobian", "|log det J| of DeepSim net"),
    "semantic_none": ("none", "semantic", "semantic score, no registration"),
    "residual_deepsim": ("deepsim", "residual", "intensity residual after DeepSim net"),
    "semantic_mse": ("mse", "semantic", "semantic score after MSE net"),
    "jacobian_mse": ("mse", "jacobian", "|log det J| of MSE net"),
    "residual_none": ("none", "residual", "intensity residual, no registration"),
}
HEADLINE = ("semantic_deepsim", "residual_mse", "jacobian_deepsim", "semantic_none")
TIE_P = 0.05


def _mse_model_path(model: str) -> Path:
    path = resolve_model(model).parent / "reg_mse.safetensors"
    if not path.is_file():
        raise ValueError(f"no MSE-trained registration model beside {model!r}: expected {str(path)!r}; give "
                         "--mse-model PATH (a `deepsim-rt train-registration --loss mse` model)")
    return path


def _summary(values: list[float], ref: list[float] | None) -> dict:
    a = np.asarray(values, dtype=np.float64)
    out = {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}
    if ref is not None:
        diff = a - np.asarray(ref, dtype=np.float64)
        out["diff_vs_semantic_deepsim"] = float(diff.mean())
        if np.any(diff != 0):
            from scipy.stats import wilcoxon

            out["wilcoxon_p"] = float(wilcoxon(a, ref).pvalue)
        else:
            out["wilcoxon_p"] = 1.0
        out["tie"] = bool(out["wilcoxon_p"] >= TIE_P)
    return out


def markdown_table(summary: dict[str, dict], names: list[str]) -> str:
    """One row per method: AUC mean +- sd, n, difference to and Wilcoxon p against semantic_deepsim."""
    rows = ["| method | AUC (mean ± sd) | n | Δ vs semantic (DeepSim net) | Wilcoxon p | tie (p ≥ 0.05) |",
            "|---|---|---|---|---|---|"]
    for name in names:
        s = summary[name]
        label = (METHODS[name][2] if name in METHODS else name).replace("|", "\\|")  # a pipe would split the cell
        if "wilcoxon_p" in s:
            tail = f"{s['diff_vs_semantic_deepsim']:+.3f} | {s['wilcoxon_p']:.2g} | {'tie' if s['tie'] else 'no'}"
        else:
            tail = "— | — | —"
        rows.append(f"| {label} | {s['mean']:.3f} ± {s['sd']:.3f} | {s['n']} | {tail} |")
    return "\n".join(rows) + "\n"


def evaluate_changes(cfg: ChangeEvalConfig, figure: bool = True, log=print) -> dict:
    """Run the benchmark; write OUT/results.json, results.md (and changes_auc.png). Returns the results dict."""
    from deepsim_rt.export._io import check_out_path

    check_out_path(cfg.out, None)  # `--out file/x` was a NotADirectoryError traceback after all the cases
    bench = ChangeBenchmark(cfg.benchmark())
    nd = bench.synthetic.ndim
    model = cfg.model or f"default-{nd}d"
    nets = {}
    for name in ("deepsim", "mse"):
        if name == "mse":
            mse_model = Path(cfg.mse_model) if cfg.mse_model else _mse_model_path(model)
        nets[name] = reg = Registrator.load(model if name == "deepsim" else mse_model, backend="eager", device="cpu")
        if reg.ndim != nd:
            raise ValueError(f"the {name} model is {reg.ndim}D but the {cfg.data!r} benchmark is {nd}D")
    ext_path = resolve_extractor(model, cfg.extractor)
    extractor = load_extractor(ext_path, nd)
    t0 = time.perf_counter()
    rows, example = [], None
    for k in range(len(bench)):
        case = bench[k]
        m, f = case.moving[None], case.fixed[None]
        m_n, _, _ = normalize(m, extractor.cfg.intensity)  # the extractor's own contract
        f_n, _, _ = normalize(f, extractor.cfg.intensity)
        maps = {"none": change_maps(extractor, m_n, f_n, None)}
        for name, reg in nets.items():
            disp = reg.register(m, f).displacement
            maps[name] = change_maps(extractor, m_n, f_n, disp, padding=reg.cfg.padding)
        scores = {name: getattr(maps[net], score) for name, (net, score, _) in METHODS.items()}
        for lvl, lmap in enumerate(maps["deepsim"].levels, start=1):
            scores[f"semantic_deepsim_level{lvl}"] = lmap
        if cfg.smooth > 0:
            scores = {n: gaussian_blur(s[:, None], cfg.smooth)[:, 0] for n, s in scores.items()}
        aucs = {n: roc_auc(s, case.mask[0], where=case.brain[0]) for n, s in scores.items()}
        rows.append({"case": k, "kind": case.kind, "moving": case.moving_index, "fixed": case.fixed_index,
                     "mask_voxels": int(case.mask.sum()), "brain_voxels": int(case.brain.sum()),
                     "params": case.params, "auc": aucs})
        if example is None and case.kind == "lesion":
            example = (case, {n: scores[n] for n in HEADLINE}, maps)
    seconds = time.perf_counter() - t0
    names = list(rows[0]["auc"])
    ref = [r["auc"]["semantic_deepsim"] for r in rows]
    summary = {n: _summary([r["auc"][n] for r in rows], None if n == "semantic_deepsim" else ref) for n in names}
    kinds = sorted({r["kind"] for r in rows})
    by_kind = {kind: {n: float(np.mean([r["auc"][n] for r in rows if r["kind"] == kind])) for n in names}
               for kind in kinds}
    sem, res = summary["semantic_deepsim"]["mean"], summary["residual_mse"]["mean"]
    targets = {"semantic_auc_ge_0.75": sem >= 0.75, "semantic_ge_mse_residual_plus_0.1": sem >= res + 0.1,
               "semantic_minus_mse_residual": sem - res}
    results = {
        "benchmark": cfg.benchmark().to_dict(), "synthetic": bench.synthetic.to_dict(),
        "config": dataclasses.asdict(cfg),
        "models": {"deepsim": {"path": nets["deepsim"].source, "sha256": file_sha256(nets["deepsim"].source)},
                   "mse": {"path": str(mse_model), "sha256": file_sha256(mse_model)},
                   "extractor": {"path": str(ext_path), "sha256": file_sha256(ext_path)}},
        "combine": COMBINE, "jacobian": f"|log max(det J, {JACOBIAN_FLOOR})|", "auc_region": "fixed brain voxels",
        "summary": summary, "by_kind": by_kind, "targets": targets, "cases": rows, "seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    table = markdown_table(summary, list(HEADLINE) + [n for n in names if n not in HEADLINE])
    kind_rows = ["| kind | n | " + " | ".join(HEADLINE) + " |", "|---|---|" + "---|" * len(HEADLINE)]
    for kind in kinds:
        n_k = sum(r["kind"] == kind for r in rows)
        kind_rows.append(f"| {kind} | {n_k} | " + " | ".join(f"{by_kind[kind][n]:.3f}" for n in HEADLINE) + " |")
    text = (f"# Change detection AUC: {cfg.data}, {cfg.split} split, {len(rows)} cases\n\n{table}\n"
            f"Per change kind (mean AUC):\n\n" + "\n".join(kind_rows) + "\n")
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1, default=float)))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    if figure:
        from deepsim_rt.anomaly.figures import benchmark_figure

        case, ex_scores, ex_maps = example if example is not None else (bench[0], None, None)
        benchmark_figure(case, ex_scores, {n: [r["auc"][n] for r in rows] for n in HEADLINE},
                         {n: METHODS[n][2] for n in HEADLINE}, out / "changes_auc.png",
                         title=f"{cfg.data} {cfg.split}: {len(rows)} cases")
    log(text)
    log(f"{len(rows)} cases in {seconds:.1f} s -> {out}")
    if not all(math.isfinite(summary[n]["mean"]) for n in names):  # pragma: no cover - roc_auc raises first
        raise ValueError("non-finite AUC")
    return results
