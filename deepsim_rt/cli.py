"""`deepsim-rt` command line: one entry point, subcommands contributed by the layers that own them.

Each module in SUBCOMMAND_MODULES defines `add_subcommands(subparsers)`; every parser it adds sets
`func=callable(args) -> int`. `main` imports only the module of the command being run: the others are listed from
their source (the `add_parser("name", help=...)` calls, read with ast), because importing them all pulls in torch
and the compiler stack (16-21 s for `deepsim-rt --help` on the shared 2-core box; issue 11 defect 11).
`build_parser()` without a command still imports every module (the full parser, for tests and tools).
Every built subcommand's help shows its defaults and reads as CLI text (see `polish_help`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import sys
from pathlib import Path

from deepsim_rt import __version__

SUBCOMMAND_MODULES = (
    "deepsim_rt.train.cli",      # train-features, train-registration
    "deepsim_rt.evaluate.cli",   # evaluate, study
    "deepsim_rt.demo",           # demo
    "deepsim_rt.register_cli",   # register
    "deepsim_rt.apply_cli",      # apply
    "deepsim_rt.export.cli",     # export
    "deepsim_rt.anomaly.cli",    # changes, evaluate-changes
    "deepsim_rt.realbench.cli",  # evaluate-real
)


def declared_commands(module: str) -> dict[str, str | None]:
    """{command: help} of the `add_parser` calls in `module`'s source, read without importing it (nor its
    package's __init__). A help that is not a literal string reads as None."""
    path = Path(__file__).resolve().parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    out: dict[str, str | None] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_parser"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            help_ = next((k.value.value for k in node.keywords if k.arg == "help" and isinstance(k.value, ast.Constant)
                          and isinstance(k.value.value, str)), None)
            out[node.args[0].value] = help_
    return out


def _command_in(argv: list[str]) -> str | None:
    # the top-level options (--help, --version) take no value: the first other token is the command
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """The `deepsim-rt` parser. lazy=False: every subcommand module imported. lazy=True: only the module that
    declares `command` (none when command is None or unknown); the other commands are listed with their help
    (read from source, `declared_commands`) and cannot run from this parser."""
    parser = argparse.ArgumentParser(
        prog="deepsim-rt",
        description="Learned image registration with the DeepSim semantic similarity: train, evaluate, export, "
                    "register.",
    )
    parser.add_argument("--version", action="version", version=f"deepsim_rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    declared = {name: declared_commands(name) for name in SUBCOMMAND_MODULES} if lazy else {}
    for name in SUBCOMMAND_MODULES:
        if not lazy or command in declared[name]:
            importlib.import_module(name).add_subcommands(sub)
        else:
            for cmd, help_ in declared[name].items():
                sub.add_parser(cmd, help=help_, add_help=False)
    return parser


_BACKTICKED = re.compile(r"`([^`\n]+)`")


def polish_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every subcommand's help CLI text: each option with a default says it ("(default: X)" appended where
    the help does not mention one), and docstring markup in descriptions and option help becomes what a shell
    user types:
    `name` -> --name when the command has that option, `name=True` -> --name, other `code` -> code."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sp in action.choices.values():
            options = {o for a in sp._actions for o in a.option_strings}
            for a in sp._actions:
                if (a.help and a.help != argparse.SUPPRESS and a.default not in (None, False, argparse.SUPPRESS)
                        and "default" not in a.help.lower()):
                    a.help += " (default: %(default)s)"

            def cli(m: re.Match, options: set[str] = options) -> str:
                text = m.group(1)
                name, _, value = text.partition("=")
                flag = "--" + name.strip().replace("_", "-")
                if flag in options and value in ("", "True"):
                    return flag
                if flag in options and value:
                    return f"{flag} {value.strip()}"
                return text

            if sp.description:
                sp.description = _BACKTICKED.sub(cli, sp.description)
            for a in sp._actions:
                if a.help and a.help != argparse.SUPPRESS:
                    a.help = _BACKTICKED.sub(cli, a.help)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse argv and call the chosen subcommand; shared by every entry point (torchrun uses train.cli.main)."""
    args = polish_help(parser).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        # Bad input is reported as one clear line (the ValueError names expected vs got), exit code 2.
        print(f"deepsim-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(build_parser(_command_in(argv), lazy=True), argv)


if __name__ == "__main__":
    sys.exit(main())
