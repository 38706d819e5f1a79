"""Evaluation: Dice (paper and foreground-only conventions), Jacobian determinant statistics, endpoint error."""

from deepsim_rt.evaluate.metrics import (
    dice_foreground,
    dice_paper,
    dice_per_class,
    endpoint_error,
    folding_fraction,
    jacobian_determinant,
    std_log_jacobian,
)

__all__ = [
    "dice_per_class",
    "dice_paper",
    "dice_foreground",
    "jacobian_determinant",
    "folding_fraction",
    "std_log_jacobian",
    "endpoint_error",
]
