"""The training loop shared by feature and registration training.

A job (features.FeatureJob, registration.RegistrationJob) supplies the model, batches, loss and validation; this
module owns the rest: seeding, DistributedDataParallel under torchrun, Adam + ReduceLROnPlateau, the progress bar
with the running loss (rank 0), periodic validation, resumable atomic checkpoints, and the final model file.

Outputs in cfg.out:
    checkpoint.safetensors   resumable state (deepsim_rt.train.state), replaced atomically
    model.safetensors        the trained model (deepsim_rt.nn.save_model; metadata "train" = config + last metrics,
                             "spacing_mm" / "train_grid" = the data's voxel spacing and grid, when known)
    model_step<N>.safetensors  with keep_models: the model at each validation (same metadata, "train" = that record)
    history.json             validation records [{step, lr, loss, dice, ...}]
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from deepsim_rt.nn import atomic_write, load_model, save_model
from deepsim_rt.nn.checkpoint import scale_metadata
from deepsim_rt.train.data import EpochBatches
from deepsim_rt.train.distributed import DistInfo, setup_distributed, sync_batchnorm, teardown_distributed
from deepsim_rt.train.state import load_train_state, save_train_state

__all__ = ["Job", "run_job", "CHECKPOINT_NAME", "MODEL_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"


class Job(Protocol):
    cfg: object
    name: str

    def setup(self, info: DistInfo) -> None: ...
    def build_model(self) -> torch.nn.Module: ...
    def num_items(self) -> int: ...
    def make_batch(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]: ...
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def validate(self, model: torch.nn.Module, info: DistInfo) -> dict[str, float]: ...


def _check_resumable(saved: dict, cfg) -> None:
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now
            if k not in cfg.RESUMABLE_CHANGES and saved.get(k) != now[k]}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume: the checkpoint was trained with different settings ({shown})")


def _scale(job: Job) -> dict[str, str]:
    """spacing_mm / train_grid metadata of the job's DataSource (the scale the model learned at), when known, and
    "synthesis" (JSON) for data rendered by deepsim_rt.data.synth."""
    source = getattr(job, "source", None)
    out = scale_metadata(getattr(source, "spacing", None), getattr(source, "shape", None))
    recipe = getattr(source, "recipe", None)
    if recipe:  # synthesis sources: the generative model's settings and label maps (the recipe of the weights)
        out["synthesis"] = json.dumps(recipe, sort_keys=True)
    return out


def _init_from(model: torch.nn.Module, path: str) -> None:
    """Copy the weights of the model file `path` into `model`: same kind, ndim and tensor shapes (dropout and the
    training scale may differ, e.g. a 4 mm net starting 2 mm training)."""
    src = load_model(path)
    a, b = src.cfg, model.cfg
    if (a.kind, a.ndim) != (b.kind, b.ndim):
        raise ValueError(f"--init {path!r} is a {a.ndim}D {a.kind} model, this run trains a {b.ndim}D {b.kind} model")
    theirs, mine = src.state_dict(), model.state_dict()
    bad = sorted(k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape)
    if bad or set(theirs) - set(mine):
        raise ValueError(f"--init {path!r} has other layers or widths than this run's {model.cfg.kind} net "
                         f"(first mismatches: {(bad or sorted(set(theirs) - set(mine)))[:3]})")
    model.load_state_dict(theirs, strict=True)


def run_job(job: Job) -> dict:
    """Train `job` to cfg.steps (resuming if asked); returns a summary dict (rank 0 writes the files)."""
    cfg = job.cfg
    info = setup_distributed()
    try:
        return _run(job, cfg, info)
    finally:
        teardown_distributed(info)


def _run(job: Job, cfg, info: DistInfo) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    job.setup(info)
    torch.manual_seed(cfg.seed)  # identical initialization on every rank (DDP broadcasts rank 0's anyway)
    model = job.build_model().to(info.device)
    if cfg.init:
        _init_from(model, cfg.init)
    if info.distributed:
        sync_batchnorm(model)  # BatchNorm statistics over the global batch: same result as one process
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    start, history = 0, []
    if ckpt_path.exists() and not cfg.resume:
        raise ValueError(f"{str(ckpt_path)!r} exists: pass --resume to continue that run, or choose another --out")
    if cfg.resume and ckpt_path.exists():
        state = load_train_state(ckpt_path)
        _check_resumable(state.train_config, cfg)
        if state.net_config != model.cfg:
            raise ValueError(f"cannot resume: checkpoint model config {state.net_config} != {model.cfg}")
        model.load_state_dict(state.model_state, strict=True)
        optimizer.load_state_dict(state.optimizer_state)
        scheduler.load_state_dict(state.scheduler_state)
        torch.set_rng_state(state.rng_state)
        start, history = state.step, list(state.history)
        if start > cfg.steps:
            raise ValueError(f"the checkpoint is at step {start}, beyond --steps {cfg.steps}")
    if info.rank > 0:
        # Dropout masks differ between ranks (rank 0 keeps the single-process stream, so resume is exact there).
        torch.manual_seed(cfg.seed * 7919 + info.rank * 104729 + start)
    ddp = model
    if info.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if info.device.type == "cpu"
                                                        else [info.device.index])
    batches = EpochBatches(job.num_items(), cfg.batch_size, info.world, info.rank, cfg.seed)

    bar = tqdm(total=cfg.steps, initial=start, desc=job.name, disable=not (info.is_main and cfg.progress),
               dynamic_ncols=True, leave=True)
    running = None
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        epoch, k = batches.locate(step)
        batch = job.make_batch(batches.batch(epoch, k), epoch)
        ddp.train()
        loss = job.loss(ddp, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}", refresh=False)
        bar.update(1)
        done = step + 1
        if done % cfg.val_every == 0 or done == cfg.steps:
            model.eval()
            with torch.no_grad():
                val = job.validate(model, info)
            scheduler.step(val["loss"])
            record = {"step": done, "lr": optimizer.param_groups[0]["lr"], "train_loss": running, **val}
            history.append(record)
            if info.is_main:
                shown = " ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float))
                bar.write(f"[{job.name}] step {done}/{cfg.steps} running_loss={running:.4f} val: {shown}")
                if getattr(cfg, "keep_models", False):
                    save_model(out / f"model_step{done}.safetensors", model,
                               extra={"train": json.dumps({"validation": record, "config": dataclasses.asdict(cfg)},
                                                          sort_keys=True), **_scale(job)})
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if info.is_main:
                save_train_state(ckpt_path, done, model, optimizer, scheduler, dataclasses.asdict(cfg), history)
            if info.distributed:
                torch.distributed.barrier()
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {"job": job.name, "steps": cfg.steps, "resumed_from": start, "seconds": seconds,
               "last_validation": history[-1] if history else None, "config": dataclasses.asdict(cfg)}
    if info.is_main:
        extra = {"train": json.dumps(summary, sort_keys=True), **_scale(job)}
        save_model(out / MODEL_NAME, model, extra=extra)
        text = json.dumps(history, indent=1)
        atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(text))
    summary["model"] = str(out / MODEL_NAME)
    return summary
