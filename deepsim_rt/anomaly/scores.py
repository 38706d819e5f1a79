"""Change scores per fixed-image voxel after registration: what the alignment cannot explain.

Inputs are batched tensors on one device: moving, fixed (B, C, *S) min-max normalized to [0, 1] (the runtime's
"minmax" contract); displacement u (B, ndim, *S) in voxels with warped(p) = moving(p + u(p)) (deepsim_rt
conventions). Every score is a map (B, *S) on the FIXED grid, higher = more change:

  semantic   1 - cos of the feature extractor's levels (DeepSim's per-pixel term), level l at 1/2**(l+1)
             resolution: each level's (1 - cos_l) map is upsampled to the image size (bilinear / trilinear,
             align_corners=False, as the U-Net decoder) and the levels are AVERAGED with equal weights, i.e.
             score = 1 - DeepSimLoss.similarity_map. In [0, 2]; 0 where the features agree exactly. The cosine maps
             come from `deepsim_rt.kernels.multilayer_cosine(..., reduction="none")`: the fused Triton kernel on
             CUDA, the PyTorch reference on the CPU.
  residual   |warped - fixed| in normalized intensity units (summed over channels): the intensity baseline.
  jacobian   |log det J(phi)| of phi = id + u (deepsim_rt.evaluate.metrics.jacobian_determinant), with det J
             clamped below at JACOBIAN_FLOOR (a folded voxel scores |log 1e-3| = 6.9): local volume change in
             either direction (growth or shrinkage), the Jacobian baseline.
Any size: the extractor's input is padded to its multiple (replicate) and the maps cropped back, as the runtime
does for the registration network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepsim_rt._checks import check_displacement, check_float, check_spatial_ndim
from deepsim_rt.evaluate.metrics import jacobian_determinant
from deepsim_rt.kernels import warp
from deepsim_rt.losses.deepsim import DEFAULT_DEEPSIM_EPS, DeepSimLoss
from deepsim_rt.runtime import crop, pad_to_multiple

__all__ = ["ChangeMaps", "semantic_change", "intensity_residual", "jacobian_score", "change_maps", "COMBINE",
           "JACOBIAN_FLOOR"]

COMBINE = "mean over levels of the (1 - cos) maps, each upsampled to the image grid (bi/trilinear, " \
          "align_corners=False)"
JACOBIAN_FLOOR = 1e-3  # det J clamp: folded voxels (det <= 0) get the largest finite score |log 1e-3|


@dataclass(frozen=True)
class ChangeMaps:
    """Scores on the fixed grid, (B, *S) float32 each; levels: one (B, *S) map per extractor level (1 - cos_l,
    upsampled); warped (B, C, *S) normalized; displacement (B, ndim, *S) voxels; log_det_j (B, *S) signed."""

    semantic: torch.Tensor
    levels: tuple[torch.Tensor, ...]
    residual: torch.Tensor
    jacobian: torch.Tensor
    log_det_j: torch.Tensor
    warped: torch.Tensor
    displacement: torch.Tensor

    def scores(self) -> dict[str, torch.Tensor]:
        return {"semantic": self.semantic, "residual": self.residual, "jacobian": self.jacobian}


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> int:
    check_float("warped", a)
    check_float("fixed", b)
    nd = check_spatial_ndim("fixed", b)
    if a.shape != b.shape:
        raise ValueError(f"warped and fixed must have the same shape (B, C, *S), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return nd


def semantic_change(extractor: nn.Module, warped: torch.Tensor, fixed: torch.Tensor,
                    eps: float = DEFAULT_DEEPSIM_EPS) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(combined (B, *S), per-level (B, *S) maps) of 1 - cos; see the module docstring.

    extractor: a deepsim_rt feature model (SegNet / AutoEncoder: `.cfg` and `extract_features`). warped, fixed:
    (B, C, *S) float in [0, 1], same shape, any spatial size.
    """
    nd = _check_pair(warped, fixed)
    cfg = getattr(extractor, "cfg", None)
    if cfg is None or cfg.kind not in ("seg", "ae") or not callable(getattr(extractor, "extract_features", None)):
        raise ValueError(f"extractor must be a deepsim_rt feature model (seg or ae), got {type(extractor).__name__} "
                         f"of kind {getattr(cfg, 'kind', None)!r}")
    if cfg.ndim != nd:
        raise ValueError(f"the extractor is {cfg.ndim}D but the images are {nd}D (shape {tuple(fixed.shape)})")
    loss = DeepSimLoss(extractor, eps=eps)
    a, pads = pad_to_multiple(warped, cfg.spatial_multiple, "replicate")
    b, _ = pad_to_multiple(fixed, cfg.spatial_multiple, "replicate")
    with torch.inference_mode():
        cos = loss.similarity_maps(a.contiguous(), b.contiguous())
    mode = "bilinear" if nd == 2 else "trilinear"
    levels = tuple(crop(F.interpolate((1.0 - c.float()).unsqueeze(1), size=a.shape[2:], mode=mode,
                                      align_corners=False), pads)[:, 0] for c in cos)
    return torch.stack(levels, 0).mean(0), levels


def intensity_residual(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """|warped - fixed| summed over channels: (B, C, *S) x2 -> (B, *S) float32."""
    _check_pair(warped, fixed)
    return (warped.float() - fixed.float()).abs().sum(1)


def jacobian_score(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|log max(det J, JACOBIAN_FLOOR)|, log max(det J, JACOBIAN_FLOOR)), each (B, *S) float32, from the
    displacement u (B, ndim, *S) in voxels."""
    check_displacement("displacement", u)
    logd = jacobian_determinant(u).clamp_min(JACOBIAN_FLOOR).log().float()
    return logd.abs(), logd


def change_maps(extractor: nn.Module, moving: torch.Tensor, fixed: torch.Tensor,
                displacement: torch.Tensor | None, padding: str = "border") -> ChangeMaps:
    """All scores of one registration result. moving, fixed: (B, C, *S) normalized; displacement (B, ndim, *S)
    voxels, or None for NO registration (u = 0: warped = moving, jacobian 0). padding: the model's warp padding."""
    _check_pair(moving, fixed)
    if displacement is None:
        # No registration: the moving image as it is (a warp by u = 0 would add ~1e-7 of grid rounding).
        displacement = moving.new_zeros((moving.shape[0], moving.dim() - 2, *moving.shape[2:]))
        warped = moving.float()
    else:
        check_displacement("displacement", displacement)
        if displacement.shape[0] != moving.shape[0] or displacement.shape[2:] != moving.shape[2:]:
            raise ValueError(f"displacement must be (B, ndim, *S) = ({moving.shape[0]}, {moving.dim() - 2}, "
                             f"{', '.join(map(str, moving.shape[2:]))}), got {tuple(displacement.shape)}")
        with torch.inference_mode():
            warped = warp(moving.float(), displacement.float(), mode="linear", padding=padding)
    semantic, levels = semantic_change(extractor, warped, fixed.float())
    jac, logd = jacobian_score(displacement.float())
    return ChangeMaps(semantic=semantic, levels=levels, residual=intensity_residual(warped, fixed), jacobian=jac,
                      log_det_j=logd, warped=warped, displacement=displacement.float())
