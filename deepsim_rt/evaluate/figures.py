"""Figures: the study's Dice box plot and the registration panel (fixed / moving / warped / difference / grid /
checkerboard). matplotlib with the Agg backend (no display needed); files are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepsim_rt.nn import atomic_write

__all__ = ["dice_boxplot", "registration_panel", "checkerboard"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def dice_boxplot(rows_by_method: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Box plot of the per-pair foreground Dice of each method (one box per method, points overlaid)."""
    from deepsim_rt.evaluate.study_config import LABELS

    plt = _plt()
    names = list(rows_by_method)
    data = [[r["dice_fg"] for r in rows_by_method[n] if r["dice_fg"] is not None] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.0, 4.2))
    ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "k"})
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=8, alpha=0.45, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(names) + 1), [LABELS.get(n, n) for n in names], rotation=20)
    ax.set_ylabel("Dice (foreground mean per pair)")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two same-shape 2D images (tiles per the shorter side)."""
    h, w = a.shape
    t = max(1, min(h, w) // tiles)
    yy, xx = np.meshgrid(np.arange(h) // t, np.arange(w) // t, indexing="ij")
    return np.where((yy + xx) % 2 == 0, a, b)


def _grid_lines(ax, u: np.ndarray, step: int, color: str = "tab:red") -> None:
    """Deformed grid: the image of a regular grid under phi(p) = p + u(p), u (2, H, W) in (row, col) voxels."""
    h, w = u.shape[1:]
    rows = np.arange(h)[:, None] + u[0]
    cols = np.arange(w)[None, :] + u[1]
    for i in range(0, h, step):
        ax.plot(cols[i, :], rows[i, :], color=color, lw=0.6)
    for j in range(0, w, step):
        ax.plot(cols[:, j], rows[:, j], color=color, lw=0.6)


def registration_panel(fixed: torch.Tensor, moving: torch.Tensor, warped: torch.Tensor, u: torch.Tensor,
                       path: str | Path, title: str = "", labels: dict[str, torch.Tensor] | None = None,
                       stats: dict[str, str] | None = None) -> Path:
    """Two rows of four panels:
        fixed | moving | warped moving | checkerboard (warped / fixed)
        |moving - fixed| | |warped - fixed| | deformed grid on the warped image | displacement magnitude

    2D tensors (H, W) for images and (2, H, W) for u (3D callers pass a slice and its in-plane components).
    labels: optional {"fixed": ..., "warped": ...} label maps drawn as contours on the fixed / warped panels.
    stats: short strings shown under the title (e.g. Dice before/after). Row 0 of the array is drawn at the bottom.
    """
    plt = _plt()
    f, m, w = (x.detach().cpu().float().numpy() for x in (fixed, moving, warped))
    uu = u.detach().cpu().float().numpy()
    diff_before, diff_after = np.abs(m - f), np.abs(w - f)
    vmax = max(float(np.percentile(diff_before, 99.5)), 1e-6)
    h, wd = f.shape
    fig, axes = plt.subplots(2, 4, figsize=(4 * 3.2 * wd / max(h, wd) + 1.5, 2 * 3.2 * h / max(h, wd) + 1.2))
    show = dict(origin="lower", interpolation="nearest")
    gray = dict(cmap="gray", vmin=0.0, vmax=1.0, **show)
    axes[0, 0].imshow(f, **gray)
    axes[0, 0].set_title("fixed")
    axes[0, 1].imshow(m, **gray)
    axes[0, 1].set_title("moving")
    axes[0, 2].imshow(w, **gray)
    axes[0, 2].set_title("warped moving")
    axes[0, 3].imshow(checkerboard(w, f), **gray)
    axes[0, 3].set_title("checkerboard warped / fixed")
    if labels:
        for ax, key in ((axes[0, 0], "fixed"), (axes[0, 2], "warped")):
            if key in labels:
                lab = labels[key].detach().cpu().numpy()
                ax.contour(lab, levels=np.arange(0.5, lab.max() + 0.5), colors="tab:cyan", linewidths=0.5,
                           origin="lower")
    err = (diff_before.mean(), diff_after.mean())
    axes[1, 0].imshow(diff_before, cmap="magma", vmin=0.0, vmax=vmax, **show)
    axes[1, 0].set_title(f"|moving − fixed| (mean {err[0]:.3f})")
    im = axes[1, 1].imshow(diff_after, cmap="magma", vmin=0.0, vmax=vmax, **show)
    axes[1, 1].set_title(f"|warped − fixed| (mean {err[1]:.3f})")
    fig.colorbar(im, ax=axes[1, 1], fraction=0.046, pad=0.02)
    axes[1, 2].imshow(w, **gray)
    _grid_lines(axes[1, 2], uu, max(2, min(h, wd) // 16))
    axes[1, 2].set_xlim(-0.5, wd - 0.5)
    axes[1, 2].set_ylim(-0.5, h - 0.5)
    axes[1, 2].set_title("deformed grid")
    mag = np.sqrt((uu ** 2).sum(0))
    im = axes[1, 3].imshow(mag, cmap="viridis", vmin=0.0, **show)
    axes[1, 3].set_title(f"|u| voxels (max {float(mag.max()):.2f})")
    fig.colorbar(im, ax=axes[1, 3], fraction=0.046, pad=0.02)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.title.set_fontsize(10)
    heading = title
    if stats:
        heading += ("\n" if heading else "") + "   ".join(f"{k}: {v}" for k, v in stats.items())
    if heading:
        fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
