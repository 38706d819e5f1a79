"""Safetensors checkpoints with the config stored alongside (in the file's metadata). Loading never unpickles.

File format (`*.safetensors`):
    tensors   the model's state_dict (parameters and BatchNorm buffers)
    metadata  {"format": "deepsim_rt.model", "format_version": "1", "config": NetConfig JSON,
               "deepsim_rt_version": ..., plus any caller-supplied string entries (e.g. "train": JSON)}
Writes go to a temporary file in the same directory, then os.replace: an interrupted save leaves the previous file.
"""

from __future__ import annotations

import hashlib
import json
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


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
