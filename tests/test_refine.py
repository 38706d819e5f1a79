"""deepsim_rt.refine: the instance-optimisation loop (known deformations, invariants, determinism, error paths).

Tiny sizes (2D 32x32 / 3D 16^3, reference ops on the CPU): each test runs in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepsim_rt.evaluate.metrics import endpoint_error, folding_fraction
from deepsim_rt.kernels import warp
from deepsim_rt.refine import (
    DEFAULTS,
    NonFiniteLossError,
    RefineConfig,
    bending_energy,
    level_sizes,
    refine,
)
from deepsim_rt.refine.pyramid import resample_field
from tests.conftest import HAS_CUDA


def _blobs(size: tuple[int, ...], g: torch.Generator, n: int = 6) -> torch.Tensor:
    """A smooth image (1, 1, *size) in [0, 1]: a sum of Gaussian blobs (sigma 3-5 voxels)."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")
    img = torch.zeros(size)
    for _ in range(n):
        centre = [float(torch.rand((), generator=g)) * (s - 1) for s in size]
        sigma = 3.0 + 2.0 * float(torch.rand((), generator=g))
        d2 = sum((x - c) ** 2 for x, c in zip(grids, centre, strict=True))
        img = img + torch.exp(-d2 / (2 * sigma * sigma))
    img = (img - img.min()) / (img.max() - img.min())
    return img[None, None]


def _smooth_field(size: tuple[int, ...], amp: float) -> torch.Tensor:
    """A smooth known displacement (1, ndim, *size): one sine period over each axis, amplitude `amp` voxels."""
    nd = len(size)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) / (s - 1) for s in size], indexing="ij")
    comps = [amp * torch.sin(2 * math.pi * grids[(i + 1) % nd]) * torch.cos(math.pi * grids[i]) for i in range(nd)]
    return torch.stack(comps)[None]


def _pair(size=(32, 32), amp=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    moving = _blobs(size, g)
    u_true = _smooth_field(size, amp)
    fixed = warp(moving, u_true)  # warp(moving, u_true) == fixed exactly
    return moving, fixed, u_true


# ----------------------------------------------------------------------------------------------------------------
# The optimiser
# ----------------------------------------------------------------------------------------------------------------
def test_loss_decreases_monotonically_on_smooth_deformation():
    moving, fixed, u_true = _pair()
    cfg = RefineConfig(iterations=40, loss="mse", lam=0.01, levels=1, lr=0.05, progress=False)
    res = refine(moving, fixed, config=cfg)
    losses = res.losses[0]
    assert res.iterations == [40] and losses.shape == (40,)
    assert bool((losses[1:] < losses[:-1]).all()), losses
    assert float(losses[-1]) < 0.2 * float(losses[0])
    # and it moved towards the truth: endpoint error well below the zero field's
    assert float(endpoint_error(res.displacement, u_true)) < 0.6 * float(endpoint_error(0 * u_true, u_true))


@pytest.mark.parametrize("loss", ["ncc", "mse"])
def test_pyramid_loss_decreases_on_every_level(loss):
    moving, fixed, _ = _pair(size=(32, 32))
    res = refine(moving, fixed, config=RefineConfig(iterations=15, loss=loss, lam=0.1, levels=3, lr=0.05,
                                                    progress=False))
    assert res.sizes == [(8, 8), (16, 16), (32, 32)]
    assert float(res.losses[0][-1]) < float(res.losses[0][0])  # the coarsest level starts from zero
    # the finest level starts from the upsampled coarse result, far below the zero field's loss, and ends there
    zero = refine(moving, fixed, config=RefineConfig(iterations=1, loss=loss, lam=0.1, levels=1, progress=False))
    assert float(res.losses[-1][-1]) < 0.5 * float(zero.losses[0][0])


@pytest.mark.parametrize("size", [(32, 32), (16, 16, 16)])
def test_refine_from_true_displacement_stays_near_it(size):
    moving, fixed, u_true = _pair(size=size, amp=1.0)
    cfg = RefineConfig(iterations=20, loss="mse", lam=0.0, levels=2, lr=0.01, progress=False)
    res = refine(moving, fixed, init=u_true, config=cfg)
    # The truth is a minimum of the full-resolution data term (not exactly of the coarse level's: downsampling
    # and warping do not commute). Adam moves up to lr per step, 40 steps = 0.4 voxels; measured mean EPE
    # 2D 0.056, 3D 0.083 (mean |u_true| 0.4-0.5 voxels).
    assert float(endpoint_error(res.displacement, u_true)) < 0.1
    assert float(res.losses[-1][0]) < 1e-4


def test_diffeomorphic_refine_has_no_folding_where_displacement_folds():
    # A large smooth deformation (5 voxels over 32) and a weak regulariser: the plain displacement folds (measured
    # 0.68 % of voxels), the velocity integrated by scaling and squaring does not. (With lam = 0 the velocity
    # itself turns rough at the voxel scale and its discrete Jacobian folds too: the guarantee needs a smooth v.)
    moving, fixed, _ = _pair(size=(32, 32), amp=5.0, seed=1)
    base = dict(iterations=60, loss="mse", lam=0.01, levels=1, lr=0.2, progress=False)
    plain = refine(moving, fixed, config=RefineConfig(**base))
    diffeo = refine(moving, fixed, config=RefineConfig(diffeomorphic=True, **base))
    assert float(folding_fraction(plain.displacement)) > 0
    assert float(folding_fraction(diffeo.displacement)) == 0.0
    assert diffeo.velocity is not None and plain.velocity is None


def test_deterministic_given_seed():
    moving, fixed, _ = _pair()
    cfg = RefineConfig(iterations=10, loss="ncc", lam=0.5, levels=2, lr=0.1, seed=7, progress=False)
    a = refine(moving, fixed, config=cfg)
    b = refine(moving, fixed, config=cfg)
    assert torch.equal(a.displacement, b.displacement)
    assert all(torch.equal(x, y) for x, y in zip(a.losses, b.losses, strict=True))


def test_tolerance_stops_early_and_zero_iterations_keep_init():
    moving, fixed, u_true = _pair()
    res = refine(moving, fixed, config=RefineConfig(iterations=200, loss="mse", lam=0.0, levels=1, lr=0.01,
                                                    tol=0.5, check_every=5, progress=False))
    assert res.iterations[0] < 200 and res.iterations[0] % 5 == 0
    res0 = refine(moving, fixed, init=u_true, config=RefineConfig(iterations=0, levels=1, progress=False))
    assert torch.equal(res0.displacement, u_true)


class _Features(nn.Module):
    """A stand-in feature extractor: two levels of fixed random 1x1 conv features (any size, no multiple)."""

    def __init__(self, nan_from_call: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.calls = 0
        self.nan_from_call = nan_from_call

    def extract_features(self, x):
        self.calls += 1
        a = torch.nn.functional.leaky_relu(self.conv(x))
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            a = a + float("inf")  # inf features: cos = inf / inf = NaN (NaN features would fail a check first)
        return [a, torch.nn.functional.avg_pool2d(a, 2)]


def test_deepsim_loss_with_given_extractor_decreases():
    moving, fixed, _ = _pair()
    res = refine(moving, fixed, config=RefineConfig(iterations=20, loss="deepsim_seg", lam=0.1, levels=1, lr=0.05,
                                                    progress=False), extractor=_Features())
    assert float(res.losses[0][-1]) < float(res.losses[0][0])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"iterations": -1}, r"iterations must be an int in \[0, 10000\]"),
    ({"lam": -0.5}, "lam must be a number >= 0"),
    ({"loss": "ssim"}, "unknown refine loss 'ssim'"),
    ({"levels": 0}, "levels must be an int >= 1"),
    ({"lr": 0.0}, "lr must be a number > 0"),
    ({"bending": -1.0}, "bending must be a number >= 0"),
    ({"ncc_window": 4}, "ncc_window must be an odd int"),
])
def test_config_errors_are_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as exc:
        RefineConfig(**kwargs)
    assert "\n" not in str(exc.value)


def test_deepsim_without_extractor_is_an_error():
    moving, fixed, _ = _pair()
    with pytest.raises(ValueError, match="deepsim_ae needs a feature extractor"):
        refine(moving, fixed, config=RefineConfig(iterations=1, loss="deepsim_ae", progress=False))


def test_pyramid_below_four_voxels_is_an_error():
    moving, fixed, _ = _pair(size=(32, 20))
    with pytest.raises(ValueError, match=r"axis 1 \(size 20\) to 2 voxels .* use levels <= 3"):
        refine(moving, fixed, config=RefineConfig(iterations=1, levels=4, progress=False))


def test_non_finite_loss_names_level_and_iteration():
    moving, fixed, _ = _pair()
    # call 1 = the fixed image's features; calls 2.. = one per step: NaN from call 5 = iteration 4 of level 1
    with pytest.raises(NonFiniteLossError, match=r"level 1/1 \(size 32x32\), iteration 4") as exc:
        refine(moving, fixed, config=RefineConfig(iterations=10, loss="deepsim_seg", levels=1, progress=False),
               extractor=_Features(nan_from_call=5))
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)


def test_input_errors():
    moving, fixed, u = _pair()
    with pytest.raises(ValueError, match="init displacement must be"):
        refine(moving, fixed, init=u[:, :, :16], config=RefineConfig(iterations=1, progress=False))
    with pytest.raises(ValueError, match="same shape"):
        refine(moving, fixed[..., :16], config=RefineConfig(iterations=1, progress=False))
    with pytest.raises(ValueError, match="config must be a RefineConfig"):
        refine(moving, fixed, config={"iterations": 1})


# ----------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------
def test_resolve_fills_measured_defaults_per_ndim():
    for nd in (2, 3):
        cfg = RefineConfig(lam=0.25).resolve(nd)
        assert cfg.lam == 0.25
        assert (cfg.iterations, cfg.loss, cfg.lr) == tuple(DEFAULTS[nd][k] for k in ("iterations", "loss", "lr"))
        assert RefineConfig(loss="mse").resolve(nd).lam == pytest.approx(DEFAULTS[nd]["lam"] * 0.08)
        assert RefineConfig(loss="deepsim_seg").resolve(nd).lam == DEFAULTS[nd]["lam"] * 0.5
    with pytest.raises(ValueError, match="2D or 3D"):
        RefineConfig().resolve(4)


def test_level_sizes_and_field_resampling_known_answers():
    assert level_sizes((40, 48, 40), 3) == [(10, 12, 10), (20, 24, 20), (40, 48, 40)]
    u = torch.ones(1, 2, 8, 6)
    u[:, 1] = 3.0
    up = resample_field(u, (16, 12))  # a constant field: interpolation keeps it, voxel units double
    assert torch.allclose(up[:, 0], torch.full((1, 16, 12), 2.0))
    assert torch.allclose(up[:, 1], torch.full((1, 16, 12), 6.0))
    assert torch.allclose(resample_field(up, (8, 6)), u)  # area-down of the up-sampled constant: exact round trip


@pytest.mark.parametrize("size", [(20, 18), (10, 12, 9)])
def test_loop_terms_equal_the_losses(size, rng):
    # the loop's check-free terms (deepsim_rt.refine.terms) are the public losses' formulas
    from deepsim_rt.losses import diffusion_regularizer, mse, ncc
    from deepsim_rt.refine.terms import FixedNCC, diffusion_term, mse_term

    a = torch.rand((2, 1, *size), generator=rng, dtype=torch.float64)
    b = torch.rand((2, 1, *size), generator=rng, dtype=torch.float64)
    u = torch.randn((2, len(size), *size), generator=rng, dtype=torch.float64)
    for window in (9, 5):
        assert torch.allclose(FixedNCC(b, window)(a), ncc(a, b, window), rtol=0, atol=1e-12)
    assert torch.allclose(mse_term(a, b), mse(a, b), rtol=0, atol=1e-15)
    assert torch.allclose(diffusion_term(u), diffusion_regularizer(u), rtol=0, atol=1e-12)


def test_bending_energy_known_answers():
    x = torch.arange(10, dtype=torch.float64)
    lin = torch.stack(torch.meshgrid(2 * x, -x, indexing="ij"))[None]
    assert float(bending_energy(lin)) == 0.0
    quad = torch.zeros(1, 2, 10, 10, dtype=torch.float64)
    quad[:, 0] = (x * x)[:, None]  # d_00 u_0 = 2 everywhere, every other second difference 0
    # mean over channels of (4 + 0 + 0) for channel 0 and 0 for channel 1 -> 4 / 2, then / ndim^2 = 4
    assert float(bending_energy(quad)) == pytest.approx(4.0 / 2 / 4)


# ----------------------------------------------------------------------------------------------------------------
# CUDA: the fused-kernel path and the CUDA graph agree with the CPU reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_cuda_path_and_graph_match_cpu(diffeomorphic):
    moving, fixed, _ = _pair(size=(16, 16, 16), amp=1.0)
    cfg = RefineConfig(iterations=12, loss="ncc", lam=0.5, levels=2, lr=0.05, diffeomorphic=diffeomorphic,
                       progress=False)
    cpu = refine(moving, fixed, config=cfg)
    gpu = refine(moving.cuda(), fixed.cuda(), config=cfg)
    graph = refine(moving.cuda(), fixed.cuda(), config=RefineConfig(**{**cfg.__dict__, "cuda_graph": True}))
    assert torch.allclose(gpu.displacement.cpu(), cpu.displacement, atol=2e-3)
    assert torch.allclose(graph.displacement, gpu.displacement, atol=1e-5)
    assert graph.iterations == gpu.iterations == [12, 12]
