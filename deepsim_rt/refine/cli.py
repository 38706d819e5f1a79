"""The refinement's command-line options, shared by `deepsim-rt register` and `deepsim-rt evaluate`.

    add_refine_arguments(parser)             # --refine ITERS, --refine-loss, --refine-lam, ..., --diffeomorphic
    cfg = refine_config_from_args(args)      # RefineConfig, or None when --refine was not given

Defaults come from RefineConfig (None there = the measured default of the data's dimensionality).
"""

from __future__ import annotations

import argparse
import dataclasses

from deepsim_rt.refine.config import REFINE_LOSSES, RefineConfig

__all__ = ["add_refine_arguments", "refine_config_from_args"]

# flag -> RefineConfig field (--refine itself is `iterations`)
_FLAGS = {
    "--refine-loss": "loss",
    "--refine-lam": "lam",
    "--refine-levels": "levels",
    "--refine-lr": "lr",
    "--refine-bending": "bending",
    "--refine-tol": "tol",
}


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(RefineConfig)}[name]


def add_refine_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the "instance optimisation" option group to `parser` and return it."""
    g = parser.add_argument_group(
        "instance optimisation",
        "refine each pair's displacement by Adam, coarse to fine, after the network (or from zero with "
        "--model none)")
    g.add_argument("--refine", type=int, default=None, metavar="ITERS",
                   help="refine with ITERS Adam steps per pyramid level (0: run the pyramid with no steps; "
                        "default: no refinement). " + _field("iterations").metadata["help"])
    for flag, name in _FLAGS.items():
        f = _field(name)
        kw = {"choices": REFINE_LOSSES} if name == "loss" else {"type": int if name == "levels" else float}
        default = "per dimensionality" if f.default is None else f.default
        g.add_argument(flag, default=f.default, dest=f"refine_{name}", metavar=name.upper(),
                       help=f"{f.metadata['help']} (default: {default})", **kw)
    g.add_argument("--diffeomorphic", action="store_true", default=_field("diffeomorphic").default,
                   help=_field("diffeomorphic").metadata["help"])
    g.add_argument("--refine-full-resolution", action="store_true", default=False,
                   help=_field("full_resolution").metadata["help"])
    g.add_argument("--refine-extractor", default=None, metavar="PATH",
                   help="feature extractor .safetensors for deepsim_seg / deepsim_ae (default: the seg / ae "
                        "checkpoint next to the registration model, as the bundled weights)")
    return g


def refine_config_from_args(args: argparse.Namespace) -> RefineConfig | None:
    """RefineConfig from the parsed options, or None without --refine (checks the values: ValueError)."""
    if getattr(args, "refine", None) is None:
        extra = [flag for flag, name in _FLAGS.items()
                 if getattr(args, f"refine_{name}", None) != _field(name).default]
        if getattr(args, "diffeomorphic", False):
            extra.append("--diffeomorphic")
        if getattr(args, "refine_full_resolution", False):
            extra.append("--refine-full-resolution")
        if getattr(args, "refine_extractor", None):
            extra.append("--refine-extractor")
        if extra:
            raise ValueError(f"{', '.join(extra)} apply only with --refine ITERS")
        return None
    values = {name: getattr(args, f"refine_{name}") for name in _FLAGS.values()}
    return RefineConfig(iterations=args.refine, diffeomorphic=args.diffeomorphic, extractor=args.refine_extractor,
                        full_resolution=getattr(args, "refine_full_resolution", False), **values)
