"""Pin the pure-PyTorch reference ops (deepsim_rt.kernels.reference) to the method (PAPER_NOTES.md).

Known answers, invariants, hand-computed cases, float64 gradchecks and the ValueError contract of
multilayer_cosine, warp and integrate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepsim_rt.evaluate import folding_fraction
from deepsim_rt.kernels import reference as ref


def _smooth_field(shape, amp, gen, batch=1, dtype=torch.float64):
    """Random smooth displacement (B, nd, *shape): coarse noise upsampled, scaled to max |component| = amp."""
    nd = len(shape)
    coarse = torch.randn(batch, nd, *[max(s // 8, 2) for s in shape], generator=gen, dtype=dtype)
    v = F.interpolate(coarse, size=shape, mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    return v / v.abs().amax() * amp


# ================================================================================================================
# multilayer_cosine
# ================================================================================================================
def test_cosine_identical_is_one_and_symmetric(rng):
    fa = [torch.randn(2, 4, 7, 9, generator=rng), torch.randn(2, 8, 3, 5, generator=rng)]
    fb = [torch.randn(2, 4, 7, 9, generator=rng), torch.randn(2, 8, 3, 5, generator=rng)]
    assert_close(ref.multilayer_cosine(fa, fa), torch.tensor(1.0), atol=1e-6, rtol=0)
    s_ab, s_ba = ref.multilayer_cosine(fa, fb), ref.multilayer_cosine(fb, fa)
    assert s_ab.shape == ()
    assert s_ab.item() == s_ba.item()  # symmetric bit for bit: the formula is commutative term by term
    assert -1.0 <= s_ab.item() <= 1.0 and abs(s_ab.item()) < 0.5  # random features: far from identical


def test_cosine_matches_formula_fp64(rng):
    fa = [torch.randn(3, 5, 6, 4, 3, generator=rng, dtype=torch.float64)]
    fb = [torch.randn(3, 5, 6, 4, 3, generator=rng, dtype=torch.float64)]
    a, b = fa[0], fb[0]
    eps = 1e-6
    want = ((a * b).sum(1) / ((a * a).sum(1).clamp_min(eps).sqrt() * (b * b).sum(1).clamp_min(eps).sqrt())).mean()
    got = ref.multilayer_cosine(fa, fb)
    assert got.dtype == torch.float64
    assert_close(got, want, atol=1e-14, rtol=0)


def test_cosine_eps_clamps_the_squared_norm_unlike_torch_cosine_similarity():
    # One pixel, C=4. Parallel features, each of norm 1e-4 (squared 1e-8 < eps=1e-6): the paper's formula gives
    # |a||b| / (sqrt(eps) sqrt(eps)) = 1e-8 / 1e-6 = 0.01; F.cosine_similarity clamps each norm at 1e-8 -> 1.
    v = torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=torch.float64) / 5.0  # unit vector
    tiny = (v * 1e-4).view(1, 4, 1, 1)
    unit = v.view(1, 4, 1, 1)
    ours = ref.multilayer_cosine([tiny], [tiny])
    torch_cos = F.cosine_similarity(tiny, tiny, dim=1).mean()
    assert_close(ours, torch.tensor(0.01, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(torch_cos, torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)
    # Only one side tiny: |a||b| / (1 * sqrt(eps)) = 1e-4 / 1e-3 = 0.1 (torch: 1).
    assert_close(ref.multilayer_cosine([unit], [tiny]), torch.tensor(0.1, dtype=torch.float64), atol=1e-12, rtol=0)
    # Squared norms 4e-6 > eps: no clamping, both agree on 1.
    small = v.view(1, 4, 1, 1) * 2e-3
    assert_close(ref.multilayer_cosine([small], [small]), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)
    # A different eps moves the answer by exactly the clamp: eps=1e-4 -> 1e-8 / 1e-4.
    assert_close(ref.multilayer_cosine([tiny], [tiny], eps=1e-4), torch.tensor(1e-4, dtype=torch.float64),
                 atol=1e-15, rtol=1e-9)


def test_cosine_per_level_mean_then_level_mean():
    # Level 0: 2x2 pixels, cosines [1, 1, 1, -1] -> mean 0.5. Level 1: 1 pixel, cosine 1 -> 1.
    # DeepSim = (0.5 + 1) / 2 = 0.75, NOT the pooled voxel mean (1 + 1 + 1 - 1 + 1) / 5 = 0.6.
    pixels = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0]])  # (4 pixels, C=2)
    a0 = pixels.T.reshape(1, 2, 2, 2)  # (B=1, C=2, H=2, W=2), pixel (y, x) = pixels[2y + x]
    b0 = 0.5 * a0
    b0[0, :, 1, 1] *= -1
    a1 = torch.tensor([0.6, 0.8, 0.0]).view(1, 3, 1, 1)
    b1 = 2.0 * a1
    got = ref.multilayer_cosine([a0, a1], [b0, b1])
    assert_close(got, torch.tensor(0.75), atol=1e-6, rtol=0)
    maps = ref.multilayer_cosine([a0, a1], [b0, b1], reduction="none")
    assert isinstance(maps, tuple) and len(maps) == 2
    assert maps[0].shape == (1, 2, 2) and maps[1].shape == (1, 1, 1)
    assert_close(maps[0], torch.tensor([[[1.0, 1.0], [1.0, -1.0]]]), atol=1e-6, rtol=0)
    assert_close(torch.stack([m.mean() for m in maps]).mean(), got)


def test_cosine_batch_3d_noncontiguous_and_half_precision(rng):
    base_a = torch.randn(2, 6, 5, 7, 3, generator=rng)
    base_b = torch.randn(2, 6, 5, 7, 3, generator=rng)
    nc_a, nc_b = base_a.transpose(2, 4), base_b.transpose(2, 4)  # (2, 6, 3, 7, 5), non-contiguous
    assert not nc_a.is_contiguous()
    assert_close(ref.multilayer_cosine([nc_a], [nc_b]), ref.multilayer_cosine([nc_a.contiguous()], [nc_b.contiguous()]))
    # The batch mean is the mean of the per-sample similarities (equal sizes).
    per = torch.stack([ref.multilayer_cosine([base_a[i:i + 1]], [base_b[i:i + 1]]) for i in range(2)])
    assert_close(ref.multilayer_cosine([base_a], [base_b]), per.mean())
    # fp16 features accumulate in fp32 and return fp32.
    h = ref.multilayer_cosine([base_a.half()], [base_b.half()])
    assert h.dtype == torch.float32
    assert_close(h, ref.multilayer_cosine([base_a], [base_b]), atol=2e-3, rtol=0)


def test_cosine_gradcheck_fp64(rng):
    fa = [torch.randn(2, 3, 3, 4, generator=rng, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 5, 2, 2, generator=rng, dtype=torch.float64, requires_grad=True)]
    fb = [torch.randn(2, 3, 3, 4, generator=rng, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 5, 2, 2, generator=rng, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a0, a1, b0, b1: ref.multilayer_cosine([a0, a1], [b0, b1]), (*fa, *fb))


@pytest.mark.parametrize(
    "fa, fb, reduction, match",
    [
        ([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 4)], "mean", "same shape"),
        ([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 3)] * 2, "mean", "same number of levels"),
        ([], [], "mean", "at least one"),
        ([torch.zeros(1, 2, 3, 3, dtype=torch.int64)], [torch.zeros(1, 2, 3, 3, dtype=torch.int64)], "mean",
         "floating-point"),
        ([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 3)], "sum", "reduction"),
        (torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), "mean", "sequences of tensors"),
        ([torch.zeros(4, 3)], [torch.zeros(4, 3)], "mean", "spatial"),
        ([torch.full((1, 2, 3, 3), float("nan"))], [torch.zeros(1, 2, 3, 3)], "mean", "NaN"),
    ],
)
def test_cosine_rejects_bad_input(fa, fb, reduction, match):
    with pytest.raises(ValueError, match=match):
        ref.multilayer_cosine(fa, fb, reduction=reduction)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan")])
def test_cosine_rejects_non_positive_eps(eps):
    z = [torch.zeros(1, 2, 3, 3)]  # all-zero features: eps = 0 would give 0/0
    with pytest.raises(ValueError, match="eps"):
        ref.multilayer_cosine(z, z, eps=eps)
    assert ref.multilayer_cosine(z, z).item() == 0.0  # default eps: zero features have cosine 0, not NaN


# ================================================================================================================
# warp
# ================================================================================================================
@pytest.mark.parametrize("shape", [(37, 41), (37, 41, 29)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_zero_displacement_is_identity(rng, shape, padding):
    img = torch.rand(2, 3, *shape, generator=rng)
    out = ref.warp(img, torch.zeros(2, len(shape), *shape), padding=padding)
    assert out.shape == img.shape and out.dtype == img.dtype
    # grid_sample's normalize/unnormalize round trip moves fp32 coordinates by up to ~n * 2**-23 (5e-6 voxel at
    # n = 41; measured 2.2e-6 in intensity): 1e-5 bounds that for [0, 1] images. In fp64 it vanishes.
    assert_close(out, img, atol=1e-5, rtol=0)
    img64 = img.double()
    out64 = ref.warp(img64, torch.zeros(2, len(shape), *shape, dtype=torch.float64), padding=padding)
    assert_close(out64, img64, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape, shift", [((37, 41), (-2, 3)), ((37, 41, 29), (1, -2, 3))])
def test_warp_integer_shift_is_roll_in_interior(rng, shape, shift):
    img = torch.rand(2, 3, *shape, generator=rng)
    flow = torch.tensor(shift, dtype=torch.float32).view(1, -1, *[1] * len(shape)).expand(2, -1, *shape)
    out = ref.warp(img, flow)
    # out(p) = img(p + s) = roll(img, -s)(p) wherever p + s stays inside.
    rolled = torch.roll(img, shifts=tuple(-s for s in shift), dims=tuple(range(2, 2 + len(shape))))
    interior = (slice(None), slice(None)) + tuple(slice(max(0, -s), n - max(0, s)) for n, s in zip(shape, shift,
                                                                                                   strict=True))
    assert_close(out[interior], rolled[interior], atol=1e-5, rtol=0)
    # mode="nearest" hits the same voxels exactly.
    assert torch.equal(ref.warp(img, flow, mode="nearest")[interior], rolled[interior])


def test_warp_hand_computed_2x2():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    fy = torch.tensor([[0.5, 0.5], [0.5, -1.0]], dtype=torch.float64)
    fx = torch.tensor([[0.25, 0.25], [0.25, -0.5]], dtype=torch.float64)
    flow = torch.stack([fy, fx]).unsqueeze(0)  # channel 0 = y (rows), channel 1 = x (columns)
    # (0,0) samples (y, x) = (0.5, 0.25): 0.5 (0.75*1 + 0.25*2) + 0.5 (0.75*3 + 0.25*4) = 2.25 (inside).
    # (0,1) samples (0.5, 1.25): border clamps x -> 1: 0.5*2 + 0.5*4 = 3; zeros: 0.75 * 3 = 2.25.
    # (1,0) samples (1.5, 0.25): border y -> 1: 0.75*3 + 0.25*4 = 3.25; zeros: 0.5 * 3.25 = 1.625.
    # (1,1) samples (0, 0.5): 0.5*1 + 0.5*2 = 1.5 (inside).
    border = torch.tensor([[2.25, 3.0], [3.25, 1.5]], dtype=torch.float64).view(1, 1, 2, 2)
    zeros = torch.tensor([[2.25, 2.25], [1.625, 1.5]], dtype=torch.float64).view(1, 1, 2, 2)
    assert_close(ref.warp(img, flow, padding="border"), border, atol=1e-12, rtol=0)
    assert_close(ref.warp(img, flow, padding="zeros"), zeros, atol=1e-12, rtol=0)
    # Nearest rounds half to even: (0.5, 0.25) -> (0, 0); (0.5, 1.25) -> (0, 1); (1.5, 0.25) -> (2, 0), clamped
    # to (1, 0) by border; (0, 0.5) -> (0, 0).
    nearest = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    assert torch.equal(ref.warp(img, flow, mode="nearest"), nearest)


def test_warp_hand_computed_2x2x2():
    # v[z, y, x] = 1 + x + 2y + 4z, except v[1, 1, 1] = 9 (not 8): a trilinear bump of weight wz*wy*wx.
    img = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 9.0]]], dtype=torch.float64).view(1, 1, 2, 2, 2)
    flow = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 2, 2, 2)
    out_b = ref.warp(img, flow, padding="border")
    out_z = ref.warp(img, flow, padding="zeros")
    # (0,0,0) samples (0.5, 0.25, 0.75): 1 + 0.75 + 0.5 + 2 = 4.25, + bump 0.5*0.25*0.75 = 0.09375.
    assert_close(out_b[0, 0, 0, 0, 0], torch.tensor(4.34375, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(out_z[0, 0, 0, 0, 0], torch.tensor(4.34375, dtype=torch.float64), atol=1e-12, rtol=0)
    # (0,1,0) samples (0.5, 1.25, 0.75). border: y -> 1: 1 + 0.75 + 2 + 2 = 5.75 + bump 0.5*1*0.75 -> 6.125;
    # zeros: the y=2 corners are 0, weight of y=1 is 0.75 -> 0.75 * 6.125 = 4.59375.
    assert_close(out_b[0, 0, 0, 1, 0], torch.tensor(6.125, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(out_z[0, 0, 0, 1, 0], torch.tensor(4.59375, dtype=torch.float64), atol=1e-12, rtol=0)
    # (1,1,1) samples (1.5, 1.25, 1.75): border -> corner (1,1,1) = 9; zeros: 9 * 0.5*0.75*0.25 = 0.84375.
    assert_close(out_b[0, 0, 1, 1, 1], torch.tensor(9.0, dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(out_z[0, 0, 1, 1, 1], torch.tensor(0.84375, dtype=torch.float64), atol=1e-12, rtol=0)


def test_warp_border_vs_zeros_outside(rng):
    img = torch.rand(1, 2, 5, 6, generator=rng) + 0.5  # strictly positive, so zeros are unambiguous
    flow = torch.zeros(1, 2, 5, 6)
    flow[:, 1] = 2.0  # sample two columns to the right: the last two columns leave the image
    b = ref.warp(img, flow, padding="border")
    z = ref.warp(img, flow, padding="zeros")
    assert_close(b[..., :4], img[..., 2:], atol=1e-6, rtol=0)
    assert_close(z[..., :4], img[..., 2:], atol=1e-6, rtol=0)
    assert_close(b[..., 4:], img[..., 5:].expand(-1, -1, -1, 2), atol=1e-6, rtol=0)  # clamped to the edge column
    assert torch.all(z[..., 4:] == 0)


@pytest.mark.parametrize("shape", [(9, 11), (5, 7, 6)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_nearest_integer_labels_exact(rng, shape, padding):
    nd = len(shape)
    labels = torch.randint(0, 6, (2, 1, *shape), generator=rng)
    # Fractional parts kept away from .5 so that rounding is unambiguous.
    whole = torch.randint(-3, 4, (2, nd, *shape), generator=rng).double()
    frac = torch.rand(2, nd, *shape, generator=rng, dtype=torch.float64) * 0.3 + 0.1
    sign = torch.where(torch.rand(2, nd, *shape, generator=rng) < 0.5, -1.0, 1.0).double()
    flow = whole + sign * frac
    out = ref.warp(labels, flow, mode="nearest", padding=padding)
    assert out.dtype == labels.dtype
    idx = torch.round(ref.identity_grid(shape, dtype=torch.float64).unsqueeze(0) + flow).long()
    inside = torch.ones(2, *shape, dtype=torch.bool)
    flat = torch.zeros(2, *shape, dtype=torch.long)
    for ax, n in enumerate(shape):
        inside &= (idx[:, ax] >= 0) & (idx[:, ax] < n)
        flat = flat * n + idx[:, ax].clamp(0, n - 1)
    want = torch.gather(labels.flatten(1), 1, flat.flatten(1)).view(2, 1, *shape)
    if padding == "zeros":
        want = torch.where(inside.unsqueeze(1), want, torch.zeros_like(want))
    assert torch.equal(out, want)


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_batch_channels_noncontiguous_consistent(rng, shape, padding):
    nd = len(shape)
    img = torch.rand(3, 4, *shape, generator=rng)
    flow = torch.randn(3, nd, *shape, generator=rng) * 1.5
    out = ref.warp(img, flow, padding=padding)
    per_sample = torch.cat([ref.warp(img[i:i + 1], flow[i:i + 1], padding=padding) for i in range(3)])
    per_channel = torch.cat([ref.warp(img[:, c:c + 1], flow, padding=padding) for c in range(4)], dim=1)
    assert_close(out, per_sample, atol=1e-6, rtol=0)
    assert_close(out, per_channel, atol=1e-6, rtol=0)
    # Non-contiguous image and flow (a channels-last view and a strided slice) give the same answer.
    img_nc = img.movedim(1, -1).contiguous().movedim(-1, 1)
    flow_nc = torch.stack([flow, -flow], dim=-1)[..., 0]
    assert not img_nc.is_contiguous() and not flow_nc.is_contiguous()
    assert_close(ref.warp(img_nc, flow_nc, padding=padding), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_warp_gradcheck_image_and_displacement(rng, shape, padding):
    nd = len(shape)
    # Batch 2 and 2 channels in 2D; batch 1 x 2 channels in 3D keeps the numerical Jacobian at 120 columns.
    img = torch.rand(2 if nd == 2 else 1, 2, *shape, generator=rng, dtype=torch.float64, requires_grad=True)
    # Random fractional displacements: bilinear is smooth away from integer coordinates (measure zero here), and
    # +-1.2 voxels sends some samples past the border, so both padding rules are exercised.
    flow = (torch.rand(img.shape[0], nd, *shape, generator=rng, dtype=torch.float64) * 2.4 - 1.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, f: ref.warp(i, f, padding=padding), (img, flow))


def _bad_warp_cases():
    img2, fl2 = torch.zeros(1, 1, 4, 5), torch.zeros(1, 2, 4, 5)
    return [
        (torch.zeros(1, 1, 5), torch.zeros(1, 1, 5), {}, "4D"),  # 1D image
        (img2, torch.zeros(1, 3, 4, 5), {}, "2 channels"),
        (torch.zeros(1, 1, 3, 4, 5), torch.zeros(1, 2, 3, 4, 5), {}, "3 channels"),
        (img2, torch.zeros(1, 2, 4, 6), {}, "spatial size"),
        (img2, torch.zeros(2, 2, 4, 5), {}, "batch"),
        (img2, fl2, {"mode": "bilinear"}, "mode"),
        (img2, fl2, {"padding": "reflection"}, "padding"),
        (torch.zeros(1, 1, 4, 5, dtype=torch.int64), fl2, {}, "integer images"),
        (img2, torch.zeros(1, 2, 4, 5, dtype=torch.int64), {}, "floating-point"),
        (torch.full((1, 1, 4, 5), float("nan")), fl2, {}, "NaN"),
        (img2, torch.full((1, 2, 4, 5), float("nan")), {}, "NaN"),
        (img2, torch.zeros(1, 2, 4), {}, "flow must be"),
        # a 1-voxel axis has no align_corners=True grid: rejected rather than silently ignoring displacement
        (torch.zeros(1, 1, 1, 4, 5), torch.zeros(1, 3, 1, 4, 5), {"padding": "zeros"}, ">= 2"),
    ]


@pytest.mark.parametrize("img, flow, kw, match", _bad_warp_cases())
def test_warp_rejects_bad_input(img, flow, kw, match):
    with pytest.raises(ValueError, match=match):
        ref.warp(img, flow, **kw)


# ================================================================================================================
# integrate (scaling and squaring)
# ================================================================================================================
@pytest.mark.parametrize("shape", [(9, 10), (5, 6, 7)])
def test_integrate_zero_and_constant_fields(rng, shape):
    nd = len(shape)
    assert torch.equal(ref.integrate(torch.zeros(2, nd, *shape)), torch.zeros(2, nd, *shape))
    # A constant velocity is a translation: exp(v) = v (each squaring doubles a constant field, border padding).
    c = torch.randn(2, nd, *[1] * nd, generator=rng, dtype=torch.float64).expand(2, nd, *shape)
    assert_close(ref.integrate(c), c, atol=1e-12, rtol=0)
    v = torch.randn(1, nd, *shape, generator=rng)
    assert torch.equal(ref.integrate(v, steps=0), v)


@pytest.mark.parametrize("shape", [(37, 41), (37, 41, 29)])
def test_integrate_small_smooth_field_is_invertible(rng, shape):
    v = _smooth_field(shape, 1.0, rng)  # max |component| 1 voxel
    phi = ref.integrate(v)
    phi_inv = ref.integrate(-v)
    assert folding_fraction(phi).item() == 0.0
    assert folding_fraction(phi_inv).item() == 0.0
    # (phi o phi_inv)(p) = p + u_inv(p) + u(p + u_inv(p)): its displacement should vanish.
    composed = phi_inv + ref.warp(phi, phi_inv)
    err = composed.norm(dim=1)
    # Measured: mean 0.0018 / 0.0012 voxel, max 0.042 / 0.048 voxel (2D / 3D; the max sits at the border, where
    # the border padding extrapolates the field). The bounds below leave ~2x headroom and still fail for a map
    # composed with itself instead of its inverse (mean 0.73 / 0.49 voxel).
    assert err.mean().item() < 0.01, err.mean().item()
    assert err.max().item() < 0.1, err.max().item()
    assert (phi + ref.warp(phi, phi)).norm(dim=1).mean().item() > 0.2


@pytest.mark.parametrize(
    "v, kw, match",
    [
        (torch.zeros(1, 3, 4, 5), {}, "channels"),
        (torch.zeros(1, 2, 4), {}, "4D"),
        (torch.zeros(1, 2, 4, 5, dtype=torch.int32), {}, "floating-point"),
        (torch.zeros(1, 2, 4, 5), {"steps": -1}, "steps"),
        (torch.zeros(1, 2, 4, 5), {"steps": 2.0}, "steps"),
        (torch.zeros(1, 2, 4, 5), {"padding": "reflect"}, "padding"),
        (torch.full((1, 2, 4, 5), float("nan")), {}, "velocity contains NaN"),
        (torch.full((1, 2, 4, 5), float("nan")), {"steps": 0}, "velocity contains NaN"),
    ],
)
def test_integrate_rejects_bad_input(v, kw, match):
    with pytest.raises(ValueError, match=match):
        ref.integrate(v, **kw)
