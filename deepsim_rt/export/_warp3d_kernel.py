"""The Warp3D TensorRT plugin's kernel: `warp_kernel._warp_fwd_kernel` behind TensorRT's AOT argument order.

Imports Triton at import time (like every kernel module); export.trt_plugin imports this lazily, so TRITON_INTERPRET
is decided before the @triton.jit decorator runs. A module-level function, not a closure: the Triton interpreter
(the CPU test path) resolves called kernels through the module's globals.
"""

from __future__ import annotations

from deepsim_rt.kernels.warp_kernel import _warp_fwd_kernel, tl, triton

__all__ = ["warp3d_plugin_kernel"]


@triton.jit
def warp3d_plugin_kernel(img_ptr, flow_ptr, C, D, H, W, out_ptr, BORDER: tl.constexpr, NEAREST: tl.constexpr,
                         ADD_SELF: tl.constexpr, BLOCK: tl.constexpr):
    # TensorRT's AOT launch order is (inputs, extra int32 scalars, outputs); the strides of the contiguous
    # (B, C, D, H, W) image and (B, 3, D, H, W) flow follow from the sizes (innermost stride 1).
    N = D * H * W
    _warp_fwd_kernel(img_ptr, flow_ptr, out_ptr, C, D, H, W,
                     C * N, N, H * W, W, 1,
                     3 * N, N, H * W, W, 1,
                     3, BORDER, NEAREST, ADD_SELF, tl.float32, BLOCK, False)
