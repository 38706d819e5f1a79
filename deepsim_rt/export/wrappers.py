"""Fixed-arity modules for the three exportable artifacts, and the export-time model preparation.

    RegistrationModule(regnet)          (moving, fixed)  -> (warped (B, C, *S), displacement (B, ndim, *S))
    FeaturesModule(extractor)           (image,)         -> (level0, ..., level{L-1}), level l (B, C_l, *S / 2**(l+1))
    MetricModule(extractor, eps=1e-6)   (a, b)           -> (similarity (B,), map0, ..., map{L-1}), map l (B, *S_l)

`similarity` is per SAMPLE: the mean over levels of each level's mean cosine over voxels (the paper's DeepSim of one
pair; for B = 1 it equals `DeepSimLoss.similarity`, which also averages over the batch). The maps are the
per-level per-pixel cosines (multilayer_cosine reduction="none").

`prepare_for_export(model)` returns an eval-mode deep copy on the CPU with every BatchNorm folded and every dropout
removed (see `fold_batchnorm`), so the exported graph holds no BatchNormalization / Dropout node.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deepsim_rt.kernels import multilayer_cosine
from deepsim_rt.nn.config import NetConfig

__all__ = ["RegistrationModule", "FlowModule", "FeaturesModule", "MetricModule", "ChannelShift", "fold_batchnorm",
           "prepare_for_export", "wrap", "GRAPHS", "default_graph"]


class ChannelShift(nn.Module):
    """x + shift[c] per channel: what remains of a BatchNorm after its scale moved into the next conv."""

    def __init__(self, shift: torch.Tensor, ndim: int) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().clone().view(1, -1, *([1] * ndim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


class ChannelAffine(nn.Module):
    """x * scale[c] + shift[c]: an eval-mode BatchNorm as a plain affine map (fallback when folding is unsafe)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, ndim: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().view(1, -1, *([1] * ndim)))
        self.register_buffer("shift", shift.detach().clone().view(1, -1, *([1] * ndim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = s x + t (per channel)."""
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    w = bn.weight.double() if bn.weight is not None else torch.ones_like(s)
    b = bn.bias.double() if bn.bias is not None else torch.zeros_like(s)
    s = s * w
    return s, b - bn.running_mean.double() * s


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """In place: fold every encoder stage's input BatchNorm into the conv that follows it.

    The U-Net normalizes a stage's INPUT (BN -> zero-padded conv). Folding the scale into the conv alone would be
    wrong at the border, because the conv pads the BN OUTPUT with zeros. Exactly: with y = s x + t,
        conv_W(pad0(s x + t)) = conv_{W s}(pad0(x + t / s)),
    so the conv weights take the scale (per input channel) and a per-channel shift t / s stays in front (one Add
    instead of BatchNormalization). A channel with |s| < 1e-6 would make t / s blow up; such a BN becomes a plain
    affine map instead. BatchNorms elsewhere (none in deepsim_rt's nets) become plain affine maps too.
    """
    from deepsim_rt.nn.unet import EncoderStage

    for stage in model.modules():
        if isinstance(stage, EncoderStage) and isinstance(stage.norm, nn.modules.batchnorm._BatchNorm):
            s, t = _bn_affine(stage.norm)
            nd = stage.down.weight.dim() - 2
            if bool((s.abs() >= 1e-6).all()):
                w = stage.down.weight
                w.copy_((w.double() * s.view(1, -1, *([1] * nd))).to(w.dtype))
                stage.norm = ChannelShift((t / s).float(), nd)
            else:
                stage.norm = ChannelAffine(s.float(), t.float(), nd)
    # Any other BatchNorm (none in deepsim_rt's nets today): a plain affine map.
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                s, t = _bn_affine(child)
                nd = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(child), 2)
                setattr(parent, name, ChannelAffine(s.float(), t.float(), nd))
    return model


def _strip_dropout(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.dropout._DropoutNd):
            setattr(model, name, nn.Identity())
        else:
            _strip_dropout(child)
    return model


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Eval-mode CPU deep copy with BatchNorm folded and dropout removed; the original is untouched.

    Exports run on the CPU copy on purpose: deepsim_rt.kernels dispatches CPU tensors to the pure-ATen reference,
    which lowers to the standard ONNX GridSample, while CUDA tensors would be captured as deepsim_rt Triton ops
    that ONNX has no operator for. (The AOTInductor CUDA export keeps the model on the GPU: there the Triton ops are
    what we want inside the package.)
    """
    m = copy.deepcopy(model).cpu().eval()
    fold_batchnorm(m)
    _strip_dropout(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class RegistrationModule(nn.Module):
    def __init__(self, regnet: nn.Module) -> None:
        super().__init__()
        _need_kind(regnet, ("reg",))
        self.net = regnet
        self.cfg: NetConfig = regnet.cfg

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        warped, displacement = self.net(moving, fixed)
        return warped, displacement


class FlowModule(nn.Module):
    """(moving, fixed) -> flow (B, ndim, *S): the flow head's output BEFORE integration and warping.

    For TensorRT in 3D, which has no 5D GridSample: the engine computes the network, the runtime integrates (when
    cfg.integrate_steps > 0) and warps with deepsim_rt.kernels (Triton on CUDA). Same code as RegNet.head_flow.
    """

    def __init__(self, regnet: nn.Module) -> None:
        super().__init__()
        _need_kind(regnet, ("reg",))
        self.net = regnet
        self.cfg: NetConfig = regnet.cfg

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.net.head_flow(moving, fixed)


class FeaturesModule(nn.Module):
    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        _need_kind(extractor, ("seg", "ae"))
        self.net = extractor
        self.cfg: NetConfig = extractor.cfg

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net.extract_features(image))


class MetricModule(nn.Module):
    def __init__(self, extractor: nn.Module, eps: float = 1e-6) -> None:
        super().__init__()
        _need_kind(extractor, ("seg", "ae"))
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.net = extractor
        self.cfg: NetConfig = extractor.cfg
        self.eps = float(eps)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fa = self.net.extract_features(a)
        fb = self.net.extract_features(b)
        maps = multilayer_cosine(fa, fb, eps=self.eps, reduction="none")
        # Per sample: mean over each level's voxels, then equal weights over levels (as the paper).
        per_level = [m.flatten(1).mean(dim=1) for m in maps]
        similarity = torch.stack(per_level, dim=0).mean(dim=0)
        return (similarity, *maps)


def _need_kind(model: nn.Module, kinds: tuple[str, ...]) -> None:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, NetConfig) or cfg.kind not in kinds:
        raise ValueError(f"expected a deepsim_rt model of kind {kinds}, got {type(model).__name__} (config kind "
                         f"{getattr(cfg, 'kind', None)!r})")


GRAPHS = ("serving", "full", "flow")


def default_graph(artifact: str) -> str:
    """"serving" for registration (raw images of any size in), "full" for features / metric."""
    return "serving" if artifact == "registration" else "full"


def wrap(model: nn.Module, artifact: str, eps: float = 1e-6, graph: str = "full") -> nn.Module:
    """The fixed-arity module of `artifact` around `model` (no copy), in eval mode (a fresh wrapper would be in
    training mode, and the ONNX exporter warns "model in training mode" for it, issue 11 #8).

    graph: "full" (the network on normalized, padded inputs), "serving" (registration: raw images of any size,
    pre/post-processing inside, see export.serving) or "flow" (registration head only).
    """
    return _wrap(model, artifact, eps, graph).eval()


def _wrap(model: nn.Module, artifact: str, eps: float = 1e-6, graph: str = "full") -> nn.Module:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if graph in ("flow", "serving"):
        if artifact != "registration":
            raise ValueError(f"graph={graph!r} exists for the registration artifact only, got {artifact!r}")
        if graph == "serving":
            from deepsim_rt.export.serving import ServingModule

            _need_kind(model, ("reg",))
            return ServingModule(model)
        return FlowModule(model)
    if artifact == "registration":
        return RegistrationModule(model)
    if artifact == "features":
        return FeaturesModule(model)
    if artifact == "metric":
        return MetricModule(model, eps=eps)
    raise ValueError(f"artifact must be 'registration', 'features' or 'metric', got {artifact!r}")
