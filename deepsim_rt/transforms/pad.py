"""Padding to a network's spatial multiple and cropping back: shared by the runtime (around the network) and the
refinement (DeepSim feature extractors take sizes that are multiples of 2**stages), so it lives below both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_amounts", "pad_to_multiple", "crop"]


def pad_amounts(spatial: tuple[int, ...], multiple: int) -> tuple[tuple[int, int], ...]:
    """Per spatial axis (before, after) so that size + before + after is the next multiple; split evenly."""
    out = []
    for n in spatial:
        total = (-int(n)) % multiple
        out.append((total // 2, total - total // 2))
    return tuple(out)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate"
                    ) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """Pad (B, C, *S) so every spatial size is a multiple of `multiple`. mode: "replicate" or "zeros".

    Returns (padded tensor, per-axis (before, after) amounts for `crop`). No copy when nothing needs padding.
    """
    if mode not in ("replicate", "zeros"):
        raise ValueError(f"pad mode must be 'replicate' or 'zeros', got {mode!r}")
    pads = pad_amounts(tuple(x.shape[2:]), multiple)
    if not any(b or a for b, a in pads):
        return x, pads
    # F.pad takes the LAST axis first.
    flat = [v for b, a in reversed(pads) for v in (b, a)]
    if mode == "replicate":
        return F.pad(x, flat, mode="replicate"), pads
    return F.pad(x, flat, mode="constant", value=0.0), pads


def crop(x: torch.Tensor, pads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Undo `pad_to_multiple` on (B, C, *S_padded)."""
    index = [slice(None), slice(None)]
    for (b, a), n in zip(pads, x.shape[2:], strict=True):
        index.append(slice(b, n - a))
    return x[tuple(index)]
