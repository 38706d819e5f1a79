"""Losses: DeepSim (frozen extractor, eps formula, maps), VGG16 features and weight loading, MSE, local squared NCC,
NCC_sup + one_hot, diffusion regularizer, the registry and the uniform Similarity interface."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from deepsim_rt.kernels import multilayer_cosine, warp
from deepsim_rt.losses import (
    MSE,
    NCC,
    PAPER_LAMBDAS,
    SIMILARITIES,
    DeepSimLoss,
    NCCSup,
    Similarity,
    VGGFeatures,
    build_similarity,
    diffusion_regularizer,
    mse,
    ncc,
    ncc_map,
    ncc_sup,
    one_hot,
    paper_lambda,
)


class TinyExtractor(nn.Module):
    """Two U-Net-like encoder stages (BatchNorm, stride-2 conv, LeakyReLU, dropout): levels at 1/2 and 1/4."""

    def __init__(self, nd: int = 2, in_ch: int = 1):
        super().__init__()
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if nd == 2 else nn.BatchNorm3d
        self.bn = bn(in_ch)
        self.c1 = conv(in_ch, 4, 3, stride=2, padding=1)
        self.c2 = conv(4, 6, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)

    def extract_features(self, x):
        f1 = F.leaky_relu(self.c1(self.bn(x)), 0.2)
        f2 = F.leaky_relu(self.c2(self.drop(f1)), 0.2)
        return [f1, f2]


@pytest.fixture
def tiny2d():
    torch.manual_seed(0)
    return TinyExtractor(2)


# ================================================================================================================
# DeepSim
# ================================================================================================================
def test_deepsim_identical_is_zero_loss_and_symmetric(rng, tiny2d):
    loss = DeepSimLoss(tiny2d)
    a = torch.rand(2, 1, 17, 23, generator=rng)
    b = torch.rand(2, 1, 17, 23, generator=rng)
    assert_close(loss(a, a), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(loss.similarity(a, a), torch.tensor(1.0), atol=1e-6, rtol=0)
    l_ab, l_ba = loss(a, b), loss(b, a)
    assert l_ab.shape == () and 0.0 < l_ab.item() <= 2.0
    assert_close(l_ab, l_ba, atol=1e-7, rtol=0)
    # It is exactly 1 - multilayer_cosine of the extractor's levels.
    with torch.no_grad():
        want = 1.0 - multilayer_cosine(tiny2d.extract_features(a), tiny2d.extract_features(b))
    assert_close(l_ab, want)


def test_deepsim_extractor_frozen_and_stays_in_eval(rng, tiny2d):
    loss = DeepSimLoss(tiny2d)
    parent = nn.ModuleDict({"sim": loss, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training and loss.training
    assert not tiny2d.training and not tiny2d.bn.training and not tiny2d.drop.training
    assert all(not p.requires_grad for p in tiny2d.parameters())
    running = tiny2d.bn.running_mean.clone()
    a = torch.rand(2, 1, 16, 16, generator=rng)
    b = torch.rand(2, 1, 16, 16, generator=rng)
    l1, l2 = loss(a, b), loss(a, b)
    assert torch.equal(l1, l2)  # dropout off: deterministic
    assert torch.equal(tiny2d.bn.running_mean, running)  # BatchNorm statistics not updated
    # Gradients flow through the extractor to the warped image, and only there.
    warped = a.clone().requires_grad_(True)
    loss(warped, b).backward()
    assert warped.grad is not None and warped.grad.abs().sum() > 0 and torch.isfinite(warped.grad).all()
    assert all(p.grad is None for p in tiny2d.parameters())


def test_deepsim_gradient_reaches_displacement_through_warp(rng, tiny2d):
    loss = DeepSimLoss(tiny2d)
    moving = torch.rand(2, 1, 16, 20, generator=rng)
    fixed = torch.rand(2, 1, 16, 20, generator=rng)
    flow = (torch.randn(2, 2, 16, 20, generator=rng) * 0.5).requires_grad_(True)
    loss(warp(moving, flow), fixed).backward()
    assert flow.grad is not None and flow.grad.abs().sum() > 0 and torch.isfinite(flow.grad).all()


def test_deepsim_gradcheck_fp64(rng, tiny2d):
    loss = DeepSimLoss(tiny2d.double())
    warped = torch.rand(1, 1, 8, 8, generator=rng, dtype=torch.float64, requires_grad=True)
    fixed = torch.rand(1, 1, 8, 8, generator=rng, dtype=torch.float64, requires_grad=True)
    # fast_mode checks a random projection of the Jacobian (full mode costs seconds through 2 conv levels).
    assert torch.autograd.gradcheck(loss, (warped, fixed), fast_mode=True)


def test_deepsim_3d_batch_multichannel_noncontiguous(rng):
    torch.manual_seed(1)
    ext = TinyExtractor(3, in_ch=2)
    loss = DeepSimLoss(ext)
    a = torch.rand(2, 2, 9, 11, 7, generator=rng)
    b = torch.rand(2, 2, 9, 11, 7, generator=rng)
    val = loss(a, b)
    assert_close(loss(a, a), torch.tensor(0.0), atol=1e-6, rtol=0)
    a_nc = a.movedim(1, -1).contiguous().movedim(-1, 1)
    assert not a_nc.is_contiguous()
    assert_close(loss(a_nc, b), val, atol=1e-6, rtol=0)
    # Per-sample losses average to the batch loss (equal sizes).
    assert_close(torch.stack([loss(a[i:i + 1], b[i:i + 1]) for i in range(2)]).mean(), val, atol=1e-6, rtol=0)


def test_deepsim_similarity_maps(rng, tiny2d):
    loss = DeepSimLoss(tiny2d)
    a = torch.rand(2, 1, 17, 23, generator=rng)
    b = torch.rand(2, 1, 17, 23, generator=rng)
    maps = loss.similarity_maps(a, b)
    assert [m.shape for m in maps] == [(2, 9, 12), (2, 5, 6)]
    assert_close(torch.stack([m.mean() for m in maps]).mean(), loss.similarity(a, b), atol=1e-6, rtol=0)
    full = loss.similarity_map(a, b)
    assert full.shape == (2, 1, 17, 23)
    assert full.min() >= -1 - 1e-6 and full.max() <= 1 + 1e-6
    up = [F.interpolate(m.unsqueeze(1), size=(17, 23), mode="bilinear", align_corners=False) for m in maps]
    assert_close(full, (up[0] + up[1]) / 2)
    assert_close(loss.similarity_map(a, a), torch.ones(2, 1, 17, 23), atol=1e-6, rtol=0)


class _ReturnsTensor(nn.Module):
    def extract_features(self, x):
        return x


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9), "same shape"),
        (torch.rand(1, 1, 8), torch.rand(1, 1, 8), "4D"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "floating-point"),
        (torch.full((1, 1, 8, 8), float("nan")), torch.rand(1, 1, 8, 8), "NaN"),
        (torch.rand(1, 1, 8, 8), torch.full((1, 1, 8, 8), float("nan")), "NaN"),
    ],
)
def test_deepsim_rejects_bad_input(tiny2d, a, b, match):
    with pytest.raises(ValueError, match=match):
        DeepSimLoss(tiny2d)(a, b)


def test_deepsim_rejects_bad_extractor(tiny2d):
    with pytest.raises(ValueError, match="extract_features"):
        DeepSimLoss(nn.Conv2d(1, 1, 3))
    with pytest.raises(ValueError, match="list of tensors"):
        DeepSimLoss(_ReturnsTensor())(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="eps"):
        DeepSimLoss(tiny2d, eps=0.0)


# ================================================================================================================
# VGG16 features
# ================================================================================================================
def test_vgg_requires_weights_or_explicit_random_init(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        VGGFeatures()
    with pytest.raises(ValueError, match="not both"):
        VGGFeatures(tmp_path / "x.safetensors", random_init=True)
    with pytest.raises(ValueError, match="not found"):
        VGGFeatures(tmp_path / "missing.safetensors")


def test_vgg_shapes_and_grayscale(rng):
    torch.manual_seed(0)
    vgg = VGGFeatures(random_init=True)
    x = torch.rand(2, 1, 18, 22, generator=rng)
    feats = vgg.extract_features(x)
    assert [f.shape for f in feats] == [(2, 64, 18, 22), (2, 128, 9, 11), (2, 256, 4, 5)]
    assert all((f >= 0).all() for f in feats)  # after ReLU
    rgb = vgg.extract_features(x.expand(-1, 3, -1, -1))
    for f, g in zip(feats, rgb, strict=True):
        assert torch.equal(f, g)
    sd = vgg.state_dict()
    assert sorted(sd) == sorted(f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14) for p in ("weight", "bias"))
    with pytest.raises(ValueError, match="1 .*or 3 channels"):
        vgg.extract_features(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="4D"):
        vgg.extract_features(torch.rand(1, 1, 8, 8, 8))


def test_vgg_loads_safetensors_and_pth_strictly(tmp_path, rng):
    torch.manual_seed(0)
    src = VGGFeatures(random_init=True)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    x = torch.rand(1, 1, 12, 12, generator=rng)
    want = src.extract_features(x)

    full = dict(sd)  # a full torchvision VGG16 file also holds deeper layers and the classifier: tolerated
    full["features.17.weight"] = torch.zeros(512, 256, 3, 3)
    full["classifier.6.bias"] = torch.zeros(1000)
    save_file(full, str(tmp_path / "vgg.safetensors"))
    torch.save(sd, tmp_path / "vgg.pth")
    for name in ("vgg.safetensors", "vgg.pth"):
        got = VGGFeatures(tmp_path / name).extract_features(x)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), name

    missing = {k: v for k, v in sd.items() if k != "features.12.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['features.12.bias'\]"):
        VGGFeatures(tmp_path / "missing.safetensors")
    extra = dict(sd, **{"head.weight": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['head.weight'\]"):
        VGGFeatures(tmp_path / "extra.safetensors")
    wrong = dict(sd, **{"features.0.weight": torch.zeros(64, 1, 3, 3)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="wrong shapes"):
        VGGFeatures(tmp_path / "wrong.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="could not read"):
        VGGFeatures(tmp_path / "corrupt.safetensors")
    (tmp_path / "vgg.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=".safetensors or .pth"):
        VGGFeatures(tmp_path / "vgg.npz")


class _Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_vgg_pth_never_unpickles_objects(tmp_path):
    torch.save({"features.0.weight": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could not read"):
        VGGFeatures(tmp_path / "evil.pth")


# ================================================================================================================
# MSE and NCC
# ================================================================================================================
def test_mse_known_value():
    a = torch.zeros(2, 1, 3, 4)
    b = torch.full((2, 1, 3, 4), 0.5)
    b[0, 0, 0, 0] = 1.5
    assert_close(mse(a, b), torch.tensor((23 * 0.25 + 2.25) / 24))
    assert_close(MSE()(a, b), mse(a, b))


def _ncc_brute(i, j, win, y, x):
    """cc at one voxel of a (H, W) fp64 pair by explicit window extraction with zero padding."""
    r0, r1 = win[0] // 2, win[1] // 2
    pi = F.pad(i, (r1, r1, r0, r0))
    pj = F.pad(j, (r1, r1, r0, r0))
    wi = pi[y:y + win[0], x:x + win[1]].reshape(-1)
    wj = pj[y:y + win[0], x:x + win[1]].reshape(-1)
    n = wi.numel()
    cross = ((wi - wi.mean()) * (wj - wj.mean())).sum()
    var_i = ((wi - wi.mean()) ** 2).sum()
    var_j = ((wj - wj.mean()) ** 2).sum()
    assert n == win[0] * win[1]
    return cross**2 / max(var_i * var_j, 1e-6)


@pytest.mark.parametrize("win", [(9, 9), (3, 5)])
def test_ncc_map_matches_brute_force(rng, win):
    i = torch.rand(1, 1, 11, 13, generator=rng, dtype=torch.float64)
    j = torch.rand(1, 1, 11, 13, generator=rng, dtype=torch.float64)
    m = ncc_map(i, j, window=win)
    assert m.shape == (1, 1, 11, 13)
    for y, x in [(0, 0), (5, 6), (10, 12), (3, 0), (10, 7)]:
        assert_close(m[0, 0, y, x], _ncc_brute(i[0, 0], j[0, 0], win, y, x), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("shape", [(23, 19), (13, 11, 15)])
@pytest.mark.parametrize("a, b", [(2.5, 0.3), (-0.7, 1.0)])
def test_ncc_of_affine_intensity_map_is_perfect(rng, shape, a, b):
    img = torch.rand(2, 1, *shape, generator=rng, dtype=torch.float64)
    cc = ncc_map(a * img + b, img)
    # Zero padding makes border windows see (0, 0) pairs, which are off the line J = a I + b when b != 0: the
    # identity holds exactly in the interior (voxels >= win//2 = 4 from every face).
    interior = (slice(None), slice(None)) + (slice(4, -4),) * len(shape)
    assert_close(cc[interior], torch.ones_like(cc[interior]), atol=1e-9, rtol=0)
    # b = 0: every window (padded zeros included) lies on the line, so the whole loss is 0.
    assert_close(ncc(a * img, img), torch.tensor(0.0, dtype=torch.float64), atol=1e-9, rtol=0)
    # Same in fp32, within fp32 cancellation error of the window sums.
    assert ncc((a * img).float(), img.float()).item() < 1e-4


def test_ncc_affine_odd_3d_fp32(rng):
    img = torch.rand(1, 1, 37, 41, 29, generator=rng)
    cc = ncc_map(1.7 * img + 0.2, img)
    assert cc.shape == img.shape
    # fp32 window sums of 729 voxels cancel to a relative error ~1e-6; measured max |cc - 1| is reported on failure.
    err = (cc[..., 4:-4, 4:-4, 4:-4] - 1).abs().max().item()
    assert err < 1e-4, err


def test_ncc_independent_noise_and_flat_images(rng):
    a = torch.rand(2, 1, 40, 40, generator=rng)
    b = torch.rand(2, 1, 40, 40, generator=rng)
    # Independent noise: E[cc] ~ 1/80 for a 9x9 window in the interior. (At the border the shared zero padding
    # correlates the two windows, which is why the full loss is lower, ~0.91 here.)
    assert ncc_map(a, b)[..., 4:-4, 4:-4].mean().item() < 0.03
    assert 0.8 < ncc(a, b).item() < 1.0
    # A flat image: windows wholly inside have var = 0 < eps, so cc = 0 there (not NaN); windows that reach the
    # zero padding see a step (0 vs 0.5), var > 0 and cc = 1 (identical images). 12x12: the 4x4 voxels >= 4 from
    # every edge are flat -> loss = 16 / 144.
    flat = torch.full((1, 1, 12, 12), 0.5)
    m = ncc_map(flat, flat)
    assert torch.isfinite(m).all()
    assert_close(m[..., 4:-4, 4:-4], torch.zeros(1, 1, 4, 4), atol=1e-6, rtol=0)
    assert_close(ncc(flat, flat), torch.tensor(16 / 144), atol=1e-6, rtol=0)


def test_ncc_multichannel_batch_noncontiguous_and_gradcheck(rng):
    a = torch.rand(3, 2, 14, 15, generator=rng)
    b = torch.rand(3, 2, 14, 15, generator=rng)
    per_ch = torch.stack([ncc(a[:, c:c + 1], b[:, c:c + 1]) for c in range(2)]).mean()
    assert_close(ncc(a, b), per_ch)
    per_b = torch.stack([ncc(a[k:k + 1], b[k:k + 1]) for k in range(3)]).mean()
    assert_close(ncc(a, b), per_b)
    a_nc = a.transpose(2, 3).contiguous().transpose(2, 3)
    assert not a_nc.is_contiguous()
    assert_close(ncc(a_nc, b), ncc(a, b))
    i = torch.rand(1, 1, 6, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    j = torch.rand(1, 1, 6, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ncc(x, y, window=3), (i, j))


@pytest.mark.parametrize(
    "a, b, kw, match",
    [
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"window": 4}, "odd"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"window": (3, 3, 3)}, "2 ints"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"eps": 0.0}, "eps"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8), {}, "same shape"),
        (torch.rand(1, 8, 8), torch.rand(1, 8, 8), {}, "4D"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.int64), torch.rand(1, 1, 8, 8), {}, "floating-point"),
        (torch.rand(1, 1, 8, 8), torch.full((1, 1, 8, 8), float("nan")), {}, "NaN"),
    ],
)
def test_ncc_rejects_bad_input(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        ncc(a, b, **kw)


def test_mse_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        mse(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        mse(torch.rand(1, 1, 4, 4), torch.full((1, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="floating-point"):
        mse(torch.ones(1, 1, 4, 4, dtype=torch.int32), torch.rand(1, 1, 4, 4))


# ================================================================================================================
# one_hot and NCC_sup
# ================================================================================================================
def test_one_hot_known_and_errors():
    lab = torch.tensor([[0, 2], [1, 2]]).view(1, 1, 2, 2)
    oh = one_hot(lab, 3)
    assert oh.shape == (1, 3, 2, 2) and oh.dtype == torch.float32
    assert torch.equal(oh[0, 2], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(oh.sum(1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="integer"):
        one_hot(lab.float(), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        one_hot(lab, 2)
    with pytest.raises(ValueError, match="B, 1, H, W"):
        one_hot(lab[:, 0], 3)


def test_ncc_sup_is_ncc_plus_label_mse_and_trains_the_flow(rng):
    moving = torch.rand(2, 1, 12, 14, generator=rng)
    fixed = torch.rand(2, 1, 12, 14, generator=rng)
    ml = torch.randint(0, 4, (2, 1, 12, 14), generator=rng)
    fl = torch.randint(0, 4, (2, 1, 12, 14), generator=rng)
    flow = (torch.randn(2, 2, 12, 14, generator=rng) * 0.7).requires_grad_(True)
    warped = warp(moving, flow)
    warped_oh = warp(one_hot(ml, 4), flow, mode="linear")  # the caller warps the moving one-hot LINEARLY
    fixed_oh = one_hot(fl, 4)
    got = ncc_sup(warped, fixed, warped_oh, fixed_oh)
    assert_close(got, ncc(warped, fixed) + mse(warped_oh, fixed_oh))
    sim = NCCSup()
    assert sim.needs_labels and sim.name == "ncc_sup"
    assert_close(sim(warped, fixed, warped_oh, fixed_oh), got)
    got.backward()
    assert flow.grad is not None and flow.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs warped_seg"):
        sim(warped, fixed)
    with pytest.raises(ValueError, match="same shape"):
        ncc_sup(warped, fixed, warped_oh, fixed_oh[:, :3])
    with pytest.raises(ValueError, match="match the images"):
        ncc_sup(warped, fixed, warped_oh[..., :7], fixed_oh[..., :7])


# ================================================================================================================
# Diffusion regularizer
# ================================================================================================================
@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_regularizer_constant_zero_and_linear_known(rng, shape):
    nd = len(shape)
    const = torch.randn(2, nd, *[1] * nd, generator=rng).expand(2, nd, *shape)
    assert diffusion_regularizer(const).item() == 0.0
    # u_c(x) = sum_j A_cj x_j: forward difference along j is A_cj except on the last slice (replicate pad -> 0),
    # so reg = sum_{c,j} A_cj^2 (n_j - 1) / n_j / (ndim * ndim)   (mean over channels, then / ndim).
    A = torch.randn(nd, nd, generator=rng, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    u = torch.einsum("cj,j...->c...", A, grid).unsqueeze(0).expand(3, -1, *shape)
    frac = torch.tensor([(n - 1) / n for n in shape], dtype=torch.float64)
    want = (A * A * frac.view(1, nd)).sum() / (nd * nd)
    assert_close(diffusion_regularizer(u), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_regularizer_matches_replicate_pad_formula(rng, shape):
    nd = len(shape)
    u = torch.randn(2, nd, *shape, generator=rng, dtype=torch.float64)
    total = 0
    for ax in range(nd):
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - ax) + 1] = 1  # F.pad lists the LAST axis first: pad the end of spatial axis `ax`
        p = F.pad(u, pad, mode="replicate")
        d = p.narrow(2 + ax, 1, shape[ax]) - u
        total = total + d * d
    assert_close(diffusion_regularizer(u), total.mean() / nd, atol=1e-12, rtol=1e-12)
    nc = u.transpose(2, 3)
    assert_close(diffusion_regularizer(nc), diffusion_regularizer(nc.contiguous()))


@pytest.mark.parametrize(
    "u, match",
    [
        (torch.zeros(1, 3, 4, 5), "2 channels"),
        (torch.zeros(1, 2, 4, 5, 6), "3 channels"),
        (torch.zeros(1, 2, 4), "4D"),
        (torch.zeros(1, 2, 4, 5, dtype=torch.int64), "floating-point"),
        (torch.full((1, 2, 4, 5), float("nan")), "NaN"),
    ],
)
def test_regularizer_rejects_bad_input(u, match):
    with pytest.raises(ValueError, match=match):
        diffusion_regularizer(u)


# ================================================================================================================
# Registry and the uniform interface
# ================================================================================================================
def _build(name, tiny2d):
    if name in ("deepsim_seg", "deepsim_ae"):
        return build_similarity(name, extractor=tiny2d)
    if name == "vgg":
        torch.manual_seed(0)
        return build_similarity(name, random_init=True)
    return build_similarity(name)


@pytest.mark.parametrize("name", SIMILARITIES)
def test_every_similarity_has_the_uniform_interface(rng, tiny2d, name):
    sim = _build(name, tiny2d)
    assert isinstance(sim, Similarity) and sim.name == name
    assert sim.needs_labels == (name == "ncc_sup")
    a = torch.rand(2, 1, 16, 18, generator=rng)
    b = torch.rand(2, 1, 16, 18, generator=rng)
    sa = one_hot(torch.randint(0, 3, (2, 1, 16, 18), generator=rng), 3)
    sb = one_hot(torch.randint(0, 3, (2, 1, 16, 18), generator=rng), 3)
    same = sim(a, a, sa, sa)
    diff = sim(a, b, sa, sb)
    assert same.shape == () and diff.shape == ()
    assert abs(same.item()) < 1e-5, same.item()
    assert diff.item() > 0.01


def test_registry_errors_and_paper_lambdas(tiny2d):
    with pytest.raises(ValueError, match="valid names: mse, ncc, ncc_sup, vgg, deepsim_seg, deepsim_ae"):
        build_similarity("ssim")
    with pytest.raises(ValueError, match="unexpected"):
        build_similarity("mse", window=9)
    with pytest.raises(ValueError, match="needs extractor"):
        build_similarity("deepsim_seg")
    with pytest.raises(ValueError, match="weights_path"):
        build_similarity("vgg")
    ncc9 = build_similarity("ncc", window=5, eps=1e-5)
    assert isinstance(ncc9, NCC) and ncc9.window == 5 and ncc9.eps == 1e-5
    assert type(build_similarity("ncc_sup")) is NCCSup
    assert isinstance(build_similarity("deepsim_ae", extractor=tiny2d), DeepSimLoss)
    assert PAPER_LAMBDAS["brain3d"] == {"mse": 0.08, "ncc": 1.0, "ncc_sup": 2.0, "deepsim_ae": 1.0,
                                        "deepsim_seg": 2.0}
    assert PAPER_LAMBDAS["cell2d"]["vgg"] == 0.125 and PAPER_LAMBDAS["cell2d"]["mse"] == 0.005
    assert paper_lambda("deepsim_seg") == 2.0 and paper_lambda("ncc", "cell2d") == 0.25
    with pytest.raises(ValueError, match="no lambda"):
        paper_lambda("vgg", "brain3d")
    with pytest.raises(ValueError, match="dataset"):
        paper_lambda("mse", "lungs")
    assert all(math.isfinite(v) and v > 0 for t in PAPER_LAMBDAS.values() for v in t.values())
