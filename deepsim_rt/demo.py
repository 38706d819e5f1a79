"""`deepsim-rt demo`: register held-out synthetic brain pairs (2D and 3D) with the bundled DeepSim_seg-trained
networks, print Dice and folding before/after and the latency, and write a figure per dimensionality.

    deepsim-rt demo --out demo_out
    -> demo_out/demo_2d.png, demo_out/demo_3d.png (fixed / moving / warped / differences / deformed grid /
       checkerboard), demo_out/summary.json

The pairs are the data set's fixed, seeded TEST pairs (subjects never seen in training). Registration goes through
deepsim_rt.runtime.Registrator (min-max normalization, padding to the network's multiple, nearest-neighbour label
warping), i.e. exactly what `deepsim-rt register` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deepsim_rt._io import atomic_write

# torch, the metrics and the runtime are imported where used: `deepsim-rt demo --help` builds this module's parser,
# importing torch for it cost 2.7 s (load 1.2) and 16-22 s on the busy 2-core box (issue 20).
__all__ = ["DemoConfig", "run_demo", "add_subcommands", "main"]


@dataclass
class DemoConfig:
    """What the demo registers and with which models (defaults: the bundled data and weights)."""

    out: str = field(default="demo_out", metadata={"help": "folder for the figures and summary.json"})
    dims: str = field(default="2,3", metadata={"help": "which dimensionalities to run: 2, 3 or 2,3"})
    pairs: int = field(default=8, metadata={"help": "held-out test pairs per dimensionality"})
    data_2d: str = field(default="default-2d", metadata={"help": "2D data: synthetic preset or NIfTI folder"})
    data_3d: str = field(default="default-3d", metadata={"help": "3D data: synthetic preset or NIfTI folder"})
    model_2d: str = field(default="default-2d", metadata={"help": "2D registration model (bundled name or file)"})
    model_3d: str = field(default="default-3d", metadata={"help": "3D registration model (bundled name or file)"})
    backend: str = field(default="eager", metadata={"help": "runtime backend (see deepsim_rt.runtime.BACKENDS)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    refine_pairs: int = field(default=2, metadata={"help": "of those, how many are also refined (deepsim_rt.refine, "
                                                           "its measured defaults; 0: skip). 2: the 3D refinement "
                                                           "costs seconds per pair on a CPU"})

    def __post_init__(self) -> None:
        parts = [p.strip() for p in str(self.dims).split(",") if p.strip()]
        if not parts or any(p not in ("2", "3") for p in parts):
            raise ValueError(f"dims must be '2', '3' or '2,3', got {self.dims!r}")
        if not isinstance(self.pairs, int) or self.pairs < 1:
            raise ValueError(f"pairs must be an int >= 1, got {self.pairs!r}")
        if not isinstance(self.refine_pairs, int) or self.refine_pairs < 0:
            raise ValueError(f"refine_pairs must be an int >= 0, got {self.refine_pairs!r}")
        # torch.set_num_threads(-1) raised a RuntimeError traceback after the data had loaded (issue 20 item 7)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0: torch's default), got {self.threads!r}")

    @property
    def dim_list(self) -> list[int]:
        return sorted({int(p) for p in str(self.dims).split(",") if p.strip()})


def _slice3d(x, u=None):
    """Middle axial slice of (D, H, W) (and the in-plane (H, W) components of u (3, D, H, W))."""
    d = x.shape[0] // 2
    if u is None:
        return x[d]
    return x[d], u[1:, d]


def _run_dim(nd: int, cfg: DemoConfig, out: Path) -> dict:
    from deepsim_rt.evaluate.figures import registration_panel
    from deepsim_rt.evaluate.metrics import dice_foreground, dice_paper, folding_fraction
    from deepsim_rt.runtime import Registrator
    from deepsim_rt.train.data import open_source

    data = cfg.data_2d if nd == 2 else cfg.data_3d
    model = cfg.model_2d if nd == 2 else cfg.model_3d
    source = open_source(data)
    if source.ndim != nd:
        raise ValueError(f"--data-{nd}d {data!r} is {source.ndim}D data, expected {nd}D")
    reg = Registrator.load(model, backend=cfg.backend, device="cpu")
    if reg.ndim != nd:
        raise ValueError(f"--model-{nd}d {model!r} is a {reg.ndim}D model, the data are {nd}D")
    pairs = source.pairs("test")[: cfg.pairs]
    k = source.n_classes
    rows, latencies = [], []
    first_call = None
    example = None
    for m, f in pairs:
        mov, mov_lab = source.subject("test", m)
        fix, fix_lab = source.subject("test", f)
        mov_b, fix_b, lab_b = mov[None], fix[None], mov_lab[None]
        t0 = time.perf_counter()
        res = reg.register(mov_b, fix_b, moving_labels=lab_b)
        dt = time.perf_counter() - t0
        if first_call is None:
            first_call = dt  # includes one-off setup (allocator, kernels); reported separately
        else:
            latencies.append(dt)
        u = res.displacement
        rows.append({
            "moving": m, "fixed": f,
            "dice_fg_before": float(dice_foreground(lab_b, fix_lab[None], k)[0]),
            "dice_fg_after": float(dice_foreground(res.warped_labels, fix_lab[None], k)[0]),
            "dice_paper_before": float(dice_paper(lab_b, fix_lab[None], k)[0]),
            "dice_paper_after": float(dice_paper(res.warped_labels, fix_lab[None], k)[0]),
            "folding_before": 0.0,
            "folding_after": 100.0 * float(folding_fraction(u)[0]),
        })
        if example is None or rows[-1]["dice_fg_after"] - rows[-1]["dice_fg_before"] > example[0]:
            example = (rows[-1]["dice_fg_after"] - rows[-1]["dice_fg_before"], mov, fix, res, mov_lab, fix_lab,
                       (m, f))
    mean = lambda key: statistics.fmean(r[key] for r in rows)
    lat = latencies or [first_call]
    summary = {
        "ndim": nd, "data": source.name, "model": model, "backend": reg.backend_name, "pairs": len(rows),
        "shape": list(source.shape),
        "dice_fg_before": mean("dice_fg_before"), "dice_fg_after": mean("dice_fg_after"),
        "dice_paper_before": mean("dice_paper_before"), "dice_paper_after": mean("dice_paper_after"),
        "folding_pct_before": 0.0, "folding_pct_after": mean("folding_after"),
        "latency_ms_median": 1000.0 * statistics.median(lat), "latency_ms_first_call": 1000.0 * first_call,
        "per_pair": rows,
    }
    _, mov, fix, res, mov_lab, fix_lab, (pm, pf) = example
    f_img, m_img, w_img = fix[0], mov[0], res.warped[0, 0]
    u = res.displacement[0]
    fl, wl = fix_lab[0], res.warped_labels[0, 0]
    if nd == 3:
        f_img, m_img, fl, wl = _slice3d(f_img), _slice3d(m_img), _slice3d(fl), _slice3d(wl)
        w_img, u = _slice3d(w_img, u)
    stats = {"Dice fg": f"{summary['dice_fg_before']:.3f} → {summary['dice_fg_after']:.3f} (mean of "
                        f"{len(rows)} pairs)",
             "folding": f"{summary['folding_pct_after']:.3f} %",
             "latency": f"{summary['latency_ms_median']:.0f} ms/pair ({reg.backend_name}, CPU)"}
    where = "" if nd == 2 else ", middle axial slice"
    fig = registration_panel(f_img, m_img, w_img, u, out / f"demo_{nd}d.png",
                             title=f"{nd}D held-out test pair {pm} → {pf} ({source.name}{where}; model {model}; "
                                   "the pair with the largest Dice gain)",
                             labels={"fixed": fl, "warped": wl}, stats=stats)
    summary["figure"] = str(fig)
    summary["refine"] = _refine_summary(reg, source, pairs[: cfg.refine_pairs], rows, lat) if cfg.refine_pairs \
        else None
    return summary


def _refine_summary(reg, source, pairs: list, rows: list[dict], net_latency: list[float]) -> dict:
    """network -> network + instance optimisation (RefineConfig defaults of the dimensionality) on `pairs`."""
    from deepsim_rt.evaluate.metrics import dice_foreground
    from deepsim_rt.refine import RefineConfig

    cfg = RefineConfig(progress=False)
    k = source.n_classes
    dice, secs = [], []
    for m, f in pairs:
        mov, mov_lab = source.subject("test", m)
        fix, fix_lab = source.subject("test", f)
        t0 = time.perf_counter()
        res = reg.register(mov[None], fix[None], moving_labels=mov_lab[None], refine=cfg)
        secs.append(time.perf_counter() - t0)
        dice.append(float(dice_foreground(res.warped_labels, fix_lab[None], k)[0]))
    c = cfg.resolve(source.ndim)
    return {"pairs": len(pairs), "dice_fg_network": statistics.fmean(r["dice_fg_after"] for r in rows[:len(pairs)]),
            "dice_fg_refined": statistics.fmean(dice), "seconds_network": statistics.median(net_latency),
            "seconds_refined": statistics.median(secs),
            "config": f"{c.loss}, lambda {c.lam:g}, {c.levels} levels x {c.iterations} Adam steps"}


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns {"2d": summary, "3d": summary} and writes OUT/summary.json and the figures."""
    from deepsim_rt.export._io import check_out_path

    check_out_path(cfg.out, None)  # before any work: '' (was the current folder), a file, an unwritable folder
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for nd in cfg.dim_list:
        t0 = time.perf_counter()
        s = _run_dim(nd, cfg, out)
        s["seconds_total"] = time.perf_counter() - t0
        results[f"{nd}d"] = s
        print(f"{nd}D  {s['data']} ({'x'.join(map(str, s['shape']))}), {s['pairs']} held-out test pairs, model "
              f"{s['model']} [{s['backend']}, cpu]")
        print(f"    Dice (foreground mean)  before {s['dice_fg_before']:.3f}  after {s['dice_fg_after']:.3f}  "
              f"({s['dice_fg_after'] - s['dice_fg_before']:+.3f})")
        print(f"    Dice (paper, all cls)   before {s['dice_paper_before']:.3f}  after {s['dice_paper_after']:.3f}")
        print(f"    folding (det J <= 0)    before {s['folding_pct_before']:.3f} %  after "
              f"{s['folding_pct_after']:.3f} %")
        print(f"    latency                 {s['latency_ms_median']:.1f} ms/pair median (first call "
              f"{s['latency_ms_first_call']:.1f} ms)")
        r = s.get("refine")
        if r:
            print(f"    network -> + refine     Dice {r['dice_fg_network']:.3f} ({r['seconds_network']:.2f} s/pair) -> "
                  f"{r['dice_fg_refined']:.3f} ({r['seconds_refined']:.2f} s/pair), first {r['pairs']} pairs; "
                  f"{r['config']}")
        print(f"    figure                  {s['figure']}")
    text = json.dumps(results, indent=1)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text))
    return results


def _demo(args: argparse.Namespace) -> int:
    from deepsim_rt.train.cli import config_from_args

    run_demo(config_from_args(DemoConfig, args))
    return 0


def add_subcommands(subparsers) -> None:
    from deepsim_rt.train.cli import add_dataclass_arguments

    p = subparsers.add_parser("demo", help="register held-out pairs with the bundled weights; Dice, folding, "
                                           "latency and a figure", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, DemoConfig)
    p.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    from deepsim_rt.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
