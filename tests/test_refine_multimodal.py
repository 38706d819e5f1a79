"""Refinement with the multimodal baselines (issue 19 item 3): MIND-SSC and NMI as `RefineConfig(loss=...)`.
Known answers: the loop's MIND term is `losses.mind`; across an inverted, non-linear contrast of a known smooth
deformation, MIND and NMI refinement from zero move towards the truth where MSE runs away; masks restrict MIND
exactly and NMI refuses one in a line."""

from __future__ import annotations

import pytest
import torch

from deepsim_rt.evaluate.metrics import endpoint_error
from deepsim_rt.losses.multimodal import mind
from deepsim_rt.refine import RefineConfig, refine
from deepsim_rt.refine.config import LAM_SCALE, REFINE_LOSSES
from deepsim_rt.refine.terms import FixedMIND
from tests.test_refine import _pair


def _inverted(x: torch.Tensor) -> torch.Tensor:
    """An inverted, non-linear contrast ((1 - x)^1.5): what a T1 -> T2 change does to tissue order."""
    return (1.0 - x) ** 1.5


def test_mind_and_nmi_are_refinement_losses_with_measured_lambda():
    assert {"mind", "nmi"} <= set(REFINE_LOSSES)
    assert LAM_SCALE["mind"] == LAM_SCALE["nmi"] == 0.2
    assert RefineConfig(loss="mind").resolve(2).lam == pytest.approx(4.0 * 0.2)


@pytest.mark.parametrize("size", [(20, 18), (10, 12, 9)])
def test_loop_mind_term_is_the_public_loss(size, rng):
    a = torch.rand((2, 1, *size), generator=rng, dtype=torch.float64)
    b = torch.rand((2, 1, *size), generator=rng, dtype=torch.float64)
    assert torch.allclose(FixedMIND(b)(a), mind(a, b), rtol=0, atol=1e-12)
    # a mask of ones is no mask; voxels outside a mask do not change the term
    ones = torch.ones((2, 1, *size), dtype=torch.float64)
    assert torch.allclose(FixedMIND(b, mask=ones)(a), mind(a, b), rtol=0, atol=1e-12)
    half = torch.zeros_like(ones)
    half[..., : size[-1] // 2] = 1
    a2 = a.clone()
    a2[..., size[-1] // 2 + 3:] = torch.rand_like(a2[..., size[-1] // 2 + 3:])  # change only far outside (radius+dil)
    assert torch.equal(FixedMIND(b, mask=half)(a), FixedMIND(b, mask=half)(a2))


def test_mind_and_nmi_refinement_follow_a_deformation_across_an_inverted_contrast():
    # Measured (32x32 blobs, 1.5-voxel sine field, 2 levels x 40 steps, lr 0.05): mean EPE zero field 0.93,
    # MIND (lam 0.05) 0.51, NMI (lam 0.2) 0.66, MSE (lam 0.01) 5.8 (it runs away: the contrast is inverted).
    moving, fixed, u_true = _pair(size=(32, 32), amp=1.5)
    fixed_inv = _inverted(fixed)
    zero_epe = float(endpoint_error(0 * u_true, u_true))
    cfg = dict(iterations=40, levels=2, lr=0.05, progress=False)
    epe = {loss: float(endpoint_error(refine(moving, fixed_inv, config=RefineConfig(loss=loss, lam=lam, **cfg))
                                      .displacement, u_true))
           for loss, lam in (("mind", 0.05), ("nmi", 0.2), ("mse", 0.01))}
    assert epe["mind"] < 0.7 * zero_epe, (epe, zero_epe)
    assert epe["nmi"] < 0.8 * zero_epe, (epe, zero_epe)
    assert epe["mse"] > zero_epe, (epe, zero_epe)


def test_nmi_refinement_runs_and_refuses_a_mask_in_one_line():
    moving, fixed, _ = _pair(size=(24, 24))
    res = refine(moving, _inverted(fixed), config=RefineConfig(loss="nmi", iterations=10, levels=1, lr=0.05,
                                                              progress=False))
    assert float(res.losses[0][-1]) < float(res.losses[0][0])
    with pytest.raises(ValueError, match="nmi .* takes no mask"):
        refine(moving, fixed, mask=torch.ones_like(fixed),
               config=RefineConfig(loss="nmi", iterations=2, levels=1, progress=False))
