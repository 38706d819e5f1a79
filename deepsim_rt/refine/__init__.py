"""Instance optimisation (`register --refine`): refine a displacement per pair by Adam, coarse to fine.

    from deepsim_rt.refine import RefineConfig, refine
    res = refine(moving, fixed, init=u_net, config=RefineConfig(iterations=50, loss="ncc"))

Runs on deepsim_rt.kernels (fused Triton ops on CUDA, the PyTorch reference on the CPU) and deepsim_rt.losses.
The runtime (`Registrator.register(..., refine=RefineConfig(...))`), `deepsim-rt register --refine ITERS` and
`deepsim-rt evaluate --refine ITERS` call into here; `deepsim_rt.refine.cli.add_refine_arguments` is their options.
"""

from deepsim_rt.refine.config import DEFAULTS, REFINE_LOSSES, RefineConfig

__all__ = ["RefineConfig", "RefineResult", "refine", "NonFiniteLossError", "load_extractor", "model_extractor",
           "bending_energy", "level_sizes", "DEFAULTS", "REFINE_LOSSES"]

# The optimiser (and torch) load on first use: `deepsim-rt --help` imports deepsim_rt.refine.cli without torch.
_LAZY = {"RefineResult": "optimize", "refine": "optimize", "NonFiniteLossError": "optimize",
         "load_extractor": "optimize", "model_extractor": "optimize", "bending_energy": "pyramid",
         "level_sizes": "pyramid"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"deepsim_rt.refine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'deepsim_rt.refine' has no attribute {name!r}")
