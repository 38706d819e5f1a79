"""Evaluation metrics: Dice in both conventions (known answers incl. empty labels), Jacobian determinant of
known maps (affine, quadratic: central vs one-sided differences), folding, std log|J|, endpoint error."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from deepsim_rt.evaluate import (
    dice_foreground,
    dice_paper,
    dice_per_class,
    endpoint_error,
    folding_fraction,
    jacobian_determinant,
    std_log_jacobian,
)
from deepsim_rt.kernels.reference import identity_grid

NAN = float("nan")


# ================================================================================================================
# Dice
# ================================================================================================================
def test_dice_known_answer_both_conventions():
    pred = torch.tensor([[0, 1], [1, 2]]).view(1, 1, 2, 2)
    true = torch.tensor([[0, 1], [2, 2]]).view(1, 1, 2, 2)
    # class 0: 2*1/(1+1) = 1; class 1: 2*1/(2+1) = 2/3; class 2: 2*1/(1+2) = 2/3; class 3: absent from both.
    d = dice_per_class(pred, true, 4)
    assert d.shape == (1, 4) and d.dtype == torch.float64
    assert_close(d, torch.tensor([[1.0, 2 / 3, 2 / 3, NAN]], dtype=torch.float64), equal_nan=True)
    assert_close(dice_paper(pred, true, 4), torch.tensor([(1 + 2 / 3 + 2 / 3 + 0) / 4], dtype=torch.float64))
    assert_close(dice_foreground(pred, true, 4), torch.tensor([2 / 3], dtype=torch.float64))
    # Symmetric in pred / true.
    assert_close(dice_per_class(true, pred, 4), d, equal_nan=True)


def test_dice_empty_labels():
    bg = torch.zeros(1, 1, 3, 4, dtype=torch.long)
    # Only background in both: per class [1, NaN, NaN]; paper: (1 + 0 + 0) / 3; foreground: nothing to score -> NaN.
    assert_close(dice_per_class(bg, bg, 3), torch.tensor([[1.0, NAN, NAN]], dtype=torch.float64), equal_nan=True)
    assert_close(dice_paper(bg, bg, 3), torch.tensor([1 / 3], dtype=torch.float64))
    assert math.isnan(dice_foreground(bg, bg, 3).item())
    # Foreground present in truth only: its Dice is 0 (not skipped), in both conventions.
    true = bg.clone()
    true[0, 0, 0, 0] = 1
    assert_close(dice_per_class(bg, true, 3), torch.tensor([[2 * 11 / 23, 0.0, NAN]], dtype=torch.float64),
                 equal_nan=True)
    assert dice_foreground(bg, true, 3).item() == 0.0
    assert_close(dice_paper(bg, true, 3), torch.tensor([(22 / 23) / 3], dtype=torch.float64))


def test_dice_batch_3d_against_brute_force(rng):
    pred = torch.randint(0, 5, (3, 1, 7, 9, 6), generator=rng)
    true = torch.randint(0, 5, (3, 1, 7, 9, 6), generator=rng)
    true[1] = pred[1]  # one perfect pair
    true[2][true[2] == 4] = 3  # class 4 absent from true in sample 2
    pred[2][pred[2] == 4] = 0  # ... and from pred: absent from both
    d = dice_per_class(pred, true, 6)  # class 5 absent everywhere
    for b in range(3):
        for k in range(6):
            p, t = pred[b] == k, true[b] == k
            denom = int(p.sum() + t.sum())
            want = NAN if denom == 0 else 2 * int((p & t).sum()) / denom
            got = d[b, k].item()
            assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-12, (b, k, got, want)
    assert_close(d[1, :5], torch.ones(5, dtype=torch.float64))
    assert math.isnan(d[2, 4].item()) and math.isnan(d[0, 5].item())
    assert_close(dice_paper(pred, true, 6), torch.nan_to_num(d).mean(1))
    assert_close(dice_foreground(pred, true, 6), d[:, 1:].nanmean(1))
    # Non-contiguous and int32 labels give the same numbers.
    nc = pred.transpose(2, 4)
    assert_close(dice_per_class(nc, true.transpose(2, 4).to(torch.int32), 6), d, equal_nan=True)
    # A different background index is excluded instead of 0.
    assert_close(dice_foreground(pred, true, 6, background=3), d[:, [0, 1, 2, 4, 5]].nanmean(1))


@pytest.mark.parametrize(
    "pred, true, n, match",
    [
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long), 2, "integer"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), torch.zeros(1, 1, 4, 5, dtype=torch.long), 2, "same shape"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.long), torch.zeros(1, 2, 4, 4, dtype=torch.long), 2, "one label"),
        (torch.full((1, 1, 4, 4), 3), torch.zeros(1, 1, 4, 4, dtype=torch.long), 2, r"\[0, 2\)"),
        (torch.full((1, 1, 4, 4), -1), torch.zeros(1, 1, 4, 4, dtype=torch.long), 2, r"\[0, 2\)"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), torch.zeros(1, 1, 4, 4, dtype=torch.long), 0, "n_classes"),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), 2, "4D"),
    ],
)
def test_dice_rejects_bad_input(pred, true, n, match):
    with pytest.raises(ValueError, match=match):
        dice_per_class(pred, true, n)


def test_dice_foreground_rejects_bad_background():
    lab = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="background"):
        dice_foreground(lab, lab, 3, background=3)


# ================================================================================================================
# Jacobian determinant
# ================================================================================================================
def _affine_field(A, t, shape):
    """u(x) = (A - I) x + t on the voxel grid, so phi(x) = A x + t; A (B, nd, nd), t (B, nd)."""
    nd = len(shape)
    x = identity_grid(shape, dtype=torch.float64)  # (nd, *S)
    eye = torch.eye(nd, dtype=torch.float64)
    u = torch.einsum("bij,j...->bi...", A - eye, x)
    return u + t.view(*t.shape, *[1] * nd)


@pytest.mark.parametrize("shape", [(13, 17), (37, 41, 29)])
def test_jacobian_of_affine_map_is_det_A_everywhere(rng, shape):
    nd = len(shape)
    A = torch.eye(nd, dtype=torch.float64) + 0.3 * torch.randn(2, nd, nd, generator=rng, dtype=torch.float64)
    A[1, 0] *= -1  # second sample: a reflection -> negative determinant
    t = torch.randn(2, nd, generator=rng, dtype=torch.float64) * 3
    u = _affine_field(A, t, shape)
    det = jacobian_determinant(u)
    assert det.shape == (2, *shape) and det.dtype == torch.float64
    want = torch.linalg.det(A).view(2, *[1] * nd).expand(2, *shape)
    assert_close(det, want, atol=1e-10, rtol=0)  # central and one-sided differences are exact for affine maps
    assert (torch.linalg.det(A)[0] > 0) and (torch.linalg.det(A)[1] < 0)
    assert_close(folding_fraction(u), torch.tensor([0.0, 1.0], dtype=torch.float64))
    # fp32 input is computed in fp32.
    assert_close(jacobian_determinant(u.float()), want.float(), atol=1e-4, rtol=0)
    # log det is constant on sample 0: std 0; sample 1 has no voxel with det > 0: NaN.
    s = std_log_jacobian(u)
    assert s[0].item() < 1e-8 and math.isnan(s[1].item())


def test_jacobian_scheme_central_interior_one_sided_boundary():
    # u_y = 0.05 y^2, u_x = 0 on (H, W) = (6, 4): du_y/dy is 0.1 y in the interior (central, exact for a
    # quadratic); one-sided at y = 0: 0.05 (1 - 0) = 0.05 and at y = 5: 0.05 (25 - 16) = 0.45.
    y = torch.arange(6, dtype=torch.float64).view(6, 1).expand(6, 4)
    u = torch.stack([0.05 * y * y, torch.zeros_like(y)]).unsqueeze(0)
    det = jacobian_determinant(u)[0, :, 0]
    assert_close(det, torch.tensor([1.05, 1.1, 1.2, 1.3, 1.4, 1.45], dtype=torch.float64), atol=1e-12, rtol=0)
    # std of log det over all voxels (all det > 0), population std.
    logs = torch.log(det)
    assert_close(std_log_jacobian(u), logs.std(correction=0).view(1), atol=1e-12, rtol=0)


def test_folding_and_std_log_on_partial_fold():
    # u_x per column = [0, 0, 0, -3, -3, -3]: du_x/dx = [0, 0, -1.5, -1.5, 0, 0] -> det = [1, 1, -.5, -.5, 1, 1].
    ux = torch.tensor([0.0, 0.0, 0.0, -3.0, -3.0, -3.0], dtype=torch.float64).view(1, 6).expand(5, 6)
    u = torch.stack([torch.zeros_like(ux), ux]).unsqueeze(0)
    det = jacobian_determinant(u)
    assert_close(det[0, 2], torch.tensor([1.0, 1.0, -0.5, -0.5, 1.0, 1.0], dtype=torch.float64))
    assert_close(folding_fraction(u), torch.tensor([2 / 6], dtype=torch.float64))
    # Folded voxels are left out of std log|J|: the rest all have det = 1 -> std 0.
    assert std_log_jacobian(u).item() == 0.0


def test_identity_and_3d_shear(rng):
    u0 = torch.zeros(2, 3, 5, 6, 7)
    assert torch.equal(jacobian_determinant(u0), torch.ones(2, 5, 6, 7))
    assert torch.equal(folding_fraction(u0), torch.zeros(2, dtype=torch.float64))
    # A pure shear (unit triangular A) preserves volume: det 1 in 3D, with the channel order (z, y, x).
    A = torch.tensor([[[1.0, 0.7, -0.2], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    u = _affine_field(A, torch.zeros(1, 3, dtype=torch.float64), (5, 6, 7))
    assert_close(jacobian_determinant(u), torch.ones(1, 5, 6, 7, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "u, match",
    [
        (torch.zeros(1, 3, 4, 5), "2 channels"),
        (torch.zeros(1, 2, 4, 5, 6), "3 channels"),
        (torch.zeros(1, 2, 4, 1), ">= 2"),
        (torch.zeros(1, 2, 4, 5, dtype=torch.int64), "floating-point"),
        (torch.full((1, 2, 4, 5), NAN), "NaN"),
        (torch.zeros(2, 4, 5), "4D"),
    ],
)
def test_jacobian_rejects_bad_input(u, match):
    with pytest.raises(ValueError, match=match):
        jacobian_determinant(u)


# ================================================================================================================
# Endpoint error
# ================================================================================================================
def test_endpoint_error_known_answers():
    u_true = torch.zeros(2, 2, 4, 6)
    u = torch.zeros(2, 2, 4, 6)
    u[0, 0], u[0, 1] = 3.0, 4.0  # |(3, 4)| = 5 voxels everywhere on sample 0
    u[1, :, :, :3] = 1.0  # sqrt(2) on half of sample 1
    assert_close(endpoint_error(u, u_true), torch.tensor([5.0, math.sqrt(2) / 2], dtype=torch.float64))
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    mask[:, :, :, :3] = True
    assert_close(endpoint_error(u, u_true, mask), torch.tensor([5.0, math.sqrt(2)], dtype=torch.float64))
    assert_close(endpoint_error(u, u_true, mask.float()), endpoint_error(u, u_true, mask))
    assert math.isnan(endpoint_error(u, u_true, torch.zeros_like(mask))[0].item())
    u3 = torch.zeros(1, 3, 3, 4, 5)
    u3[:, 0], u3[:, 1], u3[:, 2] = 1.0, 2.0, -2.0
    assert_close(endpoint_error(u3, torch.zeros_like(u3)), torch.tensor([3.0], dtype=torch.float64))
    assert_close(endpoint_error(u3, u3), torch.tensor([0.0], dtype=torch.float64))


def test_endpoint_error_rejects_bad_input():
    u = torch.zeros(1, 2, 4, 5)
    with pytest.raises(ValueError, match="same shape"):
        endpoint_error(u, torch.zeros(1, 2, 4, 6))
    with pytest.raises(ValueError, match="mask must be"):
        endpoint_error(u, u, torch.ones(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        endpoint_error(u, u, torch.full((1, 1, 4, 5), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        endpoint_error(u, torch.full((1, 2, 4, 5), NAN))
    with pytest.raises(ValueError, match="2 channels"):
        endpoint_error(torch.zeros(1, 3, 4, 5), torch.zeros(1, 3, 4, 5))
