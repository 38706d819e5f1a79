"""Evaluation: Dice (paper and foreground-only conventions), Jacobian determinant statistics, endpoint error."""

# Names resolve on first use (PEP 562): `deepsim-rt evaluate/study --help` import this package for evaluate/cli.py,
# and evaluate.metrics imports torch (2.6-3.8 s of each such help at load 8; issue 20).
__all__ = [
    "dice_per_class",
    "dice_paper",
    "dice_foreground",
    "jacobian_determinant",
    "folding_fraction",
    "std_log_jacobian",
    "endpoint_error",
]


def __getattr__(name: str):
    if name in __all__:
        from deepsim_rt.evaluate import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
