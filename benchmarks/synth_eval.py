"""Evaluate 2D registration nets trained on synthesized brains (deepsim_rt.data.synth) against today's bundled ones.

    python -m benchmarks.synth_eval --nets bundled=deepsim_rt/weights/default-2d/reg.safetensors \
        ncc=runs/reg2d_ncc/model.safetensors ... --extractor runs/seg2d/model.safetensors --out OUT.json

Test sets (each net sees the normalization it was trained with: bundled = min-max, synthesis nets = robust
percentiles, deepsim_rt.data.synth.robust_normalize):
  synthetic: the bundled default-2d TEST pairs (64; foreground Dice of the 6 tissue classes, labels nearest);
  synth:     32 synth-2d test pairs (cross-contrast in general: each image draws its own template);
  real:      axial 2 mm slices (z = +4 and +8 mm, the MNI152 2 mm grid, resampled from world coordinates) of the
             three labelled real brains of deepsim_rt.data.real_brains (colin27, fsaverage, cat12: every ordered
             pair, 6 x 2 = 12 pairs; Dice over the shared subcortical structures present in the fixed slice with
             >= 5 voxels); "t1" = both real T1s; "xc" = the fixed brain made T2-like by a non-monotone map of ITS OWN
             T1 intensities (knots at its own CSF / GM / WM means from a 3-class k-means of the brain's slice:
             background dark, CSF bright, GM mid, WM dark), so its edges, noise and partial volume stay the real
             image's.
  head: the moving brain's head (colin27 ch2 with skull; fsaverage orig, an average head) vs its brain as the
        moving image, same fixed brains and labels (8 pairs);
  refine (real xc): from the field of the net named by --refine-from, Adam refinement (deepsim_rt.refine,
             2D defaults, 3 levels x 25 steps) with NCC, DeepSim_seg (the synthesis extractor), MIND-SSC and NMI
             (lambda x --lam-scale, swept on synth-2d validation pairs: set "sweep"); ANTs SyN with mutual
             information (antspyx, from identity) as the classical reference.
No world-space pre-alignment is run beyond the common MNI grid (all brains are in MNI-like space; "identity" is
that baseline). The real slices and their score live in deepsim_rt.evaluate.real_slices (shared with `deepsim-rt
study --eval real-2d`), the T2-like map in deepsim_rt.realbench.contrast (real_slices keeps the same map below
realbench's floor; tests/test_study_real.py checks the two agree bit for bit).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from deepsim_rt.data.synth import SynthConfig, render_pair, robust_normalize
from deepsim_rt.evaluate.metrics import dice_foreground, folding_fraction
from deepsim_rt.evaluate.real_slices import REAL, SLICES_MM, real_slices, slice_dice
from deepsim_rt.kernels import warp
from deepsim_rt.nn import load_model
from deepsim_rt.realbench.contrast import t2_like  # the one T2-like map, shared with evaluate-real --contrast
from deepsim_rt.train.data import minmax


def structure_dice(warped: torch.Tensor, fixed: torch.Tensor) -> float:
    """Mean Dice over the label ids present in the fixed slice with >= 5 voxels (real_slices.slice_dice)."""
    return slice_dice(warped, fixed)[0]


# ------------------------------------------------------------------------------------------------ nets
def run_net(net, norm: str, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    f = minmax if norm == "minmax" else robust_normalize
    with torch.no_grad():
        _, u = net(f(moving), f(fixed))
    return u


def _refine(moving, fixed, init, loss: str, extractor, lam_scale: float = 1.0):
    from deepsim_rt.refine import RefineConfig, refine

    if loss in ("mind", "nmi"):
        # lam = NCC's 4.0 x --lam-scale (the sweep chose 0.2, now refine.config.LAM_SCALE's default for both)
        cfg = RefineConfig(loss=loss, lam=4.0 * lam_scale, progress=False)
        return refine(moving, fixed, init=init, config=cfg).displacement
    scale = {"ncc": 1.0, "deepsim_seg": 0.5}[loss] * lam_scale  # refine.config.LAM_SCALE
    cfg = RefineConfig(loss=loss, progress=False, lam=4.0 * scale)
    return refine(moving, fixed, init=init, config=cfg, extractor=extractor if loss.startswith("deepsim") else None
                  ).displacement


def ants_mi(moving: torch.Tensor, fixed: torch.Tensor, mlab: torch.Tensor) -> torch.Tensor:
    import ants

    f = ants.from_numpy(fixed[0, 0].numpy().astype(np.float32))
    m = ants.from_numpy(moving[0, 0].numpy().astype(np.float32))
    reg = ants.registration(f, m, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes")
    ml = ants.from_numpy(mlab[0, 0].numpy().astype(np.float32))
    w = ants.apply_transforms(f, ml, reg["fwdtransforms"], interpolator="nearestNeighbor")
    return torch.from_numpy(np.round(w.numpy()).astype(np.int64))[None, None]


def _wilcoxon(a: list, b: list) -> float | None:
    from scipy.stats import wilcoxon

    x, y = np.array([v[0] for v in a]), np.array([v[0] for v in b])
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 5 or np.allclose(x[ok], y[ok]):
        return None
    return float(wilcoxon(x[ok], y[ok]).pvalue)


def markdown(res: dict) -> str:
    """One table per test set: Dice mean +- sd, n, folding %, paired Wilcoxon p vs identity."""
    lines = []
    for key, methods in res["summary"].items():
        lines += [f"### {key}", "", "| method | Dice (mean ± sd) | n | folding % | Wilcoxon p vs identity |",
                  "|---|---|---|---|---|"]
        for meth, s in methods.items():
            p = _wilcoxon(res["per_pair"][key][meth], res["per_pair"][key]["identity"]) if meth != "identity" \
                else None
            fold = "—" if s["folding_pct"] is None or math.isnan(s["folding_pct"]) else f"{s['folding_pct']:.3f}"
            lines.append(f"| {meth} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['n']} | {fold} | "
                         f"{'—' if p is None else f'{p:.2g}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", required=True, help="name=path[:minmax|robust] (bundled: minmax)")
    p.add_argument("--extractor", help="synthesis seg extractor (DeepSim_seg refinement)")
    p.add_argument("--refine-from", help="net name whose field the refinements start from")
    p.add_argument("--sets", default="synthetic,synth,real", help="comma list of test sets")
    p.add_argument("--cache", default=None, help="real_brains cache (DEEPSIM_RT_CACHE)")
    p.add_argument("--ants", action="store_true", help="also ANTs SyN (mattes MI) on the real cross-contrast pairs")
    p.add_argument("--lam-scale", nargs="*", help="loss=scale of the refinement lambda (x NCC's 4.0), e.g. mind=0.2")
    p.add_argument("--out", required=True)
    p.add_argument("--md", help="also write the tables (markdown) here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    nets = {}
    for spec in a.nets:
        name, path = spec.split("=", 1)
        norm = "robust"
        if path.endswith((":minmax", ":robust")):
            path, norm = path.rsplit(":", 1)
        nets[name] = (load_model(path).eval(), norm)
    sets = a.sets.split(",")
    res: dict = {"nets": {k: [str(v[1])] for k, v in nets.items()}, "per_pair": {}}
    t0 = time.time()

    def add(key, method, dice, fold):
        res["per_pair"].setdefault(key, {}).setdefault(method, []).append((dice, fold))

    lam_scale = {"ncc": 1.0, "deepsim_seg": 1.0, "mind": 1.0, "nmi": 1.0}
    for spec in a.lam_scale or []:
        k, v = spec.split("=")
        lam_scale[k] = float(v)
    res["lam_scale"] = lam_scale
    if "sweep" in sets:
        # Refinement lambda per loss on 8 synth-2d VALIDATION pairs (cross-contrast in general), from zero: the
        # lambda of NCC times each scale. Never on the test or real pairs.
        cfg = SynthConfig.preset("synth-2d")
        for k in range(8):
            ra, rb_ = render_pair(cfg, "val", k, (k + 1) % cfg.n_val)
            m, f, ml, fl = ra.image[None], rb_.image[None], ra.labels[None], rb_.labels[None]
            add("sweep", "identity", float(dice_foreground(ml, fl, 7)[0]), 0.0)
            for loss in ("ncc", "mind", "nmi"):
                for sc in (0.05, 0.2, 1.0):
                    u = _refine(m, f, None, loss, None, sc)
                    add("sweep", f"{loss}_x{sc}", float(dice_foreground(warp(ml, u, mode="nearest"), fl, 7)[0]),
                        float(folding_fraction(u)[0]))
    if "synthetic" in sets:
        from deepsim_rt.data.synthetic import SyntheticConfig, SyntheticPairs

        pairs = SyntheticPairs(SyntheticConfig.preset("default-2d"), "test", pairs="random")
        for k in range(len(pairs)):
            it = pairs[k]
            m, f = it["moving"][None], it["fixed"][None]
            ml, fl = it["moving_labels"][None], it["fixed_labels"][None]
            add("synthetic", "identity", float(dice_foreground(ml, fl, 7)[0]), 0.0)
            for name, (net, norm) in nets.items():
                u = run_net(net, norm, m, f)
                add("synthetic", name, float(dice_foreground(warp(ml, u, mode="nearest"), fl, 7)[0]),
                    float(folding_fraction(u)[0]))
    if "synth" in sets:
        cfg = SynthConfig.preset("synth-2d")
        for k in range(cfg.n_test):
            ra, rb_ = render_pair(cfg, "test", k, (k + 1) % cfg.n_test)
            m, f, ml, fl = ra.image[None], rb_.image[None], ra.labels[None], rb_.labels[None]
            add("synth", "identity", float(dice_foreground(ml, fl, 7)[0]), 0.0)
            for name, (net, norm) in nets.items():
                u = run_net(net, norm, m, f)
                add("synth", name, float(dice_foreground(warp(ml, u, mode="nearest"), fl, 7)[0]),
                    float(folding_fraction(u)[0]))
    if "real" in sets:
        sl = real_slices(a.cache)
        for mv in REAL:
            for fx in REAL:
                if mv == fx:
                    continue
                for s in range(len(SLICES_MM)):
                    m, ml, _, mhead = sl[mv][s]
                    f, fl, fmask, _ = sl[fx][s]
                    f_xc = torch.from_numpy(t2_like(f[0, 0].numpy(), fmask))[None, None]
                    if mhead is not None:  # the same subject with skull and scalp, against the same fixed brain
                        for name, (net, norm) in nets.items():
                            for key, mov in (("real_head_vs_brain:brain", m), ("real_head_vs_brain:head", mhead)):
                                u = run_net(net, norm, mov, f)
                                add(key, name, structure_dice(warp(ml, u, mode="nearest"), fl),
                                    float(folding_fraction(u)[0]))
                        add("real_head_vs_brain:brain", "identity", structure_dice(ml, fl), 0.0)
                        add("real_head_vs_brain:head", "identity", structure_dice(ml, fl), 0.0)
                    for key, fixed in (("real_t1", f), ("real_xc", f_xc)):
                        add(key, "identity", structure_dice(ml, fl), 0.0)
                        fields = {}
                        for name, (net, norm) in nets.items():
                            u = run_net(net, norm, m, fixed)
                            fields[name] = u
                            add(key, name, structure_dice(warp(ml, u, mode="nearest"), fl),
                                float(folding_fraction(u)[0]))
                        if key == "real_xc" and a.refine_from:
                            init = fields[a.refine_from]
                            mn, fn = robust_normalize(m), robust_normalize(fixed)
                            for loss in ("ncc", "deepsim_seg", "mind", "nmi"):
                                if loss == "deepsim_seg" and not a.extractor:
                                    continue
                                u = _refine(mn, fn, init, loss, a.extractor, lam_scale[loss])
                                add(key, f"{a.refine_from}+refine_{loss}",
                                    structure_dice(warp(ml, u, mode="nearest"), fl), float(folding_fraction(u)[0]))
                        if a.ants:
                            w = ants_mi(robust_normalize(m), robust_normalize(fixed), ml)
                            add(key, "ants_syn_mi", structure_dice(w, fl), float("nan"))
                    print(f"{mv}->{fx} slice {s} done ({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for key, methods in res["per_pair"].items():
        summary[key] = {}
        for meth, vals in methods.items():
            d = np.array([v[0] for v in vals], dtype=float)
            fo = np.array([v[1] for v in vals], dtype=float)
            summary[key][meth] = {"dice_mean": float(np.nanmean(d)), "dice_sd": float(np.nanstd(d)),
                                  "n": int(np.isfinite(d).sum()), "folding_pct": float(np.nanmean(fo) * 100)
                                  if np.isfinite(fo).any() else None}
    res["summary"] = summary
    res["seconds"] = time.time() - t0
    Path(a.out).write_text(json.dumps(res, indent=1))
    if a.md:
        Path(a.md).write_text(markdown(res))
    for key, methods in summary.items():
        print(f"== {key}")
        for meth, s in methods.items():
            fold = "" if s["folding_pct"] is None or math.isnan(s["folding_pct"]) else f" fold {s['folding_pct']:.3f}%"
            print(f"  {meth:32s} {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} (n={s['n']}){fold}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
