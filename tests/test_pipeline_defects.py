"""Regression tests of issue 20 item 7 in the file pipeline and the runtime API: each case as a new user met it,
now one line naming expected vs got, and nothing written; plus affine-only runs (no dense field) and the affine
part as an ITK file that `apply` takes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepsim_rt.export.verify import random_regnet
from deepsim_rt.nn import save_model
from deepsim_rt.nn.checkpoint import scale_metadata

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def model2d(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("m") / "reg2.safetensors", random_regnet(2, seed=31))


@pytest.fixture(scope="module")
def model3d(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("m3") / "reg3.safetensors", random_regnet(3, seed=5),
                      extra=scale_metadata(spacing=(2.0, 2.0, 2.0)))


def _one_line(rc, text, match):
    assert rc != 0 and "Traceback" not in text and match in text, text
    lines = [ln for ln in text.splitlines() if "error" in ln]
    assert len(lines) == 1, text


def _npy_pair(d):
    g = np.random.default_rng(3)
    np.save(d / "m.npy", (g.random((20, 18)) * 100).astype(np.float32))
    np.save(d / "f.npy", (g.random((20, 18)) * 100).astype(np.float32))
    np.save(d / "l.npy", g.integers(0, 3, (20, 18)).astype(np.int16))


def _blob(shape, seed, shift=(0.0, 0.0, 0.0)):
    g = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    c = (np.asarray(shape) - 1) / 2 + np.asarray(shift)
    img = 500 * np.exp(-(((ijk - c) / (np.asarray(shape) / 4)) ** 2).sum(-1))
    for _ in range(4):
        img += 200 * np.exp(-(((ijk - c - g.normal(0, 3, 3)) / 3.0) ** 2).sum(-1))
    return img.astype(np.float32)


def _nii(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


# ---------------------------------------------------------------------------------------------------------------
# item 7, the file pipeline
# ---------------------------------------------------------------------------------------------------------------
def test_csv_row_with_more_cells_than_the_header_is_one_line(tmp_path, run_cli):
    _npy_pair(tmp_path)
    (tmp_path / "pairs.csv").write_text("moving,fixed\nm.npy,f.npy,extra\n")  # was AttributeError on a list
    rc, text = run_cli("register", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "o"))
    _one_line(rc, text, "line 2: more cells than the header's 2 columns")
    assert not (tmp_path / "o").exists()


def test_overwrite_removes_a_previous_runs_labels(tmp_path, model2d, run_cli):
    _npy_pair(tmp_path)
    base = ["register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"), "--out",
            str(tmp_path / "o"), "--model", str(model2d), "--device", "cpu"]
    rc, text = run_cli(*base, "--labels", str(tmp_path / "l.npy"))
    assert rc == 0 and (tmp_path / "o" / "warped_labels.npy").is_file(), text
    rc, text = run_cli(*base, "--overwrite")
    assert rc == 0, text
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["labels"] is None
    assert not (tmp_path / "o" / "warped_labels.npy").exists()  # no stale file beside a summary without labels
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["displacement.npy", "jacobian.npy", "qc.png",
                                                                   "summary.json", "warped.npy"]


def test_out_is_checked_before_any_work(tmp_path, model2d, run_cli, monkeypatch):
    from deepsim_rt.pipeline import register

    _npy_pair(tmp_path)

    def no_model(*a, **k):  # the model must not even load
        raise AssertionError("registered before checking --out")

    monkeypatch.setattr(register, "registrator_for", no_model)
    args = ["register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"), "--model",
            str(model2d), "--device", "cpu", "--out"]
    (tmp_path / "file").write_text("x")
    rc, text = run_cli(*args, str(tmp_path / "file" / "sub"))
    _one_line(rc, text, "is a file, not a folder")
    rc, text = run_cli(*args, str(tmp_path / "file"))
    _one_line(rc, text, "exists and is not a folder")
    rc, text = run_cli(*args, "")  # was: wrote into the current folder
    _one_line(rc, text, "--out must name a folder, got an empty string")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "warped.npy").write_text("old")
    rc, text = run_cli(*args, str(tmp_path / "o"))
    _one_line(rc, text, "outputs already exist")
    assert (tmp_path / "o" / "warped.npy").read_text() == "old"


def test_constant_image_warning_survives_the_prealignment(tmp_path, model3d):
    from deepsim_rt.pipeline.register import run_register

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    _nii(tmp_path / "m.nii.gz", np.full((24, 20, 22), 7.0, np.float32), aff)
    _nii(tmp_path / "f.nii.gz", _blob((24, 20, 22), 1), aff)
    for affine in (None, "rigid"):  # rigid resamples moving with zeros outside: no longer constant to the net
        info = run_register(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / f"o_{affine}", model=model3d,
                            device="cpu", affine=affine)
        said = [w for w in info["warnings"] if w.startswith("moving image is constant")]
        assert len(said) == 1, (affine, info["warnings"])


# ---------------------------------------------------------------------------------------------------------------
# item 7, the runtime API
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reg2d(model2d):
    from deepsim_rt.runtime import Registrator

    return Registrator.load(model2d, device="cpu")


def test_requires_grad_and_meta_tensors(reg2d):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(24, 20, generator=g, requires_grad=True)
    f = torch.rand(24, 20, generator=g)
    out = reg2d.register(m, f)  # was: RuntimeError (a tensor that requires grad to numpy / inference mode)
    ref = reg2d.register(m.detach(), f)
    assert torch.equal(out.displacement, ref.displacement) and not out.displacement.requires_grad
    with pytest.raises(ValueError, match=r"moving is a meta tensor \(shape \(24, 20\), no data\)"):
        reg2d.register(torch.empty(24, 20, device="meta"), f)  # was torch's NotImplementedError


def test_spacing_far_from_the_models_is_refused(tmp_path):
    from deepsim_rt.runtime import Registrator

    reg = Registrator.from_model(random_regnet(3, seed=2), device="cpu", model_spacing=(2.0, 2.0, 2.0))
    img = np.random.default_rng(0).random((20, 24, 20)).astype(np.float32)
    with pytest.raises(ValueError, match=r"spacing \[50.0, 50.0, 50.0\] mm is 25x from the model's .* a \[500, 600, "
                                         r"500\] network grid\): expected within 16x"):
        reg.register(img, img, spacing=50)  # was: an attempt to allocate 25.9 GB
    with pytest.raises(ValueError, match=r"spacing \[0.01, 0.01, 0.01\] mm is 200x from the model's .* expected "
                                         r"within 16x"):
        reg.register(img, img, spacing=0.01)  # was: a silent 19.8-voxel field
    from deepsim_rt.transforms.scale import SpacingPlan

    with pytest.raises(ValueError, match=r"a \[520, 520, 520\] grid .* expected at most 134217728 voxels"):
        SpacingPlan.make((260, 260, 260), 4.0, 2.0)  # within 16x, but 1.4e8 network voxels
    assert reg.register(img, img, spacing=1.0).displacement.shape == (3, 20, 24, 20)  # 2x coarser: fine


def test_refine_iterations_are_bounded(tmp_path, run_cli):
    from deepsim_rt.refine import RefineConfig

    with pytest.raises(ValueError, match=r"refine iterations must be an int in \[0, 10000\]"):
        RefineConfig(iterations=10**6)
    _npy_pair(tmp_path)
    rc, text = run_cli("register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"),
                       "--out", str(tmp_path / "o"), "--refine", "100000")
    _one_line(rc, text, "refine iterations must be an int in [0, 10000]")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# affine-only runs and the ITK affine file
# ---------------------------------------------------------------------------------------------------------------
def test_affine_only_writes_no_dense_field_and_apply_takes_the_mat(tmp_path, run_cli):
    from deepsim_rt.transforms.itk_affine import read_itk_affine

    shape = (28, 26, 24)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-20, -30, -25)
    _nii(tmp_path / "m.nii.gz", _blob(shape, 1, shift=(2.0, -1.5, 1.0)), aff)
    _nii(tmp_path / "f.nii.gz", _blob(shape, 1), aff)
    rc, text = run_cli("register", "--moving", str(tmp_path / "m.nii.gz"), "--fixed", str(tmp_path / "f.nii.gz"),
                       "--out", str(tmp_path / "o"), "--model", "none", "--affine", "rigid", "--refine", "0",
                       "--device", "cpu")
    assert rc == 0, text
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["affine.mat", "qc.png", "summary.json", "warped.nii.gz"], names  # 12 numbers, no 3 x S field
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["transforms"] == {"ants": ["affine.mat"], "dense_field": False,
                                     "command": "antsApplyTransforms -r FIXED -i MOVING -t affine.mat"}
    w = read_itk_affine(tmp_path / "o" / "affine.mat")
    assert np.allclose(w[:3, 3], (4.0, -3.0, 2.0), atol=1.0), w  # the blob moved by (2, -1.5, 1) voxels of 2 mm
    assert summary["qc"]["folding_percent"] == 0 and abs(summary["qc"]["jacobian_mean"] - 1) < 1e-6  # rigid
    rc, text = run_cli("apply", "--transform", str(tmp_path / "o" / "affine.mat"), "--input",
                       str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "a.nii.gz"))
    _one_line(rc, text, "give --reference FIXED.nii.gz")
    rc, text = run_cli("apply", "--transform", str(tmp_path / "o" / "affine.mat"), "--reference",
                       str(tmp_path / "f.nii.gz"), "--input", str(tmp_path / "m.nii.gz"), "--out",
                       str(tmp_path / "a.nii.gz"))
    assert rc == 0 and "affine form" in text and "padding zeros" in text, text
    a = nib.load(str(tmp_path / "a.nii.gz")).get_fdata(dtype=np.float32)
    ref = nib.load(str(tmp_path / "o" / "warped.nii.gz")).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(a, ref, rtol=0, atol=1e-3)


def test_affine_nmi_through_register_across_contrast(tmp_path, run_cli):
    """`--affine rigid-nmi` reaches the pre-alignment: a shifted blob against the fixed blob with its contrast
    inverted inside (a non-monotone map) is recovered, and summary.json records the metric."""
    from deepsim_rt.transforms.itk_affine import read_itk_affine

    shape = (28, 26, 24)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-20, -30, -25)
    fixed = _blob(shape, 1)
    inverted = np.where(fixed > 0.05 * fixed.max(), 1.05 * fixed.max() - fixed, fixed)
    _nii(tmp_path / "m.nii.gz", _blob(shape, 1, shift=(2.0, -1.5, 1.0)), aff)
    _nii(tmp_path / "f.nii.gz", inverted, aff)
    rc, text = run_cli("register", "--moving", str(tmp_path / "m.nii.gz"), "--fixed", str(tmp_path / "f.nii.gz"),
                       "--out", str(tmp_path / "o"), "--model", "none", "--affine", "rigid-nmi", "--refine", "0",
                       "--device", "cpu")
    assert rc == 0, text
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["grid"]["affine"]["metric"] == "nmi", summary["grid"]["affine"]
    w = read_itk_affine(tmp_path / "o" / "affine.mat")
    assert np.allclose(w[:3, 3], (4.0, -3.0, 2.0), atol=1.0), w


def test_apply_default_padding_is_registers(tmp_path, model2d, run_cli):
    """Same-grid pair: register warps with the networks' border padding; apply's default reproduces it (was zeros,
    up to 91 of 240 different at the edges); --padding zeros still differs there."""
    g = np.random.default_rng(5)
    aff = np.diag([1.5, 1.5, 1.0, 1.0])
    _nii(tmp_path / "m.nii.gz", (g.random((30, 26)) * 240).astype(np.float32), aff)
    _nii(tmp_path / "f.nii.gz", (g.random((30, 26)) * 240).astype(np.float32), aff)
    rc, text = run_cli("register", "--moving", str(tmp_path / "m.nii.gz"), "--fixed", str(tmp_path / "f.nii.gz"),
                       "--out", str(tmp_path / "o"), "--model", str(model2d), "--device", "cpu")
    assert rc == 0, text
    ref = nib.load(str(tmp_path / "o" / "warped.nii.gz")).get_fdata(dtype=np.float32)
    for padding, same in ((None, True), ("zeros", False)):
        extra = [] if padding is None else ["--padding", padding]
        rc, text = run_cli("apply", "--transform", str(tmp_path / "o" / "displacement.nii.gz"), "--input",
                           str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / f"a_{padding}.nii.gz"), *extra)
        assert rc == 0, text
        a = nib.load(str(tmp_path / f"a_{padding}.nii.gz")).get_fdata(dtype=np.float32)
        assert np.allclose(a, ref, atol=1e-3) == same, padding
