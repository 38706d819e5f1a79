"""Does the intensity contract matter? synth-2d nets (trained on percentile-normalized synthesized brains) on real
2D T1 slices, run by the runtime with the contract their metadata now states ("percentile") and with the old
min-max one (same weights), on three inputs per ordered pair:
  brain     the real skull-stripped T1 slice, raw units (no normalization before the runtime)
  outlier   the same with ONE background voxel of moving and fixed set to 20x the slice's maximum
  head      moving = the same subject with skull and scalp (colin27, fsaverage), fixed = the other brain
Slices: deepsim_rt.evaluate.real_slices (colin27 / fsaverage / cat12, z = +4 and +8 mm on the MNI 2 mm grid),
taken BEFORE its robust normalization; score: mean Dice over the 12 shared structures (real_slices.slice_dice).

    OMP_NUM_THREADS=1 python benchmarks/intensity_contract.py [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

import deepsim_rt.evaluate.real_slices as rs
from deepsim_rt.kernels import warp
from deepsim_rt.nn.checkpoint import load_model
from deepsim_rt.runtime import Registrator, bundled_model_path

NETS = ("reg_ncc", "reg")


def raw_slices(cache=None) -> dict:
    norm = rs.robust_normalize
    rs.robust_normalize = lambda x: x  # the slices in the scanner's units
    try:
        return rs.real_slices(cache)
    finally:
        rs.robust_normalize = norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    sl = raw_slices()
    wdir = bundled_model_path("default-2d").parents[1] / "synth-2d"
    regs = {}
    for n in NETS:
        net = load_model(wdir / f"{n}.safetensors")
        assert net.cfg.intensity == "percentile"
        regs[(n, "percentile")] = Registrator.from_model(net, device="cpu")
        mm = load_model(wdir / f"{n}.safetensors")
        mm.cfg = dataclasses.replace(mm.cfg, intensity="minmax")
        regs[(n, "minmax")] = Registrator.from_model(mm, device="cpu")
    rows: dict[str, list[float]] = {}

    def add(key, v):
        rows.setdefault(key, []).append(v)

    for mv in rs.REAL:
        for fx in rs.REAL:
            if mv == fx:
                continue
            for s in range(len(rs.SLICES_MM)):
                m, ml, _, mhead = sl[mv][s]
                f, fl, _, _ = sl[fx][s]
                mo, fo = m.clone(), f.clone()
                mo[0, 0, 0, 0] = 20 * float(m.max())
                fo[0, 0, 0, 0] = 20 * float(f.max())
                cases = {"brain": (m, f), "outlier": (mo, fo)}
                if mhead is not None:
                    cases["head"] = (mhead, f)
                for case, (mi, fi) in cases.items():
                    add(f"{case}|identity", rs.slice_dice(ml, fl)[0])
                    for (n, contract), reg in regs.items():
                        u = reg.register(mi, fi).displacement
                        add(f"{case}|{n}|{contract}", rs.slice_dice(warp(ml, u, mode="nearest"), fl)[0])
    summary = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "n": len(v)} for k, v in rows.items()}
    for k, s in summary.items():
        print(f"{k:32s} {s['mean']:.3f} ± {s['sd']:.3f} (n={s['n']})")
    print(f"{time.time() - t0:.0f} s")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"summary": summary, "per_pair": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
