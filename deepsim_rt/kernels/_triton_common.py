"""Small helpers shared by the Triton op modules (cosine, warp, integrate).

This module imports Triton at import time; `deepsim_rt.kernels.dispatch` imports the op modules lazily, so a
machine without Triton still imports `deepsim_rt.kernels` and runs the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch", "launch_device", "acc_dtype", "tl_acc", "check_launch_device", "cdiv", "cast_out", "emulate_rtne",
           "declare_writes", "declared_writes", "kernel_name", "triton", "tl"]

# kernel name -> rule(kwargs of one launch, parameter name -> value) -> the parameters that launch writes.
_WRITES: dict = {}


def kernel_name(kernel) -> str:
    """The @triton.jit function's name, for a JITFunction and an interpreter InterpretedFunction alike."""
    return kernel.fn.__name__


def declare_writes(kernel, rule) -> None:
    """Record which pointer parameters `kernel` stores to, as `rule(kw) -> iterable of parameter names` where kw
    maps every parameter name to the launch's value (constexprs included).

    This is the ground truth torch's mutation analysis (what triton_op / torch.compile / AOTInductor use to decide
    what a launch writes) is checked against by `benchmarks/gpu_static.py --mutation-only`: an analyser that misses
    a written buffer lets torch.compile reorder or drop the write, so every version of it must report these.
    """
    _WRITES[kernel_name(kernel)] = rule


def declared_writes(kernel, kw: dict) -> set[str]:
    """The parameters one launch of `kernel` with parameters `kw` writes (KeyError: no declaration)."""
    return set(_WRITES[kernel_name(kernel)](kw))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch `kernel[grid](*args, **kwargs)` through `torch.library.wrap_triton`.

    Inside a `triton_op` body the wrapper lets torch.compile / torch.export record the launch as a traceable
    kernel call; outside tracing it is a plain launch. Torch <= 2.12 refuses to wrap an interpreter kernel
    (TRITON_INTERPRET=1 turns @triton.jit into an InterpretedFunction): then the kernel is launched as is,
    which is all the eager interpreter path needs.
    """
    try:
        runner = torch.library.wrap_triton(kernel)
    except RuntimeError:
        runner = kernel
    device = launch_device(args)
    # Triton launches on the CURRENT device and stream: a tensor on cuda:1 while cuda:0 is current would be read
    # by a kernel running on cuda:0 (an illegal address, or silently wrong with peer access). The guard is entered
    # only when needed: it costs two device switches per launch, and a refinement step launches 26 kernels.
    if device is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            runner[grid](*args, **kwargs)
    else:
        runner[grid](*args, **kwargs)


def launch_device(args) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among `args` (None when none is on CUDA: interpreter / CPU)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 if any input is fp64 (gradcheck), else fp32 (fp32/bf16/fp16 inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_launch_device(name: str, t: torch.Tensor) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the eager test path)."""
    import os

    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    raise ValueError(f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {name} on "
                     f"{t.device}")


def emulate_rtne(kernel, *dtypes: torch.dtype) -> bool:
    """True when `kernel` runs under the interpreter and a bf16 tensor is written: Triton 3.9's interpreter
    TRUNCATES fp32 -> bf16 (even with fp_downcast_rounding="rtne"), GPUs round to nearest even (cvt.rn.bf16.f32).
    The kernels then round by hand so that CI checks the numbers the GPU produces."""
    return type(kernel).__name__ == "InterpretedFunction" and torch.bfloat16 in dtypes


@triton.jit
def cast_out(x, ety: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """x.to(ety), with round-to-nearest-even done in integer ops when EMULATE_RTNE (interpreter + bf16 only)."""
    if EMULATE_RTNE and ety == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 dropped bits
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        out = tl.where(xf != xf, xf.to(tl.bfloat16), out)  # NaN stays NaN
    else:
        out = x.to(ety)
    return out
