"""ChangeDetector: register with any runtime backend, then score the changes alignment cannot explain.

    det = ChangeDetector.load("default-2d")                       # bundled reg + its seg extractor
    det = ChangeDetector.load("runs/reg/model.safetensors", extractor="runs/seg/model.safetensors")
    maps = det.detect(moving, fixed)                               # numpy or torch, (*S), (C, *S) or (B, C, *S)
    maps.semantic, maps.residual, maps.jacobian                    # (B, *S) on the fixed grid, see scores.py

The feature extractor: `extractor` if given; else, for a bundled model, `weights/<name>/seg.safetensors`; else the
`seg.safetensors` beside the model file. The registration runs on the chosen backend (eager, ONNX Runtime, ...);
the extractor runs in PyTorch on the registrator's device (on CUDA the cosine maps come from the Triton kernel).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsim_rt.anomaly.scores import ChangeMaps, change_maps
from deepsim_rt.nn.checkpoint import load_model
from deepsim_rt.nn.intensity import normalize
from deepsim_rt.runtime import BUNDLED_MODELS, Registrator, as_batch, bundled_model_path

__all__ = ["ChangeDetector", "resolve_extractor", "load_extractor"]


def resolve_extractor(model: str | os.PathLike, extractor: str | os.PathLike | None = None) -> Path:
    """The feature extractor file for `model` (see the module docstring); ValueError naming the file to give."""
    if extractor is not None:
        path = Path(extractor)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ValueError(f"--extractor must be an existing feature model .safetensors (from `deepsim-rt "
                             f"train-features`), got {str(extractor)!r}")
        return path
    if isinstance(model, str) and model in BUNDLED_MODELS:
        path = bundled_model_path(model, "seg")
    else:
        path = Path(model).parent / "seg.safetensors"
    if not path.is_file():
        raise ValueError(f"model {str(model)!r} has no feature extractor: expected {str(path)!r}; give --extractor "
                         "PATH, the seg (or ae) feature model .safetensors the registration net was trained with")
    return path


def load_extractor(path: str | os.PathLike, ndim: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a seg / ae feature model (eval mode); ValueError if it is another kind or of another dimensionality."""
    net = load_model(path, map_location=device)
    kind = net.cfg.kind
    if kind not in ("seg", "ae"):
        raise ValueError(f"{str(path)!r} is a {kind!r} model; the extractor must be a seg or ae feature model "
                         "(from `deepsim-rt train-features`)")
    if ndim is not None and net.cfg.ndim != ndim:
        raise ValueError(f"extractor {str(path)!r} is {net.cfg.ndim}D but the registration model is {ndim}D")
    return net


def _batch(name: str, x: Any, ndim: int, channels: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers, got numpy dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    x, _ = as_batch(name, x, ndim, channels)
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values (shape {tuple(x.shape)})")
    return x


class ChangeDetector:
    """A registrator (None: score without registration) + a feature extractor; `detect` returns ChangeMaps."""

    def __init__(self, registrator: Registrator | None, extractor: nn.Module, source: str = "",
                 extractor_source: str = "") -> None:
        ndim = getattr(getattr(extractor, "cfg", None), "ndim", None)
        if registrator is not None and registrator.ndim != ndim:
            raise ValueError(f"extractor is {ndim}D but the registration model is {registrator.ndim}D")
        self.registrator = registrator
        self.extractor = extractor.eval()
        self.source = source
        self.extractor_source = extractor_source

    @classmethod
    def load(cls, model: str | os.PathLike = "default-2d", extractor: str | os.PathLike | None = None,
             backend: str = "auto", device: str | torch.device | None = "auto") -> ChangeDetector:
        """Registrator.load(model, backend, device) + the extractor resolved by `resolve_extractor`."""
        ext_path = resolve_extractor(model, extractor)  # before the (possibly slow) model load: fail early
        reg = Registrator.load(model, backend=backend, device=device)
        ext = load_extractor(ext_path, reg.ndim, device=reg.device if reg.device is not None else "cpu")
        return cls(reg, ext, source=reg.source, extractor_source=str(ext_path))

    @property
    def ndim(self) -> int:
        return self.extractor.cfg.ndim

    @property
    def device(self) -> torch.device:
        return next(self.extractor.parameters()).device

    def detect(self, moving: Any, fixed: Any) -> ChangeMaps:
        """Register `moving` onto `fixed` and score every fixed voxel. Inputs: numpy or torch, spatial (*S),
        (C, *S) or (B, C, *S), same shape. Returns ChangeMaps with batched (B, ...) CPU tensors."""
        nd, ch = self.ndim, self.extractor.cfg.in_channels
        m = _batch("moving", moving, nd, ch)
        f = _batch("fixed", fixed, nd, ch)
        if m.shape != f.shape:
            raise ValueError(f"moving and fixed must have the same shape, got {tuple(m.shape)} and {tuple(f.shape)}")
        padding = "border"
        disp = None
        if self.registrator is not None:
            disp = self.registrator.register(m, f).displacement
            padding = self.registrator.cfg.padding
        dev = self.device
        # The extractor sees images normalized the way it was trained (its config's intensity contract).
        m_n, _, _ = normalize(m.to(dev), self.extractor.cfg.intensity)
        f_n, _, _ = normalize(f.to(dev), self.extractor.cfg.intensity)
        maps = change_maps(self.extractor, m_n, f_n, None if disp is None else disp.to(dev), padding=padding)
        return ChangeMaps(**{k: (tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu())
                             for k, v in vars(maps).items()})
