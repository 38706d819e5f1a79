"""Safetensors checkpoints with the config stored alongside (in the file's metadata). Loading never unpickles.

File format (`*.safetensors`):
    tensors   the model's state_dict (parameters and BatchNorm buffers)
    metadata  {"format": "deepsim_rt.model", "format_version": "1", "config": NetConfig JSON,
               "deepsim_rt_version": ..., plus any caller-supplied string entries (e.g. "train": JSON)}
    optional  "spacing_mm": JSON list of floats, the voxel spacing (mm) of the training data, one per spatial axis
              in TENSOR order (e.g. "[2.0, 2.0, 2.0]"); "train_grid": JSON list of ints, the spatial shape of the
              training data in tensor order (e.g. "[80, 96, 80]"). Written by training (`scale_metadata`), read by
              `read_spacing` / `read_train_grid` / `read_scale`; files from before these keys read as None.
Writes go to a temporary file in the same directory, then os.replace: an interrupted save leaves the previous file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepsim_rt import __version__
from deepsim_rt._io import atomic_write
from deepsim_rt.nn.config import NetConfig
from deepsim_rt.nn.unet import build_model

FORMAT = "deepsim_rt.model"
FORMAT_VERSION = "1"
SPACING_KEY = "spacing_mm"
GRID_KEY = "train_grid"


def save_model(path: str | os.PathLike, model: torch.nn.Module, extra: dict[str, str] | None = None) -> Path:
    """Save `model` (which has a `.cfg: NetConfig`) to `path` (.safetensors) atomically."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, NetConfig):
        raise ValueError(f"save_model needs a deepsim_rt model with a NetConfig `.cfg`, got {type(model).__name__}")
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_json(),
            "deepsim_rt_version": __version__}
    for key, value in (extra or {}).items():
        if key in meta or not isinstance(value, str):
            raise ValueError(f"extra metadata must be new string entries, got {key!r}: {type(value).__name__}")
        meta[key] = value
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata dict of a checkpoint; ValueError if the file is missing, corrupt or not ours."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {str(path)!r}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a valid safetensors checkpoint: {exc}") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a deepsim_rt model checkpoint (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint format version {meta.get('format_version')!r}; this "
                         f"deepsim_rt reads version {FORMAT_VERSION!r}")
    return meta


def load_config(path: str | os.PathLike) -> NetConfig:
    return NetConfig.from_json(read_metadata(path)["config"])


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model from the config in the checkpoint and load its weights strictly. Returns it in eval mode."""
    meta = read_metadata(path)
    cfg = NetConfig.from_json(meta["config"])
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r}: cannot read the tensors: {exc}") from exc
    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match its config ({cfg.kind}, {cfg.ndim}D): missing {missing[:5]}"
                         f", unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{str(path)!r}: tensor {key!r} has shape {tuple(tensor.shape)}, the config expects "
                             f"{tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            # say it here: otherwise the first symptom is a NaN flow far from the cause
            raise ValueError(f"{str(path)!r}: weight {key!r} contains NaN or Inf values (a diverged or damaged "
                             "checkpoint)")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _check_scale(spacing, grid, ndim: int | None = None) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
    """Validate (spacing mm, grid) as tuples of one entry per spatial axis; either may be None."""
    sp = gr = None
    if spacing is not None:
        if not isinstance(spacing, list | tuple) or not spacing or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0
                for v in spacing):
            raise ValueError(f"spacing_mm must be a non-empty list of finite numbers > 0 (mm), got {spacing!r}")
        sp = tuple(float(v) for v in spacing)
    if grid is not None:
        if not isinstance(grid, list | tuple) or not grid or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid):
            raise ValueError(f"train_grid must be a non-empty list of ints >= 1, got {grid!r}")
        gr = tuple(int(v) for v in grid)
    for name, val in (("spacing_mm", sp), ("train_grid", gr)):
        if val is not None and ndim is not None and len(val) != ndim:
            raise ValueError(f"{name} must have one entry per spatial axis ({ndim}), got {list(val)}")
    if sp is not None and gr is not None and len(sp) != len(gr):
        raise ValueError(f"spacing_mm {list(sp)} and train_grid {list(gr)} have different lengths")
    return sp, gr


def scale_metadata(spacing=None, grid=None) -> dict[str, str]:
    """The metadata entries recording the training scale, for `save_model(..., extra=...)`.

    spacing: voxel spacing in mm per spatial axis (tensor order) or None (unknown: no entry);
    grid: training spatial shape (tensor order) or None. Returns {"spacing_mm": "[...]", "train_grid": "[...]"}
    (only the known ones). ValueError for non-positive / non-finite spacings, non-int sizes or mismatched lengths.
    """
    sp, gr = _check_scale(spacing, grid)
    out = {}
    if sp is not None:
        out[SPACING_KEY] = json.dumps(list(sp))
    if gr is not None:
        out[GRID_KEY] = json.dumps(list(gr))
    return out


def read_scale(path: str | os.PathLike) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
    """(spacing_mm, train_grid) recorded in a checkpoint, each a tuple per spatial axis in tensor order, or None
    when the file predates these keys. ValueError if an entry is present but malformed or its length is not the
    model's ndim (and for a missing / foreign file, as `read_metadata`)."""
    meta = read_metadata(path)
    ndim = NetConfig.from_json(meta["config"]).ndim
    raw = {}
    for key in (SPACING_KEY, GRID_KEY):
        if key in meta:
            try:
                raw[key] = json.loads(meta[key])
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r}: metadata {key!r} is not JSON: {meta[key][:40]!r}") from exc
    try:
        return _check_scale(raw.get(SPACING_KEY), raw.get(GRID_KEY), ndim)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None


def read_spacing(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The voxel spacing (mm per spatial axis, tensor order) the model was trained at; None for older files."""
    return read_scale(path)[0]


def read_train_grid(path: str | os.PathLike) -> tuple[int, ...] | None:
    """The spatial shape (tensor order) of the model's training data; None for older files."""
    return read_scale(path)[1]


def update_metadata(path: str | os.PathLike, entries: dict[str, str], out: str | os.PathLike) -> Path:
    """Write `path`'s tensors unchanged with its metadata updated by `entries` (string values; the format keys and
    "config" cannot be changed) to `out` atomically (out may equal path). E.g. adding `scale_metadata(...)` to a
    checkpoint trained before those keys existed, without touching its weights."""
    meta = read_metadata(path)
    for key, value in entries.items():
        if key in ("format", "format_version", "config") or not isinstance(value, str):
            raise ValueError(f"metadata updates must be string entries other than format/config, got {key!r}: "
                             f"{type(value).__name__}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r}: cannot read the tensors: {exc}") from exc
    new = {**meta, **entries}
    if not str(out).endswith(".safetensors"):
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(out)!r}")
    return atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=new))
