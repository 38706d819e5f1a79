"""Spot the difference: change maps after registration (Czolbe, Feragen, Krause 2021) and their benchmark.

  change_maps(extractor, moving, fixed, displacement) -> ChangeMaps(semantic, levels, residual, jacobian, ...)
  ChangeDetector.load(model, extractor=None, backend="auto").detect(moving, fixed)
  roc_auc(scores, positive, where=None)
  evaluate_changes(ChangeEvalConfig(data="default-2d", split="test"))   # the AUC table
CLI: `deepsim-rt changes`, `deepsim-rt evaluate-changes` (anomaly/cli.py).
"""

from deepsim_rt.anomaly.detector import ChangeDetector, load_extractor, resolve_extractor
from deepsim_rt.anomaly.roc import roc_auc
from deepsim_rt.anomaly.scores import (
    COMBINE,
    JACOBIAN_FLOOR,
    ChangeMaps,
    change_maps,
    intensity_residual,
    jacobian_score,
    semantic_change,
)

__all__ = ["ChangeDetector", "ChangeMaps", "change_maps", "semantic_change", "intensity_residual",
           "jacobian_score", "roc_auc", "resolve_extractor", "load_extractor", "COMBINE", "JACOBIAN_FLOOR"]
