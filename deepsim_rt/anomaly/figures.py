"""Figures of change maps: the overlay of one registration (`deepsim-rt changes`) and the benchmark figure
(`deepsim-rt evaluate-changes`). 3D inputs are shown as the slice along the first axis named by the caller.
Written atomically (matplotlib Agg, as deepsim_rt.evaluate.figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepsim_rt.evaluate.figures import _plt, _save

__all__ = ["overlay_figure", "benchmark_figure", "slice_of"]


def slice_of(x, index: int | None) -> np.ndarray:
    """A 2D numpy view: x itself when 2D, else x[index] (first axis)."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return a if a.ndim == 2 else a[index]


def _panels(axes, fixed: np.ndarray, maps: dict[str, np.ndarray], mask: np.ndarray | None) -> None:
    show = dict(origin="lower", interpolation="nearest")
    axes[0].imshow(fixed, cmap="gray", vmin=0.0, vmax=1.0, **show)
    axes[0].set_title("fixed" + (" + true change" if mask is not None else ""))
    if mask is not None and mask.any():
        axes[0].contour(mask.astype(float), levels=[0.5], colors="tab:cyan", linewidths=0.8, origin="lower")
    for ax, (name, m) in zip(axes[1:], maps.items(), strict=True):
        ax.imshow(fixed, cmap="gray", vmin=0.0, vmax=1.0, **show)
        vmax = max(float(np.percentile(m, 99.9)), 1e-6)
        im = ax.imshow(np.ma.masked_less(m, 0.15 * vmax), cmap="inferno", vmin=0.0, vmax=vmax, alpha=0.8, **show)
        ax.set_title(name)
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.title.set_fontsize(9)


def overlay_figure(fixed: np.ndarray, maps: dict[str, np.ndarray], path: str | Path, title: str = "",
                   mask: np.ndarray | None = None) -> Path:
    """One row: the fixed image, then each score map over it (hot colours, the lowest 15 % of its range hidden).

    fixed (H, W) in [0, 1]; maps name -> (H, W) scores; mask (H, W) bool drawn as a contour (optional)."""
    plt = _plt()
    h, w = fixed.shape
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(n * 3.0 * w / max(h, w) + 1.0, 3.0 * h / max(h, w) + 0.8))
    _panels(np.atleast_1d(axes), fixed, maps, mask)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def benchmark_figure(case, scores: dict[str, torch.Tensor] | None, aucs: dict[str, list[float]],
                     labels: dict[str, str], path: str | Path, title: str = "") -> Path:
    """Top: an example case (fixed + true change, then each method's score map); bottom: per-case AUC box plot."""
    plt = _plt()
    names = list(aucs)
    idx = None
    if case.mask.dim() == 4:  # (1, D, H, W): the slice with the most changed voxels
        idx = int(case.mask[0].flatten(1).sum(1).argmax())
    fixed = slice_of(case.fixed[0], idx)
    fig = plt.figure(figsize=(2.5 * (1 + len(names)), 5.8))
    grid = fig.add_gridspec(2, 1 + len(names), height_ratios=(1.0, 1.1))
    if scores is not None:
        axes = [fig.add_subplot(grid[0, i]) for i in range(1 + len(names))]
        _panels(axes, fixed, {labels[n]: slice_of(scores[n][0], idx) for n in names},
                slice_of(case.mask[0], idx) > 0.5)
    ax = fig.add_subplot(grid[1, :])
    data = [aucs[n] for n in names]
    ax.boxplot(data, showmeans=True, meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "k"})
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=9, alpha=0.5, color="tab:blue", zorder=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(1, len(names) + 1),
                  [f"{labels[n]}\n{np.mean(aucs[n]):.3f} ± {np.std(aucs[n], ddof=1):.3f}" for n in names], fontsize=8)
    ax.set_ylabel("voxel-level ROC AUC per case")
    ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
