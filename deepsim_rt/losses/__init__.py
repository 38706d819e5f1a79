"""Registration losses: DeepSim (seg / ae / VGG), MSE, local squared NCC, NCC_sup, MIND-SSC / NMI (multimodal),
diffusion regularizer.

Uniform interface (deepsim_rt.losses.base.Similarity): every similarity is an nn.Module called as
    sim(warped, fixed, warped_seg=None, fixed_seg=None) -> 0-dim loss (lower is better)
with attributes `name` (registry name) and `needs_labels` (True only for ncc_sup, which reads the label maps).
Build them by name with `build_similarity`; the paper's regularization weights are in `PAPER_LAMBDAS`.
"""

from deepsim_rt.losses.base import Similarity
from deepsim_rt.losses.deepsim import DeepSimLoss
from deepsim_rt.losses.intensity import MSE, NCC, NCCSup, mse, ncc, ncc_map, ncc_sup, one_hot
from deepsim_rt.losses.multimodal import MIND, NMI, mind, mind_ssc, nmi, nmi_loss
from deepsim_rt.losses.registry import PAPER_LAMBDAS, SIMILARITIES, build_similarity, paper_lambda
from deepsim_rt.losses.regularizer import diffusion_regularizer
from deepsim_rt.losses.vgg import VGGFeatures

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
