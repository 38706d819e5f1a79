"""The brain synthesis (deepsim_rt.data.synth, label_maps): labels move exactly with the image, known deformations,
seeded determinism, contrast / bias / noise ranges, measured deformation magnitudes, robust normalization, the
training data source. Everything at 4 mm (48 x 40 slices, 40 x 48 x 40 volumes) to stay fast."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from deepsim_rt.data import label_maps
from deepsim_rt.data.synth import (
    SynthConfig,
    base_map,
    render,
    render_pair,
    render_subject,
    robust_normalize,
)
from deepsim_rt.kernels import warp

TINY = SynthConfig.preset("synth-tiny-2d")
CLEAN = dataclasses.replace(TINY, texture_sd=0.0, pv_blur=(0.0, 0.0), lowres_prob=0.0, bias_sd=0.0, gamma_sd=0.0,
                            noise_sd=0.0, label_jitter=0.0, head_prob=0.0, subdivisions=1)
NO_MOTION = dict(rotate_deg=0.0, scale=0.0, shear=0.0, shift_mm=0.0, nonlinear_mm=0.0, slice_jitter_mm=0.0)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _render(cfg, seed=0, contrast=None):
    g = _g(seed)
    gen, scoring, classes = base_map(cfg, g)
    return gen, scoring, render(cfg, gen, scoring, classes, g, contrast=contrast)


@pytest.mark.parametrize("cfg", [CLEAN, TINY], ids=["clean", "full"])
def test_labels_move_exactly_with_the_image(cfg):
    """The scoring labels are the base map warped by the returned displacement (nearest), bit for bit."""
    gen, scoring, r = _render(cfg, seed=3)
    expect = warp(scoring, r.displacement[None], mode="nearest", padding="zeros")[0]
    assert torch.equal(r.labels, expect)
    assert float(r.displacement.abs().max()) > 1.0  # it did move


def test_clean_image_is_a_function_of_the_labels():
    """Without texture, blur, bias, gamma and noise every label is one flat intensity, ordered as T1."""
    _, _, r = _render(CLEAN, seed=5, contrast="t1")
    means = []
    for v in (0, 1, 2, 3):  # background, CSF, GM, WM (left)
        vals = r.image[r.labels == v]
        assert float(vals.std()) < 1e-5, v
        means.append(float(vals.mean()))
    assert means[0] < means[1] < means[2] < means[3]


def test_known_deformations():
    still = dataclasses.replace(CLEAN, **NO_MOTION)
    _, scoring, r = _render(still)
    assert float(r.displacement.abs().max()) < 1e-5 and torch.equal(r.labels, scoring[0])
    # A pure shift: a constant displacement equal to the drawn shift (mm / voxel size).
    shift = dataclasses.replace(still, shift_mm=10.0)
    _, _, r = _render(shift, seed=1)
    want = torch.tensor(r.info["shift_mm"]) / shift.voxel_size
    torch.testing.assert_close(r.displacement.flatten(1).mean(1), want, atol=1e-5, rtol=0)
    assert float(r.displacement.flatten(1).std(1).max()) < 1e-5
    # A pure rotation about the grid centre: u(p) = R (p - c) + c - p.
    rot = dataclasses.replace(still, rotate_deg=10.0)
    _, _, r = _render(rot, seed=2)
    a = math.radians(r.info["rotate_deg"][0])
    h, w = r.displacement.shape[1:]
    p = torch.stack(torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                   indexing="ij"))
    c = torch.tensor([(h - 1) / 2, (w - 1) / 2]).view(2, 1, 1)
    q = p - c
    rq = torch.stack([math.cos(a) * q[0] - math.sin(a) * q[1], math.sin(a) * q[0] + math.cos(a) * q[1]])
    torch.testing.assert_close(r.displacement, rq - q, atol=1e-4, rtol=0)


def test_seeded_determinism():
    a, b = render_subject(TINY, "train", 4), render_subject(TINY, "train", 4)
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    c = render_subject(TINY, "train", 5)
    assert not torch.equal(a.image, c.image)
    assert not torch.equal(a.image, render_subject(TINY, "val", 4).image)  # splits use distinct streams
    p1, p2 = render_pair(TINY, "train", 2, 7), render_pair(TINY, "train", 2, 7)
    assert all(torch.equal(x.image, y.image) for x, y in zip(p1, p2, strict=True))


def test_contrast_templates_order_the_tissues():
    """Over 6 subjects per template with every corruption on: T1 WM > GM > CSF, T2 CSF > GM > WM (class means)."""
    for contrast, order in (("t1", (1, 2, 3)), ("t2", (3, 2, 1))):
        for seed in range(6):
            _, _, r = _render(TINY, seed=seed, contrast=contrast)
            m = [float(r.image[(r.labels == v) | (r.labels == v + 3)].mean()) for v in order]
            assert m[0] < m[1] < m[2], (contrast, seed, m)


def test_corruption_draws_stay_in_their_ranges():
    for seed in range(12):
        r = render_subject(TINY, "train", seed)
        i = r.info
        assert 0 <= i["bias_sd"] <= TINY.bias_sd and 0 <= i["noise_sd"] <= TINY.noise_sd
        assert TINY.pv_blur[0] <= i["pv_blur"] <= TINY.pv_blur[1]
        assert 1.0 <= i["thickness"] <= TINY.max_thickness
        assert abs(math.log(i["gamma"])) < 5 * TINY.gamma_sd
        assert r.contrast in ("t1", "t2", "random")
        assert float(r.image.min()) >= 0.0 and float(r.image.max()) == 1.0  # robust-normalized, clipped


def test_deformation_magnitudes_in_mm():
    """Measured over 16 subjects: non-linear peak 4-8 mm drawn (U(0.5, 1) x 8 mm before integration), rotations
    within +-10 deg, shifts within +-10 mm, scalings within 10 %; the total displacement reaches several mm."""
    peaks, totals = [], []
    for seed in range(16):
        r = render_subject(TINY, "train", seed)
        i = r.info
        peaks.append(i["nonlinear_max_mm"])
        totals.append(float(r.displacement.norm(dim=0).max()) * TINY.voxel_size)
        assert all(abs(a) <= 10.0 for a in i["rotate_deg"]) and all(abs(s) <= 10.0 for s in i["shift_mm"])
        assert all(abs(s - 1) <= 0.1 for s in i["scales"])
    assert 2.0 < min(peaks) and max(peaks) < 10.0, peaks
    assert sum(totals) / len(totals) > 5.0, totals


def test_head_layers_surround_the_brain():
    cfg = dataclasses.replace(CLEAN, head_prob=1.0, **NO_MOTION)
    gen, scoring, classes = base_map(cfg, _g(1))
    head = (scoring == 0) & (gen > 0)
    assert int(head.sum()) > 100
    # every head voxel lies within ~1.4 x the total thickness of the brain (chessboard distance)
    total = math.ceil(sum(cfg.head_mm) / cfg.voxel_size * 1.4 * 1.4) + 1
    near = label_maps._dilate(scoring > 0, total)
    assert bool(near[head].all())
    # skull and scalp always (extra-cerebral CSF, 2 mm mean, is under one 4 mm voxel and may vanish)
    assert {4, 5} <= {classes[int(v)] for v in gen[head].unique()} <= {1, 4, 5}


def test_shape_pairs_share_one_map_and_random_contrast():
    cfg = dataclasses.replace(TINY, shapes_prob=1.0)
    a, b = render_pair(cfg, "train", 0, 1)
    assert a.contrast == b.contrast == "random"
    assert a.labels.max() <= cfg.shape_labels - 1 and set(a.labels.unique().tolist()) <= set(range(7))
    # validation pairs never use shapes (their labels are scored as tissue); with independent affines
    # (pair_affine 1, the first round's pairs) each image is exactly render_subject's
    va, vb = render_pair(dataclasses.replace(cfg, pair_affine=1.0), "val", 0, 1)
    assert torch.equal(va.labels, render_subject(cfg, "val", 0).labels)
    assert torch.equal(vb.image, render_subject(cfg, "val", 1).image)


def _affine_fit(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine x -> A x + b of the map p -> p + u(p), u (2, H, W) voxels (exact when u is affine)."""
    h, w = u.shape[1:]
    p = torch.stack(torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                   indexing="ij")).flatten(1)
    q = p + u.double().flatten(1)
    x = torch.cat([p, torch.ones(1, p.shape[1], dtype=torch.float64)]).T  # (N, 3)
    sol = torch.linalg.lstsq(x, q.T).solution.T  # (2, 3)
    return sol[:, :2], sol[:, 2]


@pytest.mark.parametrize("shapes", [0.0, 1.0], ids=["anatomy", "shapes"])
def test_pair_affine_keeps_the_relative_affine_within_the_residual(shapes):
    """pair_affine 0.2 (the default): each image's own affine is within 0.2 x the ranges (+-2 deg, +-2 %, +-2 mm);
    the shared part cancels, so the pair's relative affine (a^-1 o b, fitted on the fields without the non-linear
    part) rotates <= 4 deg, scales <= ~4 %, shifts the centre <= 2 x 2 mm per axis. The full jitter (pair_affine 1)
    puts some of the same pairs much further apart; labels still move exactly with each image."""
    cfg = dataclasses.replace(TINY, nonlinear_mm=0.0, shapes_prob=shapes)
    assert SynthConfig().pair_affine == 0.2 and SynthConfig.preset("synth-2d-independent").pair_affine == 1.0
    rel_rot = {}
    for frac in (0.2, 1.0):
        c = dataclasses.replace(cfg, pair_affine=frac)
        rel_rot[frac] = []
        for k in range(6):
            a, b = render_pair(c, "train", k, k + 1)
            for r in (a, b):
                assert all(abs(d) <= 10.0 * frac + 1e-9 for d in r.info["rotate_deg"])
                assert all(abs(s) <= 10.0 * frac + 1e-9 for s in r.info["shift_mm"])
                assert all(abs(s - 1) <= 0.1 * frac + 1e-12 for s in r.info["scales"])
            ma, ta = _affine_fit(a.displacement)
            mb, tb = _affine_fit(b.displacement)
            rel = torch.linalg.inv(ma) @ mb  # x_a = rel x_b + ...
            rel_t = torch.linalg.solve(ma, tb - ta)
            h, w = a.displacement.shape[1:]
            centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=torch.float64)
            shift_mm = (rel @ centre + rel_t - centre).abs() * c.voxel_size
            angle = math.degrees(math.atan2(float(rel[1, 0] - rel[0, 1]), float(rel[0, 0] + rel[1, 1])))
            sv = torch.linalg.svdvals(rel)
            rel_rot[frac].append(abs(angle))
            if frac == 0.2:
                # own rotations <= 2 deg each, shear <= 0.01 each (adds <= ~0.6 deg to the fitted angle)
                assert abs(angle) <= 4.0 + 1.5, angle
                assert float((sv - 1).abs().max()) <= 0.04 + 0.03, sv
                # own shifts <= 2 mm per axis each, the inverse's scale <= 1 / 0.97
                assert float(shift_mm.max()) <= 4.0 / 0.97 + 0.2, shift_mm
    assert max(rel_rot[1.0]) > 6.0, rel_rot  # the independent jitters put pairs far apart (up to 20 deg)


def test_pair_affine_labels_follow_and_determinism():
    """With the shared affine on, each image's labels are still its base map warped by its returned displacement
    (bit for bit, every corruption on); same arguments, same pair."""
    from deepsim_rt.data.synth import _gen, synth_seed

    a, b = render_pair(TINY, "val", 1, 2)
    for r, idx in ((a, 1), (b, 2)):
        _, scoring, _ = base_map(TINY, _gen(synth_seed(TINY.seed, "val", idx)))
        assert torch.equal(r.labels, warp(scoring, r.displacement[None], mode="nearest", padding="zeros")[0])
    a2, b2 = render_pair(TINY, "val", 1, 2)
    assert torch.equal(a.image, a2.image) and torch.equal(b.displacement, b2.displacement)
    c, _ = render_pair(TINY, "val", 3, 2)
    assert not torch.equal(c.displacement, a.displacement)
    with pytest.raises(ValueError, match="pair_affine must be a fraction"):
        SynthConfig(pair_affine=1.5)
    # recipes recorded before the field existed were trained on independent affines
    old = {k: v for k, v in TINY.to_dict().items() if k != "pair_affine"}
    assert SynthConfig.from_dict(old).pair_affine == 1.0


def test_robust_normalize_ignores_outliers():
    x = torch.rand(1, 1, 32, 32, generator=_g()) * 0.5
    x[0, 0, 0, 0] = 1000.0  # one hot voxel: min-max would squash everything else below 5e-4
    y = robust_normalize(x)
    assert float(y.median()) > 0.3 and float(y.max()) == 1.0 and float(y.min()) == 0.0
    assert float(robust_normalize(torch.full((2, 1, 8, 8), 3.0)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="lo_pct < hi_pct"):
        robust_normalize(x, 50, 10)


def test_3d_subject():
    cfg = SynthConfig.preset("synth-3d", voxel_size=4)
    r = render_subject(cfg, "train", 0)
    assert r.image.shape == (1, 40, 48, 40) and r.displacement.shape == (3, 40, 48, 40)
    assert torch.equal(r.labels, warp(label_maps.anatomy(3, 4), r.displacement[None], mode="nearest",
                                      padding="zeros")[0])


def test_config_errors_and_round_trip():
    with pytest.raises(ValueError, match="head_prob must be a probability"):
        SynthConfig(head_prob=1.5)
    with pytest.raises(ValueError, match="contrast_probs"):
        SynthConfig(contrast_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="unknown synthesis preset"):
        SynthConfig.preset("nope")
    with pytest.raises(ValueError, match="contrast must be one of"):
        _render(TINY, contrast="pd")
    assert SynthConfig.from_dict(TINY.to_dict()) == TINY
    import json
    assert SynthConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def test_training_source_serves_synthesis():
    from deepsim_rt.train.data import open_source

    src = open_source("synth-tiny-2d")
    assert src.ndim == 2 and src.shape == (48, 40) and src.recipe["synthesis"] == "synth-tiny-2d"
    img, lab = src.subject("val", 1)
    assert img.shape == (1, 48, 40) and lab.dtype == torch.int64 and int(lab.max()) <= 6
    assert src.subject("val", 1)[0] is img  # validation subjects are cached
    (mi, ml), (fi, fl) = src.pair("train", 3, 5)
    assert mi.shape == fi.shape == (1, 48, 40) and 0 <= float(mi.min()) and float(mi.max()) <= 1


def test_training_on_synthesis_records_the_recipe(tmp_path):
    """Two steps of registration training on synth-tiny-2d: the model file carries the synthesis settings."""
    import json

    from safetensors import safe_open

    from deepsim_rt.train.config import RegistrationTrainConfig
    from deepsim_rt.train.registration import train_registration

    cfg = RegistrationTrainConfig(loss="mind", data="synth-tiny-2d", preset="tiny", steps=2, batch_size=2,
                                  val_every=2, val_items=2, checkpoint_every=2, threads=1, progress=False,
                                  out=str(tmp_path / "reg"))
    summary = train_registration(cfg)
    assert math.isfinite(summary["last_validation"]["loss"])
    with safe_open(summary["model"], "pt") as f:
        recipe = json.loads(f.metadata()["synthesis"])
    assert recipe["synthesis"] == "synth-tiny-2d" and recipe["voxel_size"] == 4 and "MNI152" in recipe["label_maps"]
    assert SynthConfig.from_dict({k: v for k, v in recipe.items() if k not in ("synthesis", "label_maps")}) == TINY
    # trained on robust-normalized (percentile) images: the model says so, so the runtime feeds it the same way
    from deepsim_rt.nn.checkpoint import load_config

    assert load_config(summary["model"]).intensity == "percentile"
