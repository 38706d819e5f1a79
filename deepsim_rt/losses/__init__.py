"""Registration losses: DeepSim (seg / ae / VGG), MSE, local squared NCC, NCC_sup, MIND-SSC / NMI (multimodal),
diffusion regularizer.

Uniform interface (deepsim_rt.losses.base.Similarity): every similarity is an nn.Module called as
    sim(warped, fixed, warped_seg=None, fixed_seg=None) -> 0-dim loss (lower is better)
with attributes `name` (registry name) and `needs_labels` (True only for ncc_sup, which reads the label maps).
Build them by name with `build_similarity`; the paper's regularization weights are in `PAPER_LAMBDAS`.
"""

# Names resolve on first use (PEP 562): train.config reads the similarity names (deepsim_rt.losses.names) for the
# CLI parsers, and importing the loss modules imports torch (1.8-3.8 s of `deepsim-rt train-* --help`; issue 20).
_LAZY = {
    "Similarity": "base",
    "DeepSimLoss": "deepsim",
    "MSE": "intensity",
    "NCC": "intensity",
    "NCCSup": "intensity",
    "mse": "intensity",
    "ncc": "intensity",
    "ncc_map": "intensity",
    "ncc_sup": "intensity",
    "one_hot": "intensity",
    "MIND": "multimodal",
    "NMI": "multimodal",
    "mind": "multimodal",
    "mind_ssc": "multimodal",
    "nmi": "multimodal",
    "nmi_loss": "multimodal",
    "PAPER_LAMBDAS": "registry",
    "SIMILARITIES": "names",
    "build_similarity": "registry",
    "paper_lambda": "registry",
    "diffusion_regularizer": "regularizer",
    "VGGFeatures": "vgg",
}

__all__ = [
    "Similarity",
    "DeepSimLoss",
    "VGGFeatures",
    "MSE",
    "NCC",
    "NCCSup",
    "MIND",
    "NMI",
    "mind",
    "mind_ssc",
    "nmi",
    "nmi_loss",
    "mse",
    "ncc",
    "ncc_map",
    "ncc_sup",
    "one_hot",
    "diffusion_regularizer",
    "build_similarity",
    "paper_lambda",
    "PAPER_LAMBDAS",
    "SIMILARITIES",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"deepsim_rt.losses.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

