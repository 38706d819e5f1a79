"""Baseline intensity similarities of the paper: MSE, local squared NCC, NCC_sup (+ the one-hot helper).

All return a 0-dim LOSS (lower is better), computed in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepsim_rt._checks import check_tensor
from deepsim_rt.losses._inputs import acc_dtype, check_image, check_image_pair
from deepsim_rt.losses.base import Similarity

__all__ = ["mse", "ncc", "ncc_map", "ncc_sup", "one_hot", "MSE", "NCC", "NCCSup", "DEFAULT_NCC_WINDOW",
           "DEFAULT_NCC_EPS"]

DEFAULT_NCC_WINDOW = 9
DEFAULT_NCC_EPS = 1e-6


def mse(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference over batch, channels and voxels. (B, C, *S) x2 -> 0-dim."""
    check_image_pair(("warped", "fixed"), warped, fixed)
    acc = acc_dtype(warped)
    return (warped.to(acc) - fixed.to(acc)).square().mean()


def _window(window: int | Sequence[int], nsp: int) -> tuple[int, ...]:
    win = (window,) * nsp if isinstance(window, int) and not isinstance(window, bool) else tuple(window)
    if len(win) != nsp or not all(isinstance(w, int) and not isinstance(w, bool) for w in win):
        raise ValueError(f"window must be an int or {nsp} ints (one per spatial axis), got {window!r}")
    if any(w < 1 or w % 2 == 0 for w in win):
        # An even window with padding win//2 would shift the output by half a voxel and grow it by one.
        raise ValueError(f"window sizes must be odd and >= 1, got {win}")
    return win


def _box_sum(x: torch.Tensor, win: tuple[int, ...]) -> torch.Tensor:
    """Sum of x over a centred box of size `win` (odd per axis), zero padding, per channel: (B, C, *S) -> same."""
    nsp = x.dim() - 2
    conv = F.conv2d if nsp == 2 else F.conv3d
    c = x.shape[1]
    for axis, w in enumerate(win):
        shape = [1] * nsp
        shape[axis] = w
        pad = [0] * nsp
        pad[axis] = w // 2
        kernel = torch.ones((c, 1, *shape), dtype=x.dtype, device=x.device)
        x = conv(x, kernel, padding=tuple(pad), groups=c)
    return x


def ncc_map(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    window: int | Sequence[int] = DEFAULT_NCC_WINDOW,
    eps: float = DEFAULT_NCC_EPS,
) -> torch.Tensor:
    """Local squared normalized cross-correlation per voxel and channel, (B, C, *S) x2 -> (B, C, *S) in [0, 1].

    Box window `window`^ndim, stride 1, zero padding window//2 (as VoxelMorph / the DeepSim code): sums are taken
    with a ones kernel, each channel separately, and the window size n = prod(window) is NOT reduced at the border
    (padded voxels count as zeros in both images). With S = window sums:
        cross = S(IJ) - S(I) S(J) / n,  var_I = S(I^2) - S(I)^2 / n,  var_J likewise,
        cc    = cross^2 / max(var_I * var_J, eps)
    Flat windows (var_I * var_J < eps) therefore score ~0, not 1.
    """
    nsp = check_image_pair(("warped", "fixed"), warped, fixed)
    win = _window(window, nsp)
    if not (isinstance(eps, float | int) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    acc = acc_dtype(warped)
    i, j = warped.to(acc), fixed.to(acc)
    c = i.shape[1]
    # The five window sums (I, J, I^2, J^2, IJ), each channel on its own, from one stack of maps. The box filter is
    # separable: one w-tap pass per axis costs 3 x 9 = 27 taps per voxel in 3D instead of 9^3 = 729 for a full
    # 9x9x9 kernel (measured at 32^3: the full kernel's backward took 3.2 s, the separable one milliseconds).
    sums = _box_sum(torch.cat([i, j, i * i, j * j, i * j], dim=1), win)
    s_i, s_j, s_ii, s_jj, s_ij = sums.split(c, dim=1)
    n = float(math.prod(win))
    cross = s_ij - s_i * s_j / n
    var_i = s_ii - s_i * s_i / n
    var_j = s_jj - s_j * s_j / n
    return cross * cross / (var_i * var_j).clamp_min(eps)


def ncc(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    window: int | Sequence[int] = DEFAULT_NCC_WINDOW,
    eps: float = DEFAULT_NCC_EPS,
) -> torch.Tensor:
    """Local squared NCC loss = 1 - mean over batch, channels and voxels of `ncc_map` (0 = perfect, max 1)."""
    return 1.0 - ncc_map(warped, fixed, window, eps).mean()


def one_hot(labels: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer label map (B, 1, *S) with values in [0, n_classes) -> float one-hot (B, n_classes, *S).

    For NCC_sup, one-hot the MOVING labels, then warp that float map with mode="linear" (the paper's choice; a
    nearest-warped map would give the labels no gradient).
    """
    check_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() not in (4, 5) or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, H, W) or (B, 1, D, H, W), got shape {tuple(labels.shape)}")
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"label values must lie in [0, {n_classes}), got range [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    if not torch.empty((), dtype=dtype).is_floating_point():
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    oh = F.one_hot(labels[:, 0].long(), n_classes)  # (B, *S, K)
    return oh.movedim(-1, 1).to(dtype)


def ncc_sup(
    warped: torch.Tensor,
    fixed: torch.Tensor,
    warped_onehot: torch.Tensor,
    fixed_onehot: torch.Tensor,
    window: int | Sequence[int] = DEFAULT_NCC_WINDOW,
    eps: float = DEFAULT_NCC_EPS,
) -> torch.Tensor:
    """NCC_sup = ncc(warped, fixed) + mse(warped_onehot, fixed_onehot) (weight 1, as the paper).

    warped_onehot: the moving one-hot map (B, K, *S) warped with LINEAR interpolation; fixed_onehot: (B, K, *S).
    """
    check_image("warped_onehot", warped_onehot)
    check_image("fixed_onehot", fixed_onehot)
    if warped_onehot.shape[0] != warped.shape[0] or warped_onehot.shape[2:] != warped.shape[2:]:
        raise ValueError(f"label maps must match the images in batch and spatial size: images "
                         f"{tuple(warped.shape)}, warped_onehot {tuple(warped_onehot.shape)}")
    return ncc(warped, fixed, window, eps) + mse(warped_onehot, fixed_onehot)


class MSE(Similarity):
    """`mse` as a Similarity module (labels ignored)."""

    name = "mse"

    def forward(self, warped, fixed, warped_seg=None, fixed_seg=None):
        return mse(warped, fixed)


class NCC(Similarity):
    """`ncc` as a Similarity module (labels ignored)."""

    name = "ncc"

    def __init__(self, window: int | Sequence[int] = DEFAULT_NCC_WINDOW, eps: float = DEFAULT_NCC_EPS):
        super().__init__()
        self.window = window
        self.eps = eps

    def forward(self, warped, fixed, warped_seg=None, fixed_seg=None):
        return ncc(warped, fixed, self.window, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, eps={self.eps}"


class NCCSup(NCC):
    """`ncc_sup` as a Similarity module: needs warped_seg (moving one-hot warped linearly) and fixed_seg."""

    name = "ncc_sup"
    needs_labels = True

    def forward(self, warped, fixed, warped_seg=None, fixed_seg=None):
        if warped_seg is None or fixed_seg is None:
            raise ValueError("ncc_sup needs warped_seg and fixed_seg (float one-hot maps (B, K, *S); warp the moving "
                             "one-hot with mode='linear'), got None")
        return ncc_sup(warped, fixed, warped_seg, fixed_seg, self.window, self.eps)
