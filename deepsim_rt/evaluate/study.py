"""The evaluation protocol and the loss study.

evaluate_model / evaluate_pairs: register the data set's fixed, seeded test pairs and score each pair:
    dice_fg        mean Dice over foreground classes, classes absent from both maps skipped (the usual convention)
    dice_paper     mean Dice over ALL classes incl. background, a class absent from both scoring 0 (the paper's)
    dice_per_class Dice of every class (NaN -> null where absent from both)
    folding        % of voxels with det J(phi) <= 0;  std_log_jac  std of log det J over the non-folded voxels
    epe            mean endpoint error (voxels) vs the true displacement (synthetic data only)
The moving label map is warped with the label mode (generic by default: ANTs genericLabel), the image linearly.

run_study: trains the feature extractors (seg, ae) and one registration net per loss (MSE, NCC, NCC_sup,
VGG if weights are given, DeepSim_ae, DeepSim_seg), evaluates them on the same test pairs, and writes the
poster's comparison: a Dice box plot, a table with mean Dice / folding and a paired Wilcoxon signed-rank test of
DeepSim_seg against each baseline (scipy.stats.wilcoxon, two-sided, on the per-pair foreground Dice).
With eval "real-2d" (2D data) every trained net is also scored on the 12 real brain slice pairs of
deepsim_rt.evaluate.real_slices, same contrast ("t1") and with the fixed brain made T2-like ("xc"): OUT/real_2d.md
(mean +- sd Dice over the shared structures, folding, paired Wilcoxon of every method against every other),
OUT/real_2d.json (per pair), OUT/real_2d_{t1,xc}_boxplot.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deepsim_rt.evaluate.metrics import (
    dice_foreground,
    dice_paper,
    dice_per_class,
    endpoint_error,
    folding_fraction,
    std_log_jacobian,
)
from deepsim_rt.evaluate.study_config import LABELS, STUDY_LOSSES, StudyConfig
from deepsim_rt.nn import atomic_write, load_model
from deepsim_rt.train.config import DEFAULT_LAMBDAS, FeatureTrainConfig, RegistrationTrainConfig
from deepsim_rt.train.data import DataSource, open_source, pad_to_multiple
from deepsim_rt.transforms.resample import DEFAULT_LABEL_MODE, warp_labels

__all__ = [
    "evaluate_pairs",
    "evaluate_model",
    "refine_register_fn",
    "summarize",
    "markdown_table",
    "write_results",
    "StudyConfig",
    "run_study",
    "STUDY_LOSSES",
    "wilcoxon_matrix",
    "evaluate_real",
    "real_register_fn",
    "real_markdown",
]


# register(moving (1, C, *S), fixed (1, C, *S)) -> displacement (1, ndim, *S)
RegisterFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _nan_to_none(x: float) -> float | None:
    return None if x != x else float(x)


def evaluate_pairs(source: DataSource, register: RegisterFn | None, split: str = "test",
                   max_pairs: int | None = None, padding: str = "border",
                   label_mode: str = DEFAULT_LABEL_MODE) -> list[dict]:
    """Score `register` on the source's seeded evaluation pairs; register=None is the identity (no registration).
    label_mode: how the moving labels are warped, "generic" | "nearest" (deepsim_rt.transforms.resample).

    Returns one dict per pair: moving, fixed (subject indices), dice_fg, dice_paper, dice_per_class {name: dice},
    folding (%), std_log_jac, epe (voxels; None without ground truth), seconds (registration time).
    """
    pairs = source.pairs(split)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    k = source.n_classes
    rows = []
    for idx, (m, f) in enumerate(pairs):
        # source.pair: two subjects, or (synthesis) the pair as the generator draws it (shared affine, 'pair_affine')
        (mov, mov_lab), (fix, fix_lab) = source.pair(split, m, f)
        mov, fix, mov_lab, fix_lab = mov[None], fix[None], mov_lab[None], fix_lab[None]
        t0 = time.perf_counter()
        if register is None:
            u = torch.zeros((1, source.ndim, *mov.shape[2:]), dtype=mov.dtype)
        else:
            with torch.no_grad():
                u = register(mov, fix)
        seconds = time.perf_counter() - t0
        warped_lab = warp_labels(mov_lab, u, mode=label_mode, padding=padding)
        per_class = dice_per_class(warped_lab, fix_lab, k)[0].tolist()
        truth = source.true_displacement(split, idx)
        rows.append({
            "moving": int(m),
            "fixed": int(f),
            "dice_fg": _nan_to_none(float(dice_foreground(warped_lab, fix_lab, k)[0])),
            "dice_paper": float(dice_paper(warped_lab, fix_lab, k)[0]),
            "dice_per_class": {n: _nan_to_none(d) for n, d in zip(source.label_names, per_class, strict=True)},
            "folding": 100.0 * float(folding_fraction(u)[0]),
            "std_log_jac": _nan_to_none(float(std_log_jacobian(u)[0])),
            "epe": None if truth is None else float(endpoint_error(u, truth[None])[0]),
            "seconds": seconds,
        })
    return rows


def model_register_fn(model: torch.nn.Module) -> RegisterFn:
    """Wrap a RegNet: pad to its spatial multiple, register, crop the displacement back."""
    m = model.cfg.spatial_multiple

    def register(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        size = moving.shape[2:]
        u = model.displacement(pad_to_multiple(moving, m), pad_to_multiple(fixed, m))
        return u[(slice(None), slice(None), *(slice(0, s) for s in size))]

    return register


def refine_register_fn(config, base: RegisterFn | None = None, extractor=None) -> RegisterFn:
    """Instance optimisation on top of `base` (a network's register fn; None = start from zero): the displacement
    is refined per pair by deepsim_rt.refine (config: a RefineConfig; extractor: for the DeepSim losses)."""
    from deepsim_rt.refine import refine

    def register(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        init = None if base is None else base(moving, fixed)
        return refine(moving, fixed, init=init, config=config, extractor=extractor).displacement

    return register


def load_registration_model(model_path: str | Path, source: DataSource) -> torch.nn.Module:
    """Load a registration checkpoint and check it fits `source` (kind reg, same dimensionality)."""
    if not Path(model_path).is_file():
        raise ValueError(f"model not found: {str(model_path)!r}")
    model = load_model(model_path)
    if model.cfg.kind != "reg":
        raise ValueError(f"{str(model_path)!r} is a {model.cfg.kind} model; evaluate needs a registration (reg) "
                         "model")
    if model.cfg.ndim != source.ndim:
        raise ValueError(f"{str(model_path)!r} is a {model.cfg.ndim}D model, the data {source.name!r} are "
                         f"{source.ndim}D")
    return model


def evaluate_model(model_path: str | Path | None, data: str | DataSource, split: str = "test",
                   max_pairs: int | None = None) -> list[dict]:
    """evaluate_pairs for a registration checkpoint (None: identity). Checks kind and dimensionality first."""
    source = data if isinstance(data, DataSource) else open_source(data)
    if model_path is None:
        return evaluate_pairs(source, None, split, max_pairs)
    model = load_registration_model(model_path, source)
    return evaluate_pairs(source, model_register_fn(model), split, max_pairs, padding=model.cfg.padding)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarize(rows: list[dict]) -> dict:
    """Means over pairs (Dice: also the sample std; per class: mean over pairs where the class is scored)."""
    names = list(rows[0]["dice_per_class"]) if rows else []
    return {
        "pairs": len(rows),
        "dice_fg": _mean([r["dice_fg"] for r in rows]),
        "dice_fg_std": _std([r["dice_fg"] for r in rows]),
        "dice_paper": _mean([r["dice_paper"] for r in rows]),
        "dice_per_class": {n: _mean([r["dice_per_class"][n] for r in rows]) for n in names},
        "folding": _mean([r["folding"] for r in rows]),
        "std_log_jac": _mean([r["std_log_jac"] for r in rows]),
        "epe": _mean([r["epe"] for r in rows]),
        "seconds": _mean([r["seconds"] for r in rows]),
    }


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(summaries: dict[str, dict], pvalues: dict[str, float | None] | None = None,
                   lambdas: dict[str, float] | None = None) -> str:
    """One row per method: mean foreground Dice +- std, paper Dice, folding %, std log|J|, EPE [, lambda, p]."""
    head = ["method"] + (["lambda"] if lambdas else []) + [
        "Dice fg (mean ± sd)", "Dice paper", "folding %", "SD log det J", "EPE (vox)"]
    if pvalues is not None:
        head.append("Wilcoxon p (DeepSim_seg vs)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        row = [LABELS.get(name, name)]
        if lambdas:
            row.append("—" if name not in lambdas else f"{lambdas[name]:g}")
        row += [f"{_fmt(s['dice_fg'])} ± {_fmt(s['dice_fg_std'])}", _fmt(s["dice_paper"]), _fmt(s["folding"], 3),
                _fmt(s["std_log_jac"]), _fmt(s["epe"], 2)]
        if pvalues is not None:
            p = pvalues.get(name)
            row.append("—" if p is None else f"{p:.2g}")
        lines.append("| " + " | ".join(row) + " |")
    per_class_names = list(next(iter(summaries.values()))["dice_per_class"]) if summaries else []
    if per_class_names:
        lines += ["", "Per-class Dice (mean over pairs where the class is present in either map):", "",
                  "| method | " + " | ".join(per_class_names) + " |", "|" + "---|" * (len(per_class_names) + 1)]
        for name, s in summaries.items():
            lines.append(f"| {LABELS.get(name, name)} | "
                         + " | ".join(_fmt(s["dice_per_class"][n]) for n in per_class_names) + " |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_results(out: str | Path, rows_by_method: dict[str, list[dict]], extra: dict | None = None,
                  pvalues: dict | None = None, lambdas: dict | None = None) -> dict[str, dict]:
    """results.json (per-pair rows + summaries) and results.md (the table) in `out`; returns the summaries."""
    out = Path(out)
    summaries = {name: summarize(rows) for name, rows in rows_by_method.items()}
    payload = {"summary": summaries, "pairs": rows_by_method, **(extra or {})}
    if pvalues is not None:
        payload["wilcoxon_deepsim_seg_vs"] = pvalues
    _write_text(out / "results.json", json.dumps(payload, indent=1))
    _write_text(out / "results.md", markdown_table(summaries, pvalues, lambdas))
    return summaries


def wilcoxon_vs(rows_by_method: dict[str, list[dict]], reference: str = "deepsim_seg") -> dict[str, float | None]:
    """Two-sided Wilcoxon signed-rank p of `reference` vs every other method on the paired per-pair fg Dice."""
    from scipy.stats import wilcoxon

    if reference not in rows_by_method:
        return {}
    ref = [r["dice_fg"] for r in rows_by_method[reference]]
    out: dict[str, float | None] = {}
    for name, rows in rows_by_method.items():
        if name == reference:
            continue
        other = [r["dice_fg"] for r in rows]
        pairs = [(a, b) for a, b in zip(ref, other, strict=True) if a is not None and b is not None]
        diffs = [a - b for a, b in pairs]
        if len(pairs) < 2 or all(d == 0 for d in diffs):
            out[name] = None  # undefined: too few pairs or identical results
            continue
        out[name] = float(wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, flush=True)


def run_study(cfg: StudyConfig) -> dict:
    """Train, evaluate, compare. Writes OUT/{features,reg}/..., OUT/results.{json,md}, OUT/dice_boxplot.png."""
    from deepsim_rt.evaluate.figures import dice_boxplot
    from deepsim_rt.train.features import train_features
    from deepsim_rt.train.registration import train_registration

    t_start = time.perf_counter()
    out = Path(cfg.out)
    source = open_source(cfg.data)
    evals = cfg.eval_sets
    if "real-2d" in evals and source.ndim != 2:
        raise ValueError(f"--eval real-2d scores 2D nets on real brain slices; the data {cfg.data!r} are "
                         f"{source.ndim}D")
    real = None
    if "real-2d" in evals:  # fetch / build the real slices before any training: a missing cache fails first
        from deepsim_rt.evaluate.real_slices import SETS, real_pairs, real_slices

        sl = real_slices(cfg.cache)
        real = {kind: real_pairs(kind, slices=sl) for kind in SETS}
    losses = cfg.loss_list
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if "vgg" in losses and not cfg.vgg_weights:
        skipped["vgg"] = "no --vgg-weights FILE given (ImageNet VGG16 weights cannot be downloaded here)"
    if "vgg" in losses and source.ndim != 2:
        skipped["vgg"] = "the VGG similarity is 2D only"
    for name, why in skipped.items():
        _say(f"[study] skipping {name}: {why}")
    losses = [n for n in losses if n not in skipped]
    common = dict(data=cfg.data, preset=cfg.preset, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                  progress=cfg.progress, resume=True, threads=cfg.threads)

    extractors = {"seg": cfg.seg_model, "ae": cfg.ae_model}
    needed = {"seg"} if cfg.weights_out else set()
    needed |= {n.split("_")[1] for n in losses if n.startswith("deepsim_")}
    if cfg.weights_out:
        needed.add("ae")
    for task in sorted(needed):
        if extractors[task]:
            continue
        t0 = time.perf_counter()
        fcfg = FeatureTrainConfig(task=task, out=str(out / "features" / task), steps=cfg.feature_steps,
                                  val_every=max(1, cfg.feature_steps // 5),
                                  checkpoint_every=max(1, cfg.feature_steps // 5), **common)
        extractors[task] = train_features(fcfg)["model"]
        timings[f"features-{task}"] = time.perf_counter() - t0

    rows: dict[str, list[dict]] = {}
    max_pairs = cfg.eval_pairs or None
    test = "test" in evals
    if test:
        t0 = time.perf_counter()
        rows["none"] = evaluate_pairs(source, None, "test", max_pairs)
        timings["evaluate-none"] = time.perf_counter() - t0
    lambdas: dict[str, float] = {}
    sweep_log: dict[str, dict[str, float]] = {}
    models: dict[str, str] = {}
    for loss in losses:
        base = DEFAULT_LAMBDAS[loss]
        grid = [base / 4, base, base * 4] if cfg.lam_sweep else [base]
        best = None
        for lam in grid:
            t1 = time.perf_counter()
            tag = loss if not cfg.lam_sweep else f"{loss}_lam{lam:g}"
            rcfg = RegistrationTrainConfig(
                loss=loss, lam=lam, extractor=extractors.get(loss.split("_")[1]) if loss.startswith("deepsim_")
                else None, vgg_weights=cfg.vgg_weights if loss == "vgg" else None, out=str(out / "reg" / tag),
                steps=cfg.reg_steps, val_every=max(1, cfg.reg_steps // 5),
                checkpoint_every=max(1, cfg.reg_steps // 5), **common)
            summary = train_registration(rcfg)
            timings[f"reg-{tag}"] = time.perf_counter() - t1
            val_dice = summary["last_validation"]["dice"]
            sweep_log.setdefault(loss, {})[f"{lam:g}"] = val_dice
            if best is None or val_dice > best[0]:
                best = (val_dice, lam, summary["model"])
        _, lambdas[loss], models[loss] = best
        if test:
            t1 = time.perf_counter()
            rows[loss] = evaluate_model(models[loss], source, "test", max_pairs)
            timings[f"evaluate-{loss}"] = time.perf_counter() - t1
            _say(f"[study] {loss}: lambda {lambdas[loss]:g}, test Dice fg {summarize(rows[loss])['dice_fg']:.4f}")
    extra = {"lambdas": lambdas, "lambda_sweep_val_dice": sweep_log, "skipped": skipped, "models": models,
             "extractors": extractors, "timings_s": timings, "config": dataclasses.asdict(cfg)}
    summaries, pvalues, summaries_real = {}, {}, {}
    if real is not None:
        t1 = time.perf_counter()
        summaries_real = evaluate_real(real, models, out, extra)
        timings["evaluate-real-2d"] = time.perf_counter() - t1
        _say("[study] real-2d: " + ", ".join(f"{k} {n} {v['dice_fg']:.4f}" for k, per in summaries_real.items()
                                             for n, v in per.items()))
    timings["total"] = time.perf_counter() - t_start
    if test:
        pvalues = wilcoxon_vs(rows)
        summaries = write_results(out, rows, extra, pvalues, lambdas)
        dice_boxplot(rows, out / "dice_boxplot.png", title=f"Test-pair Dice by similarity ({source.name})")
    if cfg.weights_out:
        export_weights(cfg.weights_out, extractors["seg"], extractors["ae"], models.get("deepsim_seg"))
    return {"summaries": summaries, "pvalues": pvalues, "lambdas": lambdas, "skipped": skipped,
            "timings_s": timings, "out": str(out), "real": summaries_real}


def wilcoxon_matrix(rows_by_method: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """{a: {b: p}}: two-sided paired Wilcoxon signed-rank p of every method against every other (wilcoxon_vs)."""
    return {a: wilcoxon_vs(rows_by_method, reference=a) for a in rows_by_method}


def real_markdown(summaries: dict[str, dict[str, dict]], matrices: dict[str, dict[str, dict]]) -> str:
    """Per real set: one row per method (Dice mean +- sample sd, n, folding %, p vs none, p vs DeepSim_seg), then
    the matrix of paired Wilcoxon p (row vs column)."""
    lines = []
    for kind, per in summaries.items():
        mat = matrices[kind]
        names = list(per)
        lines += [f"### real_{kind}", "", "| method | Dice (mean ± sd) | n | folding % | SD log det J | "
                  "Wilcoxon p vs none | Wilcoxon p vs DeepSim_seg |", "|---|---|---|---|---|---|---|"]
        for n in names:
            s = per[n]
            p_none = mat.get("none", {}).get(n) if n != "none" else None
            p_ds = mat.get("deepsim_seg", {}).get(n) if n != "deepsim_seg" else None
            lines.append(f"| {LABELS.get(n, n)} | {_fmt(s['dice_fg'])} ± {_fmt(s['dice_fg_std'])} | {s['pairs']} | "
                         f"{_fmt(s['folding'])} | {_fmt(s['std_log_jac'])} | "
                         f"{'—' if p_none is None else f'{p_none:.2g}'} | {'—' if p_ds is None else f'{p_ds:.2g}'} |")
        n_pairs = per[names[0]]["pairs"] if names else 0
        lines += ["", f"Paired Wilcoxon p, real_{kind} (row vs column, two-sided, {n_pairs} pairs):", "",
                  "| | " + " | ".join(LABELS.get(n, n) for n in names) + " |", "|" + "---|" * (len(names) + 1)]
        for a in names:
            cells = ["—" if a == b or mat[a].get(b) is None else f"{mat[a][b]:.2g}" for b in names]
            lines.append(f"| {LABELS.get(a, a)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def real_register_fn(model: torch.nn.Module) -> RegisterFn:
    """model_register_fn for the real slices, each image normalized by the model's input contract first, as the
    runtime feeds it: "minmax" min-max, "percentile" data.synth.robust_normalize (the slices are robust-normalized
    already; normalizing again moves them by the percentiles' interpolation, <= 0.006 Dice on the 12 pairs)."""
    from deepsim_rt.data.synth import robust_normalize
    from deepsim_rt.train.data import minmax

    base = model_register_fn(model)
    norm = minmax if model.cfg.intensity == "minmax" else robust_normalize
    return lambda moving, fixed: base(norm(moving), norm(fixed))


def evaluate_real(real: dict, models: dict[str, str], out: Path, extra: dict | None = None) -> dict[str, dict]:
    """Score no registration and every model {loss: path} on each real slice set {kind: [RealSlicePair]}; writes
    OUT/real_2d.{json,md} and OUT/real_2d_<kind>_boxplot.png; returns {kind: {method: summary}}."""
    from deepsim_rt.evaluate.figures import dice_boxplot
    from deepsim_rt.evaluate.real_slices import evaluate_real_pairs

    nets = {name: load_model(path).eval() for name, path in models.items()}
    rows = {kind: {"none": evaluate_real_pairs(pairs, None),
                   **{n: evaluate_real_pairs(pairs, real_register_fn(m)) for n, m in nets.items()}}
            for kind, pairs in real.items()}
    summaries = {kind: {n: summarize(r) for n, r in per.items()} for kind, per in rows.items()}
    matrices = {kind: wilcoxon_matrix(per) for kind, per in rows.items()}
    payload = {"summary": summaries, "wilcoxon": matrices, "pairs": rows, "models": models,
               "protocol": "deepsim_rt.evaluate.real_slices (12 pairs per set from 3 brains x 2 slices: not "
                           "independent)", **(extra or {})}
    _write_text(out / "real_2d.json", json.dumps(payload, indent=1, default=str))  # a Path cache folder
    _write_text(out / "real_2d.md", real_markdown(summaries, matrices))
    titles = {"t1": "real T1 slice pairs", "xc": "real T1 -> T2-like fixed slice pairs"}
    for kind, per in rows.items():
        dice_boxplot(per, out / f"real_2d_{kind}_boxplot.png",
                     title=f"Dice over shared structures, {titles.get(kind, kind)} (12 pairs, 3 brains)")
    return summaries


def export_weights(folder: str | Path, seg: str | None, ae: str | None, reg: str | None) -> None:
    """Copy the trained models to `folder` as seg/ae/reg.safetensors (each copied atomically)."""
    folder = Path(folder)
    for name, src in (("seg", seg), ("ae", ae), ("reg", reg)):
        if src is None:
            raise ValueError(f"cannot export weights: no {name} model was trained (include deepsim_seg in --losses)")
        atomic_write(folder / f"{name}.safetensors", lambda tmp, src=src: shutil.copyfile(src, tmp))
    _say(f"[study] weights written to {folder}")
