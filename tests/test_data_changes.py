"""The topological-change benchmark (deepsim_rt.data.changes): deterministic cases, voxel-exact masks, contracts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from deepsim_rt.data.atlas import load_atlas
from deepsim_rt.data.changes import CHANGE_KINDS, ChangeBenchmark, ChangeBenchmarkConfig, insert_change
from deepsim_rt.data.synthetic import SyntheticSubjects

_TISSUE = {"csf": 0, "gm": 1, "wm": 2}


@pytest.fixture(scope="module")
def bench2d() -> ChangeBenchmark:
    return ChangeBenchmark(ChangeBenchmarkConfig(data="tiny-2d", split="test", n_cases=6))


def _same(a, b) -> None:
    for f in ("index", "kind", "moving_index", "fixed_index", "params"):
        assert getattr(a, f) == getattr(b, f)
    for f in ("moving", "fixed", "moving_labels", "fixed_labels", "mask", "brain"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_generator_is_deterministic(bench2d):
    again = ChangeBenchmark(ChangeBenchmarkConfig(data="tiny-2d", split="test", n_cases=6), cache=False)
    for k in range(len(bench2d)):
        _same(bench2d[k], again[k])
    other = ChangeBenchmark(ChangeBenchmarkConfig(data="tiny-2d", split="test", n_cases=6, seed=1))
    assert any(other[k].params != bench2d[k].params for k in range(6))


def test_cases_cycle_kinds_and_pair_distinct_subjects(bench2d):
    n = len(bench2d.subjects)
    for k in range(len(bench2d)):
        c = bench2d[k]
        assert c.kind == CHANGE_KINDS[k % 3]
        assert (c.fixed_index, c.moving_index) == (k % n, (k % n + 1) % n)
        assert torch.equal(c.moving, bench2d.subjects[c.moving_index].image)  # the moving subject is unchanged


@pytest.mark.parametrize("data", ["tiny-2d", "tiny-3d"])
def test_mask_is_exactly_the_label_change(data):
    bench = ChangeBenchmark(ChangeBenchmarkConfig(data=data, split="test", n_cases=3))
    for k in range(3):
        c = bench[k]
        unchanged = bench.subjects[c.fixed_index]
        # Same deformation and intensity draws as the unchanged subject; the mask is where the labels differ.
        assert torch.equal(c.mask, c.fixed_labels != unchanged.labels), (data, c.kind)
        assert int(c.mask.sum()) > 0
        assert bool((c.mask <= c.brain).all())
        tissue = (c.fixed_labels[c.mask] - 1) % 3
        assert bool((tissue == _TISSUE[c.params["tissue"]]).all())
        assert dataclasses.is_dataclass(c) and c.mask.dtype == torch.bool and c.mask.shape == c.fixed.shape


def test_image_changes_only_near_the_mask(bench2d):
    # Outside the mask the changed subject differs only by interpolation / blur bleeding (<= 3 voxels at 4 mm) and
    # the brain-mean shift of the contrast step; far away it is the same image to < 1e-2 (measured max 4e-3).
    for k in range(3):
        c = bench2d[k]
        unchanged = bench2d.subjects[c.fixed_index].image
        far = ndimage.distance_transform_edt(~c.mask[0].numpy()) > 3
        diff = (c.fixed[0] - unchanged[0]).abs().numpy()
        assert diff[far].max() < 1e-2, c.kind
        assert diff[c.mask[0].numpy()].max() > 0.1, c.kind  # the change itself is visible


@pytest.mark.parametrize("kind", CHANGE_KINDS)
def test_insert_change_alters_exactly_the_region(kind):
    atlas = load_atlas(2, 2)
    g = np.random.default_rng(7)
    altered, region, params = insert_change(atlas, kind, g)
    lab0, lab1 = atlas.labels[0, 0].numpy(), altered.labels[0, 0].numpy()
    img0, img1 = atlas.image[0, 0].numpy(), altered.image[0, 0].numpy()
    assert region.dtype == np.bool_ and params["voxels"] == int(region.sum()) >= 4
    assert np.array_equal(lab1 != lab0, region)
    assert np.array_equal(img1[~region], img0[~region])
    t = _TISSUE[params["tissue"]]
    mean_t = img0[(lab0 > 0) & ((lab0 - 1) % 3 == t)].mean()
    np.testing.assert_allclose(img1[region], mean_t, rtol=0, atol=1e-6)
    assert bool(((lab1[region] - 1) % 3 == t).all())
    # Hemispheres kept: a left voxel stays left (labels 1-3), a right one right (4-6).
    assert np.array_equal((lab1[region] - 1) // 3, (lab0[region] - 1) // 3)
    again = insert_change(atlas, kind, np.random.default_rng(7))
    assert np.array_equal(again[1], region) and again[2] == params


def test_changed_subject_uses_the_subjects_own_draws(bench2d):
    c = bench2d[0]
    # A zero change (the atlas itself) through the same path reproduces the unchanged subject bit for bit.
    subj = SyntheticSubjects(bench2d.synthetic, "test", cache=False, atlas=bench2d.subjects.atlas)[c.fixed_index]
    assert torch.equal(subj.image, bench2d.subjects[c.fixed_index].image)


@pytest.mark.parametrize("kw, match", [
    (dict(split="holdout"), "split must be one of"),
    (dict(kinds=("tumour",)), "kinds must be"),
    (dict(kinds=()), "kinds must be"),
    (dict(n_cases=0), "n_cases must be"),
    (dict(seed=-1), "seed must be"),
    (dict(lesion_radius_mm=(5.0, 2.0)), "lesion_radius_mm must be"),
    (dict(gap_width_mm=0), "gap_width_mm must be"),
    (dict(data="no-such-preset"), "unknown SyntheticConfig preset"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ChangeBenchmarkConfig(**kw)


def test_index_and_kind_errors(bench2d):
    with pytest.raises(IndexError, match="out of range"):
        bench2d[6]
    with pytest.raises(ValueError, match="must be an int"):
        bench2d["0"]
    with pytest.raises(ValueError, match="kind must be one of"):
        insert_change(load_atlas(2, 4), "tumour", np.random.default_rng(0))
    with pytest.raises(ValueError, match="ChangeBenchmarkConfig"):
        ChangeBenchmark({"data": "tiny-2d"})
