"""Quality table of instance optimisation (issue #10): Dice fg / paper, folding, SD log|J|, s/pair on ALL bundled
test pairs, for no registration, the network, network + refine (each loss), refine from zero and ANTs SyN (CC).

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 5 \
        .venv/bin/python benchmarks/refine_quality.py --data default-2d --out benchmarks/results/refine_quality_2d
    ... --data default-3d --out benchmarks/results/refine_quality_3d

Every method is scored by deepsim_rt.evaluate.study.evaluate_pairs (same pairs, same Dice / Jacobian code; the
moving labels are warped by OUR generic-label warp, the default label mode, with each method's displacement,
ANTs' included). Seconds per pair = the registration call only (network + refinement; ANTs: antsRegistration +
reading its field back), one torch / ITK thread. Writes OUT/results.json, OUT/results.md (the evaluate table + a
s/pair column).
ANTs needs the optional `bench` extra (antspyx); without it the ANTs row is skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepsim_rt.evaluate.study import (  # noqa: E402
    evaluate_pairs,
    load_registration_model,
    markdown_table,
    model_register_fn,
    refine_register_fn,
    summarize,
    write_results,
)
from deepsim_rt.refine import RefineConfig, load_extractor, model_extractor  # noqa: E402
from deepsim_rt.train.data import open_source  # noqa: E402

METHODS = ("none", "network", "network+ncc", "network+mse", "network+deepsim_seg", "network+deepsim_ae",
           "zero+ncc", "zero+deepsim_seg", "ants_syn_cc", "ants_syn_cc_long")
# ANTs SyN with the CC metric (radius 4, as antspyx's "SyNCC"), deformable only: the pairs are already in one
# space (synthetic deformations of one template), so no rigid/affine stage; antspyx's default SyN schedule.
ANTS_KW = {"type_of_transform": "SyNOnly", "syn_metric": "CC", "syn_sampling": 4, "initial_transform": "Identity",
           "reg_iterations": (40, 20, 0), "random_seed": 1}
# A stronger schedule (antsRegistrationSyN.sh's SyN iterations, 4 levels, the finest one optimised too)
ANTS_LONG = {"reg_iterations": (100, 70, 50, 20)}


def ants_register_fn(**overrides):
    """register(moving (1, 1, *S), fixed) -> displacement (1, ndim, *S) in voxels by ANTs SyN (antspyx).

    Images go to ANTs with unit spacing, zero origin and identity direction, so physical coordinates are voxel
    indices along the array axes; the forward warp field (fixed -> moving points) is then our displacement.
    """
    import ants

    kw = {**ANTS_KW, **overrides}

    def register(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with tempfile.TemporaryDirectory(prefix="h10_ants_") as tmp:
            m = ants.from_numpy(moving[0, 0].double().numpy())
            f = ants.from_numpy(fixed[0, 0].double().numpy())
            out = ants.registration(f, m, outprefix=os.path.join(tmp, "r_"), **kw)
            # SyNOnly writes the warp field and the (identity) initial affine: compose them into one field
            field = ants.apply_transforms(f, m, out["fwdtransforms"], compose=os.path.join(tmp, "c_"))
            u = ants.image_read(field).numpy()  # (*S, ndim), vector on the last axis
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(u, -1, 0))).float()[None]

    return register


def _split(method: str) -> tuple[str, dict]:
    """"network+ncc:iterations=5,levels=2" -> ("network+ncc", {"iterations": 5, "levels": 2})."""
    base, _, extra = method.partition(":")
    return base, (eval(f"dict({extra})", {}) if extra else {})  # noqa: S307 - a developer's command line


def _register_fns(method: str, source, model, model_path: str, cfg: RefineConfig):
    nd = source.ndim
    method, extra = _split(method)
    cfg = dataclasses.replace(cfg, **extra)
    if method == "none":
        return None
    if method == "network":
        return model_register_fn(model)
    if method == "ants_syn_cc":
        return ants_register_fn()
    if method == "ants_syn_cc_long":
        return ants_register_fn(**ANTS_LONG)
    start, loss = method.split("+")
    c = dataclasses.replace(cfg, loss=loss).resolve(nd)
    ext = model_extractor(model_path, loss)
    base = model_register_fn(model) if start == "network" else None
    return refine_register_fn(c, base, load_extractor(ext, loss) if ext is not None else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="default-2d")
    p.add_argument("--model", default=None, help="registration checkpoint (default: the bundled one of --data)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma- (or, with overrides, semicolon-) separated")
    p.add_argument("--max-pairs", type=int, default=0, help="0: all test pairs")
    p.add_argument("--out", required=True)
    p.add_argument("--refine", default="", help="RefineConfig overrides, e.g. 'iterations=30,lam=2'; per method: "
                                                "'network+ncc:iterations=5'")
    p.add_argument("--merge", action="store_true", help="keep OUT/results.json's rows of methods not run now")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    source = open_source(args.data)
    model_path = args.model or f"deepsim_rt/weights/{args.data}/reg.safetensors"
    model = load_registration_model(model_path, source)
    overrides = eval(f"dict({args.refine})", {})  # noqa: S307 - a developer's command line
    cfg = RefineConfig(progress=False, **overrides)
    rows: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    out = Path(args.out)
    if args.merge and (out / "results.json").is_file():
        rows.update(json.loads((out / "results.json").read_text())["pairs"])
    sep = ";" if ";" in args.methods else ","  # ";" separates methods that carry overrides (which use ",")
    for method in [m.strip() for m in args.methods.split(sep) if m.strip()]:
        if _split(method)[0] not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if method.startswith("ants_"):
            try:
                import ants  # noqa: F401
            except ImportError as exc:
                skipped[method] = f"antspyx not installed ({exc}); pip install -e '.[bench]'"
                continue
        fn = _register_fns(method, source, model, model_path, cfg)
        rows[method] = evaluate_pairs(source, fn, "test", args.max_pairs or None, padding=model.cfg.padding)
        s = summarize(rows[method])
        print(f"[{args.data}] {method}: Dice fg {s['dice_fg']:.4f} paper {s['dice_paper']:.4f} folding "
              f"{s['folding']:.4f}% SD log|J| {s['std_log_jac'] or 0:.3f} {s['seconds']:.3f} s/pair", flush=True)
        # rewrite after every method: a long run stopped midway keeps what it measured
        write_results(out, rows, extra={"data": args.data, "model": model_path, "skipped": skipped,
                                        "refine": {k: v for k, v in dataclasses.asdict(cfg.resolve(source.ndim))
                                                   .items() if k != "extractor"},
                                        "ants": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in ANTS_KW.items()},
                                        "torch_threads": torch.get_num_threads(), "cpu": _cpu()})
    summaries = {m: summarize(r) for m, r in rows.items()}
    text = compact_table(summaries) + "\n" + markdown_table(summaries)
    (out / "results.md").write_text(text)
    print(text)
    print(json.dumps({"skipped": skipped}))
    return 0


LABELS = {"none": "no registration", "network": "network (bundled reg.safetensors)",
          "ants_syn_cc": "ANTs SyN, CC (antspyx default schedule 40x20x0)",
          "ants_syn_cc_long": "ANTs SyN, CC, long schedule 100x70x50x20"}


def compact_table(summaries: dict[str, dict]) -> str:
    """One row per method: Dice fg (mean ± sd), Dice paper, folding %, SD log|J|, EPE, s/pair."""
    lines = ["| method | Dice fg | Dice paper | folding % | SD log\\|J\\| | EPE (vox) | s/pair |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        label = LABELS.get(name, name.replace("+", " + refine ").replace(":", ", "))
        lines.append(f"| {label} | {s['dice_fg']:.3f} ± {s['dice_fg_std']:.3f} | {s['dice_paper']:.3f} | "
                     f"{s['folding']:.4f} | {s['std_log_jac'] or 0:.3f} | {s['epe']:.2f} | {s['seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def tables(out: str) -> str:
    """The compact table of an existing OUT/results.json (for RESULTS.md)."""
    rows = json.loads((Path(out) / "results.json").read_text())["pairs"]
    return compact_table({m: summarize(r) for m, r in rows.items()})


if __name__ == "__main__":
    sys.exit(main())
