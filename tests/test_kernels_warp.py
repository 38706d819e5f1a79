"""Triton warp 2D/3D (interpreter on CPU) against the float64 reference (grid_sample).

The kernel uses voxel coordinates directly while the reference goes through grid_sample's normalize/unnormalize
round trip, so fp32 forward agreement is a few 1e-7 absolute on [0, 1] images, not bitwise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deepsim_rt.kernels import reference as R  # noqa: E402
from deepsim_rt.kernels import warp_kernel as Wk  # noqa: E402

pytestmark = pytest.mark.interpreter


def _case(g: torch.Generator, nsp: int, dtype=torch.float32, max_b=2, max_c=3):
    """Random image in [0, 1] and displacement up to ~3 voxels (so samples leave the volume at the edges),
    odd/anisotropic sizes; sometimes non-contiguous (transposed spatial view, a channel slice)."""
    B = int(torch.randint(1, max_b + 1, (1,), generator=g))
    C = int(torch.randint(1, max_c + 1, (1,), generator=g))
    lo, hi = (5, 14) if nsp == 2 else (3, 8)
    S = tuple(int(n) for n in torch.randint(lo, hi, (nsp,), generator=g))
    img = torch.rand(B, C, *S, generator=g, dtype=torch.float64)
    flow = torch.randn(B, nsp, *S, generator=g, dtype=torch.float64) * 2.5
    kind = int(torch.randint(0, 3, (1,), generator=g))
    img, flow = img.to(dtype), flow.to(dtype)
    if kind == 1:  # same values, spatially transposed memory
        img = img.transpose(-1, -2).contiguous().transpose(-1, -2)
        flow = flow.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif kind == 2:  # channel slices of wider tensors: strides that are not the contiguous ones
        img = torch.cat([img, img[:, :1]], dim=1)[:, :C]
        flow = torch.cat([flow[:, :1], flow], dim=1)[:, 1:]
    return img, flow


def _check_linear(seed: int, nsp: int, padding: str):
    g = torch.Generator().manual_seed(seed)
    img, flow = _case(g, nsp)
    need_img = seed % 3 != 1  # 1 in 3 cases: only the displacement learns (the registration-training case)
    ki = img.clone().requires_grad_(need_img)
    kf = flow.clone().requires_grad_()
    ri = img.double().requires_grad_(need_img)
    rf = flow.double().requires_grad_()
    out_k = Wk.warp(ki, kf, "linear", padding)
    out_r = R.warp(ri, rf, "linear", padding)
    assert out_k.shape == img.shape and out_k.dtype == img.dtype
    torch.testing.assert_close(out_k.double(), out_r, rtol=0, atol=2e-6)
    up = torch.randn(img.shape, generator=g, dtype=torch.float64)
    out_k.backward(up.float())
    out_r.backward(up)
    torch.testing.assert_close(kf.grad.double(), rf.grad, rtol=1e-5, atol=2e-5, msg=lambda s: f"grad flow: {s}")
    if need_img:
        torch.testing.assert_close(ki.grad.double(), ri.grad, rtol=1e-5, atol=1e-5, msg=lambda s: f"grad image: {s}")
    else:
        assert ki.grad is None


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("seed", range(16))
def test_linear_2d_matches_float64_reference(seed, padding):
    _check_linear(seed, 2, padding)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("seed", range(8))
def test_linear_3d_matches_float64_reference(seed, padding):
    _check_linear(1000 + seed, 3, padding)


@pytest.mark.parametrize("nsp", [2, 3])
@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("seed", range(6))
def test_nearest_label_warp_is_exact(seed, padding, nsp):
    """Integer labels (int64 beyond 2**24 too, uint8) and float labels: identical to the reference's nearest."""
    g = torch.Generator().manual_seed(2000 + seed)
    img, flow = _case(g, nsp)
    labels = (img * 7).floor().to(torch.int64)
    for lab in (labels, labels.to(torch.uint8), labels.to(torch.float32)):
        got = Wk.warp(lab, flow, "nearest", padding)
        assert got.dtype == lab.dtype
        assert torch.equal(got, R.warp(lab, flow, "nearest", padding)), f"{lab.dtype}"
    big = labels + 2**40  # beyond fp32's 2**24 exact integers: the kernel copies bits, never converts
    shifted = Wk.warp(big, flow, "nearest", padding)
    want = R.warp(labels, flow, "nearest", padding)
    kept = want != 0 if padding == "zeros" else torch.ones_like(want, dtype=torch.bool)
    assert torch.equal(shifted[kept] - 2**40, want[kept])


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("nsp", [2, 3])
def test_nearest_gradients(nsp, padding):
    """Float image, nearest: the image gradient is a scatter to the chosen voxel, the displacement gets zero."""
    g = torch.Generator().manual_seed(2100 + nsp)
    img, flow = _case(g, nsp)
    ki, kf = img.clone().requires_grad_(), flow.clone().requires_grad_()
    ri, rf = img.double().requires_grad_(), flow.double().requires_grad_()
    up = torch.randn(img.shape, generator=g, dtype=torch.float64)
    Wk.warp(ki, kf, "nearest", padding).backward(up.float())
    R.warp(ri, rf, "nearest", padding).backward(up)
    torch.testing.assert_close(ki.grad.double(), ri.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(kf.grad, torch.zeros_like(kf))


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("nsp", [2, 3])
def test_deterministic_image_gradient_is_bitwise_reproducible(nsp, mode):
    g = torch.Generator().manual_seed(2200 + nsp)
    img, flow = _case(g, nsp)
    # Push samples past the edge so that border clamping makes several voxels hit the same destination.
    flow = flow * 2
    up = torch.randn(img.shape, generator=g)
    runs = [Wk.warp_bwd(up, img, flow, mode, "border", need_image=True, need_flow=False, deterministic=True)[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    atomic = Wk.warp_bwd(up, img, flow, mode, "border", need_image=True, need_flow=False)[0]
    torch.testing.assert_close(runs[0], atomic, rtol=1e-6, atol=1e-6)
    ri = img.double().requires_grad_()
    R.warp(ri, flow.double(), mode, "border").backward(up.double())
    torch.testing.assert_close(runs[0].double(), ri.grad, rtol=1e-5, atol=1e-5)
    # Through autograd, with the displacement gradient as well.
    ki, kf = img.clone().requires_grad_(), flow.clone().requires_grad_()
    Wk.warp(ki, kf, mode, "border", deterministic=True).backward(up)
    assert torch.equal(ki.grad, runs[0])


@pytest.mark.parametrize("nsp", [2, 3])
def test_gradcheck_float64_image_and_displacement(nsp):
    g = torch.Generator().manual_seed(2300 + nsp)
    shape = (1, 2, 5, 6) if nsp == 2 else (1, 1, 3, 4, 5)
    img = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    # Displacements away from integer coordinates (the interpolant's kinks) for finite differences.
    flow = (torch.rand(1, nsp, *shape[2:], generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    for padding in ("border", "zeros"):
        assert torch.autograd.gradcheck(lambda i, f, p=padding: Wk.warp(i, f, "linear", p), (img, flow),
                                        fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nsp", [2, 3])
@pytest.mark.parametrize("seed", range(2))
def test_low_precision_within_twice_torch_error(seed, nsp, dtype):
    """Forward and displacement gradient: err(kernel) <= 2 err(reference in that dtype) + atol, vs fp64 on the
    same rounded inputs. (The reference samples half-precision inputs in fp32 and rounds the result once, so this
    bound is the output's own rounding error.)"""
    g = torch.Generator().manual_seed(2400 + seed + 10 * nsp)
    img, flow = _case(g, nsp, dtype=dtype)
    up = torch.randn(img.shape, generator=g).to(dtype)

    def run(fn, cast):
        i, f = cast(img).requires_grad_(), cast(flow).requires_grad_()
        out = fn(i, f, "linear", "border")
        out.backward(cast(up))
        return out.double(), i.grad.double(), f.grad.double()

    exact = run(R.warp, lambda x: x.detach().double())
    kern = run(Wk.warp, lambda x: x.detach().clone())
    torch_ = run(R.warp, lambda x: x.detach().clone())
    for name, k, t, e in zip(("out", "grad image", "grad flow"), kern, torch_, exact, strict=True):
        err_k = (k - e).abs().max().item()
        err_t = (t - e).abs().max().item()
        atol = 1e-3 * e.abs().max().item()
        assert err_k <= 2 * err_t + atol, f"{name}: kernel {err_k:.3g} vs torch {err_t:.3g}"


@pytest.mark.parametrize("nsp", [2, 3])
def test_known_answers_identity_and_integer_shift(nsp):
    g = torch.Generator().manual_seed(2500 + nsp)
    shape = (2, 2, 9, 11) if nsp == 2 else (1, 2, 5, 6, 7)
    img = torch.rand(shape, generator=g)
    zero = torch.zeros(shape[0], nsp, *shape[2:])
    for padding in ("border", "zeros"):
        assert torch.equal(Wk.warp(img, zero, "linear", padding), img)
        assert torch.equal(Wk.warp(img, zero, "nearest", padding), img)
    # u = +1 along the last axis: out(p) = image(p + e_w), a roll in the interior; zeros padding past the edge.
    shift = zero.clone()
    shift[:, -1] = 1.0
    out = Wk.warp(img, shift, "linear", "zeros")
    assert torch.equal(out[..., :-1], img[..., 1:])
    assert torch.equal(out[..., -1], torch.zeros_like(out[..., -1]))
    out_b = Wk.warp(img, shift, "linear", "border")
    assert torch.equal(out_b[..., -1], img[..., -1])


def test_image_gradient_skipped_when_not_needed():
    g = torch.Generator().manual_seed(2600)
    img, flow = _case(g, 2)
    gi, gf = Wk.warp_bwd(torch.ones_like(img), img, flow, need_image=False, need_flow=True)
    assert gi is None and gf is not None and gf.shape == flow.shape
    gi, gf = Wk.warp_bwd(torch.ones_like(img), img, flow, need_image=True, need_flow=False)
    assert gf is None and gi is not None and gi.shape == img.shape


def test_integer_image_has_no_gradient():
    with pytest.raises(ValueError, match="no gradient"):
        Wk.warp_bwd(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.int64), torch.zeros(1, 2, 4, 4),
                    "nearest", need_image=True)


@pytest.mark.parametrize(
    "image, flow, mode, padding, match",
    [
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 5, dtype=torch.float64), "linear", "border", "same dtype"),
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 5, device="meta"), "linear", "border", "same device"),
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 3, 4, 5), "linear", "border", "channels"),
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 6), "linear", "border", "spatial size"),
        (torch.rand(2, 1, 4, 5), torch.zeros(1, 2, 4, 5), "linear", "border", "batch"),
        (torch.ones(1, 1, 4, 5, dtype=torch.int64), torch.zeros(1, 2, 4, 5), "linear", "border", "nearest"),
        (torch.rand(1, 1, 0, 5), torch.zeros(1, 2, 0, 5), "linear", "border", "empty"),
        (torch.rand(1, 1, 1, 5), torch.zeros(1, 2, 1, 5), "linear", "border", ">= 2"),
        (torch.rand(1, 1, 4), torch.zeros(1, 1, 4), "linear", "border", "4D"),
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 5), "cubic", "border", "mode"),
        (torch.rand(1, 1, 4, 5), torch.zeros(1, 2, 4, 5), "linear", "reflection", "padding"),
    ],
)
def test_bad_input_raises_before_launch(image, flow, mode, padding, match):
    with pytest.raises(ValueError, match=match):
        Wk.warp_fwd(image, flow, mode, padding)
