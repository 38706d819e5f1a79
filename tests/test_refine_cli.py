"""Refinement through the API and the CLIs: Registrator.register(refine=...), `deepsim-rt register --refine`,
`--model none`, `deepsim-rt evaluate --refine` (bundled 2D weights, 96x80 images, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepsim_rt.kernels import warp
from deepsim_rt.refine import RefineConfig
from deepsim_rt.train.data import open_source


@pytest.fixture(scope="module")
def pair2d():
    src = open_source("default-2d")
    (m, f), = src.pairs("test")[:1]
    mov, _ = src.subject("test", m)
    fix, _ = src.subject("test", f)
    return mov[0].numpy(), fix[0].numpy()


def test_registrator_refine_hook_changes_and_is_consistent(pair2d):
    from deepsim_rt.runtime import Registrator

    mov, fix = pair2d
    reg = Registrator.load("default-2d", device="cpu")
    net = reg.register(mov, fix)
    ref = reg.register(mov, fix, refine=RefineConfig(iterations=5, loss="ncc", lam=1.0, levels=2, progress=False))
    assert ref.displacement.shape == net.displacement.shape == (2, *mov.shape)
    assert np.abs(ref.displacement - net.displacement).max() > 1e-3
    # the returned image is the moving image warped by the refined displacement (inputs are in [0, 1] already)
    expect = warp(torch.from_numpy(mov)[None, None], torch.from_numpy(ref.displacement)[None])[0, 0].numpy()
    assert (mov.min(), mov.max()) == (0.0, 1.0)  # the data are min-max normalised: the runtime's scaling is 1
    assert np.allclose(ref.warped, expect, atol=1e-5)
    # a DeepSim loss finds the extractor bundled with the model (deepsim_rt/weights/default-2d/seg.safetensors)
    ds = reg.register(mov, fix, refine=RefineConfig(iterations=2, loss="deepsim_seg", levels=1, progress=False))
    assert np.isfinite(ds.displacement).all()


def test_no_model_registrator_refines_from_zero(pair2d):
    from deepsim_rt.runtime import Registrator

    mov, fix = pair2d
    reg = Registrator.no_network(2, device="cpu")
    assert np.abs(reg.register(mov, fix).displacement).max() == 0.0  # no network: the identity
    res = reg.register(mov, fix, refine=RefineConfig(iterations=5, levels=2, progress=False))
    assert np.abs(res.displacement).max() > 0.01


def _npy(tmp_path, pair2d):
    paths = []
    for name, arr in zip(("m.npy", "f.npy"), pair2d, strict=True):
        np.save(tmp_path / name, arr.astype(np.float32))
        paths.append(str(tmp_path / name))
    return paths


def test_register_cli_refine_and_model_none(tmp_path, pair2d, run_cli):
    m, f = _npy(tmp_path, pair2d)
    code, out = run_cli("register", "--moving", m, "--fixed", f, "--out", str(tmp_path / "a"), "--refine", "3",
                        "--refine-levels", "2", "--refine-lam", "1.5", "--diffeomorphic")
    assert code == 0, out
    assert (tmp_path / "a" / "displacement.npy").is_file()
    code, out = run_cli("register", "--moving", m, "--fixed", f, "--out", str(tmp_path / "b"), "--model", "none",
                        "--refine", "3", "--refine-loss", "mse")
    assert code == 0, out
    u = np.load(tmp_path / "b" / "displacement.npy")
    assert u.shape == (*pair2d[0].shape, 2) and np.abs(u).max() > 0


@pytest.mark.parametrize("argv,match", [
    (["--model", "none"], "--model none (no network) needs --refine ITERS"),
    (["--refine-loss", "mse"], "--refine-loss apply only with --refine ITERS"),
    (["--refine", "-1"], "refine iterations must be an int in [0, 10000] (Adam steps per pyramid level), got -1"),
    (["--refine", "2", "--refine-lam", "-1"], "refine lam must be a number >= 0"),
    (["--refine", "1", "--refine-levels", "6"], "would shrink spatial axis 0 (size 96) to 3 voxels"),
    (["--model", "none", "--refine", "1", "--refine-loss", "deepsim_ae"], "deepsim_ae needs a feature extractor"),
])
def test_register_cli_refine_errors_write_nothing(tmp_path, pair2d, run_cli, argv, match):
    m, f = _npy(tmp_path, pair2d)
    code, out = run_cli("register", "--moving", m, "--fixed", f, "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and match in out, out
    assert not (tmp_path / "o").exists()


def test_evaluate_cli_refine_rows(tmp_path, run_cli):
    out = tmp_path / "ev"
    code, text = run_cli("evaluate", "--data", "default-2d", "--max-pairs", "1", "--out", str(out),
                         "--model", "deepsim_rt/weights/default-2d/reg.safetensors", "--model", "none",
                         "--refine", "2", "--refine-levels", "2")
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"none", "reg", "reg+refine", "refine"}
    assert res["refine"]["iterations"] == 2 and res["refine"]["levels"] == 2
    code, text = run_cli("evaluate", "--data", "default-2d", "--max-pairs", "1", "--out", str(out), "--model",
                         "none", "--refine", "1", "--refine-loss", "deepsim_seg")
    assert code == 2 and "needs a feature extractor: pass --refine-extractor" in text
