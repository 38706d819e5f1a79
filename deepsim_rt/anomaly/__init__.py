"""Spot the difference: change maps after registration (Czolbe, Feragen, Krause 2021) and their benchmark.

  change_maps(extractor, moving, fixed, displacement) -> ChangeMaps(semantic, levels, residual, jacobian, ...)
  ChangeDetector.load(model, extractor=None, backend="auto").detect(moving, fixed)
  roc_auc(scores, positive, where=None)
  evaluate_changes(ChangeEvalConfig(data="default-2d", split="test"))   # the AUC table
CLI: `deepsim-rt changes`, `deepsim-rt evaluate-changes` (anomaly/cli.py).
"""

# Names resolve on first use (PEP 562): `deepsim-rt changes/evaluate-changes --help` import this package for
# anomaly/cli.py, and the scoring modules import torch (2.3-3.0 s at load 1.2, 16-22 s on the busy box; issue 20).
_LAZY = {"ChangeDetector": "detector", "load_extractor": "detector", "resolve_extractor": "detector",
         "roc_auc": "roc", "COMBINE": "scores", "JACOBIAN_FLOOR": "scores", "ChangeMaps": "scores",
         "change_maps": "scores", "intensity_residual": "scores", "jacobian_score": "scores",
         "semantic_change": "scores", "ChangeEvalConfig": "config", "evaluate_changes": "benchmark"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"deepsim_rt.anomaly.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
