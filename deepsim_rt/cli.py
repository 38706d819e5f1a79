"""`deepsim-rt` command line: one entry point, subcommands contributed by the layers that own them.

Each module in SUBCOMMAND_MODULES defines `add_subcommands(subparsers)`; every parser it adds sets
`func=callable(args) -> int`. Modules are imported when the CLI is built, so `deepsim-rt --help` lists everything.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deepsim_rt import __version__

SUBCOMMAND_MODULES = (
    "deepsim_rt.train.cli",      # train-features, train-registration
    "deepsim_rt.evaluate.cli",   # evaluate, study
    "deepsim_rt.demo",           # demo
    "deepsim_rt.register_cli",   # register
    "deepsim_rt.export.cli",     # export
    "deepsim_rt.anomaly.cli",    # changes, evaluate-changes
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepsim-rt",
        description="Learned image registration with the DeepSim semantic similarity: train, evaluate, export, "
                    "register.",
    )
    parser.add_argument("--version", action="version", version=f"deepsim_rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse argv and call the chosen subcommand; shared by every entry point (torchrun uses train.cli.main)."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        # Bad input is reported as one clear line (the ValueError names expected vs got), exit code 2.
        print(f"deepsim-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
