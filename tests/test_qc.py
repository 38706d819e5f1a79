"""deepsim_rt.pipeline.qc: Jacobian / displacement figures with known answers, training-profile warnings, and the QC
files `deepsim-rt register` writes (jacobian map + summary.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepsim_rt.pipeline.qc import TrainingProfile, displacement_qc, input_warnings, training_profile
from deepsim_rt.runtime import bundled_model_path


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


def test_affine_field_known_answers():
    shape = (6, 7, 5)
    a = np.array([[0.2, 0.1, 0.0], [0.0, -0.1, 0.05], [0.0, 0.0, 0.3]])  # u(p) = a p: det J = det(I + a) everywhere
    u = np.einsum("ij,j...->i...", a, _grid(shape)).astype(np.float32)
    det, stats = displacement_qc(u)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + a), rtol=0, atol=1e-5)
    assert det.shape == shape and det.dtype == np.float32
    assert stats["folding_percent"] == 0.0 and stats["sd_log_jacobian"] < 1e-6
    length = np.sqrt((u.astype(np.float64) ** 2).sum(0))
    assert abs(stats["displacement_voxels"]["max"] - length.max()) < 1e-5
    assert "displacement_mm" not in stats


def test_folding_and_mm_lengths():
    # u_0 = -2 p_0: phi_0 = -p_0, a reflection: det J = -1 at every voxel -> 100 % folding, no log|J|
    u = np.zeros((2, 5, 4), np.float32)
    u[0] = -2 * _grid((5, 4))[0]
    _, stats = displacement_qc(u)
    assert stats["folding_percent"] == 100.0 and stats["sd_log_jacobian"] is None
    # one voxel along axis 0 of a grid with 2.5 mm voxels on that axis (rotated): 2.5 mm everywhere
    c, s = np.cos(0.4), np.sin(0.4)
    aff = np.array([[2.5 * c, -1.2 * s, 0, 3], [2.5 * s, 1.2 * c, 0, -4], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    t = np.zeros((3, 4, 4, 3), np.float32)
    t[0] = 1.0
    _, stats = displacement_qc(t, aff)
    assert stats["displacement_voxels"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert stats["displacement_mm"]["max"] == pytest.approx(2.5, abs=1e-9)
    t2 = np.zeros((2, 4, 4), np.float32)
    t2[1] = 2.0  # 2D: axis 1 has 1.2 mm voxels
    assert displacement_qc(t2, aff)[1]["displacement_mm"]["mean"] == pytest.approx(2.4, abs=1e-9)
    with pytest.raises(ValueError, match="ndim"):
        displacement_qc(np.zeros((3, 4, 4), np.float32))


def test_bundled_profile_and_training_like_input_has_no_warning():
    from deepsim_rt.data.atlas import load_atlas

    prof = training_profile(bundled_model_path("default-3d"))
    assert prof.spacing_mm == (2.0, 2.0, 2.0) and prof.train_grid == (80, 96, 80)  # the 2 mm default (issue 12)
    assert prof.axcodes == ("S", "A", "R")
    atlas = load_atlas(3, voxel_size=2)
    img = atlas.image[0, 0].numpy() * 700 + 20  # any affine intensity map: the model min-max scales
    assert input_warnings("moving", img, prof, atlas.affine) == []
    assert training_profile(bundled_model_path("default-2d")).axcodes == ("A", "R")


def test_warnings_far_from_training_data():
    prof = TrainingProfile(spacing_mm=(4.0, 4.0, 4.0), train_grid=(40, 48, 40), axcodes=("S", "A", "R"))
    g = np.random.default_rng(0)
    img = g.random((20, 24, 20)).astype(np.float32)
    sar = np.array([[0, 0, 4.0, 0], [0, 4.0, 0, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])
    assert input_warnings("moving", img, prof, sar) == []
    w = input_warnings("moving", img, prof, sar @ np.diag([0.5, 0.5, 0.5, 1]))  # 2 mm: 2x
    assert len(w) == 1 and "voxel size (2, 2, 2) mm" in w[0] and "(4, 4, 4)" in w[0]
    w = input_warnings("fixed", img, prof, np.diag([4.0, 4.0, 4.0, 1]), path="f.nii.gz")  # RAS arrays
    assert len(w) == 1 and w[0].startswith("fixed f.nii.gz: array axes point RAS") and "SAR" in w[0]
    hot = img.copy()
    hot[0, 0, 0] = 50.0  # one hot voxel: 99 % of the voxels in the bottom 2 % of the range
    w = input_warnings("moving", hot, prof, sar)
    assert len(w) == 1 and "bright outliers" in w[0]
    mask = (img > 0.5).astype(np.float32) * 3
    w = input_warnings("moving", mask, prof, sar)
    assert len(w) == 1 and "only 2 distinct intensities" in w[0]
    # no affine (PNG / NPY): the grid size is compared instead
    assert input_warnings("moving", g.random((40, 50, 44)), prof) == []
    w = input_warnings("moving", g.random((160, 48, 40)), prof)
    assert len(w) == 1 and "training grid (40, 48, 40)" in w[0]
    assert input_warnings("moving", np.zeros((20, 24, 20)), prof, sar) == []  # constant: the runtime warns, not qc


def test_register_writes_jacobian_and_summary(tmp_path, run_cli):
    import nibabel as nib
    import torch

    from deepsim_rt.evaluate.metrics import jacobian_determinant
    from deepsim_rt.export.verify import random_regnet
    from deepsim_rt.nn import save_model
    from deepsim_rt.nn.checkpoint import scale_metadata

    # trained (say) at the inputs' own spacing: the network runs on the input grid, and no spacing warning
    model = save_model(tmp_path / "reg3.safetensors", random_regnet(3, seed=5),
                       extra=scale_metadata(spacing=(2.0, 3.0, 4.5), grid=(11, 9, 10)))
    g = np.random.default_rng(3)
    aff = np.diag([2.0, 3.0, 4.5, 1.0])
    for name in ("m", "f"):
        nib.save(nib.Nifti1Image((g.random((11, 9, 10)) * 300).astype(np.float32), aff), str(tmp_path / f"{name}.nii"))
    rc, out = run_cli("register", "--moving", str(tmp_path / "m.nii"), "--fixed", str(tmp_path / "f.nii"),
                      "--out", str(tmp_path / "o"), "--model", str(model), "--device", "cpu")
    assert rc == 0, out
    disp = nib.load(str(tmp_path / "o" / "displacement.nii.gz")).get_fdata(dtype=np.float32)
    jac = nib.load(str(tmp_path / "o" / "jacobian.nii.gz"))
    np.testing.assert_allclose(jac.affine, aff, rtol=0, atol=1e-6)
    ref = jacobian_determinant(torch.from_numpy(np.moveaxis(disp, -1, 0).copy())[None])[0].numpy()
    np.testing.assert_allclose(jac.get_fdata(dtype=np.float32), ref, rtol=0, atol=1e-5)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    qc = summary["qc"]
    assert qc["folding_percent"] == pytest.approx(100.0 * float((ref <= 0).mean()), abs=1e-9)
    assert qc["jacobian_min"] == pytest.approx(float(ref.min()), abs=1e-5)
    mm = np.sqrt(((disp * np.array([2.0, 3.0, 4.5])) ** 2).sum(-1))
    assert qc["displacement_mm"]["max"] == pytest.approx(float(mm.max()), rel=1e-5)
    assert summary["model"] == str(model) and summary["backend"] == "eager" and summary["device"] == "cpu"
    assert summary["shape"] == [11, 9, 10] and summary["timings_s"]["register"] > 0
    assert summary["training_profile"] == {"spacing_mm": [2.0, 3.0, 4.5], "train_grid": [11, 9, 10], "axcodes": None}
    assert summary["warnings"] == []
