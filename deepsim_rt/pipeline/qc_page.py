"""What a person looks at: one QC picture per registered pair and one HTML page for a batch (issue 20 item 6).

    write_pair_picture(out / "qc.png", fixed, warped, jacobian, summary)    # per pair, inside its folder
    write_batch_page(out_dir, rows)                                         # out_dir/qc.html: every pair, outliers

The picture (PNG, matplotlib Agg, written atomically) has one row per view (2D: the image; 3D: the middle slice
across each array axis) and three panels per row:
  overlay       fixed in magenta, warped moving in green (grey where they agree, colour where they do not)
  checkerboard  tiles of warped and fixed (deepsim_rt.evaluate.figures.checkerboard, as the demo draws it)
  Jacobian      det J of p -> p + u(p) on a diverging scale centred at 1 (blue: shrinking, red: growing),
                folded voxels (det J <= 0) outlined in yellow
with the pair's name, folding %, sd log|J| and the similarity (NCC of warped and fixed inside the fixed image's
foreground) in its title. `write_pair_picture` records that NCC in summary["qc"]["ncc"] so that the batch can flag
it.

The page (qc.html, self-contained HTML + CSS, written atomically, links RELATIVE to out_dir so the folder can be
moved or served as it is) lists the flagged pairs first, then every pair in the given order as a card: its
picture, status, folding %, NCC, the reasons it is flagged, and links to its summary.json. A pair is flagged when
  failed                 status "failed" (its error is shown)
  folding               folding_percent > folding_max (default FOLDING_MAX_PERCENT)
  low similarity        ncc < ncc_min (default NCC_MIN), or, with >= ROBUST_MIN_ROWS pairs having an NCC, below
                         median - 3 x 1.4826 x MAD of the batch's NCCs (a robust z-score below -3)
  no picture            the picture file is missing
A small inline script counts the pictures that loaded (body data-images-loaded / data-images-broken) and marks a
broken one on its card; the test opens the page in headless Chromium and reads those counts.

No torch at import (the pipeline's rule); matplotlib is imported when a picture is drawn.
"""

from __future__ import annotations

import html
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepsim_rt._io import atomic_write

__all__ = ["write_pair_picture", "write_batch_page", "pair_ncc", "flag_reasons", "PAGE_NAME", "PICTURE_NAME",
           "FOLDING_MAX_PERCENT", "NCC_MIN", "ROBUST_MIN_ROWS"]

PAGE_NAME = "qc.html"
PICTURE_NAME = "qc.png"
# Folding: the bundled nets fold 0.022 % (3D) and <= 0.006 % of voxels on their test pairs (README measured
# figures); 1 % is 45x the worst of them.
FOLDING_MAX_PERCENT = 1.0
# Similarity: NCC of warped and fixed over the fixed foreground. Measured on the synthetic test pairs with the
# bundled nets (first 16 2D and 6 3D test pairs, pipeline.qc_page.pair_ncc): unregistered 0.57-0.76, registered
# 0.66-0.93. Below 0.5 the warped image is less like the fixed one than any unregistered pair: a gross failure.
# Subtler outliers are caught by the batch's robust bound (`_ncc_floor`).
NCC_MIN = 0.5
ROBUST_MIN_ROWS = 5  # a median / MAD of fewer NCCs says little about what is unusual in the batch
_MAD_TO_SD = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation


def _display_range(x: np.ndarray) -> tuple[float, float]:
    """The 1st .. 99th percentile of the image (from at most ~500k voxels, evenly strided: a 1 mm head has 5M
    and the percentile of all of them cost 0.1 s per call), for a robust [0, 1] display scaling."""
    flat = np.asarray(x).ravel()
    sub = flat[:: max(1, flat.size // 500_000)]
    lo, hi = (float(v) for v in np.percentile(sub, [1, 99]))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def _scaled(x: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
    lo, hi = lo_hi
    return np.clip((np.asarray(x, dtype=np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def pair_ncc(fixed: np.ndarray, warped: np.ndarray) -> float | None:
    """Normalized cross-correlation (Pearson) of warped and fixed over the fixed foreground (voxels above 5 % of
    the fixed image's 1..99 % range); None when either is constant there. Same shape required."""
    f = np.asarray(fixed, dtype=np.float64)
    w = np.asarray(warped, dtype=np.float64)
    if f.shape != w.shape:
        raise ValueError(f"fixed and warped must have the same shape, got {f.shape} and {w.shape}")
    lo, hi = _display_range(f)
    fg = f > lo + 0.05 * (hi - lo)
    if fg.sum() < 2:
        fg = np.ones_like(fg)
    a, b = f[fg] - f[fg].mean(), w[fg] - w[fg].mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return None if den <= 0 else float((a * b).sum() / den)


def _views(x: np.ndarray) -> list[tuple[str, tuple]]:
    """(label, index) of the 2D views: the image itself, or the middle slice across each axis of a volume."""
    if x.ndim == 2:
        return [("", (slice(None), slice(None)))]
    out = []
    for ax in range(3):
        idx: list[Any] = [slice(None)] * 3
        idx[ax] = x.shape[ax] // 2
        out.append((f"axis {ax} = {x.shape[ax] // 2}", tuple(idx)))
    return out


def _check_arrays(fixed, warped, jacobian) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    f = np.asarray(fixed, dtype=np.float32)
    w = np.asarray(warped, dtype=np.float32)
    if f.ndim not in (2, 3) or f.shape != w.shape:
        raise ValueError(f"fixed and warped must be 2D or 3D arrays of the same shape, got {f.shape} and {w.shape}")
    if min(f.shape) < 2:
        raise ValueError(f"every spatial size must be >= 2 to draw a picture, got {f.shape}")
    j = None
    if jacobian is not None:
        j = np.asarray(jacobian, dtype=np.float32)
        if j.shape != f.shape:
            raise ValueError(f"jacobian must have the fixed image's shape {f.shape}, got {j.shape}")
    return f, w, j


def write_pair_picture(path: str | os.PathLike, fixed: np.ndarray, warped: np.ndarray, jacobian: np.ndarray | None,
                       summary: dict[str, Any]) -> Path:
    """Draw one pair's QC picture (module docstring) at `path` (.png, atomically); returns the path.

    fixed, warped: (*S) arrays on the fixed grid (2D or 3D, any intensity range; shown 1..99 % scaled);
    jacobian: (*S) det J map (pipeline.qc.displacement_qc), or None (that column is left out). summary: the pair's
    summary dict (name / moving / fixed, qc.folding_percent, qc.sd_log_jacobian are shown when present); its
    summary["qc"]["ncc"] is set to `pair_ncc(fixed, warped)`.
    """
    from deepsim_rt.evaluate.figures import _plt, checkerboard

    f, w, j = _check_arrays(fixed, warped, jacobian)
    qc = summary.setdefault("qc", {})
    ncc = pair_ncc(f, w)
    qc["ncc"] = ncc
    f_range, w_range = _display_range(f), _display_range(w)
    views = _views(f)
    cols = 3 if j is not None else 2
    plt = _plt()
    sl0 = f[views[0][1]]
    size = 3.0 * max(1.0, sl0.shape[1] / max(sl0.shape[0], 1)) ** 0.5
    fig, axes = plt.subplots(len(views), cols, figsize=(cols * size + 0.8, len(views) * size + 0.9), squeeze=False)
    show = dict(origin="lower", interpolation="nearest")
    for r, (label, idx) in enumerate(views):
        a, b = _scaled(f[idx], f_range), _scaled(w[idx], w_range)
        rgb = np.stack([a, b, a], axis=-1)  # magenta fixed + green warped: grey where equal
        axes[r, 0].imshow(rgb, **show)
        axes[r, 0].set_title(f"fixed (magenta) / warped (green){'  ' + label if label else ''}")
        axes[r, 1].imshow(checkerboard(b, a), cmap="gray", vmin=0.0, vmax=1.0, **show)
        axes[r, 1].set_title("checkerboard warped / fixed")
        if j is not None:
            jj = j[idx]
            im = axes[r, 2].imshow(jj, cmap="RdBu_r", vmin=0.0, vmax=2.0, **show)
            if (jj <= 0).any():
                axes[r, 2].contour((jj <= 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.8,
                                   origin="lower")
            axes[r, 2].set_title(f"det J (folded: {int((jj <= 0).sum())} px)")
            fig.colorbar(im, ax=axes[r, 2], fraction=0.046, pad=0.02)
    for ax in axes.ravel():
        ax.set_axis_off()  # no ticks: their creation was 0.5 of the 2.4 s a 1 mm picture took
        ax.title.set_fontsize(9)
    name = summary.get("name") or f"{Path(str(summary.get('moving', 'moving'))).name} -> " \
                                  f"{Path(str(summary.get('fixed', 'fixed'))).name}"
    facts = [f"NCC {ncc:.3f}" if ncc is not None else "NCC n/a"]
    if qc.get("folding_percent") is not None:
        facts.append(f"folding {qc['folding_percent']:.3f} %")
    if qc.get("sd_log_jacobian") is not None:
        facts.append(f"sd log|J| {qc['sd_log_jacobian']:.3f}")
    fig.suptitle(f"{name}\n" + "   ".join(facts), fontsize=10)
    # fixed margins, not tight_layout: its text measuring was 0.75 of the 2.8 s a 1 mm picture took
    height = len(views) * size + 0.9  # inches, as in figsize: title lines + panel titles take ~0.85 of them
    fig.subplots_adjust(left=0.01, right=0.93, bottom=0.01, top=1.0 - 0.85 / height, wspace=0.08, hspace=0.2)
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The batch page
# ----------------------------------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def _ncc_floor(rows: Sequence[Mapping[str, Any]], ncc_min: float) -> tuple[float, str]:
    """The NCC below which a pair is flagged, and how it was set (absolute, or the batch's robust bound)."""
    values = [v for v in (_num(r.get("ncc")) for r in rows if r.get("status", "done") != "failed") if v is not None]
    if len(values) < ROBUST_MIN_ROWS:
        return ncc_min, f"NCC < {ncc_min:g}"
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    robust = med - 3.0 * _MAD_TO_SD * mad
    if robust > ncc_min:
        return robust, f"NCC < {robust:.3f} (batch median {med:.3f} - 3 x 1.4826 x MAD {mad:.3f})"
    return ncc_min, f"NCC < {ncc_min:g}"


def flag_reasons(row: Mapping[str, Any], folding_max: float = FOLDING_MAX_PERCENT, ncc_floor: float = NCC_MIN,
                 picture_exists: bool = True) -> list[str]:
    """Why one row is an outlier (empty: it is not). See the module docstring."""
    if row.get("status") == "failed":
        return [f"failed: {row.get('error') or 'no reason given'}"]
    out = []
    fold = _num(row.get("folding_percent"))
    if fold is not None and fold > folding_max:
        out.append(f"folding {fold:.3f} % > {folding_max:g} %")
    ncc = _num(row.get("ncc"))
    if ncc is not None and ncc < ncc_floor:
        out.append(f"low similarity: NCC {ncc:.3f} < {ncc_floor:.3f}")
    if not picture_exists:
        out.append("no QC picture")
    return out


def _with_summary_qc(root: Path, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row, with ncc / folding_percent it lacks (or holds as blank CSV cells) read from its folder's
    summary.json "qc" (written by `register`), so the batch table's rows can be passed as they are."""
    out = dict(row)
    missing = [k for k in ("ncc", "folding_percent") if out.get(k) in (None, "")]
    summary = root / str(out.get("folder") or out["name"]) / "summary.json"
    if missing and summary.is_file():
        import json

        try:
            qc = json.loads(summary.read_text(encoding="utf-8")).get("qc") or {}
        except (OSError, ValueError, AttributeError):
            qc = {}
        for k in missing:
            if qc.get(k) is not None:
                out[k] = qc[k]
    return out


def _rel(target: Path, root: Path) -> str:
    """`target` relative to `root` as a URL path (forward slashes, each part percent-encoded)."""
    from urllib.parse import quote

    rel = os.path.relpath(target, root)
    return "/".join(quote(p) for p in Path(rel).parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em} .meta{color:#555;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border:2px solid #ccc;border-radius:6px;padding:8px;width:560px}
.card.flagged{border-color:#d33} .card img{width:100%;height:auto;display:block}
.card.broken .pic::after{content:"picture did not load";color:#d33}
.status{font-weight:bold} .status.failed{color:#d33} .status.done,.status.skipped{color:#286}
ul.why{color:#d33;margin:.3em 0 .3em 1.1em;padding:0} table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
"""

# Counts the pictures that loaded or failed once the page has loaded (the browser test reads these attributes)
# and marks a broken picture's card; nothing else runs.
_SCRIPT = """
window.addEventListener('load', function () {
  var ok = 0, bad = 0;
  document.querySelectorAll('img.qc').forEach(function (im) {
    if (im.complete && im.naturalWidth > 0) { ok++; } else { bad++; im.closest('.card').classList.add('broken'); }
  });
  document.body.dataset.imagesLoaded = ok; document.body.dataset.imagesBroken = bad;
});
"""


def write_batch_page(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                     folding_max: float = FOLDING_MAX_PERCENT, ncc_min: float = NCC_MIN,
                     title: str = "deepsim-rt batch QC") -> Path:
    """Write out_dir/qc.html for a batch (module docstring); returns its path.

    rows: one mapping per pair, in the order to show: name (required, the pair's folder inside out_dir unless
    `folder` is given), status ("done" | "skipped" | "failed"), error, folding_percent, ncc, picture (path of the
    pair's QC PNG; default out_dir/<name>/qc.png), folder, and any of register_s / warnings (shown). A missing or
    blank ncc / folding_percent is read from <folder>/summary.json "qc" (`write_pair_picture` puts ncc there), so
    the batch table's rows (pipeline.batch TABLE_COLUMNS) can be passed as they are. Relative paths in rows are
    relative to out_dir. Links in the page are relative.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise ValueError(f"out_dir must be an existing folder (the batch output), got {str(root)!r}")
    if not isinstance(folding_max, int | float) or not folding_max >= 0:
        raise ValueError(f"folding_max must be a number >= 0 (percent), got {folding_max!r}")
    if not isinstance(ncc_min, int | float) or not -1.0 <= ncc_min <= 1.0:
        raise ValueError(f"ncc_min must be a number in [-1, 1], got {ncc_min!r}")
    for i, row in enumerate(rows):
        if "name" not in row:
            raise ValueError(f"rows[{i}] needs a 'name', got keys {sorted(row)}")
    rows = [_with_summary_qc(root, row) for row in rows]
    floor, floor_text = _ncc_floor(rows, float(ncc_min))
    cards, flagged = [], []
    for i, row in enumerate(rows):
        name = str(row["name"])
        folder = root / str(row.get("folder") or name)
        pic = Path(row["picture"]) if row.get("picture") else folder / PICTURE_NAME
        pic = pic if pic.is_absolute() else root / pic
        has_pic = pic.is_file()
        why = flag_reasons(row, folding_max, floor, picture_exists=has_pic or row.get("status") == "failed")
        anchor = f"pair-{i}"
        if why:
            flagged.append((anchor, name, why))
        status = str(row.get("status", "done"))
        facts = []
        for key, label, fmt in (("folding_percent", "folding %", "{:.3f}"), ("ncc", "NCC", "{:.3f}"),
                                ("register_s", "register s", "{:.1f}"), ("warnings", "warnings", "{}")):
            v = row.get(key)
            if v in (None, ""):
                continue
            x = _num(v)
            text = fmt.format(x) if x is not None and key != "warnings" else str(v)
            facts.append(f"<tr><th>{label}</th><td>{html.escape(text)}</td></tr>")
        links = []
        if (folder / "summary.json").is_file():
            links.append(f'<a href="{_rel(folder / "summary.json", root)}">summary.json</a>')
        if folder.is_dir():
            links.append(f'<a href="{_rel(folder, root)}/">folder</a>')
        img = (f'<div class="pic"><a href="{_rel(pic, root)}"><img class="qc" src="{_rel(pic, root)}" '
               f'alt="QC picture of {html.escape(name)}" loading="eager"></a></div>') if has_pic else ""
        why_html = ("<ul class=\"why\">" + "".join(f"<li>{html.escape(w)}</li>" for w in why) + "</ul>") if why else ""
        cards.append(
            f'<div class="card{" flagged" if why else ""}" id="{anchor}"><h3>{html.escape(name)}</h3>'
            f'<span class="status {html.escape(status)}">{html.escape(status)}</span>{why_html}{img}'
            f'<table>{"".join(facts)}</table><div>{" · ".join(links)}</div></div>')
    flagged_html = ("<ol>" + "".join(f'<li><a href="#{a}">{html.escape(n)}</a>: {html.escape("; ".join(w))}</li>'
                                     for a, n, w in flagged) + "</ol>") if flagged else "<p>none</p>"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>"
        f"<h1>{html.escape(title)}</h1><p class=\"meta\">{len(rows)} pairs, {len(flagged)} flagged. Flagged when: "
        f"failed; folding &gt; {folding_max:g} %; {html.escape(floor_text)}; no QC picture.</p>"
        f"<h2>Flagged</h2>{flagged_html}<h2>All pairs</h2><div class=\"cards\">{''.join(cards)}</div>"
        f"<script>{_SCRIPT}</script></body></html>\n")
    path = root / PAGE_NAME
    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
