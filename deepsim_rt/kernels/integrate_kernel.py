"""Scaling and squaring on the warp kernel: launchers -> autograd.Function -> function.

    u_0 = v / 2**steps;   u_{k+1} = u_k + u_k o (id + u_k)   (steps times)   -- exactly `reference.integrate`.

Each step is ONE launch of the warp forward kernel with ADD_SELF (the field is both the image and the
displacement, and the residual add happens in the kernel): no grid, no separate add, 7 launches for 7 steps.

Backward: only the velocity is saved; the backward recomputes u_0 .. u_{steps-1} (steps launches, cheap next to the
backward itself) and walks them in reverse. For one step, with g the gradient of u_{k+1}:
    g_k = g + grad_image(warp)(g) + grad_flow(warp)(g)
because u_k is the identity term, the warped image AND the displacement: the image-role gradient is the atomic
scatter, the flow-role gradient the per-voxel term; `warp_self_bwd` adds all three into one zero-filled buffer in
one launch (no displacement-gradient temporary, no separate additions).
Memory held between forward and backward: the velocity only (a field); during the backward: steps fields.
"""

from __future__ import annotations

import torch

from deepsim_rt.kernels._triton_common import acc_dtype, check_launch_device
from deepsim_rt.kernels.reference import DEFAULT_STEPS, check_integrate_inputs
from deepsim_rt.kernels.warp_kernel import _launch_fwd, _launch_self_bwd

__all__ = ["integrate_fwd", "integrate_bwd", "IntegrateFunction", "integrate", "check_integrate_inputs"]


def _trajectory(velocity: torch.Tensor, steps: int, padding: str, keep: bool):
    # Checked by the callers (check_integrate_inputs): every step launches unchecked.
    nsp = velocity.dim() - 2
    u = velocity / (2.0**steps)
    kept = []
    for _ in range(steps):
        if keep:
            kept.append(u)
        u = _launch_fwd(u, u, nsp, "linear", padding, add_self=True)
    return u, kept


def integrate_fwd(velocity: torch.Tensor, steps: int = DEFAULT_STEPS, padding: str = "border") -> torch.Tensor:
    """Forward launcher: velocity (B, ndim, *S) voxels -> displacement of exp(v), (B, ndim, *S), contiguous."""
    check_integrate_inputs(velocity, steps, padding)
    check_launch_device("velocity", velocity)
    return _trajectory(velocity, steps, padding, keep=False)[0]


def integrate_bwd(grad: torch.Tensor, velocity: torch.Tensor, steps: int = DEFAULT_STEPS,
                  padding: str = "border") -> torch.Tensor:
    """Backward launcher: d loss / d displacement (B, ndim, *S) -> d loss / d velocity (same shape and dtype)."""
    check_integrate_inputs(velocity, steps, padding)
    check_launch_device("velocity", velocity)
    if tuple(grad.shape) != tuple(velocity.shape):
        raise ValueError(f"grad must have the velocity's shape {tuple(velocity.shape)}, got {tuple(grad.shape)}")
    _, us = _trajectory(velocity, steps, padding, keep=True)
    # The running gradient stays fp32 for bf16/fp16 fields (7 rounded additions would cost ~3 bits otherwise);
    # warp_self_bwd returns it in that dtype, one launch and one zero-filled buffer per step.
    g = grad
    for u in reversed(us):
        g = _launch_self_bwd(g, u, velocity.dim() - 2, padding)
    return (g.to(acc_dtype(velocity.dtype)) / (2.0**steps)).to(velocity.dtype)


class IntegrateFunction(torch.autograd.Function):
    """apply(velocity, steps, padding). Saves only the velocity; the backward recomputes the trajectory."""

    @staticmethod
    def forward(ctx, velocity, steps, padding):
        ctx.steps, ctx.padding = steps, padding
        ctx.save_for_backward(velocity)
        return integrate_fwd(velocity, steps, padding)

    @staticmethod
    def backward(ctx, grad):
        (velocity,) = ctx.saved_tensors
        return integrate_bwd(grad, velocity, ctx.steps, ctx.padding), None, None


def integrate(velocity: torch.Tensor, steps: int = DEFAULT_STEPS, padding: str = "border") -> torch.Tensor:
    """Scaling and squaring on the Triton warp kernel (eager path; contract of `reference.integrate`).

    velocity (B, ndim, *S) float, voxel units; steps >= 0 (0 returns a copy of v). Returns (B, ndim, *S).
    The image-role gradient uses atomics, so the velocity gradient is not bitwise reproducible run to run.
    """
    check_integrate_inputs(velocity, steps, padding)
    return IntegrateFunction.apply(velocity, steps, padding)
