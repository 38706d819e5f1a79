"""`deepsim-rt train-features` and `deepsim-rt train-registration` (options and defaults come from the config
dataclasses: one source of truth). Both run unchanged under `torchrun --nproc-per-node N -m deepsim_rt.cli ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from deepsim_rt.cli import run

__all__ = ["add_subcommands", "add_dataclass_arguments", "config_from_args", "main"]


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                            overrides: dict | None = None) -> None:
    """One --option per dataclass field (underscores -> dashes), default = the field default (or `overrides`),
    help = the field's metadata; bool fields get --x / --no-x."""
    hints = typing.get_type_hints(cls)
    overrides = overrides or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = overrides.get(f.name, f.default)
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=helptext)
        else:
            parser.add_argument(flag, type=tp, default=default, help=f"{helptext} (default: {default})",
                                metavar=f.name.upper())


def config_from_args(cls, args: argparse.Namespace, **fixed):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(fixed)
    return cls(**values)


def _features(args: argparse.Namespace) -> int:
    from deepsim_rt.train.config import FeatureTrainConfig
    from deepsim_rt.train.features import train_features

    summary = train_features(config_from_args(FeatureTrainConfig, args))
    _report(summary)
    return 0


def _registration(args: argparse.Namespace) -> int:
    from deepsim_rt.train.config import RegistrationTrainConfig
    from deepsim_rt.train.registration import train_registration

    summary = train_registration(config_from_args(RegistrationTrainConfig, args))
    _report(summary)
    return 0


def _report(summary: dict) -> None:
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        last = summary.get("last_validation") or {}
        shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
        print(f"{summary['job']}: {summary['steps']} steps in {summary['seconds']:.1f} s -> {summary['model']} "
              f"(last validation {json.dumps(shown)})")


def add_subcommands(subparsers) -> None:
    # Imported here, not at the top: other commands' parsers use add_dataclass_arguments, and train.config imports
    # deepsim_rt.losses (torch) for the similarity names.
    from deepsim_rt.train.config import FeatureTrainConfig, RegistrationTrainConfig

    p = subparsers.add_parser("train-features", help="train a DeepSim feature extractor (seg or ae)",
                              description=FeatureTrainConfig.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, FeatureTrainConfig)
    p.set_defaults(func=_features)
    p = subparsers.add_parser("train-registration", help="train a registration network with one similarity",
                              description=RegistrationTrainConfig.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p, RegistrationTrainConfig)
    p.set_defaults(func=_registration)


def main(argv: list[str] | None = None) -> int:
    """`python -m deepsim_rt.train.cli train-features|train-registration ...` (also under torchrun): the training
    subcommands alone, with the same error handling as `deepsim-rt` (ValueError -> one line, exit code 2)."""
    parser = argparse.ArgumentParser(prog="deepsim-rt")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_subcommands(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
