"""Conventions where peer libraries differ (issue 11 item 8), each pinned by a known answer.

- integrate pads with BORDER (MONAI DVF2DDF and VoxelMorph VecInt sample with zeros);
- the diffusion regulariser averages over the n voxels of an axis, the last forward difference being 0
  (VoxelMorph / neurite Grad('l2') average over the n - 1 differences);
- Dice scores a class absent from the truth (present in the prediction) as 0 (MONAI DiceMetric: NaN).
"""

from __future__ import annotations

import inspect

import torch

from deepsim_rt.evaluate.metrics import dice_foreground, dice_paper, dice_per_class
from deepsim_rt.kernels import integrate
from deepsim_rt.kernels.reference import integrate as integrate_reference
from deepsim_rt.losses.regularizer import diffusion_regularizer


def test_integrate_default_padding_is_border_and_keeps_a_translation_exact():
    assert inspect.signature(integrate).parameters["padding"].default == "border"
    assert inspect.signature(integrate_reference).parameters["padding"].default == "border"
    # exp of a constant velocity c is the translation by c: with border padding every sample of the constant field
    # (inside or beyond the edge) is c, so the result is c everywhere, up to the last voxel.
    v = torch.empty(1, 3, 7, 6, 5, dtype=torch.float64)
    for c, val in enumerate((1.75, -0.5, 2.25)):
        v[:, c] = val
    u = integrate(v, steps=7)
    torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    # Zero padding (MONAI / VoxelMorph) shrinks it where p + u(p) leaves the grid: 1.75 voxels along axis 0 loses
    # more than half of it on the last slice. The choice is visible, hence pinned.
    v1 = torch.zeros_like(v)
    v1[:, 0] = 1.75
    z = integrate(v1, steps=7, padding="zeros")
    assert float((z[:, 0, -1] - 1.75).abs().min()) > 0.8
    torch.testing.assert_close(integrate(v1, steps=7), v1, rtol=0, atol=1e-12)


def test_diffusion_regulariser_averages_over_n_voxels_not_n_minus_1():
    n0, n1, a = 5, 4, 1.5
    x0 = torch.arange(n0, dtype=torch.float64).view(n0, 1).expand(n0, n1)
    u = torch.zeros(1, 2, n0, n1, dtype=torch.float64)
    u[0, 0] = a * x0  # a linear ramp along axis 0 in component 0: every forward difference along axis 0 is a
    ours = float(diffusion_regularizer(u))
    # ours: mean over (channels=2, n0*n1 voxels) of sum_i d_i^2, / ndim=2; a^2 on (n0-1)/n0 of the voxels
    assert abs(ours - a * a * (n0 - 1) / n0 / 4) < 1e-12
    # VoxelMorph / neurite Grad('l2'): mean over the (n0-1) x n1 differences per axis, summed, / ndim
    dx = (u[:, :, 1:] - u[:, :, :-1]) ** 2
    dy = (u[:, :, :, 1:] - u[:, :, :, :-1]) ** 2
    voxelmorph = float((dx.mean() + dy.mean()) / 2)
    assert abs(voxelmorph - a * a / 4) < 1e-12
    assert abs(ours / voxelmorph - (n0 - 1) / n0) < 1e-12  # 0.8 here: the two conventions differ by (n-1)/n


def test_dice_class_absent_from_truth_scores_zero_not_nan():
    true = torch.tensor([[[[0, 0, 1, 1]]]])
    pred = torch.tensor([[[[0, 2, 1, 1]]]])  # class 2 predicted, absent from the truth
    d = dice_per_class(pred, true, n_classes=4)
    assert d[0, 2].item() == 0.0  # MONAI DiceMetric (ignore_empty=True) returns NaN for it
    assert torch.isnan(d[0, 3])  # absent from BOTH: undefined here; each mean below states its rule
    torch.testing.assert_close(d[0, :2], torch.tensor([2 * 1 / 3, 1.0], dtype=torch.float64))
    # paper mean: all 4 classes, absent-from-both scores 0 -> (2/3 + 1 + 0 + 0) / 4
    assert abs(dice_paper(pred, true, 4).item() - (2 / 3 + 1) / 4) < 1e-12
    # foreground mean: classes 1..3, absent-from-both skipped, absent-from-truth counted as 0 -> (1 + 0) / 2
    assert abs(dice_foreground(pred, true, 4).item() - 0.5) < 1e-12
