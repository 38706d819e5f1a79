"""`deepsim-rt evaluate` (score a registration model on the test pairs) and `deepsim-rt study` (the loss study)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from deepsim_rt.evaluate.study_config import StudyConfig
from deepsim_rt.refine.cli import add_refine_arguments
from deepsim_rt.train.cli import add_dataclass_arguments, config_from_args

# The study / evaluation machinery (torch) is imported inside the commands: `deepsim-rt evaluate --help` and
# `study --help` build these parsers only (they imported torch: 2.6-3.8 s at load 8; issue 20).
__all__ = ["add_subcommands", "main"]


def _evaluate(args: argparse.Namespace) -> int:
    from deepsim_rt.evaluate.study import (
        evaluate_pairs,
        load_registration_model,
        markdown_table,
        model_register_fn,
        write_results,
    )
    from deepsim_rt.refine.cli import refine_config_from_args
    from deepsim_rt.refine.config import NO_MODEL
    from deepsim_rt.train.data import open_source

    if args.max_pairs < 0:  # a negative N would slice off the last |N| pairs silently
        raise ValueError(f"--max-pairs must be >= 0 (0: all pairs), got {args.max_pairs}")
    source = open_source(args.data)
    refine = refine_config_from_args(args)
    models = {}
    for spec in args.model or []:  # check every model before any (slow) evaluation
        name, _, path = spec.rpartition("=")
        if path == NO_MODEL:
            if refine is None:
                raise ValueError("--model none (refinement from zero) needs --refine ITERS")
            models[name or "refine"] = (NO_MODEL, None)
            continue
        models[name or Path(path).stem] = (path, load_registration_model(path, source))
    refiners = {name: _refine_fn(refine, source, path, model, args.refine_extractor)
                for name, (path, model) in models.items()} if refine is not None else {}
    limit = args.max_pairs or None
    rows = {"none": evaluate_pairs(source, None, args.split, limit)}
    for name, (_, model) in models.items():
        if model is not None:
            rows[name] = evaluate_pairs(source, model_register_fn(model), args.split, limit,
                                        padding=model.cfg.padding)
        if name in refiners:
            rows[name if model is None else f"{name}+refine"] = evaluate_pairs(
                source, refiners[name], args.split, limit, padding="border" if model is None else model.cfg.padding)
    extra = {"data": args.data, "split": args.split, "models": {n: p for n, (p, _) in models.items()}}
    if refine is not None:
        extra["refine"] = {k: v for k, v in dataclasses.asdict(refine.resolve(source.ndim)).items()
                           if k != "extractor"}
    summaries = write_results(args.out, rows, extra=extra)
    print(markdown_table(summaries), end="")
    print(f"per-pair results: {Path(args.out) / 'results.json'}; table: {Path(args.out) / 'results.md'}")
    return 0


def _refine_fn(refine, source, path: str, model, extractor: str | None):
    """The register fn of `model` (None: from zero) followed by refinement in the model's warp padding; a DeepSim
    loss takes --refine-extractor, else the extractor next to the model (the bundled layout)."""
    from deepsim_rt.evaluate.study import model_register_fn, refine_register_fn
    from deepsim_rt.refine import load_extractor, model_extractor

    cfg = refine.resolve(source.ndim)
    if model is not None:
        cfg = dataclasses.replace(cfg, padding=model.cfg.padding)
    ext = extractor or (model_extractor(path, cfg.loss) if model is not None else None)
    if cfg.needs_extractor and ext is None:
        raise ValueError(f"--refine-loss {cfg.loss} needs a feature extractor: pass --refine-extractor PATH (no "
                         f"{cfg.loss.split('_', 1)[1]}.safetensors next to {path})")
    return refine_register_fn(cfg, None if model is None else model_register_fn(model),
                              load_extractor(ext, cfg.loss) if ext is not None else None)


def _study(args: argparse.Namespace) -> int:
    from deepsim_rt.evaluate.study import run_study

    cfg = config_from_args(StudyConfig, args)
    result = run_study(cfg)
    out = Path(result["out"])
    if result["summaries"]:
        print((out / "results.md").read_text(), end="")
    if result["real"]:
        print((out / "real_2d.md").read_text(), end="")
    print(json.dumps({"timings_s": {k: round(v, 1) for k, v in result["timings_s"].items()},
                      "skipped": result["skipped"]}))
    if result["summaries"]:
        print(f"box plot: {out / 'dice_boxplot.png'}; per-pair results: {out / 'results.json'}")
    if result["real"]:
        print(f"real slices: {out / 'real_2d.md'}, box plots {out / 'real_2d_t1_boxplot.png'} and "
              f"{out / 'real_2d_xc_boxplot.png'}, per pair {out / 'real_2d.json'}")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice / folding / std log|J| / endpoint error of registration models on the test pairs",
        description="Registers the data set's fixed, seeded test pairs with each model (and without registration) "
                    "and writes OUT/results.json (per pair) and OUT/results.md (table).")
    p.add_argument("--model", action="append", metavar="[NAME=]PATH",
                   help="registration model .safetensors (repeatable; with --refine each also gets a "
                        "NAME+refine row); 'none' with --refine: refinement from zero; absent: only the "
                        "unregistered baseline")
    p.add_argument("--data", default="default-2d", help="synthetic preset or NIfTI folder (default: default-2d)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="pairs to evaluate (default: test)")
    p.add_argument("--max-pairs", type=int, default=0, help="only the first N pairs (0: all)")
    p.add_argument("--out", default="runs/evaluate", help="output folder (default: runs/evaluate)")
    add_refine_arguments(p)
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("study", help="train all losses, evaluate, box plot + table with Wilcoxon tests",
                              description=StudyConfig.__doc__)
    add_dataclass_arguments(p, StudyConfig)
    p.set_defaults(func=_study)


def main(argv: list[str] | None = None) -> int:
    from deepsim_rt.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
