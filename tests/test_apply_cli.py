"""`deepsim-rt apply`: a saved registration (voxel or ITK form) reproduces register's outputs, moves images from
other grids through their affines, and refuses to overwrite inputs or existing files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsim_rt.export.verify import random_regnet
from deepsim_rt.nn.checkpoint import save_model, scale_metadata
from deepsim_rt.transforms.compose import source_coords
from deepsim_rt.transforms.grid import Grid
from deepsim_rt.transforms.itk import read_displacement

nib = pytest.importorskip("nibabel")


def _save(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A 3D NIfTI registration on an oblique anisotropic grid (moving and labels on another grid)."""
    from deepsim_rt.cli import main

    d = tmp_path_factory.mktemp("apply")
    model = save_model(d / "r.safetensors", random_regnet(3, seed=41), extra=scale_metadata(spacing=(3.0,) * 3))
    g = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    c, s = np.cos(0.3), np.sin(0.3)
    aff_f = np.array([[3 * c, -3 * s, 0, -40], [3 * s, 3 * c, 0, 10], [0, 0, 4.5, -30], [0, 0, 0, 1.0]])
    aff_m = np.diag([2.5, 2.5, 2.5, 1.0])
    aff_m[:3, 3] = (-55, -20, -40)
    mov = (gaussian_filter(g.random((40, 40, 36)), 2) * 1000).astype(np.float32)
    fix = (gaussian_filter(g.random((26, 24, 20)), 2) * 1000).astype(np.float32)
    lab = (mov > np.median(mov)).astype(np.int16) * 2 + (mov > np.percentile(mov, 80)).astype(np.int16)
    _save(d / "m.nii.gz", mov, aff_m)
    _save(d / "f.nii.gz", fix, aff_f)
    _save(d / "l.nii.gz", lab, aff_m)
    assert main(["register", "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
                 str(d / "l.nii.gz"), "--out", str(d / "o"), "--model", str(model), "--device", "cpu"]) == 0
    return d, mov, aff_m, aff_f


@pytest.mark.parametrize("form", ["displacement.nii.gz", "transform_itk.nii.gz"])
def test_apply_reproduces_register_outputs(registered, form, run_cli, tmp_path):
    d, mov, _, aff_f = registered
    code, text = run_cli("apply", "--transform", str(d / "o" / form), "--input", str(d / "m.nii.gz"), "--out",
                         str(tmp_path / "w.nii.gz"))
    assert code == 0, text
    out = nib.load(str(tmp_path / "w.nii.gz"))
    np.testing.assert_allclose(out.affine, aff_f, atol=1e-5)
    rng = float(mov.max() - mov.min())
    np.testing.assert_allclose(out.get_fdata(dtype=np.float32), _load(d / "o" / "warped.nii.gz"), rtol=0,
                               atol=1e-4 * rng)
    code, text = run_cli("apply", "--transform", str(d / "o" / form), "--input", str(d / "l.nii.gz"), "--out",
                         str(tmp_path / "wl.nii.gz"), "--labels")
    assert code == 0, text
    wl = _load(tmp_path / "wl.nii.gz")
    assert wl.dtype == np.int16
    assert (wl == _load(d / "o" / "warped_labels.nii.gz")).mean() > 0.999  # float32 field round-off on ties


def test_apply_moves_an_image_from_another_grid_through_its_affine(registered, run_cli, tmp_path):
    d, mov, aff_m, _ = registered
    # the same moving image stored on a grid shifted by whole voxels and cropped: the same world content
    aff_shift = aff_m.copy()
    aff_shift[:3, 3] += aff_m[:3, :3] @ np.array([2.0, 3.0, 1.0])
    _save(tmp_path / "m2.nii.gz", mov[2:, 3:, 1:], aff_shift)
    code, text = run_cli("apply", "--transform", str(d / "o" / "transform_itk.nii.gz"), "--input",
                         str(tmp_path / "m2.nii.gz"), "--out", str(tmp_path / "w2.nii.gz"))
    assert code == 0, text
    a, b = _load(tmp_path / "w2.nii.gz"), _load(d / "o" / "warped.nii.gz")
    # compare where the sample point lies inside the cropped image (both sample the same voxels there)
    disp = read_displacement(d / "o" / "displacement.nii.gz")
    q = source_coords(torch.from_numpy(np.moveaxis(disp.u, -1, 0))[None], Grid.of(disp.shape, disp.affine),
                      Grid.of(mov[2:, 3:, 1:].shape, aff_shift))[0].numpy()
    inside = np.all([(q[i] >= 0) & (q[i] <= n - 1) for i, n in enumerate(mov[2:, 3:, 1:].shape)], axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(a[inside], b[inside], rtol=0, atol=1e-4 * float(mov.max() - mov.min()))


def test_apply_refuses_inputs_existing_files_and_wrong_shapes(registered, run_cli, tmp_path):
    d, mov, _, _ = registered
    t = str(d / "o" / "displacement.nii.gz")
    code, text = run_cli("apply", "--transform", t, "--input", str(d / "m.nii.gz"), "--out", str(d / "m.nii.gz"),
                         "--overwrite")
    assert code == 2 and "it is an input" in text and text.count("\n") == 1, text
    (tmp_path / "exists.nii.gz").write_bytes(b"x")
    code, text = run_cli("apply", "--transform", t, "--input", str(d / "m.nii.gz"), "--out",
                         str(tmp_path / "exists.nii.gz"))
    assert code == 2 and "--overwrite" in text, text
    assert (tmp_path / "exists.nii.gz").read_bytes() == b"x"
    np.save(tmp_path / "u.npy", np.zeros((6, 5, 2), np.float32))
    np.save(tmp_path / "img.npy", np.zeros((6, 4), np.float32))
    code, text = run_cli("apply", "--transform", str(tmp_path / "u.npy"), "--input", str(tmp_path / "img.npy"),
                         "--out", str(tmp_path / "o.npy"))
    assert code == 2 and "on a (6, 5) grid" in text, text
    code, text = run_cli("apply", "--transform", str(d / "m.nii.gz"), "--input", str(d / "m.nii.gz"), "--out",
                         str(tmp_path / "x.nii.gz"))
    assert code == 2 and "expected a displacement field" in text, text


def test_apply_npy_voxel_form_known_answer(run_cli, tmp_path):
    img = np.arange(30, dtype=np.float32).reshape(6, 5)
    u = np.zeros((6, 5, 2), np.float32)
    u[..., 1] = 1.0  # sample one voxel further along axis 1
    np.save(tmp_path / "u.npy", u)
    np.save(tmp_path / "img.npy", img)
    code, text = run_cli("apply", "--transform", str(tmp_path / "u.npy"), "--input", str(tmp_path / "img.npy"),
                         "--out", str(tmp_path / "o.npy"), "--padding", "border")
    assert code == 0, text
    out = np.load(tmp_path / "o.npy")
    np.testing.assert_allclose(out[:, :-1], img[:, 1:], rtol=0, atol=1e-5)  # fp32 grid normalisation
    np.testing.assert_allclose(out[:, -1], img[:, -1], rtol=0, atol=1e-5)
