"""A stand-in Triton driver: compile for a named GPU target on a machine without one (the static GPU gate).

Triton asks `triton.runtime.driver.active` for the target, the current device and the current stream before it
compiles; with this driver active, `kernel.warmup(*args, grid=..., **kwargs)` specialises the arguments exactly as
a real launch would (an int equal to 1 becomes a constexpr, ints and pointers divisible by 16 are marked so) and
compiles TTIR -> TTGIR -> LLVM -> PTX -> cubin for `GPUTarget("cuda", arch, 32)` with the wheel's own ptxas.
Nothing is ever launched: `capture_launches` routes the kernel modules' `launch` helper to `warmup`.

CPU tensors stand in for CUDA tensors: CPU allocations are 64-byte aligned (CUDA's 256), so a tensor's pointer
specialises the same way (divisible by 16), and a view at an element offset the same way as on the GPU.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

__all__ = ["StandInDriver", "stand_in_target", "capture_launches", "KERNEL_MODULES"]

# Every module that launches through `_triton_common.launch` or checks devices with `check_launch_device`:
# capture_launches patches those names in each.
KERNEL_MODULES = ("deepsim_rt.kernels.cosine", "deepsim_rt.kernels.warp_kernel", "deepsim_rt.kernels.integrate_kernel")


class StandInDriver(DriverBase):
    """Reports `target` (no GPU needed); device 0, stream 0. Good for compiling, never for launching."""

    def __init__(self, target: GPUTarget) -> None:
        super().__init__()
        self.target = target

    @classmethod
    def is_active(cls) -> bool:  # never picked by Triton's own driver discovery
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return divmod(self.target.arch, 10)

    def get_benchmarker(self):
        raise NotImplementedError("the stand-in driver compiles only; nothing can be timed")


@contextlib.contextmanager
def stand_in_target(arch: int) -> Iterator[StandInDriver]:
    """Make Triton compile for sm_`arch` (e.g. 90, 80) inside the block; the previous driver comes back after."""
    previous = driver._active
    stand_in = StandInDriver(GPUTarget("cuda", arch, 32))
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver._active = previous


@contextlib.contextmanager
def capture_launches(on_launch: Callable) -> Iterator[None]:
    """Inside the block every kernel launch of the deepsim_rt launchers calls `on_launch(kernel, grid, args,
    kwargs)` instead (no launch), and the launchers accept CPU tensors in place of CUDA ones."""
    from deepsim_rt.kernels import _triton_common

    mods = [importlib.import_module(m) for m in KERNEL_MODULES]
    saved = []
    reals = {"launch": _triton_common.launch, "check_launch_device": _triton_common.check_launch_device}
    for mod in mods:
        for name, real in reals.items():
            if name not in vars(mod):
                continue
            if vars(mod)[name] is not real:
                raise RuntimeError(f"{mod.__name__}.{name} is not _triton_common.{name}: the gate would miss launches")
            saved.append((mod, name, real))
        if "launch" in vars(mod):
            mod.launch = lambda kernel, grid, *args, **kwargs: on_launch(kernel, grid, args, kwargs)
        if "check_launch_device" in vars(mod):
            mod.check_launch_device = lambda name, t: None
    try:
        yield
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)
