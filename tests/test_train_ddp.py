"""DistributedDataParallel: 2 gloo processes under torchrun give the parameters of one process on the same global
batch.

Why they can agree: rank r's k-th batch is the positions k*B + j*W + r of the epoch permutation, whose union is the
single-process batch k; the losses are means over the batch, so DDP's gradient average equals the global-batch
gradient; BatchNorm statistics are all-reduced over the global batch (deepsim_rt.train.distributed).
Tolerance: float32 summation order differs (two half-batch sums + all-reduce vs one sum; sum/sum-of-squares vs
BatchNorm's own variance). Measured on this machine after 3 Adam steps (lr 1e-3): max |difference| 3.7e-8 over all
parameters and BatchNorm buffers; we allow atol 1e-6 (about 25x that), while one Adam step alone moves parameters
by ~lr = 1e-3, so a DDP run that saw a different batch, skipped the all-reduce or used per-rank BatchNorm
statistics fails by orders of magnitude.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from deepsim_rt.nn import load_model
from deepsim_rt.train import RegistrationTrainConfig, train_registration
from deepsim_rt.train.registration import RegistrationJob

ARGS = dict(loss="ncc_sup", data="tiny-2d", preset="tiny", steps=3, batch_size=4, lr=1e-3, val_every=3,
            checkpoint_every=3, val_items=2, seed=3)
ATOL = 1e-6


def _torchrun(out: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "deepsim_rt.train.cli", "train-registration", "--no-progress", "--threads", "1", "--out", out]
    for k, v in ARGS.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_ddp_two_gloo_processes_equal_single_process_on_the_same_global_batch(tmp_path):
    single = train_registration(RegistrationTrainConfig(out=str(tmp_path / "single"), progress=False, **ARGS))
    proc = _torchrun(str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registration-ncc_sup: 3 steps" in proc.stdout  # rank 0 reports once
    assert proc.stdout.count("registration-ncc_sup: 3 steps") == 1
    a = load_model(single["model"]).state_dict()
    b = load_model(tmp_path / "ddp" / "model.safetensors").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0.0, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    # Not vacuous: training moved the parameters far beyond the tolerance.
    torch.manual_seed(ARGS["seed"])
    init = RegistrationJob(RegistrationTrainConfig(out=str(tmp_path / "x"), **ARGS)).build_model().state_dict()
    moved = max(float((a[k].double() - init[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert moved > 100 * ATOL
    # Only rank 0 wrote files.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.safetensors", "history.json",
                                                                     "model.safetensors"]
