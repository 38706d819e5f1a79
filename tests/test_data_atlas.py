"""The bundled MNI152 asset and load_atlas: format, sizes, labels, symmetry, downsampling, builder reproducibility."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepsim_rt.data import LABEL_NAMES, MIRROR_LABELS, atlas_shape, default_slice_index, load_atlas
from deepsim_rt.data.atlas import ASSET_PATH

REPO = Path(__file__).resolve().parents[1]
SHAPES = {1: (160, 192, 160), 2: (80, 96, 80), 4: (40, 48, 40)}


@pytest.fixture(scope="module")
def asset():
    with np.load(ASSET_PATH, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_asset_loads_without_pickle_and_is_small(asset):
    assert ASSET_PATH.stat().st_size <= 3_000_000
    assert asset["t1"].dtype == np.uint8 and asset["labels"].dtype == np.uint8
    assert asset["t1"].shape == asset["labels"].shape == SHAPES[1]
    assert asset["affine"].dtype == np.float64 and asset["affine"].shape == (4, 4)
    np.testing.assert_array_equal(asset["voxel_size"], [1.0, 1.0, 1.0])
    assert tuple(asset["label_names"].tolist()) == LABEL_NAMES
    assert tuple(asset["mirror_labels"].tolist()) == MIRROR_LABELS
    assert int(asset["format_version"]) == 1


def test_licence_notice_ships_beside_the_asset():
    text = (ASSET_PATH.parent / "MNI152_LICENSE.txt").read_text()
    notice = "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute"
    assert notice in text
    assert "McGill University" in text and "Permission to use, copy, modify, and distribute" in text


@pytest.mark.parametrize("voxel_size", [1, 2, 4])
def test_sizes_labels_and_ranges(voxel_size):
    a = load_atlas(3, voxel_size)
    assert a.shape == SHAPES[voxel_size] == atlas_shape(3, voxel_size)
    assert all(s % 8 == 0 for s in a.shape) and all(s % 16 == 0 for s in SHAPES[1])
    assert a.image.shape == a.labels.shape == (1, 1, *SHAPES[voxel_size])
    assert a.image.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert a.image.min() >= 0 and a.image.max() <= 1
    assert a.voxel_size == float(voxel_size) and a.label_names == LABEL_NAMES
    # Every documented label is present, and nothing else.
    assert torch.unique(a.labels).tolist() == list(range(len(LABEL_NAMES)))


@pytest.mark.parametrize("voxel_size", [1, 2, 4])
def test_left_right_labels_mirror(voxel_size):
    a = load_atlas(3, voxel_size)
    mirror = torch.tensor(MIRROR_LABELS)
    flipped = mirror[a.labels.flip(-1)]
    assert torch.equal(flipped, a.labels), "labels are not the mirror image of themselves with L/R swapped"
    assert torch.equal(a.image.flip(-1), a.image)
    # Left labels sit at world x < 0 (RAS+): check via the affine on the leftmost/rightmost label voxels.
    w = a.shape[-1]
    left = (a.labels[0, 0] >= 1) & (a.labels[0, 0] <= 3)
    cols = torch.nonzero(left.any(dim=0).any(dim=0)).flatten()
    assert cols.max() < w // 2 and a.affine[0, 2] > 0  # x grows with the W index
    x_mid = a.affine @ np.array([0, 0, w / 2 - 0.5, 1.0])
    assert x_mid[0] == pytest.approx(0.0)


def test_downsampling_is_block_mean_and_majority():
    fine, coarse = load_atlas(3, 1), load_atlas(3, 2)
    # A slab through the ventricles and cortex (coarse slices 35..50) keeps the check fast and representative.
    f_img, f_lab = fine.image[0, 0, 70:102], fine.labels[0, 0, 70:102]
    c_img, c_lab = coarse.image[0, 0, 35:51], coarse.labels[0, 0, 35:51]
    blocks_img = f_img.reshape(16, 2, 96, 2, 80, 2).double().mean(dim=(1, 3, 5))
    torch.testing.assert_close(c_img.double(), blocks_img, rtol=0, atol=1e-6)
    lab = f_lab.reshape(16, 2, 96, 2, 80, 2).permute(0, 2, 4, 1, 3, 5).reshape(16, 96, 80, 8)
    counts = torch.stack([(lab == c).sum(-1) for c in range(len(LABEL_NAMES))], dim=-1)
    # Majority with ties broken toward the lowest label value: argmax of counts * 8 - label breaks ties that way.
    expect = torch.argmax(counts * 8 - torch.arange(len(LABEL_NAMES)), dim=-1)
    assert torch.equal(c_lab, expect)
    # The affine of a block is the mean world position of its fine voxels.
    fine_idx = np.array([[2 * 10 + a, 2 * 20 + b, 2 * 30 + c, 1.0] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    np.testing.assert_allclose(coarse.affine @ np.array([10, 20, 30, 1.0]), (fine.affine @ fine_idx.T).mean(axis=1))


def test_csf_is_darker_than_gm_darker_than_wm():
    """The derived CSF label (1 - GM - WM inside the brain) must be T1-dark, as real CSF is."""
    a = load_atlas(3, 1)
    img, lab = a.image[0, 0], a.labels[0, 0]
    med = [img[(lab == t) | (lab == t + 3)].median().item() for t in (1, 2, 3)]
    assert med[0] + 0.1 < med[1] and med[1] + 0.1 < med[2], f"median T1 CSF/GM/WM = {med}"
    assert (img[lab == 0] == 0).float().mean() > 0.99  # background is (nearly all) outside the stripped brain


@pytest.mark.parametrize("voxel_size", [2, 4])
def test_2d_slice(voxel_size):
    a2, a3 = load_atlas(2, voxel_size), load_atlas(3, voxel_size)
    k = default_slice_index(voxel_size)
    assert a2.slice_index == k and a2.shape == SHAPES[voxel_size][1:] == atlas_shape(2, voxel_size)
    assert torch.equal(a2.image[0, 0], a3.image[0, 0, k]) and torch.equal(a2.labels[0, 0], a3.labels[0, 0, k])
    assert torch.unique(a2.labels).tolist() == list(range(len(LABEL_NAMES)))
    # The 2D affine maps (h, w, 0) to the same world point as the 3D one maps (k, h, w); world z ~ +8 mm.
    np.testing.assert_allclose(a2.affine @ np.array([5, 7, 0, 1.0]), a3.affine @ np.array([k, 5, 7, 1.0]))
    assert abs((a2.affine @ np.array([0, 0, 0, 1.0]))[2] - 8.0) <= voxel_size / 2
    other = load_atlas(2, voxel_size, slice_index=3)
    assert other.slice_index == 3 and torch.equal(other.labels[0, 0], a3.labels[0, 0, 3])


def test_returns_fresh_tensors():
    a = load_atlas(2, 4)
    a.image.zero_()
    a.labels.zero_()
    b = load_atlas(2, 4)
    assert b.image.max() > 0 and b.labels.max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ndim=4), "ndim must be 2 or 3"),
        (dict(voxel_size=3), "voxel_size must be one of"),
        (dict(voxel_size=True), "voxel_size must be one of"),
        (dict(ndim=2, voxel_size=4, slice_index=40), r"slice_index must be an int in \[0, 40\)"),
        (dict(ndim=2, voxel_size=4, slice_index=-1), "slice_index must be an int"),
        (dict(ndim=3, slice_index=3), "slice_index is for ndim=2 only"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_atlas(**kwargs)


def test_loading_needs_neither_nilearn_nor_nibabel():
    """The GPU machine has no nibabel/nilearn: importing deepsim_rt.data and loading the atlas must not need them."""
    code = (
        "import sys; sys.modules['nilearn'] = None; sys.modules['nibabel'] = None\n"
        "from deepsim_rt.data import load_atlas, SyntheticConfig\n"
        "a = load_atlas(2, 4); print(tuple(a.image.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1, 48, 40)"


def test_builder_reproduces_committed_asset():
    pytest.importorskip("nilearn")
    pytest.importorskip("nibabel")
    spec = importlib.util.spec_from_file_location("build_mni_asset", REPO / "tools" / "build_mni_asset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    arrays = tool.build_arrays()
    assert tool.compare(arrays, ASSET_PATH) == []
