"""Device dispatch for the public ops: CUDA tensors -> Triton (as `deepsim_rt::` torch.library ops), CPU -> reference.

Routing, decided per call from the tensors' device and the environment (read at call time, never cached):
  DEEPSIM_RT_BACKEND unset / "auto"  CUDA -> Triton ops (reference if Triton is not installed); CPU -> reference
  DEEPSIM_RT_BACKEND="triton"        CUDA -> Triton ops; CPU -> the eager Triton autograd.Functions, which needs
                                     TRITON_INTERPRET=1 set before the first call (the CI path for the kernels)
  DEEPSIM_RT_BACKEND="reference"     the reference composite everywhere

Why by device in Python rather than one op with a CPU kernel (seen on this machine, torch 2.13 CPU / triton 3.9):
torch.compile of a triton_op on CPU lowers the op to its Triton kernel and finds no GPU driver, and under
TRITON_INTERPRET=1 both compile and export fail (the interpreter reads fake tensors' data). The reference composite
compiles, exports to ONNX GridSample and AOT-compiles on the CPU, so CPU graphs keep it.

On CUDA the ops are `torch.library.triton_op`s whose bodies launch through `wrap_triton`, with backward ops of
their own registered via `register_autograd`: torch.compile / torch.export / AOTInductor see
deepsim_rt::multilayer_cosine[_maps|_backward], deepsim_rt::warp[_backward], deepsim_rt::integrate[_backward] as
single ops and can embed their kernels. The kernel modules (which import Triton) load on the first CUDA or
interpreter call, so importing this module works without Triton and honours a TRITON_INTERPRET set after import.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from deepsim_rt._checks import check_choice, check_tensor
from deepsim_rt.kernels import reference
from deepsim_rt.kernels.reference import DEFAULT_EPS, DEFAULT_STEPS

__all__ = ["multilayer_cosine", "warp", "integrate", "BACKENDS", "backend_for", "HAS_TRITON", "HAS_TRITON_OPS",
           "OPS_REGISTERED"]

BACKENDS = ("auto", "triton", "reference")
ENV_BACKEND = "DEEPSIM_RT_BACKEND"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TRITON_OPS = HAS_TRITON and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def backend_for(t: Tensor) -> str:
    """Which implementation a call on tensors like `t` takes now: "op" (Triton torch.library op), "eager"
    (Triton autograd.Function under the interpreter) or "reference"."""
    choice = os.environ.get(ENV_BACKEND, "auto") or "auto"
    check_choice(ENV_BACKEND, choice, BACKENDS)
    if choice == "reference":
        return "reference"
    if t.device.type == "cuda":
        if OPS_REGISTERED:  # a CUDA tensor means CUDA was available at import, hence registered
            return "op"
        if choice == "triton":
            raise ValueError(f"{ENV_BACKEND}=triton needs the triton package and torch.library.triton_op "
                             f"(torch >= 2.6); triton installed: {HAS_TRITON}, torch {torch.__version__}")
        return "reference"
    if choice == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{ENV_BACKEND}=triton needs the triton package, which is not installed")
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"{ENV_BACKEND}=triton on {t.device} tensors runs the Triton interpreter: set "
                             "TRITON_INTERPRET=1 (before the first call), got TRITON_INTERPRET="
                             f"{os.environ.get('TRITON_INTERPRET')!r}")
        return "eager"
    return "reference"


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------
def multilayer_cosine(feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], eps: float = DEFAULT_EPS,
                      reduction: str = "mean") -> Tensor | tuple[Tensor, ...]:
    """DeepSim similarity of two feature pyramids (see `reference.multilayer_cosine` for the exact formula).

    feats_a, feats_b: L levels, level l (B, C_l, *S_l), same shape, dtype and device in a and b.
    eps: clamp on the squared feature norm (> 0). reduction: "mean" -> 0-dim fp32 (fp64 for fp64 features), the
    mean over levels of the per-level mean over batch and voxels; "none" -> tuple of L maps (B, *S_l).
    Gradients flow to every input that requires them. On CUDA: one fused launch for up to 8 levels,
    deterministic reduction.
    """
    reference.check_cosine_inputs(feats_a, feats_b, reduction)
    route = backend_for(feats_a[0])
    if route == "reference":
        return reference.multilayer_cosine(feats_a, feats_b, eps, reduction)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number (clamp on the squared feature norm), got {eps!r}")
    if route == "eager":
        from deepsim_rt.kernels import cosine

        return cosine.multilayer_cosine(feats_a, feats_b, float(eps), reduction)
    if reduction == "mean":
        return torch.ops.deepsim_rt.multilayer_cosine(list(feats_a), list(feats_b), float(eps))
    return tuple(torch.ops.deepsim_rt.multilayer_cosine_maps(list(feats_a), list(feats_b), float(eps)))


def _check_warp_dtypes(image: Tensor, flow: Tensor) -> None:
    if image.is_floating_point() and flow.is_floating_point() and image.dtype != flow.dtype:
        raise ValueError(f"image and flow must have the same dtype, got image {image.dtype} and flow {flow.dtype} "
                         "(cast one; integer label images with a float flow are fine for mode='nearest')")


def warp(image: Tensor, flow: Tensor, mode: str = "linear", padding: str = "border",
         deterministic: bool = False) -> Tensor:
    """Warp `image` by the voxel displacement `flow`: out(p) = image(p + flow(p)), align_corners=True.

    image: (B, C, H, W) or (B, C, D, H, W); float (same dtype as flow) or integer labels with mode="nearest".
    flow: (B, ndim, *spatial), voxel units, channel i along spatial axis i (tensor order).
    mode: "linear" | "nearest" (round half to even).  padding: "border" | "zeros".
    deterministic: on the Triton path, compute the image gradient without atomics (bitwise reproducible; slower).
    The reference path's CPU backward is deterministic already.
    Returns a tensor shaped like `image`, in its dtype.
    """
    check_tensor("image", image)
    check_tensor("flow", flow)
    _check_warp_dtypes(image, flow)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    route = backend_for(image)
    if route == "reference":
        return reference.warp(image, flow, mode, padding)
    if route == "eager":
        from deepsim_rt.kernels import warp_kernel

        return warp_kernel.warp(image, flow, mode, padding, deterministic)
    reference.check_warp_inputs(image, flow, mode, padding)
    return torch.ops.deepsim_rt.warp(image, flow, mode, padding, deterministic)


def integrate(velocity: Tensor, steps: int = DEFAULT_STEPS, padding: str = "border") -> Tensor:
    """Scaling and squaring: displacement of exp(v) (see `reference.integrate`).

    velocity: (B, ndim, *spatial) float, voxel units; steps >= 0 (7 default); padding "border" | "zeros".
    Returns (B, ndim, *spatial). On CUDA: one warp launch per step, backward recomputes the trajectory.
    """
    check_tensor("velocity", velocity)
    route = backend_for(velocity)
    if route == "reference":
        return reference.integrate(velocity, steps, padding)
    from deepsim_rt.kernels import integrate_kernel

    integrate_kernel.check_integrate_inputs(velocity, steps, padding)
    if route == "eager":
        return integrate_kernel.integrate(velocity, steps, padding)
    return torch.ops.deepsim_rt.integrate(velocity, steps, padding)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (CUDA path). Bodies import the kernel modules when first traced or run.
# ----------------------------------------------------------------------------------------------------------------
def _empty_like_none(t: Tensor | None, like: Tensor) -> Tensor:
    # Op outputs cannot be None: a gradient that was not asked for travels as a 0-element tensor.
    return t if t is not None else like.new_empty(0)


# Registering a triton_op makes torch scan its kernels' source (torch._dynamo's analysis): 3.6 s of import on the
# 2-core CPU box, paid by every `deepsim-rt register` there. The ops are reached only with CUDA tensors (route "op")
# or by tests calling torch.ops.deepsim_rt.* under the interpreter (TRITON_INTERPRET=1, set before this import by
# tests/conftest.py), so a process with neither skips the registration; routing never returns "op" without it.
OPS_REGISTERED = HAS_TRITON_OPS and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1")

if OPS_REGISTERED:
    _triton_op = torch.library.triton_op

    @_triton_op("deepsim_rt::multilayer_cosine", mutates_args=())
    def _cosine_op(feats_a: list[Tensor], feats_b: list[Tensor], eps: float) -> Tensor:
        from deepsim_rt.kernels.cosine import cosine_fwd

        return cosine_fwd(feats_a, feats_b, eps, "mean")

    @_triton_op("deepsim_rt::multilayer_cosine_maps", mutates_args=())
    def _cosine_maps_op(feats_a: list[Tensor], feats_b: list[Tensor], eps: float) -> list[Tensor]:
        from deepsim_rt.kernels.cosine import cosine_fwd

        return list(cosine_fwd(feats_a, feats_b, eps, "none"))

    @_triton_op("deepsim_rt::multilayer_cosine_backward", mutates_args=())
    def _cosine_bwd_op(feats_a: list[Tensor], feats_b: list[Tensor], grads: list[Tensor], eps: float,
                       mean: bool, need_a: bool, need_b: bool) -> list[Tensor]:
        """-> grads of feats_a (if need_a) followed by grads of feats_b (if need_b)."""
        from deepsim_rt.kernels.cosine import cosine_bwd

        ga, gb = cosine_bwd(feats_a, feats_b, grads[0] if mean else grads, eps, "mean" if mean else "none",
                            need_a, need_b)
        return [*(ga or []), *(gb or [])]

    def _cosine_setup(ctx, inputs, output):
        feats_a, feats_b, eps = inputs
        ctx.n_levels, ctx.eps = len(feats_a), eps
        ctx.save_for_backward(*feats_a, *feats_b)

    def _cosine_backward_impl(ctx, grads: list[Tensor], mean: bool):
        n = ctx.n_levels
        feats = list(ctx.saved_tensors)
        need_a, need_b = list(ctx.needs_input_grad[0]), list(ctx.needs_input_grad[1])
        out = torch.ops.deepsim_rt.multilayer_cosine_backward(feats[:n], feats[n:], grads, ctx.eps, mean,
                                                              any(need_a), any(need_b))
        ga = out[:n] if any(need_a) else [None] * n
        gb = out[n if any(need_a) else 0:] if any(need_b) else [None] * n
        ga = [g if r else None for g, r in zip(ga, need_a, strict=True)]
        gb = [g if r else None for g, r in zip(gb, need_b, strict=True)]
        return ga, gb, None

    def _cosine_backward(ctx, grad):
        return _cosine_backward_impl(ctx, [grad], mean=True)

    def _cosine_maps_backward(ctx, grads):
        feats = ctx.saved_tensors
        grads = [g if g is not None else feats[i].new_zeros((feats[i].shape[0], *feats[i].shape[2:]),
                                                             dtype=torch.float64 if feats[i].dtype == torch.float64
                                                             else torch.float32)
                 for i, g in enumerate(grads)]
        return _cosine_backward_impl(ctx, grads, mean=False)

    _cosine_op.register_autograd(_cosine_backward, setup_context=_cosine_setup)
    _cosine_maps_op.register_autograd(_cosine_maps_backward, setup_context=_cosine_setup)

    @_triton_op("deepsim_rt::warp", mutates_args=())
    def _warp_op(image: Tensor, flow: Tensor, mode: str, padding: str, deterministic: bool) -> Tensor:
        from deepsim_rt.kernels.warp_kernel import warp_fwd

        return warp_fwd(image, flow, mode, padding)

    @_triton_op("deepsim_rt::warp_backward", mutates_args=())
    def _warp_bwd_op(grad: Tensor, image: Tensor, flow: Tensor, mode: str, padding: str, deterministic: bool,
                     need_image: bool, need_flow: bool) -> tuple[Tensor, Tensor]:
        """-> (grad_image, grad_flow); a gradient not asked for is a 0-element tensor."""
        from deepsim_rt.kernels.warp_kernel import warp_bwd

        gi, gf = warp_bwd(grad, image, flow, mode, padding, need_image, need_flow, deterministic)
        return _empty_like_none(gi, flow), _empty_like_none(gf, flow)

    def _warp_setup(ctx, inputs, output):
        image, flow, mode, padding, deterministic = inputs
        ctx.mode, ctx.padding, ctx.deterministic = mode, padding, deterministic
        ctx.save_for_backward(image, flow)

    def _warp_backward(ctx, grad):
        image, flow = ctx.saved_tensors
        need_image, need_flow = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        gi, gf = torch.ops.deepsim_rt.warp_backward(grad, image, flow, ctx.mode, ctx.padding, ctx.deterministic,
                                                    need_image, need_flow)
        return (gi if need_image else None), (gf if need_flow else None), None, None, None

    _warp_op.register_autograd(_warp_backward, setup_context=_warp_setup)

    @_triton_op("deepsim_rt::integrate", mutates_args=())
    def _integrate_op(velocity: Tensor, steps: int, padding: str) -> Tensor:
        from deepsim_rt.kernels.integrate_kernel import integrate_fwd

        return integrate_fwd(velocity, steps, padding)

    @_triton_op("deepsim_rt::integrate_backward", mutates_args=())
    def _integrate_bwd_op(grad: Tensor, velocity: Tensor, steps: int, padding: str) -> Tensor:
        from deepsim_rt.kernels.integrate_kernel import integrate_bwd

        return integrate_bwd(grad, velocity, steps, padding)

    def _integrate_setup(ctx, inputs, output):
        velocity, steps, padding = inputs
        ctx.steps, ctx.padding = steps, padding
        ctx.save_for_backward(velocity)

    def _integrate_backward(ctx, grad):
        (velocity,) = ctx.saved_tensors
        return torch.ops.deepsim_rt.integrate_backward(grad, velocity, ctx.steps, ctx.padding), None, None

    _integrate_op.register_autograd(_integrate_backward, setup_context=_integrate_setup)
