"""The runtime at the model's voxel spacing (issue 12 item 1) and `register` on other grids / with --affine
(issue 11 item 3): what the outputs mean, what summary.json says, and the one-line errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from deepsim_rt.export.verify import random_regnet
from deepsim_rt.kernels import warp
from deepsim_rt.nn.checkpoint import save_model, scale_metadata
from deepsim_rt.runtime import Registrator, minmax_normalize

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def net3d():
    return random_regnet(3, seed=31)


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    blur = torch.nn.functional.avg_pool3d
    m = blur(torch.rand(1, 1, *shape, generator=g), 5, 1, 2) * 500
    f = blur(torch.rand(1, 1, *shape, generator=g), 5, 1, 2) * 500
    return m[0, 0].numpy(), f[0, 0].numpy()


def test_register_runs_the_network_at_the_model_spacing(net3d):
    mov, fix = _pair((40, 44, 36))
    reg = Registrator.from_model(net3d, device="cpu", model_spacing=(2.0, 2.0, 2.0))
    res = reg.register(mov, fix, spacing=1.0)
    assert res.scale["resampled"] and res.scale["network_shape"] == [20, 22, 18]
    assert res.scale["input_spacing_mm"] == [1.0, 1.0, 1.0] and res.scale["model_spacing_mm"] == [2.0, 2.0, 2.0]
    assert res.displacement.shape == (3, 40, 44, 36) and res.warped.shape == mov.shape
    assert np.abs(res.displacement).max() > 0.5
    # the contract still holds at the input resolution: warped(p) = moving(p + u(p))
    mn, lo, scale = minmax_normalize(torch.from_numpy(mov)[None, None])
    direct = warp(mn, torch.from_numpy(res.displacement)[None]) * scale + lo
    np.testing.assert_allclose(res.warped, direct[0, 0].numpy(), rtol=0, atol=1e-3)
    # at the model's spacing (within 5 %) nothing is resampled: exactly the array path
    same = reg.register(mov, fix, spacing=(2.05, 2.0, 1.96))
    plain = reg.register(mov, fix)
    assert not same.scale["resampled"]
    np.testing.assert_array_equal(same.displacement, plain.displacement)


def test_a_model_without_spacing_warns_and_keeps_todays_behaviour(net3d):
    mov, fix = _pair((16, 16, 16), seed=1)
    reg = Registrator.from_model(net3d, device="cpu")
    assert reg.model_spacing is None
    with pytest.warns(RuntimeWarning, match="records no training voxel spacing"):
        res = reg.register(mov, fix, spacing=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = reg.register(mov, fix)  # arrays without a spacing: no warning
    np.testing.assert_array_equal(res.displacement, plain.displacement)
    with pytest.raises(ValueError, match="positive finite"):
        reg.register(mov, fix, spacing=(1.0, -1.0, 1.0))


def test_load_reads_the_checkpoint_spacing(net3d, tmp_path):
    path = save_model(tmp_path / "r.safetensors", net3d, extra=scale_metadata(spacing=(4.0, 4.0, 4.0)))
    assert Registrator.load(path, device="cpu").model_spacing == (4.0, 4.0, 4.0)
    assert Registrator.load(save_model(tmp_path / "old.safetensors", net3d), device="cpu").model_spacing is None


# -- register CLI ----------------------------------------------------------------------------------------------------
def _save(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def test_register_resamples_other_grids_and_says_so(net3d, tmp_path, run_cli):
    model = save_model(tmp_path / "r.safetensors", net3d, extra=scale_metadata(spacing=(2.0, 2.0, 2.0)))
    mov, fix = _pair((24, 26, 22), seed=2)
    aff_f = np.diag([2.0, 2.0, 2.0, 1.0])
    aff_m = np.diag([1.5, 1.5, 1.5, 1.0])
    aff_m[:3, 3] = (-3.0, 2.0, 1.0)
    _save(tmp_path / "m.nii.gz", np.pad(mov, 4, mode="edge"), aff_m)
    _save(tmp_path / "f.nii.gz", fix, aff_f)
    lab = (np.pad(mov, 4, mode="edge") > np.median(mov)).astype(np.uint8) * 3
    _save(tmp_path / "l.nii.gz", lab, aff_m)
    code, text = run_cli("register", "--moving", str(tmp_path / "m.nii.gz"), "--fixed", str(tmp_path / "f.nii.gz"),
                         "--labels", str(tmp_path / "l.nii.gz"), "--out", str(tmp_path / "o"), "--model",
                         str(model), "--device", "cpu")
    assert code == 0, text
    assert "different voxel grids" in text
    out = tmp_path / "o"
    summary = json.loads((out / "summary.json").read_text())
    grid = summary["grid"]
    assert grid["moving_resampled_to_fixed_grid"] and grid["affine"] is None and grid["label_mode"] == "generic"
    assert grid["moving_grid"]["shape"] == [32, 34, 30] and grid["fixed_grid"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert grid["network"]["resampled"] is False  # fixed is at the model's 2 mm already
    for name in ("warped", "warped_labels", "displacement", "transform_itk"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(img.affine, aff_f, atol=1e-6)
        assert img.shape[:3] == fix.shape
    wl = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert wl.dtype == np.uint8 and set(np.unique(wl)) <= {0, 3}


def test_register_bad_grids_are_one_line_errors(net3d, tmp_path, run_cli):
    model = save_model(tmp_path / "r.safetensors", net3d)
    mov, fix = _pair((12, 12, 12), seed=3)
    _save(tmp_path / "f.nii.gz", fix, np.eye(4))
    flat = nib.Nifti1Image(mov, None)  # an sform with a zero column, as a broken converter writes it
    flat.header["sform_code"] = 2
    flat.header["srow_x"], flat.header["srow_y"], flat.header["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    nib.save(flat, str(tmp_path / "flat.nii.gz"))
    code, text = run_cli("register", "--moving", str(tmp_path / "flat.nii.gz"), "--fixed",
                         str(tmp_path / "f.nii.gz"), "--out", str(tmp_path / "o"), "--model", str(model))
    assert code == 2 and "degenerate affine" in text and "flat.nii.gz" in text and text.count("\n") == 1, text
    np.save(tmp_path / "m.npy", mov)
    np.save(tmp_path / "f.npy", fix)
    code, text = run_cli("register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"),
                         "--out", str(tmp_path / "o"), "--model", str(model), "--affine", "rigid")
    assert code == 2 and "--affine needs NIfTI inputs" in text, text
    assert not (tmp_path / "o").exists()
