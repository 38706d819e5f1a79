"""What the runtime and the CLIs call: refine a Registrator's result; a Registrator without a network (--model none).

Kept here so that deepsim_rt.runtime only needs a two-line hook.
"""

from __future__ import annotations

import dataclasses

import torch

from deepsim_rt.refine.config import RefineConfig
from deepsim_rt.refine.optimize import model_extractor, refine

__all__ = ["refine_displacement", "NoModelBackend", "no_model_registrator", "NO_MODEL"]

NO_MODEL = "none"


def refine_displacement(registrator, moving: torch.Tensor, fixed: torch.Tensor, displacement: torch.Tensor,
                        config: RefineConfig) -> torch.Tensor:
    """The runtime hook: refine `displacement` (B, ndim, *S) of normalised (B, C, *S) images in the model's warp
    padding; a DeepSim loss without an explicit extractor uses the one bundled with the model. -> (B, ndim, *S)
    float32."""
    if not isinstance(config, RefineConfig):
        raise ValueError(f"refine must be a RefineConfig or None, got {type(config).__name__}")
    cfg = dataclasses.replace(config, padding=registrator.cfg.padding).resolve(registrator.ndim)
    extractor = cfg.extractor if cfg.extractor is not None else model_extractor(registrator.source, cfg.loss)
    if extractor is not None:
        cfg = dataclasses.replace(cfg, extractor=extractor)
    res = refine(moving, fixed, init=None if _is_no_model(registrator) else displacement, config=cfg)
    return res.displacement.float().contiguous()


def _is_no_model(registrator) -> bool:
    return isinstance(registrator.backend, NoModelBackend)


class NoModelBackend:
    """A Registrator backend without a network: the identity (zero displacement); `refine` does the work."""

    name = NO_MODEL

    def __init__(self, ndim: int, device: torch.device, channels: int = 1) -> None:
        from deepsim_rt.export.metadata import ArtifactInfo
        from deepsim_rt.nn.config import NetConfig

        # The tiny preset only supplies the input contract (ndim, channels, padding); no weights are built.
        cfg = NetConfig.make("reg", ndim, "tiny", in_channels=channels)
        self.info = ArtifactInfo(artifact="registration", cfg=cfg, inputs=("moving", "fixed"),
                                 outputs=("warped", "displacement"), extra={"model": NO_MODEL})
        self.device = device

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = moving.new_zeros((moving.shape[0], self.info.cfg.ndim, *moving.shape[2:]))
        return moving, zeros


def no_model_registrator(ndim: int, device: str | torch.device | None = "auto", channels: int = 1):
    """A Registrator for pure optimisation (`--model none`): call its register(..., refine=RefineConfig(...)).
    Without a network there is no training spacing: the images are registered on their own grid as given."""
    from deepsim_rt.runtime import Registrator, _resolve_device

    if ndim not in (2, 3):
        raise ValueError(f"--model none registers 2D or 3D images, got {ndim}D data")

    class NoModelRegistrator(Registrator):
        def network_displacement(self, mov_n, fix_n, spacing=None):
            zeros = mov_n.new_zeros((mov_n.shape[0], ndim, *mov_n.shape[2:]))
            given = None if spacing is None else torch.as_tensor(spacing, dtype=torch.float64).flatten().tolist()
            return mov_n, zeros, {"input_spacing_mm": given,
                                  "model_spacing_mm": None, "input_shape": list(mov_n.shape[2:]),
                                  "network_shape": None, "resampled": False}

    return NoModelRegistrator(NoModelBackend(ndim, _resolve_device(device), channels), source=NO_MODEL)
