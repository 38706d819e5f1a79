"""The uniform similarity interface every registration loss implements.

    loss = sim(warped, fixed, warped_seg=None, fixed_seg=None)     # 0-dim tensor, lower is better

- warped, fixed: float (B, C, *spatial) images, same shape; `warped` is the moving image already warped by the
  current displacement (the caller warps; gradients flow back through `warped`).
- warped_seg, fixed_seg: only read when `sim.needs_labels` is True (NCC_sup): float one-hot / soft label maps
  (B, K, *spatial); `warped_seg` is the moving one-hot map warped with LINEAR interpolation (see `one_hot`).
  Similarities that do not need labels ignore them, so a training loop can always pass whatever it has.
- `sim.name` is the registry name ("mse", "ncc", ...), `sim.needs_labels` tells the loop whether it must provide
  label maps. Total registration loss = sim + lambda * diffusion_regularizer(u) (see PAPER_LAMBDAS).
"""

from __future__ import annotations

import torch
from torch import nn


class Similarity(nn.Module):
    """Base class: subclasses set `name` / `needs_labels` and implement `forward` with the signature below."""

    name: str = ""
    needs_labels: bool = False

    def forward(  # pragma: no cover - abstract
        self,
        warped: torch.Tensor,
        fixed: torch.Tensor,
        warped_seg: torch.Tensor | None = None,
        fixed_seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, needs_labels={self.needs_labels}"
