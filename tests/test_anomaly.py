"""Change scores (deepsim_rt.anomaly): known answers, the reference cross-check, the AUC, the detector's contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from deepsim_rt.anomaly import (
    JACOBIAN_FLOOR,
    ChangeDetector,
    change_maps,
    jacobian_score,
    resolve_extractor,
    roc_auc,
    semantic_change,
)
from deepsim_rt.anomaly.detector import load_extractor
from deepsim_rt.data.atlas import load_atlas
from deepsim_rt.losses.deepsim import DeepSimLoss
from deepsim_rt.nn import NetConfig, build_model, save_model
from deepsim_rt.runtime import bundled_model_path


@pytest.fixture(scope="module")
def seg2d() -> torch.nn.Module:
    return load_extractor(bundled_model_path("default-2d", "seg"), 2)


def _tiny_extractor(ndim: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(NetConfig.make("seg", ndim, "tiny", n_classes=3)).eval()


# ----------------------------------------------------------------------------------------------------------------
# Known answers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 37, 41), (2, 1, 11, 16, 13)])
def test_identical_images_score_zero(shape, rng):
    x = torch.rand(shape, generator=rng)
    maps = change_maps(_tiny_extractor(len(shape) - 2), x, x.clone(), None)
    assert maps.semantic.shape == (shape[0], *shape[2:])
    # cos(a, a) = |a|^2 / max(|a|^2, eps): 1 up to fp32 rounding wherever the features are not ~0.
    assert float(maps.semantic.abs().max()) < 1e-6
    assert torch.equal(maps.residual, torch.zeros_like(maps.residual))
    assert torch.equal(maps.jacobian, torch.zeros_like(maps.jacobian))


def test_inserted_blob_ranks_highest(seg2d):
    atlas = load_atlas(2, 2)
    moving = atlas.image.clone()
    fixed = moving.clone()
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(80), indexing="ij")
    blob = ((yy - 30) ** 2 + (xx - 22) ** 2) <= 9  # radius 3 voxels (6 mm) in the left hemisphere's GM/WM
    fixed[0, 0][blob] = 0.38  # the atlas CSF intensity: a cyst-like lesion
    maps = change_maps(seg2d, moving, fixed, None)
    brain = atlas.labels[0, 0] > 0
    near = torch.from_numpy(np.asarray(
        __import__("scipy.ndimage", fromlist=["x"]).binary_dilation(blob.numpy(), iterations=2)))
    sem = maps.semantic[0]
    # The maximum lies on the blob (its 2-voxel rim included: the coarsest level is 1/8 resolution) ...
    assert bool(near[divmod(int(sem.argmax()), 80)])
    # ... and the blob outranks the rest of the brain (measured AUC 0.998).
    assert roc_auc(sem, blob, where=brain) > 0.97
    assert roc_auc(maps.residual[0], blob, where=brain) == 1.0  # undeformed pair: the residual is the blob


def test_semantic_equals_the_deepsim_similarity_map(seg2d, rng):
    a = torch.rand((2, 1, 32, 24), generator=rng)
    b = torch.rand((2, 1, 32, 24), generator=rng)
    combined, levels = semantic_change(seg2d, a, b)
    ref = DeepSimLoss(seg2d).similarity_map(a, b)[:, 0]
    torch.testing.assert_close(combined, 1.0 - ref, rtol=0, atol=1e-6)
    assert len(levels) == 3 and all(lv.shape == (2, 32, 24) for lv in levels)
    torch.testing.assert_close(torch.stack(levels).mean(0), combined, rtol=0, atol=0)


def test_any_size_is_padded_and_cropped(seg2d, rng):
    # An odd size is padded (replicate) for the extractor and the maps cropped back onto the input grid; cropping
    # a multiple-of-8 image's maps equals scoring the same padded image.
    a = torch.rand((1, 1, 27, 21), generator=rng)
    b = torch.rand((1, 1, 27, 21), generator=rng)
    combined, _ = semantic_change(seg2d, a, b)
    assert combined.shape == (1, 27, 21)
    from deepsim_rt.runtime import crop, pad_to_multiple

    ap, pads = pad_to_multiple(a, 8, "replicate")
    bp, _ = pad_to_multiple(b, 8, "replicate")
    full, _ = semantic_change(seg2d, ap, bp)
    torch.testing.assert_close(crop(full[:, None], pads)[:, 0], combined, rtol=0, atol=0)


@pytest.mark.parametrize("ndim, s", [(2, 1.25), (3, 0.8)])
def test_jacobian_of_a_scaling(ndim, s):
    # u(p) = (s - 1) p on every axis: det J = s**ndim, score |ndim log s|.
    shape = (6, 7, 5)[:ndim]
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    u = torch.stack([(s - 1.0) * g for g in grids])[None]
    score, logd = jacobian_score(u)
    torch.testing.assert_close(logd, torch.full_like(logd, ndim * math.log(s)), rtol=0, atol=1e-6)
    torch.testing.assert_close(score, logd.abs(), rtol=0, atol=0)


def test_jacobian_floor_for_folding():
    u = torch.zeros((1, 2, 5, 5), dtype=torch.float64)
    u[0, 0] = -2.0 * torch.arange(5.0, dtype=torch.float64)[:, None]  # phi_0 = -p_0: det J = -1 (a reflection)
    score, _ = jacobian_score(u)
    torch.testing.assert_close(score, torch.full_like(score, -math.log(JACOBIAN_FLOOR)), rtol=0, atol=1e-6)


def test_warping_in_change_maps_uses_the_displacement(rng):
    # An integer shift of 2 voxels along W: warped = moving rolled, so fixed = that roll scores a zero residual
    # away from the last 2 columns (where border padding repeats the edge instead of wrapping).
    ext = _tiny_extractor(2)
    moving = torch.rand((1, 1, 16, 24), generator=rng)
    u = torch.zeros((1, 2, 16, 24))
    u[:, 1] = 2.0
    fixed = torch.roll(moving, -2, dims=-1)
    maps = change_maps(ext, moving, fixed, u)
    assert float(maps.residual[..., :-2].abs().max()) < 1e-5  # grid_sample coordinate rounding (measured 1.2e-6)
    assert float(change_maps(ext, moving, fixed, None).residual.max()) > 0.5  # unaligned: far from zero
    assert torch.equal(maps.jacobian, torch.zeros_like(maps.jacobian))


def test_triton_path_matches_reference(monkeypatch, rng):
    # The CUDA code path of the maps (multilayer_cosine reduction="none" in the fused Triton kernel), run under the
    # interpreter; same maps as the reference to fp32 rounding.
    pytest.importorskip("triton")
    ext = _tiny_extractor(2, seed=3)
    a = torch.rand((1, 1, 16, 24), generator=rng)
    b = torch.rand((1, 1, 16, 24), generator=rng)
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "reference")
    ref, ref_levels = semantic_change(ext, a, b)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DEEPSIM_RT_BACKEND", "triton")
    tri, tri_levels = semantic_change(ext, a, b)
    torch.testing.assert_close(tri, ref, rtol=0, atol=2e-6)
    for t, r in zip(tri_levels, ref_levels, strict=True):
        torch.testing.assert_close(t, r, rtol=0, atol=2e-6)


@pytest.mark.gpu
def test_cuda_maps_match_cpu_reference(seg2d, rng):
    # On CUDA the per-level maps come from the deepsim_rt::multilayer_cosine_maps Triton op (dispatch "op" route).
    from deepsim_rt.kernels.dispatch import HAS_TRITON_OPS, backend_for

    a = torch.rand((2, 1, 40, 48), generator=rng)
    b = torch.rand((2, 1, 40, 48), generator=rng)
    ref, _ = semantic_change(seg2d, a, b)
    ext = load_extractor(bundled_model_path("default-2d", "seg"), 2, device="cuda")
    assert backend_for(a.cuda()) == ("op" if HAS_TRITON_OPS else "reference")
    out, _ = semantic_change(ext, a.cuda(), b.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-4)  # cuDNN vs CPU conv rounding in the features


# ----------------------------------------------------------------------------------------------------------------
# AUC
# ----------------------------------------------------------------------------------------------------------------
def test_auc_hand_computed():
    # Positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of the 4 pairs ordered -> 0.75.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # Ties count 1/2: positives {1, 2}, negatives {1, 0}: (0.5 + 1 + 1 + 1) / 4.
    assert roc_auc(np.array([1.0, 1.0, 2.0, 0.0]), np.array([True, False, True, False])) == 0.875
    assert roc_auc(np.zeros(6), np.array([0, 1, 0, 1, 0, 0])) == 0.5
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False])) == 1.0


def test_auc_matches_sklearn_with_ties_and_region():
    g = np.random.default_rng(0)
    s = np.round(g.normal(size=(40, 30)), 1)  # rounding makes many ties
    y = g.random((40, 30)) < 0.2
    w = g.random((40, 30)) < 0.7
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-12)
    assert roc_auc(s, y, where=w) == pytest.approx(roc_auc_score(y[w], s[w]), abs=1e-12)


@pytest.mark.parametrize("args, match", [
    ((np.ones(3), np.zeros(3)), "positive and negative"),
    ((np.ones(3), np.ones(3)), "positive and negative"),
    ((np.array([1.0, np.nan]), np.array([0, 1])), "NaN"),
    ((np.ones(3), np.ones(4)), "same number"),
    ((np.ones(3), np.array([0, 2, 1])), "only 0 and 1"),
    (([1.0, 2.0], np.array([0, 1])), "numpy array or a torch tensor"),
])
def test_auc_errors(args, match):
    with pytest.raises(ValueError, match=match):
        roc_auc(*args)


# ----------------------------------------------------------------------------------------------------------------
# Detector and its contracts
# ----------------------------------------------------------------------------------------------------------------
def test_detector_without_registration_scores_identical_images_zero(seg2d):
    det = ChangeDetector(None, seg2d)
    img = load_atlas(2, 2).image[0, 0].numpy() * 200.0  # any intensity units: min-max normalized inside
    maps = det.detect(img, img.copy())
    assert maps.semantic.shape == (1, 96, 80)
    assert float(maps.semantic.abs().max()) < 1e-6 and float(maps.residual.abs().max()) == 0.0


def test_detector_bundled_model_shapes():
    det = ChangeDetector.load("default-2d", device="cpu")
    assert det.extractor_source.endswith("default-2d/seg.safetensors")
    atlas = load_atlas(2, 4)
    maps = det.detect(atlas.image[0, 0], torch.roll(atlas.image[0, 0], 1, dims=0))
    assert maps.semantic.shape == maps.residual.shape == maps.jacobian.shape == (1, 48, 40)
    assert maps.displacement.shape == (1, 2, 48, 40) and len(maps.levels) == 3


def test_missing_extractor_names_the_file(tmp_path):
    reg = build_model(NetConfig.make("reg", 2, "tiny"))
    path = save_model(tmp_path / "reg.safetensors", reg)
    with pytest.raises(ValueError, match=r"no feature extractor: expected .*seg\.safetensors.*--extractor"):
        resolve_extractor(str(path))
    with pytest.raises(ValueError, match="--extractor must be an existing"):
        resolve_extractor(str(path), tmp_path / "nope.safetensors")
    # Beside the model it is found.
    save_model(tmp_path / "seg.safetensors", _tiny_extractor(2))
    assert resolve_extractor(str(path)) == tmp_path / "seg.safetensors"


def test_extractor_kind_and_dimension_errors(tmp_path):
    reg = save_model(tmp_path / "reg.safetensors", build_model(NetConfig.make("reg", 2, "tiny")))
    with pytest.raises(ValueError, match="must be a seg or ae feature model"):
        load_extractor(reg)
    seg3 = save_model(tmp_path / "seg3.safetensors", _tiny_extractor(3))
    with pytest.raises(ValueError, match="is 3D but the registration model is 2D"):
        ChangeDetector.load(str(reg), extractor=seg3, device="cpu")
    with pytest.raises(ValueError, match="extractor is 3D but the images are 2D"):
        semantic_change(load_extractor(seg3), torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_detector_input_errors(seg2d):
    det = ChangeDetector(None, seg2d)
    bad = np.ones((16, 16), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="fixed contains NaN"):
        det.detect(np.ones((16, 16), np.float32), bad)
    with pytest.raises(ValueError, match="same shape"):
        det.detect(np.ones((16, 16)), np.ones((16, 24)))
    with pytest.raises(ValueError, match="2D model"):
        det.detect(np.ones((2, 2, 8, 8, 8)), np.ones((2, 2, 8, 8, 8)))
    with pytest.raises(ValueError, match="must not be empty"):
        det.detect(np.ones((0, 8)), np.ones((0, 8)))
    with pytest.raises(ValueError, match="displacement must be"):
        change_maps(seg2d, torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 4))



def _spike_change(extractor: torch.nn.Module) -> float:
    """Largest change of the semantic map (away from the spike) when one voxel at 1000x the maximum is added to
    both images of a pair, relative to the map's largest value without it."""
    det = ChangeDetector(None, extractor)
    img = load_atlas(2, 2).image[0, 0].numpy()
    moved = np.roll(img, 2, axis=0)
    spiked, spiked_moved = img.copy(), moved.copy()
    spiked[0, 0] = spiked_moved[0, 0] = 1000.0 * img.max()
    clean = det.detect(moved, img).semantic[0]
    spiky = det.detect(spiked_moved, spiked).semantic[0]
    return float((clean - spiky)[8:, 8:].abs().max() / clean[8:, 8:].abs().max())


def test_detector_normalizes_as_its_extractor_was_trained(seg2d):
    # The synth-2d extractor was trained on percentile-normalized brains (config intensity "percentile"): a bright
    # voxel must not squash the rest of the image, as min-max (the bundled extractor's contract) does.
    synth = load_extractor(bundled_model_path("default-2d", "seg").parents[1] / "synth-2d" / "seg.safetensors", 2)
    assert synth.cfg.intensity == "percentile" and seg2d.cfg.intensity == "minmax"
    assert _spike_change(synth) < 0.01
    assert _spike_change(seg2d) > 0.5  # min-max: the brain is squashed to ~1e-3 of the range, the maps change
