"""Resumable training checkpoints: one safetensors file, written atomically (temp file, then rename). No pickle.

File `checkpoint.safetensors`:
    tensors   "model/<key>"          the model's state_dict
              "optim/<i>/<name>"     Adam state tensors of parameter i (exp_avg, exp_avg_sq, step)
              "rng/torch"            the global torch RNG state (dropout masks continue where they stopped)
    metadata  format "deepsim_rt.train_state", format_version "1", net_config (NetConfig JSON), train_config (JSON),
              step, optimizer (param_groups JSON without the parameters), scheduler (ReduceLROnPlateau state JSON),
              history (validation records JSON)
Because the file is replaced in one rename, an interrupted run leaves the previous complete checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deepsim_rt.nn import NetConfig, atomic_write

__all__ = ["TrainState", "save_train_state", "load_train_state", "FORMAT"]

FORMAT = "deepsim_rt.train_state"
FORMAT_VERSION = "1"


def _json_safe(x):
    """ReduceLROnPlateau keeps +-inf in `best`; JSON has no inf: store it as a string."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _json_restore(x):
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        return {k: _json_restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_restore(v) for v in x]
    return x


@dataclass
class TrainState:
    """Everything a run needs to continue: step count, model/optimizer/scheduler state, RNG, history."""

    step: int
    net_config: NetConfig
    train_config: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    rng_state: torch.Tensor
    history: list[dict]


def save_train_state(path: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, train_config: dict, history: list[dict]) -> Path:
    """Write the checkpoint atomically; returns its path. `model` is the bare model (not the DDP wrapper)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if not isinstance(val, torch.Tensor):
                val = torch.tensor(val)
            tensors[f"optim/{pid}/{name}"] = val.detach().cpu().contiguous().clone()
    tensors["rng/torch"] = torch.get_rng_state().clone()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "net_config": model.cfg.to_json(),
        "train_config": json.dumps(train_config, sort_keys=True),
        "step": str(int(step)),
        "optimizer": json.dumps(_json_safe(opt["param_groups"])),
        "scheduler": json.dumps(_json_safe(scheduler.state_dict())),
        "history": json.dumps(_json_safe(history)),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_train_state(path: str | Path) -> TrainState:
    """Read a checkpoint written by `save_train_state`; ValueError if it is missing, corrupt or not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training checkpoint not found: {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"not a deepsim_rt training checkpoint (format {meta.get('format')!r} version "
                                 f"{meta.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION!r})")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable training checkpoint: {exc}") from exc
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    return TrainState(
        step=int(meta["step"]),
        net_config=NetConfig.from_json(meta["net_config"]),
        train_config=json.loads(meta["train_config"]),
        model_state=model_state,
        optimizer_state={"state": opt_state, "param_groups": _json_restore(json.loads(meta["optimizer"]))},
        scheduler_state=_json_restore(json.loads(meta["scheduler"])),
        rng_state=tensors["rng/torch"],
        history=_json_restore(json.loads(meta["history"])),
    )
