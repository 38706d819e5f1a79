"""`deepsim-rt register`: NIfTI affine/header round trip, outputs agree with the library, bad input writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsim_rt.cli import main
from deepsim_rt.export.verify import random_regnet
from deepsim_rt.kernels import warp
from deepsim_rt.nn import save_model
from deepsim_rt.runtime import Registrator

nib = pytest.importorskip("nibabel")  # optional (GPU machines lack it): a skip, never a collection error


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {2: save_model(d / "reg2.safetensors", random_regnet(2, seed=21)),
            3: save_model(d / "reg3.safetensors", random_regnet(3, seed=22))}


def _affine() -> np.ndarray:
    # rotation about z, anisotropic voxels, shear-free, a world offset: nothing an identity default would match
    c, s = np.cos(0.3), np.sin(0.3)
    a = np.array([[c * 1.5, -s * 1.2, 0, -40.5], [s * 1.5, c * 1.2, 0, 12.25], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    return a


def _write(path, data, affine, descrip=b"subject-7"):
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = descrip
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))


@pytest.fixture
def pair3d(tmp_path):
    g = np.random.default_rng(0)
    shape = (13, 10, 9)  # odd sizes: the runtime pads to 8 and crops back
    mov = (g.random(shape) * 800).astype(np.float32)
    fix = (g.random(shape) * 800).astype(np.float32)
    lab = g.integers(0, 4, shape).astype(np.int16)
    aff = _affine()
    _write(tmp_path / "m.nii.gz", mov, aff)
    _write(tmp_path / "f.nii.gz", fix, aff, descrip=b"fixed-one")
    _write(tmp_path / "l.nii.gz", lab, aff)
    return tmp_path, mov, fix, lab, aff


def test_register_nifti_round_trips_affine_and_matches_library(pair3d, models, capsys):
    d, mov, fix, lab, aff = pair3d
    out = d / "out"
    rc = main(["register", "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
               str(d / "l.nii.gz"), "--out", str(out), "--model", str(models[3]), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    fixed_img = nib.load(str(d / "f.nii.gz"))
    for name in ("warped", "displacement", "warped_labels"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(img.affine, aff, rtol=0, atol=1e-5)
        assert img.header["descrip"].tobytes().rstrip(b"\0") in (b"fixed-one",
                                                                   b"deepsim_rt displacement, voxels, last axis=voxel"
                                                                   b" axis i")
        assert int(img.header["sform_code"]) == int(fixed_img.header["sform_code"]) == 2
        assert img.header.get_xyzt_units() == ("mm", "sec")
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata(dtype=np.float32)
    disp = nib.load(str(out / "displacement.nii.gz")).get_fdata(dtype=np.float32)
    wl = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert warped.shape == mov.shape and disp.shape == (*mov.shape, 3) and wl.shape == mov.shape
    assert wl.dtype == np.int16 and set(np.unique(wl)) <= {0, 1, 2, 3}
    ref = Registrator.load(models[3], device="cpu").register(mov, fix, lab)
    np.testing.assert_allclose(disp, np.moveaxis(ref.displacement, 0, -1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(warped, ref.warped, rtol=0, atol=1e-3)  # intensities up to 800, float32 on disk
    np.testing.assert_array_equal(wl, ref.warped_labels)
    # the written field means what the docstring says: warped(p) = moving(p + u(p)), voxel units, last axis
    mn = (mov - mov.min()) / (mov.max() - mov.min())
    direct = warp(torch.from_numpy(mn)[None, None], torch.from_numpy(np.moveaxis(disp, -1, 0))[None])[0, 0]
    np.testing.assert_allclose(warped, direct.numpy() * (mov.max() - mov.min()) + mov.min(), rtol=0, atol=2e-3)
    assert float(np.abs(disp).max()) > 0.5


def test_register_png_and_npy_2d(tmp_path, models):
    from PIL import Image

    g = np.random.default_rng(1)
    m8 = (g.random((27, 19)) * 255).astype(np.uint8)
    f8 = (g.random((27, 19)) * 255).astype(np.uint8)
    Image.fromarray(m8).save(tmp_path / "m.png")
    Image.fromarray(f8).save(tmp_path / "f.png")
    Image.fromarray((g.integers(0, 3, (27, 19)) * 50).astype(np.uint8)).save(tmp_path / "l.png")
    assert main(["register", "--moving", str(tmp_path / "m.png"), "--fixed", str(tmp_path / "f.png"), "--labels",
                 str(tmp_path / "l.png"), "--out", str(tmp_path / "o"), "--model", str(models[2])]) == 0
    w = np.array(Image.open(tmp_path / "o" / "warped.png"))
    assert w.dtype == np.uint8 and w.shape == (27, 19)
    assert np.load(tmp_path / "o" / "displacement.npy").shape == (27, 19, 2)
    assert set(np.unique(np.array(Image.open(tmp_path / "o" / "warped_labels.png")))) <= {0, 50, 100}
    np.save(tmp_path / "m.npy", m8.astype(np.float32))
    np.save(tmp_path / "f.npy", f8.astype(np.float32))
    assert main(["register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"), "--out",
                 str(tmp_path / "o2"), "--model", str(models[2])]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o2" / "displacement.npy"),
                               np.load(tmp_path / "o" / "displacement.npy"), rtol=0, atol=1e-6)


def _fails(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_bad_inputs_write_nothing(pair3d, models, capsys):
    d, mov, fix, lab, aff = pair3d
    out = d / "never"
    base = ["register", "--out", str(out), "--model", str(models[3])]
    _write(d / "small.nii.gz", mov[:12], aff)
    _fails([*base, "--moving", str(d / "small.nii.gz"), "--fixed", str(d / "f.nii.gz")], capsys, "shapes differ")
    shifted = aff.copy()
    shifted[0, 3] += 2.0
    _write(d / "moved.nii.gz", mov, shifted)
    _fails([*base, "--moving", str(d / "moved.nii.gz"), "--fixed", str(d / "f.nii.gz")], capsys, "affines differ")
    _write(d / "4d.nii.gz", np.stack([mov, mov], -1), aff)
    _fails([*base, "--moving", str(d / "4d.nii.gz"), "--fixed", str(d / "4d.nii.gz")], capsys, "expected a 3D image")
    _fails(["register", "--out", str(out), "--model", str(models[2]), "--moving", str(d / "m.nii.gz"), "--fixed",
            str(d / "f.nii.gz")], capsys, "model is 2D")
    _write(d / "frac.nii.gz", lab.astype(np.float32) + 0.5, aff)
    _fails([*base, "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
            str(d / "frac.nii.gz")], capsys, "integer-valued")
    (d / "trunc.nii.gz").write_bytes((d / "m.nii.gz").read_bytes()[:200])
    _fails([*base, "--moving", str(d / "trunc.nii.gz"), "--fixed", str(d / "f.nii.gz")], capsys, "trunc.nii.gz")
    _fails([*base, "--moving", str(d / "m.txt"), "--fixed", str(d / "f.nii.gz")], capsys, "unsupported file type")
    assert not out.exists()
