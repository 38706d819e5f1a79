"""Boundary checks shared by every public function: violations raise ValueError naming expected vs got.

Checks that read tensor data (NaN scans) are skipped while torch.compile / torch.export trace, because fake
tensors have no data and the check would break the graph; the eager call path still runs them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MODES = ("linear", "nearest")
PADDINGS = ("border", "zeros")


def is_tracing() -> bool:
    """True while torch.compile, torch.export, torch.jit or ONNX export is tracing the caller."""
    if torch.compiler.is_compiling():
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:  # pragma: no cover - older torch
        return False


def check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: torch.Tensor) -> torch.Tensor:
    check_tensor(name, x)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_spatial_ndim(name: str, x: torch.Tensor, allowed: tuple[int, ...] = (2, 3)) -> int:
    """x is (B, C, *spatial); returns the number of spatial dims, which must be in `allowed`."""
    check_tensor(name, x)
    nsp = x.dim() - 2
    if nsp not in allowed:
        want = " or ".join(f"{n + 2}D (B, C, {'D, H, W' if n == 3 else 'H, W'})" for n in allowed)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)} ({x.dim()}D)")
    return nsp


def check_not_empty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if x holds NaN (skipped under tracing: no data there). Inf is allowed only if not NaN-producing."""
    if is_tracing() or not x.is_floating_point():
        return
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN (shape {tuple(x.shape)}); it would silently poison the result")


def check_same_device(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got {a.device} and {b.device}")


def check_displacement(name: str, u: object) -> int:
    """u must be a float (B, ndim, *spatial) field, ndim in (2, 3), channels == ndim, no NaN; returns ndim."""
    check_tensor(name, u)
    nsp = check_spatial_ndim(name, u)
    check_float(name, u)
    if u.shape[1] != nsp:
        raise ValueError(f"{name} must have {nsp} channels (one per spatial axis of a {nsp}D field), got "
                         f"{u.shape[1]} (shape {tuple(u.shape)})")
    check_not_empty(name, u)
    check_finite(name, u)
    return nsp
