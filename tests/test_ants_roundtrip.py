"""ANTs itself applies `register`'s transform_itk.nii.gz and must reproduce warped.nii.gz (issue 11, item 1).

Oblique (17 degree) and anisotropic (3 x 3 x 4.5 mm) grids; a model recording a 4 mm training spacing (so the
spacing round trip runs too); moving on its own grid (resampled from the affines) with a rigid pre-alignment, whose
composition must be in the one ITK field; a 2D oblique case. "Interior": fixed voxels at least 3 voxels from the
border whose moving sample point lies at least one voxel inside the moving image (outside, ANTs pads with 0 and the
network's warp with the edge value). Tolerance: 1e-3 of the moving intensity range (the issue's target).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ants = pytest.importorskip("ants", reason="antspyx is not installed (pip install 'deepsim_rt[ants]')")
nib = pytest.importorskip("nibabel")

from deepsim_rt.export.verify import random_regnet  # noqa: E402
from deepsim_rt.nn.checkpoint import save_model, scale_metadata  # noqa: E402
from deepsim_rt.transforms.compose import source_coords  # noqa: E402
from deepsim_rt.transforms.grid import Grid  # noqa: E402
from deepsim_rt.transforms.itk import read_displacement  # noqa: E402

TOL = 1e-3


def _rot3(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
    return rz @ rx


def _affine(deg: float, spacing, origin) -> np.ndarray:
    nd = len(spacing)
    a = np.eye(4)
    if nd == 3:
        a[:3, :3] = _rot3(deg) * np.asarray(spacing)
    else:
        t = np.deg2rad(deg)
        a[:2, :2] = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * np.asarray(spacing)
    a[:nd, 3] = origin
    return a


def _blob_image(shape, affine, centre_mm, seed) -> np.ndarray:
    """A smooth head-like image defined in WORLD space (so two grids see the same object), intensities 0..~900."""
    g = np.random.default_rng(seed)
    nd = len(shape)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    xyz = ijk @ affine[:nd, :nd].T + affine[:nd, 3] - np.asarray(centre_mm)
    r = np.sqrt((xyz**2 / np.array([50.0, 60.0, 45.0][:nd]) ** 2).sum(-1))
    img = 600 * np.clip(1.2 - r, 0, 1) ** 0.5
    for _ in range(6):
        c = g.normal(0, 25, nd)
        img += 300 * np.exp(-((xyz - c) ** 2).sum(-1) / (2 * g.uniform(8, 15) ** 2))
    return img.astype(np.float32)


def _save(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _compare(out, moving_path, fixed_path, margin=3, transforms=("transform_itk.nii.gz",)):
    """(max |ANTs - warped| over the interior, intensity range, interior voxel count). `transforms`: the files in
    `out` given to ANTs, in its order."""
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata(dtype=np.float32)
    fixed_img, moving_img = nib.load(str(fixed_path)), nib.load(str(moving_path))
    mov = moving_img.get_fdata(dtype=np.float32)
    f = ants.image_read(str(fixed_path))
    m = ants.image_read(str(moving_path))
    res = ants.apply_transforms(fixed=f, moving=m, transformlist=[str(out / t) for t in transforms],
                                interpolator="linear").numpy()
    if warped.ndim == 3 and warped.shape[-1] == 1:  # single-slice (X, Y, 1) files: a 2D registration
        warped, mov, res = warped[..., 0], mov[..., 0], res[..., 0]
    nd = mov.ndim
    d = read_displacement(out / "displacement.nii.gz")
    q = source_coords(torch.from_numpy(np.moveaxis(d.u, -1, 0))[None], Grid.of(warped.shape, fixed_img.affine),
                      Grid.of(mov.shape, moving_img.affine))[0].numpy()
    inside = np.all([(q[i] >= 1) & (q[i] <= mov.shape[i] - 2) for i in range(nd)], axis=0)
    border = np.zeros_like(inside)
    border[(slice(margin, -margin),) * nd] = True
    mask = inside & border
    return float(np.abs(res - warped)[mask].max()), float(mov.max() - mov.min()), int(mask.sum())


def _register_and_compare(run_cli, d, model, *extra, transforms=("transform_itk.nii.gz",)):
    """`deepsim-rt register` d/m.nii.gz -> d/f.nii.gz into d/o, then _compare; returns (err, range, n, output)."""
    code, text = run_cli("register", "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--out",
                         str(d / "o"), "--model", str(model), "--device", "cpu", *extra)
    assert code == 0, text
    return (*_compare(d / "o", d / "m.nii.gz", d / "f.nii.gz", transforms=transforms), text)


@pytest.fixture(scope="module")
def model3d(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "reg3.safetensors"
    return save_model(path, random_regnet(3, seed=5), extra=scale_metadata(spacing=(4.0, 4.0, 4.0)))


def test_ants_reproduces_warped_oblique_anisotropic_same_grid(tmp_path, model3d, run_cli):
    shape = (44, 48, 30)
    aff = _affine(17.0, (3.0, 3.0, 4.5), (-60.0, -80.0, -55.0))
    centre = aff[:3, :3] @ (np.asarray(shape) - 1) / 2 + aff[:3, 3]
    _save(tmp_path / "m.nii.gz", _blob_image(shape, aff, centre + [4, -3, 2], 1), aff)
    _save(tmp_path / "f.nii.gz", _blob_image(shape, aff, centre, 2), aff)
    err, rng, n, _ = _register_and_compare(run_cli, tmp_path, model3d)
    assert n > 0.5 * np.prod([s - 6 for s in shape])
    assert err <= TOL * rng, (err, rng)
    u = read_displacement(tmp_path / "o" / "transform_itk.nii.gz").u
    assert np.abs(u).max() > 0.5  # a real deformation, not the identity


def test_ants_reproduces_warped_other_grid_with_rigid_prealignment(tmp_path, model3d, run_cli):
    shape_f, shape_m = (44, 48, 30), (56, 60, 52)
    aff_f = _affine(17.0, (3.0, 3.0, 4.5), (-60.0, -80.0, -55.0))
    aff_m = _affine(-6.0, (2.5, 2.5, 2.5), (-70.0, -75.0, -60.0))
    centre = aff_f[:3, :3] @ (np.asarray(shape_f) - 1) / 2 + aff_f[:3, 3]
    _save(tmp_path / "m.nii.gz", _blob_image(shape_m, aff_m, centre + [5, 2, -3], 1), aff_m)
    _save(tmp_path / "f.nii.gz", _blob_image(shape_f, aff_f, centre, 1), aff_f)
    # the affine part as ANTs writes it (affine.mat) after the deformable field, in ANTs' order
    err, rng, n, text = _register_and_compare(run_cli, tmp_path, model3d, "--affine", "rigid",
                                              transforms=("warp.nii.gz", "affine.mat"))
    assert "different voxel grids" in text
    assert n > 0.3 * np.prod([s - 6 for s in shape_f])
    assert err <= TOL * rng, (err, rng)
    assert not (tmp_path / "o" / "transform_itk.nii.gz").exists()
    # `apply` takes the same two files and reproduces warped.nii.gz (zeros outside the moving field of view)
    code, text = run_cli("apply", "--transform", str(tmp_path / "o" / "warp.nii.gz"), "--transform",
                         str(tmp_path / "o" / "affine.mat"), "--input", str(tmp_path / "m.nii.gz"), "--out",
                         str(tmp_path / "a.nii.gz"))
    assert code == 0 and "padding zeros" in text, text
    np.testing.assert_allclose(nib.load(str(tmp_path / "a.nii.gz")).get_fdata(dtype=np.float32),
                               nib.load(str(tmp_path / "o" / "warped.nii.gz")).get_fdata(dtype=np.float32),
                               rtol=0, atol=1e-4 * rng)


def _axes(codes: str, spacing, deg: float, origin) -> np.ndarray:
    """An affine whose array axes point `codes` (e.g. "LIA"), then tilted by `deg` (oblique)."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    ras = _affine(0.0, spacing, origin)
    shape = (10, 10, 10)  # inv_ornt_aff only needs it for the flips' offsets
    a = ras @ inv_ornt_aff(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(codes))), shape)
    tilt = np.eye(4)
    tilt[:3, :3] = _rot3(deg)
    return tilt @ a


@pytest.mark.parametrize("codes", ["LIA", "LPS"])
def test_ants_reproduces_warped_in_other_orientations(tmp_path, model3d, run_cli, codes):
    """Reoriented to the model's axes and back (pipeline.orientation): ANTs still reproduces warped.nii.gz from
    transform_itk.nii.gz on files whose axes point LIA / LPS, with a 12 degree tilt on top."""
    shape = (40, 36, 44)
    aff = _axes(codes, (3.0, 3.5, 2.5), 12.0, (-60.0, -70.0, -50.0))
    centre = aff[:3, :3] @ (np.asarray(shape) - 1) / 2 + aff[:3, 3]
    _save(tmp_path / "m.nii.gz", _blob_image(shape, aff, centre + [4, -3, 2], 1), aff)
    _save(tmp_path / "f.nii.gz", _blob_image(shape, aff, centre, 2), aff)
    err, rng, n, _ = _register_and_compare(run_cli, tmp_path, model3d)
    assert n > 0.5 * np.prod([s - 6 for s in shape])
    assert err <= TOL * rng, (err, rng)
    import json

    facts = json.loads((tmp_path / "o" / "summary.json").read_text())["orientation"]["fixed"]
    assert facts["file_axcodes"] == codes and facts["reoriented"]


@pytest.mark.parametrize("single_slice", [False, True], ids=["XY", "XY1"])
def test_ants_reproduces_warped_2d_oblique(tmp_path, run_cli, single_slice):
    """2D images as (X, Y) files (a 2D ITK field) and as single-slice (X, Y, 1) volumes, which ITK reads as 3D
    (register then writes a 3D field with a zero z component)."""
    model = save_model(tmp_path / "reg2.safetensors", random_regnet(2, seed=6),
                       extra=scale_metadata(spacing=(2.0, 2.0)))
    shape = (70, 62)
    aff = _affine(17.0, (1.5, 2.5), (-50.0, -70.0))
    centre = aff[:2, :2] @ (np.asarray(shape) - 1) / 2 + aff[:2, 3]
    as_file = (lambda x: x[..., None]) if single_slice else (lambda x: x)
    _save(tmp_path / "m.nii.gz", as_file(_blob_image(shape, aff, centre + [3, -2], 3)), aff)
    _save(tmp_path / "f.nii.gz", as_file(_blob_image(shape, aff, centre, 4)), aff)
    err, rng, n, _ = _register_and_compare(run_cli, tmp_path, model)
    assert n > 0.5 * np.prod([s - 6 for s in shape])
    assert err <= TOL * rng, (err, rng)
    # and `apply` reads the field back (either layout) and reproduces warped.nii.gz
    code, text = run_cli("apply", "--transform", str(tmp_path / "o" / "transform_itk.nii.gz"), "--input",
                         str(tmp_path / "m.nii.gz"), "--out", str(tmp_path / "a.nii.gz"), "--padding", "border")
    assert code == 0, text
    np.testing.assert_allclose(nib.load(str(tmp_path / "a.nii.gz")).get_fdata(dtype=np.float32).reshape(shape),
                               nib.load(str(tmp_path / "o" / "warped.nii.gz")).get_fdata(dtype=np.float32)
                               .reshape(shape), rtol=0, atol=1e-4 * rng)


def test_generic_label_mode_matches_ants_genericlabel(tmp_path, model3d, run_cli):
    shape = (44, 48, 30)
    aff = _affine(17.0, (3.0, 3.0, 4.5), (-60.0, -80.0, -55.0))
    centre = aff[:3, :3] @ (np.asarray(shape) - 1) / 2 + aff[:3, 3]
    mov = _blob_image(shape, aff, centre + [4, -3, 2], 1)
    _save(tmp_path / "m.nii.gz", mov, aff)
    _save(tmp_path / "f.nii.gz", _blob_image(shape, aff, centre, 2), aff)
    lab = np.digitize(mov, np.percentile(mov, [40, 60, 75, 90])).astype(np.int16) * 10  # 5 labels, 0..40
    _save(tmp_path / "l.nii.gz", lab, aff)
    _register_and_compare(run_cli, tmp_path, model3d, "--labels", str(tmp_path / "l.nii.gz"))
    ours = np.asarray(nib.load(str(tmp_path / "o" / "warped_labels.nii.gz")).dataobj)
    theirs = ants.apply_transforms(fixed=ants.image_read(str(tmp_path / "f.nii.gz")),
                                   moving=ants.image_read(str(tmp_path / "l.nii.gz")),
                                   transformlist=[str(tmp_path / "o" / "transform_itk.nii.gz")],
                                   interpolator="genericLabel").numpy()
    inner = (slice(3, -3),) * 3
    agree = float((ours[inner] == np.rint(theirs[inner])).mean())
    assert agree >= 0.999, agree  # the same rule; disagreements only at float-rounding ties
