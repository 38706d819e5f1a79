"""Pure-PyTorch ground truth for the three hot ops. Imports no Triton.

This module is what CPU tensors run, what every kernel test compares against, and what the benchmarks call
"reference". It is written for clarity and exact agreement with the method (../shared/docs/PAPER_NOTES.md), and it
composes only standard ATen ops so it compiles with torch.compile, exports with torch.export, lowers to ONNX
(GridSample) and AOT-compiles on the CPU.

Conventions
  image         float (B, C, *spatial); spatial = (H, W) or (D, H, W)
  displacement  (B, ndim, *spatial), voxel units, channel i moves along spatial axis i in tensor order,
                warped(p) = image(p + u(p)), align_corners=True (voxel centres at integer indices)
  padding       "border" (clamp to the edge voxel, as the DeepSim code) or "zeros" (VoxelMorph)
  mode          "linear" (bilinear 2D / trilinear 3D) or "nearest" (round half to even, as ATen's grid_sample)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepsim_rt._checks import (
    MODES,
    PADDINGS,
    check_choice,
    check_finite,
    check_float,
    check_not_empty,
    check_same_device,
    check_spatial_ndim,
    check_tensor,
)

__all__ = [
    "multilayer_cosine",
    "warp",
    "integrate",
    "identity_grid",
    "check_cosine_inputs",
    "check_warp_inputs",
    "check_integrate_inputs",
]

DEFAULT_EPS = 1e-6
DEFAULT_STEPS = 7


# ----------------------------------------------------------------------------------------------------------------
# Multi-layer cosine similarity (DeepSim)
# ----------------------------------------------------------------------------------------------------------------
def check_cosine_inputs(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], reduction: str) -> None:
    """Validate the level lists of `multilayer_cosine`; shared by the reference and the Triton launcher."""
    check_choice("reduction", reduction, ("mean", "none"))
    if isinstance(feats_a, torch.Tensor) or isinstance(feats_b, torch.Tensor):
        raise ValueError("feats_a and feats_b must be sequences of tensors (one per level), got a single tensor")
    if len(feats_a) != len(feats_b):
        raise ValueError(f"feats_a and feats_b must have the same number of levels, got {len(feats_a)} and "
                         f"{len(feats_b)}")
    if len(feats_a) == 0:
        raise ValueError("multilayer_cosine needs at least one feature level, got 0")
    for lvl, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
        check_float(f"feats_a[{lvl}]", fa)
        check_float(f"feats_b[{lvl}]", fb)
        if fa.dim() < 3:
            raise ValueError(f"feats_a[{lvl}] must be (B, C, *spatial) with >= 1 spatial dim, got shape "
                             f"{tuple(fa.shape)}")
        if fa.shape != fb.shape:
            raise ValueError(f"level {lvl}: feats_a and feats_b must have the same shape (B, C, *spatial), got "
                             f"{tuple(fa.shape)} and {tuple(fb.shape)}")
        if fa.dtype != fb.dtype:
            raise ValueError(f"level {lvl}: feats_a and feats_b must have the same dtype, got {fa.dtype} and "
                             f"{fb.dtype}")
        check_same_device((f"feats_a[{lvl}]", f"feats_b[{lvl}]"), fa, fb)
        check_not_empty(f"feats_a[{lvl}]", fa)
        if fa.device != feats_a[0].device:
            raise ValueError(f"all levels must be on one device, got {feats_a[0].device} (level 0) and {fa.device} "
                             f"(level {lvl})")


def cosine_map(fa: torch.Tensor, fb: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Per-pixel cosine of one level: (B, C, *S) x2 -> (B, *S), computed in fp32 (or fp64 if given fp64).

    The squared norms are clamped at eps BEFORE the square root (paper's formula), so each norm is >= sqrt(eps);
    torch.nn.functional.cosine_similarity clamps the norm itself at 1e-8 and differs on near-zero features.
    """
    acc = torch.float64 if fa.dtype == torch.float64 else torch.float32
    a = fa.to(acc)
    b = fb.to(acc)
    dot = (a * b).sum(dim=1)
    na2 = (a * a).sum(dim=1).clamp_min(eps)
    nb2 = (b * b).sum(dim=1).clamp_min(eps)
    return dot / (na2.sqrt() * nb2.sqrt())


def multilayer_cosine(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor],
    eps: float = DEFAULT_EPS,
    reduction: str = "mean",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """DeepSim similarity of two feature pyramids.

    Args:
        feats_a, feats_b: L levels each; level l is (B, C_l, *S_l), same shape and dtype in a and b. Levels may
            differ in channels and resolution.
        eps: clamp on the SQUARED feature norm (paper: 1e-6).
        reduction: "mean" -> 0-dim tensor, the mean over levels of the per-level mean over batch and voxels;
            "none" -> tuple of L per-pixel maps (B, *S_l).
    Returns fp32 (fp64 for fp64 inputs); values in [-1, 1]. Loss = 1 - similarity.
    """
    check_cosine_inputs(feats_a, feats_b, reduction)
    # eps <= 0 would turn an all-zero feature vector (common after LeakyReLU on a flat region) into 0/0 = NaN.
    if isinstance(eps, bool) or not isinstance(eps, float | int) or not eps > 0:
        raise ValueError(f"eps must be a positive number (clamp on the squared feature norm), got {eps!r}")
    for lvl, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
        check_finite(f"feats_a[{lvl}]", fa)
        check_finite(f"feats_b[{lvl}]", fb)
    maps = tuple(cosine_map(fa, fb, eps) for fa, fb in zip(feats_a, feats_b, strict=True))
    if reduction == "none":
        return maps
    # Levels are weighted equally AFTER the per-level voxel mean (a level at 1/8 resolution counts as much as one
    # at 1/2), exactly as the paper.
    return torch.stack([m.mean() for m in maps]).mean()


# ----------------------------------------------------------------------------------------------------------------
# Warping
# ----------------------------------------------------------------------------------------------------------------
def check_warp_inputs(image: torch.Tensor, flow: torch.Tensor, mode: str, padding: str) -> int:
    """Validate warp arguments; returns the number of spatial dims. Shared by reference and Triton launchers."""
    check_choice("mode", mode, MODES)
    check_choice("padding", padding, PADDINGS)
    check_tensor("image", image)
    check_tensor("flow", flow)
    nsp = check_spatial_ndim("image", image)
    check_float("flow", flow)
    if flow.dim() != image.dim():
        raise ValueError(f"flow must be (B, {nsp}, *spatial) like image {tuple(image.shape)}, got shape "
                         f"{tuple(flow.shape)}")
    if flow.shape[1] != nsp:
        raise ValueError(f"flow must have {nsp} channels (one per spatial dim of the {nsp}D image), got "
                         f"{flow.shape[1]} (shape {tuple(flow.shape)})")
    if flow.shape[2:] != image.shape[2:]:
        raise ValueError(f"flow spatial size {tuple(flow.shape[2:])} must equal image spatial size "
                         f"{tuple(image.shape[2:])}")
    if flow.shape[0] != image.shape[0]:
        raise ValueError(f"flow batch {flow.shape[0]} must equal image batch {image.shape[0]}")
    if not image.is_floating_point() and mode != "nearest":
        raise ValueError(f"integer images (dtype {image.dtype}) can only be warped with mode='nearest'; use a float "
                         "image for mode='linear'")
    check_same_device(("image", "flow"), image, flow)
    check_not_empty("image", image)
    check_not_empty("flow", flow)
    if min(image.shape[2:]) < 2:
        # align_corners=True has no sampling grid on a 1-voxel axis (grid_sample maps every coordinate to index 0,
        # which silently ignores displacement and zeros padding there): reject instead of guessing.
        raise ValueError(f"every spatial size must be >= 2 to warp, got {tuple(image.shape[2:])}; use a 2D image "
                         "instead of a 3D one with a singleton axis")
    return nsp


def identity_grid(spatial: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(ndim, *spatial) voxel coordinates; channel i holds the index along spatial axis i."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _sampling_grid(flow: torch.Tensor) -> torch.Tensor:
    """Voxel displacement (B, nd, *S) -> grid_sample grid (B, *S, nd) in [-1, 1], last dim ordered (x, y[, z]).

    Normalization is 2 c / (n - 1) - 1 per axis (align_corners=True); check_warp_inputs guarantees n >= 2.
    """
    spatial = flow.shape[2:]
    nd = len(spatial)
    coords = identity_grid(spatial, device=flow.device, dtype=flow.dtype).unsqueeze(0) + flow
    scale = torch.tensor([2.0 / (n - 1) for n in spatial], device=flow.device, dtype=flow.dtype)
    scale = scale.view(1, nd, *([1] * nd))
    grid = coords * scale - 1.0
    # grid_sample wants the fastest-varying axis (x) first in the last dim: reverse the tensor-order channels.
    return grid.flip(1).movedim(1, -1)


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """Warp `image` by the voxel displacement `flow`: out(p) = image(p + flow(p)).

    Args:
        image: (B, C, H, W) or (B, C, D, H, W). Float for mode="linear"; integer label maps allowed for "nearest"
            (returned in their own dtype, exact for values < 2**24).
        flow: (B, ndim, *spatial) float, voxel units, channel i along spatial axis i.
        mode: "linear" or "nearest".  padding: "border" or "zeros".
    Returns a tensor shaped like `image`.
    """
    check_warp_inputs(image, flow, mode, padding)
    check_finite("flow", flow)
    if image.is_floating_point():
        check_finite("image", image)
    # Coordinates need fp32 at least: in bf16 an index of 200 is only representable to +-1 voxel, and fp16 cannot
    # hold 2048. Half-precision inputs are therefore sampled in fp32 and the result rounded once to image.dtype.
    compute = flow.dtype if flow.dtype in (torch.float32, torch.float64) else torch.float32
    grid = _sampling_grid(flow.to(compute))
    src = image.to(compute) if image.dtype != compute else image
    out = F.grid_sample(src, grid, mode="bilinear" if mode == "linear" else "nearest", padding_mode=padding,
                        align_corners=True)
    return out.to(image.dtype) if out.dtype != image.dtype else out


def check_integrate_inputs(velocity: torch.Tensor, steps: int, padding: str) -> int:
    """Validate `integrate` arguments (shared by the reference and the Triton launcher): velocity
    (B, ndim, *S) float, steps int >= 0, a known padding; returns ndim."""
    check_float("velocity", velocity)
    nsp = check_spatial_ndim("velocity", velocity)
    if velocity.shape[1] != nsp:
        raise ValueError(f"velocity must have {nsp} channels for a {nsp}D field, got {velocity.shape[1]}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    check_choice("padding", padding, PADDINGS)
    if velocity.numel() == 0:
        raise ValueError(f"velocity must not be empty, got shape {tuple(velocity.shape)}")
    if min(velocity.shape[2:]) < 2:
        raise ValueError(f"every spatial size must be >= 2 to integrate, got {tuple(velocity.shape[2:])}")
    return nsp


def integrate(velocity: torch.Tensor, steps: int = DEFAULT_STEPS, padding: str = "border") -> torch.Tensor:
    """Scaling and squaring: displacement of exp(v) for a stationary velocity field v.

    u_0 = v / 2**steps;  u_{k+1} = u_k + warp(u_k, u_k)  (i.e. phi_{k+1} = phi_k o phi_k), `steps` times.
    Padding "border" (default) extrapolates the displacement at the edge as constant, which keeps the map smooth at
    the boundary (and a constant velocity integrates to exactly that translation). Convention where peers differ:
    MONAI's DVF2DDF and VoxelMorph's VecInt sample with zeros, which shrinks the field wherever p + u(p) leaves the
    grid (issue 11 saw up to 5 voxels of difference on rough fields); pass padding="zeros" to match them (pinned in
    tests/test_conventions.py).
    Args: velocity (B, ndim, *spatial) float, voxel units; steps >= 0 (0 returns v unchanged).
    Returns (B, ndim, *spatial).
    """
    check_integrate_inputs(velocity, steps, padding)
    # Checked here, not only inside warp: steps=0 never calls warp, and the message should name `velocity`.
    check_finite("velocity", velocity)
    u = velocity / (2.0**steps)
    for _ in range(steps):
        u = u + warp(u, u, mode="linear", padding=padding)
    return u
