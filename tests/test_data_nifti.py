"""NIfTI IO (round trip, error paths, atomic writes) and NiftiFolderDataset (CSV pairs, all-to-atlas, checks)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from deepsim_rt.data import NiftiFolderDataset, load_atlas, load_nifti, normalize_intensity, save_nifti  # noqa: E402

AFFINE = np.array([[0.0, 0.0, 1.5, -30.0], [0.0, -1.2, 0.0, 40.0], [2.0, 0.0, 0.0, -12.5], [0, 0, 0, 1]])
SHAPE = (7, 9, 5)


def _rand(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_data_affine_header(tmp_path, suffix):
    data = _rand()
    hdr = nib.Nifti1Header()
    hdr["descrip"] = b"deepsim_rt test"
    hdr.set_xyzt_units("mm", "sec")
    path = save_nifti(tmp_path / f"img{suffix}", data, AFFINE, header=hdr)
    out, affine, header = load_nifti(path)
    assert out.dtype == np.float32 and out.shape == SHAPE
    np.testing.assert_array_equal(out, data)
    np.testing.assert_allclose(affine, AFFINE, rtol=0, atol=1e-6)  # the header stores the affine as float32
    assert header["descrip"].item() == b"deepsim_rt test"
    assert header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(header.get_zooms(), (2.0, 1.2, 1.5), rtol=1e-6)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind


def test_round_trip_integer_labels_and_torch_input(tmp_path):
    labels = torch.randint(0, 7, SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.int16)
    save_nifti(tmp_path / "lab.nii.gz", labels, np.eye(4))
    out, _, header = load_nifti(tmp_path / "lab.nii.gz")
    assert header.get_data_dtype() == np.int16
    np.testing.assert_array_equal(out, labels.numpy())


def test_header_dtype_and_scaling_do_not_quantize(tmp_path):
    """A header from a uint8 file with scaling must not squeeze float data back into uint8."""
    src = nib.Nifti1Image(np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE), np.eye(4))
    src.header.set_slope_inter(0.5, 3.0)
    data = _rand()
    save_nifti(tmp_path / "f.nii", data, AFFINE, header=src.header)
    np.testing.assert_array_equal(load_nifti(tmp_path / "f.nii")[0], data)


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_nifti(tmp_path / "nope.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(ValueError, match="junk.nii.gz"):
        load_nifti(junk)
    junk_plain = tmp_path / "junk.nii"
    junk_plain.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="junk.nii"):
        load_nifti(junk_plain)
    # Truncated: the header parses, the data is cut short.
    good = save_nifti(tmp_path / "good.nii", _rand(), AFFINE)
    raw = good.read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[: len(raw) - 200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_nifti(cut)
    gz = gzip.compress(raw)
    cutgz = tmp_path / "cut.nii.gz"
    cutgz.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="cut.nii.gz"):
        load_nifti(cutgz)


def test_4d_and_2d(tmp_path):
    save_nifti_4d = nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), np.eye(4))
    nib.save(save_nifti_4d, tmp_path / "four.nii")
    with pytest.raises(ValueError, match="expected a 3D image .* 4D data of shape"):
        load_nifti(tmp_path / "four.nii")
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 1), np.float32), np.eye(4)), tmp_path / "single.nii")
    assert load_nifti(tmp_path / "single.nii")[0].shape == SHAPE  # one-volume 4D files are 3D images
    save_nifti(tmp_path / "flat.nii", np.ones((6, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="allow_2d=True"):
        load_nifti(tmp_path / "flat.nii")
    assert load_nifti(tmp_path / "flat.nii", allow_2d=True)[0].shape == (6, 4)


def test_save_rejects_bad_input_and_writes_nothing(tmp_path):
    cases = [
        (dict(path=tmp_path / "a.png", array=_rand(), affine=AFFINE), "must end in .nii or .nii.gz"),
        (dict(path=tmp_path / "a.nii", array=_rand(), affine=np.eye(3)), r"affine must be a finite \(4, 4\)"),
        (dict(path=tmp_path / "a.nii", array=_rand(), affine=np.full((4, 4), np.nan)), "affine must be a finite"),
        (dict(path=tmp_path / "a.nii", array=np.zeros((2, 2, 2, 2, 2)), affine=AFFINE), "2D or 3D array"),
        (dict(path=tmp_path / "a.nii", array=np.zeros(SHAPE, complex), affine=AFFINE), "must be numeric"),
        (dict(path=tmp_path / "sub" / "a.nii", array=_rand(), affine=AFFINE), "does not exist"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            save_nifti(**kwargs)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    """A crash after the temp file is written but before the rename: the target keeps its old content, no temp."""
    target = save_nifti(tmp_path / "img.nii.gz", _rand(seed=1), AFFINE)
    before = target.read_bytes()
    real_save = nib.save

    def save_then_crash(img, filename):
        real_save(img, filename)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(nib, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save_nifti(target, _rand(seed=2), AFFINE)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["img.nii.gz"]


def test_normalize_intensity():
    x = np.array([[-5.0, 0.0], [5.0, 15.0]], np.float32)
    np.testing.assert_allclose(normalize_intensity(x), [[0, 0.25], [0.5, 1.0]])
    hot = np.concatenate([np.linspace(0, 1, 999), [1000.0]]).astype(np.float32)
    y = normalize_intensity(hot, "percentile", (0.0, 99.0))
    assert y.min() == 0 and y.max() == 1 and np.median(y) > 0.4  # the hot voxel no longer squashes the rest
    assert normalize_intensity(np.full((3, 3), 7.0)).max() == 0
    with pytest.raises(ValueError, match="normalize must be"):
        normalize_intensity(x, "zscore")


def _folder(tmp_path, names=("s1", "s2", "s3"), shape=SHAPE, labels=True):
    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, n in enumerate(names):
        save_nifti(img_dir / f"{n}.nii.gz", _rand(shape, seed=k) * (k + 1), AFFINE)
        if labels:
            save_nifti(lab_dir / f"{n}.nii.gz", rng.integers(0, 4, size=shape).astype(np.uint8), AFFINE)
    return img_dir, lab_dir


def test_csv_pairs_with_labels(tmp_path):
    img_dir, lab_dir = _folder(tmp_path)
    csv = tmp_path / "pairs.csv"
    csv.write_text("moving,fixed\ns1.nii.gz,s2\ns3 , s1.nii.gz\n")
    ds = NiftiFolderDataset(img_dir, pairs_csv=csv, labels_dir=lab_dir)
    assert len(ds) == 2 and ds.pair_names() == [("s1.nii.gz", "s2.nii.gz"), ("s3.nii.gz", "s1.nii.gz")]
    item = ds[1]
    assert item["moving"].shape == item["fixed"].shape == (1, *SHAPE) and item["moving"].dtype == torch.float32
    assert item["moving"].min() == 0 and item["moving"].max() == 1  # min-max normalized per image
    assert item["moving_labels"].dtype == torch.int64
    np.testing.assert_array_equal(item["fixed_labels"][0].numpy(), load_nifti(lab_dir / "s1.nii.gz")[0])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["moving"].shape == (2, 1, *SHAPE) and batch["moving_name"] == ["s1.nii.gz", "s3.nii.gz"]


def test_all_to_atlas_path_and_atlas_object(tmp_path):
    img_dir, lab_dir = _folder(tmp_path)
    atlas_img = save_nifti(tmp_path / "atlas.nii.gz", _rand(seed=9), AFFINE)
    atlas_lab = save_nifti(tmp_path / "atlas_lab.nii.gz", np.ones(SHAPE, np.uint8), AFFINE)
    ds = NiftiFolderDataset(img_dir, atlas=atlas_img, atlas_labels=atlas_lab, labels_dir=lab_dir)
    assert ds.pair_names() == [(f"s{k}.nii.gz", "atlas.nii.gz") for k in (1, 2, 3)]
    assert torch.equal(ds[0]["fixed_labels"], torch.ones((1, *SHAPE), dtype=torch.int64))
    rev = NiftiFolderDataset(img_dir, atlas=atlas_img, atlas_role="moving")
    assert rev.pair_names()[0] == ("atlas.nii.gz", "s1.nii.gz") and "moving_labels" not in rev[0]

    # The bundled atlas as the fixed image: the files must have its grid.
    atlas = load_atlas(3, 4)
    dir2 = tmp_path / "mni"
    dir2.mkdir()
    save_nifti(dir2 / "a.nii", atlas.image[0, 0].numpy() * 300.0, atlas.affine)
    ds2 = NiftiFolderDataset(dir2, atlas=atlas)
    item = ds2[0]
    assert item["fixed_name"] == "atlas"
    # min-max normalization of 300 * atlas (min 0) gives atlas / max(atlas).
    torch.testing.assert_close(item["moving"], item["fixed"] / item["fixed"].max(), rtol=0, atol=1e-6)


def test_folder_errors(tmp_path):
    img_dir, lab_dir = _folder(tmp_path)
    with pytest.raises(ValueError, match="give pairs_csv .* or atlas"):
        NiftiFolderDataset(img_dir)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("src,dst\ns1,s2\n")
    with pytest.raises(ValueError, match="'moving' and 'fixed' columns"):
        NiftiFolderDataset(img_dir, pairs_csv=bad_csv)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("moving,fixed\ns1,s2\ns1,s9\n")
    with pytest.raises(ValueError, match=r"line 3: no image 's9'"):
        NiftiFolderDataset(img_dir, pairs_csv=unknown)
    (lab_dir / "s2.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"lacks label maps for \['s2.nii.gz'\]"):
        NiftiFolderDataset(img_dir, atlas=img_dir / "s1.nii.gz", labels_dir=lab_dir)
    full_labels = _folder(tmp_path / "x")[1]
    with pytest.raises(ValueError, match="the atlas has no labels"):
        NiftiFolderDataset(img_dir, atlas=img_dir / "s1.nii.gz", labels_dir=full_labels)
    with pytest.raises(ValueError, match="the images need labels too"):
        NiftiFolderDataset(img_dir, atlas=img_dir / "s1.nii.gz", atlas_labels=full_labels / "s1.nii.gz")
    # Shapes must agree: one odd image out.
    save_nifti(img_dir / "s4.nii.gz", _rand((7, 9, 6)), AFFINE)
    with pytest.raises(ValueError, match=r"one spatial shape.*s4.nii.gz: \(7, 9, 6\)"):
        NiftiFolderDataset(img_dir, atlas=img_dir / "s1.nii.gz")


def test_non_integer_labels_rejected(tmp_path):
    img_dir, lab_dir = _folder(tmp_path, names=("s1",))
    save_nifti(lab_dir / "s1.nii.gz", np.full(SHAPE, 0.5, np.float32), AFFINE)
    atlas_lab = save_nifti(tmp_path / "al.nii", np.ones(SHAPE, np.uint8), AFFINE)
    ds = NiftiFolderDataset(img_dir, atlas=img_dir / "s1.nii.gz", atlas_labels=atlas_lab, labels_dir=lab_dir)
    with pytest.raises(ValueError, match="non-negative integers"):
        ds[0]
