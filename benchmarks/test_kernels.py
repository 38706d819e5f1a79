"""Kernel suite: DeepSim multi-layer cosine, warp 2D/3D, scaling-and-squaring, per provider.

Providers: "reference" (deepsim_rt.kernels.reference, eager: the grid-build + grid_sample path for warp),
"compile" (torch.compile of the same reference function), "triton" (the public ops on CUDA tensors, i.e. the
Triton kernels; GPU only). Passes: cosine fwd / fwd+bwd (gradient for the warped side only, as in registration
training); warp fwd / bwd_flow (moving image is data) / bwd_both; integrate fwd / fwd+bwd.

Sizes: benchmarks/shapes.py (GPU: 3D brain 160x192x224 + 2D 4x1024^2; CPU: small). On the GPU, 3D runs in fp32 and
bf16, 2D in fp32. Bytes per case: benchmarks/roofline.py (the minimum each op must move).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks import roofline
from benchmarks.harness import bench_device, compiled, shape_str
from benchmarks.shapes import KERNEL_SIZES, STEPS, KernelSize
from deepsim_rt.kernels import reference

DEV = bench_device()
ON_GPU = DEV.type == "cuda"
SIZES = KERNEL_SIZES[DEV.type]
PROVIDERS = ("reference", "compile", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DISPLACEMENT_VOXELS = 4.0  # max |u| of the random smooth fields: a realistic registration displacement


def _triton_ready() -> str | None:
    """None if the public ops route CUDA tensors to the Triton ops here, else the reason they do not."""
    if not ON_GPU:
        return "the triton provider needs CUDA (on the CPU Triton runs only under TRITON_INTERPRET=1: too slow)"
    try:
        from deepsim_rt.kernels import dispatch
    except ImportError as exc:
        return f"deepsim_rt.kernels.dispatch is not importable: {exc}"
    route = dispatch.backend_for(torch.empty(1, device=DEV)) if hasattr(dispatch, "backend_for") else "?"
    if route != "op":
        return (f"the public ops route CUDA tensors to {route!r}, not the Triton ops (triton installed: "
                f"{getattr(dispatch, 'HAS_TRITON', '?')}, torch.library.triton_op: "
                f"{getattr(dispatch, 'HAS_TRITON_OPS', '?')}, "
                f"DEEPSIM_RT_BACKEND={os.environ.get('DEEPSIM_RT_BACKEND')})")
    return None


def _cases(dtypes_for) -> list:
    """(size, dtype, provider) params; GPU cases and the triton provider carry the `gpu` marker."""
    out = []
    for size in SIZES:
        for dt in dtypes_for(size):
            for prov in PROVIDERS:
                marks = [pytest.mark.gpu] if (ON_GPU or prov == "triton") else []
                out.append(pytest.param(size, dt, prov, marks=marks, id=f"{size.name}-{dt}-{prov}"))
    return out


def _dtypes(size: KernelSize) -> tuple[str, ...]:
    return ("float32", "bfloat16") if (ON_GPU and size.ndim == 3) else ("float32",)


def _skip_compile_on_gpu(provider: str, op: str, size: KernelSize, dtype: str) -> None:
    """On the GPU, torch.compile takes seconds per graph and `make gpu-check` has 8 minutes: compile the cases the
    targets compare against (every DeepSim case; warp and integrate in 3D fp32) unless BENCH_COMPILE=all."""
    if provider != "compile" or not ON_GPU or os.environ.get("BENCH_COMPILE", "") == "all":
        return
    if op == "deepsim" or (size.ndim == 3 and dtype == "float32"):
        return
    pytest.skip("compile baseline limited to the target cases on the GPU (BENCH_COMPILE=all for every case)")


def _op(name: str, provider: str):
    if provider == "reference":
        return getattr(reference, name)
    if provider == "compile":
        return compiled(getattr(reference, name))
    reason = _triton_ready()
    if reason:
        pytest.skip(reason)
    import deepsim_rt.kernels as public

    return getattr(public, name)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def smooth_field(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, amp: float) -> torch.Tensor:
    """Random smooth displacement/velocity (B, nd, *S), max |component| = amp voxels (coarse noise upsampled)."""
    b, nd, *spatial = shape
    coarse = torch.randn(b, nd, *[max(s // 16, 2) for s in spatial], generator=gen, device=DEV)
    u = F.interpolate(coarse, size=tuple(spatial), mode="bilinear" if nd == 2 else "trilinear", align_corners=True)
    return (u / u.abs().amax() * amp).to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# DeepSim multi-layer cosine
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,dtype,provider", _cases(_dtypes))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_deepsim(bench, size, dtype, provider, pass_):
    _skip_compile_on_gpu(provider, "deepsim", size, dtype)
    dt = DTYPES[dtype]
    fn = _op("multilayer_cosine", provider)
    levels = size.levels
    grad = pass_ == "fwd+bwd"
    seed = iter(range(1000))

    def make():
        g = _gen(next(seed))
        fa = [torch.randn(s, generator=g, device=DEV).to(dt).requires_grad_(grad) for s in levels]
        fb = [torch.randn(s, generator=g, device=DEV).to(dt) for s in levels]
        return fa, fb

    if grad:
        def prepare(inputs):
            for t in inputs[0]:
                t.grad = None
            return inputs

        def target(fa, fb):
            fn(fa, fb).backward()
    else:
        prepare = None

        def target(fa, fb):
            return fn(fa, fb)

    bench.run(target, make, prepare=prepare, op=f"deepsim{size.ndim}d", pass_=pass_, provider=provider,
              shape=shape_str(size.image), dtype=dtype,
              bytes_moved=roofline.cosine_bytes(levels, dtype, pass_),
              flops=roofline.cosine_flops(levels, pass_),
              extra={"levels": [list(s) for s in levels]})


# ----------------------------------------------------------------------------------------------------------------
# Warp
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,dtype,provider", _cases(_dtypes))
@pytest.mark.parametrize("pass_", ["fwd", "bwd_flow", "bwd_both"])
def test_warp(bench, size, dtype, provider, pass_):
    _skip_compile_on_gpu(provider, "warp", size, dtype)
    dt = DTYPES[dtype]
    fn = _op("warp", provider)
    seed = iter(range(1000))
    need_img, need_flow = pass_ == "bwd_both", pass_ != "fwd"

    def make():
        g = _gen(next(seed))
        img = torch.rand(size.image, generator=g, device=DEV).to(dt).requires_grad_(need_img)
        flow = smooth_field(size.flow, dt, g, DISPLACEMENT_VOXELS).requires_grad_(need_flow)
        grad_out = torch.randn(size.image, generator=g, device=DEV).to(dt)
        return img, flow, grad_out

    if pass_ == "fwd":
        prepare = None

        def target(img, flow, grad_out):
            return fn(img, flow)
    else:
        # The forward runs untimed in prepare; only the backward (autograd.grad through the op) is timed.
        def prepare(inputs):
            img, flow, grad_out = inputs
            return fn(img, flow), ((img, flow) if need_img else (flow,)), grad_out

        def target(out, wrt, grad_out):
            return torch.autograd.grad(out, wrt, grad_out)

    bench.run(target, make, prepare=prepare, op=f"warp{size.ndim}d", pass_=pass_, provider=provider,
              shape=shape_str(size.image), dtype=dtype,
              bytes_moved=roofline.warp_bytes(size.image, dtype, pass_))


# ----------------------------------------------------------------------------------------------------------------
# Scaling and squaring
# ----------------------------------------------------------------------------------------------------------------
def _int_dtypes(size: KernelSize) -> tuple[str, ...]:
    return ("float32",)


@pytest.mark.parametrize("size,dtype,provider", _cases(_int_dtypes))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_integrate(bench, size, dtype, provider, pass_):
    _skip_compile_on_gpu(provider, "integrate", size, dtype)
    dt = DTYPES[dtype]
    fn = _op("integrate", provider)
    seed = iter(range(1000))
    grad = pass_ == "fwd+bwd"

    def make():
        g = _gen(next(seed))
        v = smooth_field(size.flow, dt, g, DISPLACEMENT_VOXELS).requires_grad_(grad)
        return v, torch.randn(size.flow, generator=g, device=DEV).to(dt)

    if grad:
        def target(v, grad_out):
            return torch.autograd.grad(fn(v, STEPS), v, grad_out)
    else:
        def target(v, grad_out):
            return fn(v, STEPS)

    bench.run(target, make, op=f"integrate{size.ndim}d", pass_=pass_, provider=provider,
              shape=shape_str(size.flow), dtype=dtype,
              bytes_moved=roofline.integrate_bytes(size.flow, dtype, STEPS, pass_), extra={"steps": STEPS})
