"""Build a similarity by name; the paper's regularization weights.

    sim = build_similarity("ncc")                                   # window=9, eps=1e-6
    sim = build_similarity("ncc_sup")                               # sim.needs_labels is True
    sim = build_similarity("deepsim_seg", extractor=seg_model)      # any module with extract_features
    sim = build_similarity("vgg", weights_path="vgg16.safetensors") # 2D only
    sim = build_similarity("mind")                                  # MIND-SSC, multimodal (radius=1, dilation=2)
    loss = sim(warped, fixed, warped_seg, fixed_seg) + lam * diffusion_regularizer(u)
"""

from __future__ import annotations

from deepsim_rt.losses.base import Similarity
from deepsim_rt.losses.deepsim import DEFAULT_DEEPSIM_EPS, DeepSimLoss
from deepsim_rt.losses.intensity import DEFAULT_NCC_EPS, DEFAULT_NCC_WINDOW, MSE, NCC, NCCSup
from deepsim_rt.losses.multimodal import DEFAULT_MIND_DILATION, DEFAULT_MIND_RADIUS, MIND
from deepsim_rt.losses.names import SIMILARITIES  # one list, torch-free (the CLI parsers read it)
from deepsim_rt.losses.vgg import VGGFeatures

__all__ = ["SIMILARITIES", "PAPER_LAMBDAS", "build_similarity", "paper_lambda"]


# Regularization weight lambda (total loss = sim + lambda * diffusion_regularizer) used in the paper, per data set.
#   "brain3d": 3D brain MRI (the journal version's main experiment).
#   "cell2d":  2D PhC-U373 cell microscopy; the paper gives one value "DeepSim 0.125" for its 2D DeepSim models,
#              listed here for both deepsim_seg and deepsim_ae. VGG was only run in 2D.
# Other data need their own lambda: sweep it.
PAPER_LAMBDAS: dict[str, dict[str, float]] = {
    "brain3d": {"mse": 0.08, "ncc": 1.0, "ncc_sup": 2.0, "deepsim_ae": 1.0, "deepsim_seg": 2.0},
    "cell2d": {"mse": 0.005, "ncc": 0.25, "ncc_sup": 0.25, "vgg": 0.125, "deepsim_seg": 0.125,
               "deepsim_ae": 0.125},
}

_KWARGS = {
    "mse": (),
    "ncc": ("window", "eps"),
    "ncc_sup": ("window", "eps"),
    "vgg": ("weights_path", "random_init", "eps"),
    "deepsim_seg": ("extractor", "eps"),
    "deepsim_ae": ("extractor", "eps"),
    "mind": ("radius", "dilation"),
}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; valid names: {', '.join(SIMILARITIES)}")
    return name


def build_similarity(name: str, **kwargs) -> Similarity:
    """A Similarity module by registry name (see deepsim_rt.losses.base for the call interface).

    Keyword arguments per name (anything else is a ValueError):
        mse:                      none
        ncc, ncc_sup:             window=9 (int or per-axis odd ints), eps=1e-6
        vgg:                      weights_path=None, random_init=False, eps=1e-6 (2D only)
        deepsim_seg, deepsim_ae:  extractor (required: nn.Module with extract_features), eps=1e-6
        mind:                     radius=1, dilation=2 (MIND-SSC, deepsim_rt.losses.multimodal)
    """
    _check_name(name)
    extra = sorted(set(kwargs) - set(_KWARGS[name]))
    if extra:
        raise ValueError(f"similarity {name!r} takes keyword arguments {_KWARGS[name] or '()'}, got unexpected "
                         f"{extra}")
    if name == "mse":
        return MSE()
    if name == "mind":
        return MIND(radius=kwargs.get("radius", DEFAULT_MIND_RADIUS),
                    dilation=kwargs.get("dilation", DEFAULT_MIND_DILATION))
    if name in ("ncc", "ncc_sup"):
        cls = NCC if name == "ncc" else NCCSup
        return cls(window=kwargs.get("window", DEFAULT_NCC_WINDOW), eps=kwargs.get("eps", DEFAULT_NCC_EPS))
    eps = kwargs.get("eps", DEFAULT_DEEPSIM_EPS)
    if name == "vgg":
        vgg = VGGFeatures(kwargs.get("weights_path"), random_init=kwargs.get("random_init", False))
        return DeepSimLoss(vgg, eps=eps, name="vgg")
    if kwargs.get("extractor") is None:
        raise ValueError(f"similarity {name!r} needs extractor= a trained feature model (nn.Module with "
                         "extract_features), got None")
    return DeepSimLoss(kwargs["extractor"], eps=eps, name=name)


def paper_lambda(name: str, dataset: str = "brain3d") -> float:
    """The paper's lambda for similarity `name` on `dataset` ("brain3d" or "cell2d")."""
    _check_name(name)
    if dataset not in PAPER_LAMBDAS:
        raise ValueError(f"dataset must be one of {tuple(PAPER_LAMBDAS)}, got {dataset!r}")
    table = PAPER_LAMBDAS[dataset]
    if name not in table:
        raise ValueError(f"the paper reports no lambda for {name!r} on {dataset!r}; it has {tuple(table)}")
    return table[name]
