"""DeepSim: semantic similarity as the multi-layer cosine of a frozen feature extractor's activations.

    loss = 1 - mean_l mean_{b,p} cos(F_l(warped)(p), F_l(fixed)(p))        (eps 1e-6 on the SQUARED norms)

The extractor is any nn.Module with `extract_features(x) -> list[Tensor]` (levels (B, C_l, *S_l)): the DeepSim_seg
/ DeepSim_ae U-Net encoders of deepsim_rt.nn, or `VGGFeatures` (2D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deepsim_rt.kernels import multilayer_cosine
from deepsim_rt.losses._inputs import check_image_pair
from deepsim_rt.losses.base import Similarity

__all__ = ["DeepSimLoss", "DEFAULT_DEEPSIM_EPS"]

DEFAULT_DEEPSIM_EPS = 1e-6


class DeepSimLoss(Similarity):
    """1 - DeepSim(warped, fixed) with a frozen extractor (Similarity interface; labels ignored).

    Args:
        extractor: nn.Module with `extract_features(x: (B, C, *S)) -> list[(B, C_l, *S_l)]`. On construction its
            parameters get requires_grad=False and it is put in eval mode (BatchNorm uses running stats, dropout
            off); `train()` on this loss or any parent keeps it in eval. Gradients still flow THROUGH it to the
            warped image. (Calling `requires_grad_(True)` on a parent would unfreeze it: don't.)
        eps: clamp on the squared feature norm (paper: 1e-6).
        name: registry name ("deepsim_seg", "deepsim_ae", "vgg" or "deepsim").
    """

    needs_labels = False

    def __init__(self, extractor: nn.Module, eps: float = DEFAULT_DEEPSIM_EPS, name: str = "deepsim"):
        super().__init__()
        if not isinstance(extractor, nn.Module) or not callable(getattr(extractor, "extract_features", None)):
            raise ValueError("extractor must be an nn.Module with an extract_features(x) -> list[Tensor] method, got "
                             f"{type(extractor).__name__}")
        if not (isinstance(eps, float | int) and not isinstance(eps, bool) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.extractor = extractor
        self.eps = float(eps)
        self.name = name
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.extractor.eval()

    def train(self, mode: bool = True) -> DeepSimLoss:
        # nn.Module.train recurses into children; put the extractor back in eval afterwards so that a registration
        # model's .train() never switches on dropout or updates BatchNorm statistics of the frozen extractor.
        super().train(mode)
        self.extractor.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.extractor.extract_features(x)
        if isinstance(feats, torch.Tensor) or not isinstance(feats, Sequence):
            raise ValueError(f"extractor.extract_features must return a list of tensors, got {type(feats).__name__}")
        return list(feats)

    def _feature_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        check_image_pair(("warped", "fixed"), a, b)
        fa = self._features(a)
        # The fixed image is data in registration training: skip its autograd graph (memory) unless the caller
        # asked for a gradient with respect to it.
        if b.requires_grad:
            fb = self._features(b)
        else:
            with torch.no_grad():
                fb = self._features(b)
        return fa, fb

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """DeepSim similarity in [-1, 1] (1 = identical features), 0-dim. a, b: (B, C, *S), same shape."""
        fa, fb = self._feature_pair(a, b)
        return multilayer_cosine(fa, fb, eps=self.eps, reduction="mean")

    def forward(self, warped, fixed, warped_seg=None, fixed_seg=None) -> torch.Tensor:
        """Loss 1 - DeepSim(warped, fixed), 0-dim, in [0, 2]. warped, fixed: float (B, C, *S), same shape."""
        return 1.0 - self.similarity(warped, fixed)

    def similarity_maps(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-level per-pixel cosine maps at the feature resolutions: tuple of L tensors (B, *S_l)."""
        fa, fb = self._feature_pair(a, b)
        return tuple(multilayer_cosine(fa, fb, eps=self.eps, reduction="none"))

    def similarity_map(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pixel semantic similarity at IMAGE resolution, (B, 1, *S) in [-1, 1] (QA / anomaly maps).

        Each level's cosine map is upsampled to the image size (bilinear / trilinear, align_corners=False, as the
        U-Net decoder) and the levels are averaged with equal weights. 1 - map is the dissimilarity map. Its
        spatial mean is close to, but not exactly, `similarity` (which averages each level at its own resolution).
        """
        maps = self.similarity_maps(a, b)
        size = a.shape[2:]
        mode = "bilinear" if len(size) == 2 else "trilinear"
        ups = []
        for m in maps:
            m = m.unsqueeze(1)
            if m.shape[2:] != size:
                if m.dim() != a.dim():
                    raise ValueError(f"feature maps must have the image's spatial ndim {len(size)}, got map shape "
                                     f"{tuple(m.shape)}")
                m = F.interpolate(m, size=size, mode=mode, align_corners=False)
            ups.append(m)
        return torch.stack(ups, dim=0).mean(dim=0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
