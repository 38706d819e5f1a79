"""ITK's T1 / PD slices (deepsim_rt.data.itk_slices) and their 2D cross-contrast benchmark's pieces
(deepsim_rt.realbench.itk_t1pd): the .deb member checks on a stand-in package (never the network), the end-point
error metric's known answers, the seeded field and its inverse."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from deepsim_rt._io import file_sha256
from deepsim_rt.data import itk_slices
from deepsim_rt.realbench.itk_t1pd import invert_field, mean_epe, smooth_field, warp_image

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb (Debian's package tool) absent")


def _fake_deb(tmp_path, corrupt: str | None = None):
    """A stand-in insighttoolkit5-examples .deb holding the three PNGs at their member paths (a gradient T1 stored as
    RGB like the real one, a PD, an ellipse mask with the 20-pixel border); `corrupt` names a file whose bytes get
    one more byte. -> (deb path, {name: sha256 of the member as packed})."""
    from PIL import Image

    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: fake-itk\nVersion: 1\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    x, y = itk_slices.SHAPE
    t1 = (np.arange(y)[:, None] + np.arange(x)[None, :]).astype(np.uint8)  # rows = y, columns = x
    pd = (255 - t1).astype(np.uint8)
    b = itk_slices.BORDER
    yy, xx = np.mgrid[:y + 2 * b, :x + 2 * b]
    mask = ((((yy - (y / 2 + b)) / (y / 2)) ** 2 + ((xx - (x / 2 + b)) / (x / 2)) ** 2) < 1).astype(np.uint8) * 255
    shas = {}
    for name, arr in (("t1", np.stack([t1] * 3, -1)), ("pd", pd), ("mask", mask)):
        member = root / itk_slices.FILES[name][0]
        member.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(member)
        if name == corrupt:
            member.write_bytes(member.read_bytes() + b"\0")
        shas[name] = file_sha256(member)
    deb = tmp_path / "fake.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True)
    return deb, shas, (t1, pd, mask)


@needs_dpkg
def test_extract_checks_every_member_sha256(tmp_path, monkeypatch):
    deb, shas, _ = _fake_deb(tmp_path, corrupt="pd")
    # pin the honest files' digests; the corrupted PD keeps the digest of the real package: it must be refused
    monkeypatch.setitem(itk_slices.FILES, "t1", (itk_slices.FILES["t1"][0], shas["t1"]))
    monkeypatch.setitem(itk_slices.FILES, "mask", (itk_slices.FILES["mask"][0], shas["mask"]))
    with pytest.raises(ValueError) as e:
        itk_slices.extract_slices(deb, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("BrainProtonDensitySlice.png: sha256 " + shas["pd"])
    assert "differs from the expected f23b1322c712" in msg
    assert not (tmp_path / "out" / "pd.nii.gz").exists()


@needs_dpkg
def test_extract_converts_to_x_y_nifti_and_crops_the_mask_border(tmp_path, monkeypatch):
    import nibabel as nib

    deb, shas, (t1, pd, mask) = _fake_deb(tmp_path)
    for name in shas:
        monkeypatch.setitem(itk_slices.FILES, name, (itk_slices.FILES[name][0], shas[name]))
    got = itk_slices.extract_slices(deb, tmp_path / "out")
    a_t1, a_pd, a_mask = got.arrays()
    assert a_t1.shape == a_pd.shape == a_mask.shape == itk_slices.SHAPE == (181, 217)
    np.testing.assert_array_equal(a_t1, t1.T)  # one channel of the RGB, (rows, cols) -> (X, Y)
    np.testing.assert_array_equal(a_pd, pd.T)
    b = itk_slices.BORDER
    np.testing.assert_array_equal(a_mask, mask[b:-b, b:-b].T > 0)
    np.testing.assert_allclose(nib.load(str(got.t1)).affine, np.eye(4))


def test_missing_member_and_missing_client_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dpkg-deb on PATH
    with pytest.raises(ValueError, match="^cannot extract the ITK slices: the client `dpkg-deb` is not installed$"):
        itk_slices.extract_slices(tmp_path / "x.deb", tmp_path / "out")


def test_mean_epe_known_answers():
    truth = np.zeros((2, 5, 4))
    u = truth.copy()
    u[0] += 3.0
    u[1] += 4.0
    mask = np.zeros((5, 4), bool)
    mask[1:4, 1:3] = True
    assert mean_epe(u, truth, mask) == pytest.approx(5.0)  # 3-4-5 in every masked voxel
    assert mean_epe(u, truth, mask, spacing=(2.0, 0.5)) == pytest.approx(np.hypot(6.0, 2.0))  # voxels -> mm
    u[:, 0, 0] = 100.0  # outside the mask: not counted
    assert mean_epe(u, truth, mask) == pytest.approx(5.0)
    u[:, 1, 1] = 0.0  # one of the 6 masked voxels exact: mean (5 * 5 + 0) / 6
    assert mean_epe(u, truth, mask) == pytest.approx(25.0 / 6.0)
    with pytest.raises(ValueError, match="expected u and truth"):
        mean_epe(u, truth[:, :4], mask)
    with pytest.raises(ValueError, match="mask is empty"):
        mean_epe(u, truth, np.zeros((5, 4), bool))


def test_smooth_field_is_seeded_and_scaled_and_its_inverse_undoes_it():
    shape = (60, 70)
    mask = np.zeros(shape, bool)
    mask[10:50, 10:60] = True
    w = smooth_field(shape, seed=3, max_mm=4.0, sigma_px=8.0, mask=mask)
    np.testing.assert_array_equal(w, smooth_field(shape, seed=3, max_mm=4.0, sigma_px=8.0, mask=mask))
    assert not np.allclose(w, smooth_field(shape, seed=4, max_mm=4.0, sigma_px=8.0, mask=mask))
    assert np.sqrt((w ** 2).sum(0))[mask].max() == pytest.approx(4.0)
    z, residual = invert_field(w)
    assert residual < 1e-6
    # moving(y) = img(y + z(y)) then moving(x + w(x)) = img(x) for a smooth (linear-interpolation-exact) image
    xx, yy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    img = (2.0 * xx + 3.0 * yy).astype(np.float64)
    moving = warp_image(img, z)
    back = warp_image(moving, w)
    inner = np.zeros(shape, bool)
    inner[8:-8, 8:-8] = True  # away from the border clamp
    # linear interpolation of a curved moving image: 0.14 measured; range 0-340, a wrong inverse errs by ~20
    assert np.abs(back - img)[inner].max() < 0.5
    with pytest.raises(ValueError, match="sigma_px > 0"):
        smooth_field(shape, seed=0, sigma_px=0.0)


def test_model_axes_puts_anterior_last_on_axis_0_and_columns_on_axis_1():
    from deepsim_rt.realbench.itk_t1pd import model_axes

    x, y = itk_slices.SHAPE
    a = np.zeros((x, y), np.float32)  # (X, Y) = (PNG columns, rows from the top)
    a[5, 0] = 1.0  # column 5 of the PNG's top row (anterior)
    m = model_axes(a)
    assert m.shape == (y, x) and m.flags.c_contiguous
    assert m[y - 1, 5] == 1.0 and m.sum() == 1.0


def test_folding_pct_counts_the_mask_only():
    from deepsim_rt.realbench.itk_t1pd import folding_pct

    shape = (12, 10)
    u = np.zeros((2, *shape))
    mask = np.zeros(shape, bool)
    mask[2:10, 2:8] = True
    assert folding_pct(u, mask) == 0.0
    u[0] = -2.0 * np.arange(shape[0])[:, None]  # x + u = -x along axis 0: det J = -1 everywhere
    assert folding_pct(u, mask) == 100.0
    u[0, 6:] = 0.0  # unfold rows 6.. (the mask's rows 2..9): rows 2-4 keep det -1, 5 mixes, 6-9 are fine
    assert 0.0 < folding_pct(u, mask) < 100.0
