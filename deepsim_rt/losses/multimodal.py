"""Multimodal classical similarities: MIND-SSC (Heinrich et al., MICCAI 2013) and Parzen-window NMI.

MIND-SSC describes each voxel by how similar the patches around pairs of its neighbours are to each other (the
self-similarity context); the descriptor depends on the image's local STRUCTURE, not on its intensities, so it
can compare a T1 with a T2. Both are 0-dim losses, lower is better, computed in fp32 (fp64 for fp64 inputs).

    mind_ssc(x, radius=1, dilation=2) -> (B, P, *S) descriptor, P = 4 (2D) or 12 (3D) neighbour pairs, in (0, 1]
    mind(warped, fixed)   = mean squared difference of the descriptors (0 = same structure; MIND(x, a x + b) = 0
                            exactly for any a != 0, inverted contrast included)
    nmi(a, b, bins=32)    = (H(A) + H(B)) / H(A, B) in [1, 2] (Studholme), Gaussian Parzen windows on [0, 1]
    nmi_loss(a, b)        = 2 - nmi(a, b)
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from deepsim_rt.losses._inputs import acc_dtype, check_image_pair
from deepsim_rt.losses.base import Similarity

__all__ = ["mind_ssc", "mind", "nmi", "nmi_loss", "parzen_weights", "nmi_of_weights", "MIND", "NMI",
           "DEFAULT_MIND_RADIUS", "DEFAULT_MIND_DILATION",
           "DEFAULT_NMI_BINS"]

DEFAULT_MIND_RADIUS = 1  # patch = 3^ndim voxels (the MIND-SSC paper's smallest patch; 2 mm voxels)
DEFAULT_MIND_DILATION = 2  # neighbours 2 voxels from the centre: 4 mm at 2 mm, about a cortical thickness
DEFAULT_NMI_BINS = 32


def _pairs(nd: int, d: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs of the 2*nd axis neighbours at distance d that are sqrt(2) d apart (the SSC pattern: 4 in 2D,
    12 in 3D); opposite neighbours (2 d apart) are not paired."""
    nbrs = []
    for axis in range(nd):
        for s in (-d, d):
            o = [0] * nd
            o[axis] = s
            nbrs.append(tuple(o))
    return [(a, b) for a, b in itertools.combinations(nbrs, 2)
            if sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) == 2 * d * d]


def _shift(xp: torch.Tensor, off: tuple[int, ...], pad: int, size: tuple[int, ...]) -> torch.Tensor:
    idx = [slice(None), slice(None)] + [slice(pad + o, pad + o + s) for o, s in zip(off, size, strict=True)]
    return xp[tuple(idx)]


def mind_ssc(x: torch.Tensor, radius: int = DEFAULT_MIND_RADIUS, dilation: int = DEFAULT_MIND_DILATION,
             eps: float = 1e-12) -> torch.Tensor:
    """MIND-SSC descriptor of (B, 1, *S) (2D or 3D) -> (B, P, *S), P = 4 (2D) / 12 (3D), values in (0, 1].

    D_k(p) = box mean over the (2 radius + 1)^ndim patch of (x(p + a_k) - x(p + b_k))^2 for neighbour pair k;
    V(p) = mean_k D_k(p), clamped to [1e-3, 1e3] x its image mean (+ eps, which only matters for a constant
    image: an absolute eps of 1e-6 broke the invariance to intensity scale by 7e-8) so flat regions never divide
    by 0;
    descriptor = exp(-D_k / V) divided by its maximum over k. Edges replicate-padded.
    """
    nd = x.dim() - 2
    if nd not in (2, 3) or x.shape[1] != 1:
        raise ValueError(f"mind_ssc needs a (B, 1, H, W) or (B, 1, D, H, W) image, got shape {tuple(x.shape)}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    size = tuple(x.shape[2:])
    pad = dilation
    xp = F.pad(x, [pad] * (2 * nd), mode="replicate")
    d = torch.cat([(_shift(xp, a, pad, size) - _shift(xp, b, pad, size)).square() for a, b in _pairs(nd, dilation)],
                  dim=1)
    if radius:
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        d = pool(F.pad(d, [radius] * (2 * nd), mode="replicate"), 2 * radius + 1, stride=1)
    v = d.mean(dim=1, keepdim=True)
    m = v.flatten(1).mean(dim=1).view(-1, 1, *([1] * nd))
    v = torch.minimum(torch.maximum(v, 1e-3 * m + eps), 1e3 * m + eps)
    desc = torch.exp(-d / v)
    return desc / desc.amax(dim=1, keepdim=True)


def mind(warped: torch.Tensor, fixed: torch.Tensor, radius: int = DEFAULT_MIND_RADIUS,
         dilation: int = DEFAULT_MIND_DILATION) -> torch.Tensor:
    """MIND-SSC loss: mean over batch, descriptor channels and voxels of (mind_ssc(warped) - mind_ssc(fixed))^2,
    every image channel separately. (B, C, *S) x2 -> 0-dim, 0 for identical structure, at most 1."""
    check_image_pair(("warped", "fixed"), warped, fixed)
    acc = acc_dtype(warped)
    a = warped.to(acc).flatten(0, 1).unsqueeze(1)
    b = fixed.to(acc).flatten(0, 1).unsqueeze(1)
    return (mind_ssc(a, radius, dilation) - mind_ssc(b, radius, dilation)).square().mean()


def _parzen(x: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, N) intensities in [0, 1] -> (B, N, bins) Gaussian Parzen weights (sigma = half a bin), rows sum to 1."""
    centres = (torch.arange(bins, dtype=x.dtype, device=x.device) + 0.5) / bins
    sigma = 0.5 / bins
    w = torch.exp(-0.5 * ((x.unsqueeze(-1) - centres) / sigma).square())
    return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def parzen_weights(x: torch.Tensor, bins: int = DEFAULT_NMI_BINS) -> torch.Tensor:
    """(B, C, *S) intensities in [0, 1] (clamped) -> (B, N, bins) Parzen weights, N = C * prod(S): one image's
    half of `nmi`, to compute once for an image that does not change between steps (a fixed image)."""
    return _parzen(x.to(acc_dtype(x)).flatten(1).clamp(0, 1), bins)


def nmi_of_weights(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """`nmi` from two images' `parzen_weights` (B, N, bins) each -> 0-dim, in [1, 2]."""
    joint = torch.einsum("bni,bnj->bij", wa, wb) / wa.shape[1]
    pa, pb = joint.sum(dim=2), joint.sum(dim=1)
    ent = lambda p: -(p * torch.log(p.clamp_min(1e-12))).flatten(1).sum(dim=1)  # noqa: E731
    return ((ent(pa) + ent(pb)) / ent(joint).clamp_min(1e-12)).mean()


def nmi(a: torch.Tensor, b: torch.Tensor, bins: int = DEFAULT_NMI_BINS) -> torch.Tensor:
    """Normalized mutual information (H(A) + H(B)) / H(A, B) per batch item, averaged: (B, C, *S) x2 -> 0-dim in
    [1, 2]. Intensities are expected in [0, 1] (values outside are clamped); channels are pooled."""
    check_image_pair(("a", "b"), a, b)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    return nmi_of_weights(parzen_weights(a, bins), parzen_weights(b, bins))


def nmi_loss(a: torch.Tensor, b: torch.Tensor, bins: int = DEFAULT_NMI_BINS) -> torch.Tensor:
    """2 - nmi(a, b): 0-dim, in [0, 1]; lower is better (never exactly 0: Parzen windows blur the joint
    histogram of identical images)."""
    return 2.0 - nmi(a, b, bins)


class MIND(Similarity):
    """`mind` as a Similarity module (labels ignored)."""

    name = "mind"

    def __init__(self, radius: int = DEFAULT_MIND_RADIUS, dilation: int = DEFAULT_MIND_DILATION) -> None:
        super().__init__()
        self.radius, self.dilation = radius, dilation

    def forward(self, warped, fixed, warped_seg=None, fixed_seg=None):
        return mind(warped, fixed, self.radius, self.dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}, dilation={self.dilation}"


class NMI(Similarity):
    """`nmi_loss` as a Similarity module (labels ignored). Not in the registry's SIMILARITIES: its loss of an
    image with itself is not 0 (see nmi_loss), which the uniform interface requires."""

    name = "nmi"

    def __init__(self, bins: int = DEFAULT_NMI_BINS) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, warped, fixed, warped_seg=None, fixed_seg=None):
        return nmi_loss(warped, fixed, self.bins)
