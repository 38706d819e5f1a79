"""Scaling and squaring on the Triton warp kernel (interpreter on CPU) against the float64 reference.

steps=3 for most cases (each step is a launch, the interpreter is slow); one case runs the default 7.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deepsim_rt.kernels import integrate_kernel as Ik  # noqa: E402
from deepsim_rt.kernels import reference as R  # noqa: E402

pytestmark = pytest.mark.interpreter


def _velocity(g, shape, scale=3.0, dtype=torch.float64):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _check(v: torch.Tensor, steps: int, padding: str, g: torch.Generator):
    kv = v.float().clone().requires_grad_()
    rv = v.double().clone().requires_grad_()
    out_k = Ik.integrate(kv, steps, padding)
    out_r = R.integrate(rv, steps, padding)
    assert out_k.shape == v.shape and out_k.dtype == torch.float32
    torch.testing.assert_close(out_k.double(), out_r, rtol=1e-5, atol=1e-5)
    up = torch.randn(v.shape, generator=g, dtype=torch.float64)
    out_k.backward(up.float())
    out_r.backward(up)
    # The velocity is the image AND the displacement of every step: both gradient paths must be in here.
    torch.testing.assert_close(kv.grad.double(), rv.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("seed", range(5))
def test_2d_matches_float64_reference(seed, padding):
    g = torch.Generator().manual_seed(3000 + seed)
    B = 1 + seed % 2
    H, W = 5 + seed, 7 + 2 * (seed % 3)
    v = _velocity(g, (B, 2, H, W))
    if seed % 2:  # non-contiguous velocity
        v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(v, 3, padding, g)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_3d_matches_float64_reference(padding):
    g = torch.Generator().manual_seed(3100)
    _check(_velocity(g, (1, 3, 4, 5, 6)), 2, padding, g)


def test_default_seven_steps():
    g = torch.Generator().manual_seed(3200)
    v = _velocity(g, (1, 2, 6, 9), scale=4.0)
    _check(v, 7, "border", g)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3300)
    v = _velocity(g, (1, 2, 4, 5), scale=0.7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: Ik.integrate(x, 2, "border"), (v,), fast_mode=True)


def test_known_answers():
    g = torch.Generator().manual_seed(3400)
    v = _velocity(g, (2, 2, 5, 6), dtype=torch.float32)
    # steps=0 returns v (a copy); a zero field stays zero; a constant field is a translation: exp(v) = v in the
    # interior of a border-padded field (u(p + c) = c everywhere).
    out0 = Ik.integrate(v, 0)
    assert torch.equal(out0, v) and out0.data_ptr() != v.data_ptr()
    assert torch.equal(Ik.integrate(torch.zeros(1, 2, 5, 6), 7), torch.zeros(1, 2, 5, 6))
    const = torch.full((1, 2, 5, 6), 0.75)
    torch.testing.assert_close(Ik.integrate(const, 4, "border"), const, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    g = torch.Generator().manual_seed(3500)
    v = _velocity(g, (1, 2, 6, 7), dtype=dtype)
    exact = R.integrate(v.double(), 3)
    err_k = (Ik.integrate(v, 3).double() - exact).abs().max().item()
    err_t = (R.integrate(v, 3).double() - exact).abs().max().item()
    assert err_k <= 2 * err_t + 1e-3 * exact.abs().max().item(), f"kernel {err_k:.3g} vs torch {err_t:.3g}"


@pytest.mark.parametrize(
    "velocity, steps, padding, match",
    [
        (torch.zeros(1, 3, 4, 5), 7, "border", "channels"),
        (torch.zeros(1, 2, 4, 5), -1, "border", "steps"),
        (torch.zeros(1, 2, 4, 5), 2.0, "border", "steps"),
        (torch.zeros(1, 2, 4, 5), True, "border", "steps"),
        (torch.zeros(1, 2, 4, 5), 7, "reflection", "padding"),
        (torch.zeros(1, 2, 4, 5, dtype=torch.int32), 7, "border", "floating"),
        (torch.zeros(1, 2, 0, 5), 7, "border", "empty"),
        (torch.zeros(1, 2, 1, 5), 7, "border", ">= 2"),
    ],
)
def test_bad_input_raises_before_launch(velocity, steps, padding, match):
    with pytest.raises(ValueError, match=match):
        Ik.integrate_fwd(velocity, steps, padding)


@pytest.mark.parametrize(("nsp", "padding"), [(2, "border"), (3, "zeros")])
def test_one_step_backward_is_identity_plus_image_and_displacement_roles(nsp, padding):
    """warp_self_bwd (one launch per step, everything in one fp32 buffer) = autograd through u + u o (id + u)."""
    from deepsim_rt.kernels.warp_kernel import warp_self_bwd

    g = torch.Generator().manual_seed(77 + nsp)
    shape = (2, nsp, 9, 7) if nsp == 2 else (1, nsp, 5, 6, 4)
    u = _velocity(g, shape, scale=1.5, dtype=torch.float32)
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    ru = u.double().requires_grad_()
    (ru + R.warp(ru, ru, "linear", padding)).backward(up)
    got = warp_self_bwd(up.float(), u, padding)
    assert got.shape == u.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), ru.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grad must have the field's shape"):
        warp_self_bwd(up.float()[:, :1], u, padding)
