"""Roofline arithmetic: the fewest bytes each benchmarked op must move through memory, and its FLOPs.

Rule (../.library/device/METHOD.md, "two numbers first"): every input tensor is read once and every output tensor
is written once, at its own dtype. Nothing is counted for caches helping or for re-reads an implementation chooses
to do; a kernel that moves more than this pays for it in "% of roofline". Time floor = bytes / copy bandwidth,
where the copy bandwidth is measured in the same session and counts bytes read plus bytes written, exactly as these
byte counts do. "% of roofline" = floor / measured time = achieved GB/s / copy GB/s.

Passes are counted as the autograd calls run them, because that is how a training step runs them:
  fwd        inputs -> outputs
  bwd        grad_output + the forward inputs the gradient needs -> the requested gradients
  fwd+bwd    fwd + bwd (the forward output is not re-read; the backward recomputes from the inputs)

Shapes are tuples of ints; dtypes are torch dtypes or their names ("float32", "bfloat16", ...). This module
imports no torch at import time, so tests and the report can use it on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

__all__ = [
    "itemsize",
    "tensor_bytes",
    "copy_bytes",
    "cosine_bytes",
    "cosine_flops",
    "warp_bytes",
    "integrate_bytes",
    "PASSES_COSINE",
    "PASSES_WARP",
    "PASSES_INTEGRATE",
]

_ITEMSIZE = {
    "float64": 8, "double": 8,
    "float32": 4, "float": 4,
    "bfloat16": 2, "float16": 2, "half": 2,
    "int64": 8, "int32": 4, "uint8": 1, "int8": 1, "bool": 1,
}

PASSES_COSINE = ("fwd", "bwd", "fwd+bwd")
PASSES_WARP = ("fwd", "bwd_flow", "bwd_both", "fwd+bwd_flow", "fwd+bwd_both")
PASSES_INTEGRATE = ("fwd", "bwd", "fwd+bwd")


def itemsize(dtype) -> int:
    """Bytes per element of a torch dtype or dtype name ("torch.float32", "float32", "bf16" not accepted)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_ITEMSIZE)}")
    return _ITEMSIZE[name]


def tensor_bytes(shape: Sequence[int], dtype) -> int:
    """Bytes of one dense tensor of `shape` and `dtype` (a 0-dim tensor is one element)."""
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"negative size in shape {tuple(shape)}")
    return prod(int(s) for s in shape) * itemsize(dtype)


def copy_bytes(numel: int, dtype) -> int:
    """A device-to-device copy of `numel` elements: read once + write once (the bandwidth reference)."""
    return 2 * int(numel) * itemsize(dtype)


def _check_pass(pass_: str, allowed: tuple[str, ...]) -> None:
    if pass_ not in allowed:
        raise ValueError(f"pass must be one of {allowed}, got {pass_!r}")


def _acc(dtype) -> str:
    """The cosine's output dtype: fp64 for fp64 features, else fp32 (fp32 accumulation for fp32/bf16/fp16)."""
    return "float64" if itemsize(dtype) == 8 else "float32"


# ----------------------------------------------------------------------------------------------------------------
# Multi-layer cosine (DeepSim): levels (B, C_l, *S_l) for a and b
# ----------------------------------------------------------------------------------------------------------------
def cosine_bytes(levels: Sequence[Sequence[int]], dtype, pass_: str = "fwd", *, reduction: str = "mean",
                 grad_b: bool = False) -> int:
    """Minimum bytes of `multilayer_cosine` over feature levels `levels` (each (B, C_l, *S_l), same for a and b).

    fwd:  read a_l and b_l for every level; write the output: a 0-dim scalar (reduction "mean") or one
          (B, *S_l) map per level ("none"), in fp32 (fp64 for fp64 features).
    bwd:  read grad_output (the scalar, or the maps for "none"), a_l and b_l; write grad_a_l (and grad_b_l when
          grad_b: registration training needs only grad_a, the fixed image's features are data).
    """
    _check_pass(pass_, PASSES_COSINE)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if len(levels) == 0:
        raise ValueError("cosine_bytes needs at least one level")
    feats = sum(tensor_bytes(s, dtype) for s in levels)  # one side (a or b), all levels
    acc = _acc(dtype)
    if reduction == "mean":
        out = tensor_bytes((), acc)
    else:
        out = sum(tensor_bytes((s[0], *s[2:]), acc) for s in levels)
    fwd = 2 * feats + out
    bwd = out + 2 * feats + feats * (2 if grad_b else 1)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def cosine_flops(levels: Sequence[Sequence[int]], pass_: str = "fwd", *, grad_b: bool = False) -> int:
    """Arithmetic of the cosine, counted as multiply-adds x 2 over the channel elements (per-pixel sqrt/div and
    the level means are O(pixels) and left out).

    fwd: a.b, a.a, b.b -> 3 FMAs = 6 FLOPs per channel element.
    bwd: the same three dot products again (norms are recomputed, not stored) + grad_a = s*(b - k*a): 2 FMAs per
         element per requested gradient (4 FLOPs).
    """
    _check_pass(pass_, PASSES_COSINE)
    elems = sum(prod(int(x) for x in s) for s in levels)
    fwd = 6 * elems
    bwd = 6 * elems + 4 * elems * (2 if grad_b else 1)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ----------------------------------------------------------------------------------------------------------------
# Warp: image (B, C, *S), flow (B, ndim, *S)
# ----------------------------------------------------------------------------------------------------------------
def warp_bytes(image_shape: Sequence[int], dtype, pass_: str = "fwd", *, flow_dtype=None) -> int:
    """Minimum bytes of `warp(image, flow)`; flow is (B, ndim, *S) with ndim = len(image_shape) - 2.

    fwd:       read image and flow, write out (image's shape and dtype). The gather reads image voxels in a
               data-dependent order, but each at least once.
    bwd_flow:  read grad_out, image and flow; write grad_flow (registration training: the moving image is data).
    bwd_both:  the same reads; write grad_flow and grad_image.
    fwd+bwd_*: fwd + the backward.
    """
    _check_pass(pass_, PASSES_WARP)
    if len(image_shape) not in (4, 5):
        raise ValueError(f"image shape must be (B, C, H, W) or (B, C, D, H, W), got {tuple(image_shape)}")
    flow_dtype = dtype if flow_dtype is None else flow_dtype
    b, _, *spatial = image_shape
    img = tensor_bytes(image_shape, dtype)
    flow = tensor_bytes((b, len(spatial), *spatial), flow_dtype)
    fwd = img + flow + img
    bwd_flow = img + img + flow + flow  # grad_out, image, flow in; grad_flow out
    bwd_both = bwd_flow + img           # + grad_image out
    return {
        "fwd": fwd,
        "bwd_flow": bwd_flow,
        "bwd_both": bwd_both,
        "fwd+bwd_flow": fwd + bwd_flow,
        "fwd+bwd_both": fwd + bwd_both,
    }[pass_]


# ----------------------------------------------------------------------------------------------------------------
# Scaling and squaring: velocity (B, ndim, *S), `steps` squarings
# ----------------------------------------------------------------------------------------------------------------
def integrate_bytes(field_shape: Sequence[int], dtype, steps: int, pass_: str = "fwd") -> int:
    """Minimum bytes of `integrate(v, steps)` for a field (B, ndim, *S).

    A squaring u_{k+1} = u_k + u_k o (id + u_k) gathers u_k at data-dependent points anywhere in the volume, so
    every voxel of u_k must be final before any voxel of u_{k+1} is computed: the steps cannot be fused into one
    pass. The floor is therefore per step, not per op:
      fwd:  each step reads its field once and writes the next once: steps x 2 fields (the first step reads v and
            applies the 1/2**steps scale on the fly; no separate scaling pass is counted).
      bwd:  each step reads the incoming gradient and u_k (saved by the forward or recomputed) and writes the
            outgoing gradient: steps x 3 fields.
    steps = 0 is the identity: 0 bytes.
    """
    _check_pass(pass_, PASSES_INTEGRATE)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if len(field_shape) not in (4, 5) or field_shape[1] != len(field_shape) - 2:
        raise ValueError(f"field shape must be (B, ndim, *S) with ndim = number of spatial dims, got "
                         f"{tuple(field_shape)}")
    field = tensor_bytes(field_shape, dtype)
    fwd = steps * 2 * field
    bwd = steps * 3 * field
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]
