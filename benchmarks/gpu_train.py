"""make gpu-train: the 3D seg feature extractor + the DeepSim_seg registration net at the paper widths on the 2 mm
synthetic data, in <= 7 minutes on one H100/H200; selection on validation Dice, scores on the test pairs.

    python -m benchmarks.gpu_train                      # GPU machine: results under $OUT (else runs/gpu_train/)
    python -m benchmarks.gpu_train --smoke --out DIR    # CPU smoke: tiny-3d data, tiny nets, a few steps
    python -m benchmarks.gpu_train --recipe synth-3d    # brains synthesized from label maps (issue 19), see below
    make gpu-train RECIPE=synth-3d

Recipes (--recipe): "default-3d-2mm" (the default): seg + DeepSim_seg on the bundled synthetic data (one template
under smooth warps, T1 only). "synth-3d": seg + DeepSim_seg + NCC registration nets on brains synthesized from label
maps (deepsim_rt.data.synth preset synth-3d, 80 x 96 x 80 at 2 mm, any contrast; pairs share an affine up to a small
residual), each registration loss at its DEFAULT_LAMBDAS weight, the same steps and budget for both; the recipe is
recorded in every checkpoint's metadata by deepsim_rt.train. The synthesis renders each subject on the CPU (~1 s
per 80 x 96 x 80 subject on one core of the CPU machine), so a GPU run is bounded by the host's rendering too.

Everything goes through deepsim_rt.train (train_features / train_registration jobs, resumed chunk by chunk) and
deepsim_rt.evaluate (evaluate_pairs / summarize); this script only schedules them under a wall-clock budget:
each phase trains in chunks of `val_every` steps (one validation + a kept model per chunk) and stops at its step
count or when the next chunk would overrun the phase's time budget (the last chunk's time as the estimate).
The model of the validation with the best Dice is selected and copied out.

Written to the output folder (<= 8 files, each <= 16 MiB: what a lent GPU machine sends back):
  seg.safetensors        selected feature extractor (kind seg)
  reg.safetensors        selected DeepSim_seg registration net (kind reg)
  reg_ncc.safetensors    (synth-3d) selected NCC registration net (kind reg)
  gpu_train.json         configs, per-validation history, the selections, test-pair summaries (identity vs
                         trained net), timings, device, versions
Training folders (checkpoints, every kept model) stay in a work folder beside it (--work, default a temp dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

MAX_FILE_BYTES = 16 * 2**20
# Phase budgets (s) of the 7-minute target: data generation + startup ~40, seg 120, reg 190, test pairs ~40.
DEFAULTS = {"data": "default-3d-2mm", "preset": "paper", "seg_steps": 2000, "reg_steps": 2000, "val_every": 200,
            "batch_size": 2, "seg_budget_s": 120.0, "reg_budget_s": 190.0}
SMOKE = {"data": "tiny-3d", "preset": "tiny", "seg_steps": 4, "reg_steps": 4, "val_every": 2, "batch_size": 2,
         "seg_budget_s": 600.0, "reg_budget_s": 600.0}
# synth-3d: 7 minutes = startup ~30 s + seg 110 + DeepSim_seg 120 + NCC 120 (the same budget and steps for both
# losses) + 8 test pairs ~40 (rendered on the host). The budgets, not the step counts, stop the phases on a GPU.
SYNTH_DEFAULTS = {"data": "synth-3d", "preset": "paper", "seg_steps": 2000, "reg_steps": 2000, "val_every": 100,
                  "batch_size": 2, "seg_budget_s": 110.0, "reg_budget_s": 120.0}
# The smoke renders 3D brains at 4 mm (40 x 48 x 40: 8x fewer voxels than synth-3d) through a preset that only
# the smoke registers (SMOKE_SYNTH_PRESET), so that the CPU test checks the same schedule in seconds.
SMOKE_SYNTH_PRESET = "synth-smoke-3d"
SYNTH_SMOKE = {"data": SMOKE_SYNTH_PRESET, "preset": "tiny", "seg_steps": 4, "reg_steps": 4, "val_every": 2,
               "batch_size": 2, "seg_budget_s": 600.0, "reg_budget_s": 600.0}
RECIPES = {"default-3d-2mm": (DEFAULTS, SMOKE, ("deepsim_seg",)),
           "synth-3d": (SYNTH_DEFAULTS, SYNTH_SMOKE, ("deepsim_seg", "ncc"))}
# Output file of each registration loss's selected net.
REG_FILES = {"deepsim_seg": "reg.safetensors", "ncc": "reg_ncc.safetensors"}


def data_name(preferred: str) -> str:
    """The 2 mm preset if this checkout has it, else default-3d (4 mm): then the note in the JSON says so.
    A synthesis preset (deepsim_rt.data.synth.SYNTH_PRESETS) is returned as it is."""
    from deepsim_rt.data.synth import SYNTH_PRESETS
    from deepsim_rt.data.synthetic import PRESETS

    return preferred if preferred in PRESETS or preferred in SYNTH_PRESETS else "default-3d"


def register_smoke_synth_preset() -> None:
    """Add SMOKE_SYNTH_PRESET (synth-3d at 4 mm, 8 train / 2 val / 2 test subjects) to SYNTH_PRESETS of this process
    (the trainer opens data by name). Only --smoke calls it; the GPU recipe trains on synth-3d itself."""
    import dataclasses as dc

    from deepsim_rt.data.synth import SYNTH_PRESETS

    SYNTH_PRESETS.setdefault(SMOKE_SYNTH_PRESET, dc.replace(SYNTH_PRESETS["synth-3d"], voxel_size=4, n_train=8,
                                                            n_val=2, n_test=2))


def train_in_chunks(job, steps: int, val_every: int, budget_s: float, log) -> dict:
    """Run `job` (a deepsim_rt.train job with resume=True, keep_models=True) to `steps` in chunks of `val_every`,
    stopping early when the next chunk would overrun `budget_s`. Returns the last run_job summary + timing."""
    from deepsim_rt.train.loop import run_job

    t0 = time.perf_counter()
    done, last_chunk_s, summary = 0, 0.0, {}
    while done < steps:
        elapsed = time.perf_counter() - t0
        if done and elapsed + last_chunk_s > budget_s:
            log(f"[{job.name}] stopping at step {done}: next chunk (~{last_chunk_s:.0f} s) would pass the "
                f"{budget_s:.0f} s budget ({elapsed:.0f} s used)")
            break
        target = min(steps, done + val_every)
        job.cfg = dataclasses.replace(job.cfg, steps=target)
        c0 = time.perf_counter()
        summary = run_job(job)
        last_chunk_s = time.perf_counter() - c0
        done = target
    summary["train_seconds"] = round(time.perf_counter() - t0, 1)
    summary["steps_done"] = done
    return summary


def select_best(work: Path) -> tuple[Path, dict]:
    """The kept model (model_step<N>.safetensors) whose validation had the highest Dice; ties: the earliest."""
    history = json.loads((work / "history.json").read_text())
    best = max(history, key=lambda h: (h.get("dice", float("-inf")), -h["step"]))
    return work / f"model_step{best['step']}.safetensors", best


def device_register_fn(model, device: torch.device):
    """evaluate_pairs hands CPU tensors: register on `device`, return the displacement on the CPU."""
    from deepsim_rt.evaluate.study import model_register_fn

    fn = model_register_fn(model.to(device).eval())
    return lambda mov, fix: fn(mov.to(device), fix.to(device)).cpu()


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny-3d data, tiny nets, a few steps")
    ap.add_argument("--recipe", default="default-3d-2mm", choices=tuple(RECIPES),
                    help="default-3d-2mm: seg + DeepSim_seg on the bundled synthetic data; synth-3d: seg + DeepSim_seg "
                         "+ NCC on brains synthesized from label maps")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else runs/gpu_train)")
    ap.add_argument("--work", type=Path, default=None, help="training folders (default: a temporary folder)")
    ap.add_argument("--max-test-pairs", type=int, default=None)
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v}")
    a = ap.parse_args(argv)
    full, smoke, losses = RECIPES[a.recipe]
    base = smoke if a.smoke else full
    if a.smoke and a.recipe == "synth-3d":
        register_smoke_synth_preset()
    opt = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}
    out = a.out or Path(os.environ.get("OUT") or "runs/gpu_train")
    out.mkdir(parents=True, exist_ok=True)
    work_ctx = tempfile.TemporaryDirectory(prefix="gpu_train_") if a.work is None else None
    work = Path(work_ctx.name) if work_ctx else a.work
    t_start = time.perf_counter()

    from deepsim_rt._io import atomic_write
    from deepsim_rt.evaluate.study import evaluate_pairs, load_registration_model, summarize
    from deepsim_rt.train import FeatureTrainConfig, RegistrationTrainConfig
    from deepsim_rt.train.features import FeatureJob
    from deepsim_rt.train.registration import RegistrationJob

    def log(msg: str) -> None:
        print(f"[gpu_train {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    data = data_name(opt["data"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"recipe": a.recipe, "data": data, "requested_data": opt["data"], "preset": opt["preset"],
                    "smoke": a.smoke, "losses": list(losses),
                    "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "options": opt}
    common = {"data": data, "preset": opt["preset"], "batch_size": opt["batch_size"], "val_every": opt["val_every"],
              "checkpoint_every": opt["val_every"], "keep_models": True, "resume": True, "progress": False}

    def write_result() -> None:  # after every phase: a kill keeps what finished
        text = json.dumps(result, indent=1, default=str) + "\n"
        atomic_write(out / "gpu_train.json", lambda tmp: Path(tmp).write_text(text))

    # ---- 1. seg feature extractor -------------------------------------------------------------------------------
    seg_job = FeatureJob(FeatureTrainConfig(task="seg", out=str(work / "seg"), **common))
    log(f"data {data} {seg_job.source.shape}, device {result['device']}; seg training up to {opt['seg_steps']} steps")
    seg_sum = train_in_chunks(seg_job, opt["seg_steps"], opt["val_every"], opt["seg_budget_s"], log)
    seg_path, seg_best = select_best(work / "seg")
    shutil.copyfile(seg_path, out / "seg.safetensors")
    result["seg"] = {"steps_done": seg_sum["steps_done"], "train_seconds": seg_sum["train_seconds"],
                     "selected": seg_best, "history": json.loads((work / "seg" / "history.json").read_text())}
    write_result()
    log(f"seg: selected step {seg_best['step']} (val Dice {seg_best.get('dice', float('nan')):.4f})")

    # ---- 2. registration nets (DeepSim_seg on the selected extractor; synth-3d: also NCC), each at its default lambda
    reg_jobs = {}
    for loss in losses:
        key = "reg" if loss == "deepsim_seg" else f"reg_{loss}"
        extractor = {"extractor": str(out / "seg.safetensors")} if loss.startswith("deepsim") else {}
        job = RegistrationJob(RegistrationTrainConfig(loss=loss, out=str(work / key), **extractor, **common))
        reg_sum = train_in_chunks(job, opt["reg_steps"], opt["val_every"], opt["reg_budget_s"], log)
        reg_path, reg_best = select_best(work / key)
        shutil.copyfile(reg_path, out / REG_FILES[loss])
        result[key] = {"loss": loss, "steps_done": reg_sum["steps_done"], "train_seconds": reg_sum["train_seconds"],
                       "lam": job.cfg.lam, "selected": reg_best,
                       "history": json.loads((work / key / "history.json").read_text())}
        write_result()
        log(f"{key} ({loss}): selected step {reg_best['step']} (val Dice {reg_best.get('dice', float('nan')):.4f})")
        reg_jobs[loss] = job

    # ---- 3. test pairs: identity vs each selected net -----------------------------------------------------------
    source = reg_jobs[losses[0]].source
    t0 = time.perf_counter()
    result["test"] = {"identity": summarize(evaluate_pairs(source, None, "test", a.max_test_pairs))}
    for loss in losses:
        model = load_registration_model(out / REG_FILES[loss], source)
        rows = evaluate_pairs(source, device_register_fn(model, device), "test", a.max_test_pairs,
                              padding=model.cfg.padding)
        result["test"][loss] = summarize(rows)
        result["test"]["dice_fg_per_pair" if loss == "deepsim_seg" else f"dice_fg_per_pair_{loss}"] = \
            [r["dice_fg"] for r in rows]
    result["test"]["seconds"] = round(time.perf_counter() - t0, 1)
    result["files"] = {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))}
    too_big = {k: v for k, v in result["files"].items() if v > MAX_FILE_BYTES}
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_result()
    t = result["test"]
    log(f"test pairs ({t['identity']['pairs']}): Dice fg identity {t['identity']['dice_fg']:.4f} -> "
        + ", ".join(f"{loss} {t[loss]['dice_fg']:.4f}" for loss in losses)
        + f"; {result['total_seconds']:.0f} s in all; files {result['files']}")
    if work_ctx:
        work_ctx.cleanup()
    if too_big:
        print(f"gpu_train: files over 16 MiB (a lent machine would not send them back): {too_big}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
