"""`deepsim-rt evaluate-real`: the real-brain benchmark (deepsim_rt.realbench) from the command line.

    deepsim-rt evaluate-real --out DIR [--grid 2mm] [--pairs labelled] [--methods all] [--report PATH]

Fetches the real brains when missing (deepsim_rt.data.real_brains), runs every (pair, method) not yet done under
DIR/<grid>/ (one JSON each: resumable, a failed method is recorded and the run goes on), then writes the report
(markdown tables, a per-structure plot and one overlay figure per pair) from every JSON there.
"""

from __future__ import annotations

import argparse

__all__ = ["add_subcommands"]


def _cmd(args: argparse.Namespace) -> int:
    from deepsim_rt.realbench import runner
    from deepsim_rt.realbench.report import write_report

    pairs = runner.select_pairs(args.pairs)
    methods = runner.select_methods(args.methods)
    if not args.report_only:
        rows = runner.run_benchmark(args.out, args.grid, pairs, methods, cache=args.cache, contrast=args.contrast)
        failed = [r for r in rows if "error" in r]
        for r in failed:
            print(f"  failed {r['pair']} {r['method']}: {r['error']}")
    path = write_report(args.out, args.report, figures=args.figures)
    print(f"report: {path}")
    return 1 if not args.report_only and failed else 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate-real", help="benchmark every method (ours and ANTs) on real brains fetched from the registries",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (per pair-method JSON under OUT/<grid>/)")
    p.add_argument("--grid", default="2mm", choices=("1mm", "2mm", "4mm"),
                   help="1mm: the files as shipped; 2mm / 4mm: 3D files block-downsampled x2 / x4 first")
    p.add_argument("--pairs", default="labelled",
                   help="comma-separated pair names or sets: labelled, heads, unlabelled, 2d, all")
    p.add_argument("--methods", default="all",
                   help="comma-separated: none, affine, net:default-3d, net:default-3d-4mm, net:default-2d, "
                        "net:synth-3d, net:synth-3d-ncc (deepsim_rt/weights/synth-3d), file:PATH (a model file, after "
                        "affine), "
                        "net+refine, net+refine-long, none+refine, net+refine:<deepsim_seg|ncc|mind|nmi>, ants:Affine, "
                        "ants:SyN, ants:SyNOnlyCC, ants:SyNCC, or all")
    p.add_argument("--contrast", default="t1", choices=("t1", "t2like"),
                   help="t2like: every fixed 3D brain made T2-like from its own T1 intensities (realbench.contrast; "
                        "cross-contrast pairs: use a separate --out)")
    p.add_argument("--cache", default=None, help="data cache root (default: $DEEPSIM_RT_CACHE or ~/.cache/deepsim_rt)")
    p.add_argument("--report", default=None, help="markdown report path (default: OUT/real_brains.md)")
    p.add_argument("--figures", default=None, help="figure folder (default: beside the report)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the JSONs in OUT")
    p.set_defaults(func=_cmd)
