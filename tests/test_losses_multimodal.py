"""MIND-SSC and Parzen NMI (deepsim_rt.losses.multimodal): known answers, invariances, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from deepsim_rt.data.atlas import load_atlas
from deepsim_rt.kernels import warp
from deepsim_rt.losses import MIND, NMI, build_similarity, mind, mind_ssc, ncc, nmi, nmi_loss


@pytest.fixture(scope="module")
def t1():
    """The bundled MNI T1 axial slice at 4 mm, (1, 1, 48, 40) in [0, 1]."""
    return load_atlas(2, 4).image.clone()


def t2_like(x: torch.Tensor) -> torch.Tensor:
    """Non-monotone map of T1 intensities: background dark, CSF (~0.2) bright, GM (~0.5) mid, WM (~0.8) dark."""
    knots_x = torch.tensor([0.0, 0.08, 0.25, 0.5, 0.8, 1.0])
    knots_y = torch.tensor([0.0, 0.1, 1.0, 0.6, 0.3, 0.25])
    idx = torch.bucketize(x.clamp(0, 1), knots_x[1:-1])
    x0, x1, y0, y1 = knots_x[idx], knots_x[idx + 1], knots_y[idx], knots_y[idx + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def shuffled(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = x.flatten()
    return flat[torch.randperm(flat.numel(), generator=g)].view_as(x)


def test_t2_like_map_is_non_monotone(t1):
    v = t2_like(torch.tensor([0.0, 0.25, 0.5, 0.8]))
    assert v[1] > v[2] > v[3] > v[0]  # up then down: no monotone (or locally linear everywhere) map


@pytest.mark.parametrize("ndim, pairs", [(2, 4), (3, 12)])
def test_descriptor_shape_and_range(ndim, pairs):
    x = torch.rand((2, 1, *([9, 11, 7][:ndim])), generator=torch.Generator().manual_seed(1))
    d = mind_ssc(x)
    assert d.shape == (2, pairs, *x.shape[2:])
    assert float(d.min()) > 0 and float(d.max()) <= 1.0 + 1e-6
    torch.testing.assert_close(d.amax(dim=1), torch.ones_like(d[:, 0]))


@pytest.mark.parametrize("a, b", [(2.0, 0.1), (-1.0, 1.0), (0.3, -5.0)])
def test_mind_is_exactly_invariant_to_affine_intensity_maps(t1, a, b):
    """Patch distances and their mean both scale by a^2: MIND(x, a x + b) = 0, inverted contrast included."""
    x = t1.double()  # in fp32 the offset -5 alone costs ~1e-5 (cancellation in the differences)
    assert float(mind(x, a * x + b)) < 1e-9
    assert float(mind(t1, t1)) == 0.0
    assert float(mind(t1, t1.roll(1, dims=-1))) > 1e-2  # what the invariance is measured against


def test_mind_and_nmi_prefer_the_non_monotone_contrast_to_a_shuffle(t1):
    t2 = t2_like(t1)
    m_same, m_shuf = float(mind(t1, t2)), float(mind(t1, shuffled(t2)))
    assert m_same < 0.5 * m_shuf, (m_same, m_shuf)
    n_same, n_shuf = float(nmi(t1, t2)), float(nmi(t1, shuffled(t2)))
    assert n_same > n_shuf + 0.1, (n_same, n_shuf)
    assert 1.0 <= n_shuf < 1.05  # independent intensities: H(A, B) ~ H(A) + H(B)


def test_cross_contrast_losses_are_minimal_at_the_true_alignment(t1):
    """T1 vs its T2-like self shifted by s voxels: MIND and NMI are lowest at s = 0."""
    t2 = t2_like(t1)
    shifts = [-3, -2, -1, 0, 1, 2, 3]
    mind_vals = [float(mind(t1, torch.roll(t2, s, dims=-1))) for s in shifts]
    nmi_vals = [float(nmi_loss(t1, torch.roll(t2, s, dims=-1))) for s in shifts]
    assert min(range(len(shifts)), key=mind_vals.__getitem__) == 3, mind_vals
    assert min(range(len(shifts)), key=nmi_vals.__getitem__) == 3, nmi_vals
    assert mind_vals[3] < min(mind_vals[2], mind_vals[4]) - 1e-3


def test_nmi_range_and_known_values(t1):
    v = float(nmi(t1, t1))
    assert 1.3 < v <= 2.0  # Parzen windows blur the diagonal: below 2, far above independent images
    assert float(nmi(t1, 1.0 - t1)) == pytest.approx(v, abs=2e-3)  # a permutation of the bins: same NMI
    assert float(nmi_loss(t1, t1)) == pytest.approx(2.0 - v)


def test_gradients_are_finite_through_a_warp(t1):
    """Both losses give finite, non-zero gradients to the displacement (the registration path)."""
    t2 = t2_like(t1)
    for loss in (mind, nmi_loss):
        u = torch.zeros((1, 2, *t1.shape[2:]), requires_grad=True)
        val = loss(warp(t2.roll(1, dims=-1), u), t1)
        val.backward()
        assert torch.isfinite(u.grad).all() and float(u.grad.abs().sum()) > 0, loss.__name__


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    a = torch.rand((1, 1, 7, 8), generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand((1, 1, 7, 8), generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mind(x, b), (a,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: nmi(x, b, bins=8), (a,), eps=1e-6, atol=1e-5)


def test_mind_3d_runs_and_is_zero_on_itself():
    x = torch.rand((1, 2, 6, 7, 5), generator=torch.Generator().manual_seed(4))
    assert float(mind(x, x)) == 0.0
    assert float(mind(x, x.flip(-1))) > 0.01


def test_registry_and_errors():
    sim = build_similarity("mind", dilation=1)
    assert isinstance(sim, MIND) and sim.dilation == 1 and not sim.needs_labels
    x = torch.rand(1, 1, 8, 8)
    assert float(sim(x, x)) == 0.0 and float(NMI(bins=16)(x, x)) > 0
    with pytest.raises(ValueError, match="unexpected"):
        build_similarity("mind", window=3)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        mind_ssc(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        mind_ssc(torch.rand(1, 1, 8, 8), dilation=0)
    with pytest.raises(ValueError, match="bins must be an int >= 2"):
        nmi(x, x, bins=1)
    with pytest.raises(ValueError, match="same shape"):
        mind(x, torch.rand(1, 1, 8, 9))
    assert float(ncc(x, x)) < 1e-5  # the registry still builds the others unchanged
