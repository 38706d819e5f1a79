"""Models, configs and checkpoints: shapes, the paper's architecture facts, round trips and error paths."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deepsim_rt.kernels.reference import warp as warp_ref
from deepsim_rt.nn import (
    AutoEncoder,
    NetConfig,
    RegNet,
    SegNet,
    build_model,
    load_config,
    load_model,
    read_metadata,
    save_model,
)
from deepsim_rt.nn.checkpoint import (
    read_scale,
    read_spacing,
    read_train_grid,
    scale_metadata,
    update_metadata,
)

SIZES = {2: (24, 40), 3: (16, 24, 8)}


@pytest.mark.parametrize("ndim", [2, 3])
def test_feature_levels_are_encoder_stages_at_half_quarter_eighth(ndim, rng):
    cfg = NetConfig.make("seg", ndim, "tiny", n_classes=4)
    model = SegNet(cfg).eval()
    x = torch.rand(2, 1, *SIZES[ndim], generator=rng)
    feats = model.extract_features(x)
    assert len(feats) == 3
    for level, (f, c) in enumerate(zip(feats, cfg.enc_channels, strict=True)):
        assert f.shape == (2, c, *(s // 2 ** (level + 1) for s in SIZES[ndim]))
    # Features are taken after LeakyReLU(0.2): negative values exist and equal 0.2 x the pre-activation.
    assert any((f < 0).any() for f in feats)
    assert model(x).shape == (2, 4, *SIZES[ndim])


def test_paper_preset_channels():
    assert NetConfig.make("seg", 2, "paper", n_classes=3).enc_channels == (64, 128, 256)
    assert NetConfig.make("ae", 3, "paper").enc_channels == (32, 64, 128)
    assert NetConfig.make("ae", 2, "paper").dropout == 0.5
    assert NetConfig.make("reg", 3, "paper").dropout == 0.0


def test_autoencoder_has_no_skips_and_outputs_in_unit_range(rng):
    cfg = NetConfig.make("ae", 2, "tiny")
    model = AutoEncoder(cfg).eval()
    assert not model.backbone.skips
    # The first decoder's output goes straight to the next one: its input width is the previous decoder's width.
    assert model.backbone.decoders[1].conv1.in_channels == cfg.dec_channels[0]
    with torch.no_grad():
        y = model(torch.rand(1, 1, 16, 16, generator=rng))
    assert y.shape == (1, 1, 16, 16) and float(y.min()) > 0 and float(y.max()) < 1


@pytest.mark.parametrize("ndim", [2, 3])
def test_regnet_starts_near_identity(ndim, rng):
    torch.manual_seed(0)
    model = RegNet(NetConfig.make("reg", ndim, "tiny")).eval()
    moving = torch.rand(2, 1, *SIZES[ndim], generator=rng)
    fixed = torch.rand(2, 1, *SIZES[ndim], generator=rng)
    with torch.no_grad():
        warped, flow = model(moving, fixed)
    assert flow.shape == (2, ndim, *SIZES[ndim])
    # Last conv ~ N(0, 1e-5) and zero bias: displacements of order 1e-4 voxels at most.
    assert float(flow.abs().max()) < 1e-3
    torch.testing.assert_close(warped, moving, atol=1e-3, rtol=0)


def test_regnet_output_is_warp_of_moving_by_its_displacement(rng):
    torch.manual_seed(1)
    model = RegNet(NetConfig.make("reg", 2, "tiny", integrate_steps=3)).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.05)  # leave the near-identity regime
    moving = torch.rand(1, 1, 16, 24, generator=rng)
    fixed = torch.rand(1, 1, 16, 24, generator=rng)
    with torch.no_grad():
        warped, flow = model(moving, fixed)
    assert float(flow.abs().max()) > 0.05
    torch.testing.assert_close(warped, warp_ref(moving, flow), rtol=0, atol=1e-6)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, rng):
    torch.manual_seed(2)
    model = SegNet(NetConfig.make("seg", 3, "tiny", n_classes=3, label_names=("bg", "a", "b"))).eval()
    # Non-trivial BatchNorm buffers so the test would catch buffers that are not saved.
    model.backbone.encoders[0].norm.running_mean.fill_(0.3)
    path = save_model(tmp_path / "seg.safetensors", model, extra={"train": json.dumps({"step": 7})})
    loaded = load_model(path)
    assert isinstance(loaded, SegNet) and not loaded.training
    assert loaded.cfg == model.cfg
    x = torch.rand(1, 1, 16, 8, 8, generator=rng)
    assert torch.equal(loaded(x), model(x))
    assert json.loads(read_metadata(path)["train"]) == {"step": 7}
    assert load_config(path).label_names == ("bg", "a", "b")


def test_config_json_round_trip_and_unknown_fields():
    cfg = NetConfig.make("reg", 3, "small", integrate_steps=7, padding="zeros")
    assert NetConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        NetConfig.from_json(json.dumps({**json.loads(cfg.to_json()), "colour": "red"}))
    with pytest.raises(ValueError, match="not valid JSON"):
        NetConfig.from_json("{oops")


def test_missing_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_model(bad)
    good = save_model(tmp_path / "m.safetensors", RegNet(NetConfig.make("reg", 2, "tiny")))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read the tensors|not a valid"):
        load_model(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a deepsim_rt model"):
        load_model(foreign)


def test_checkpoint_whose_tensors_disagree_with_config(tmp_path):
    model = RegNet(NetConfig.make("reg", 2, "tiny"))
    path = save_model(tmp_path / "m.safetensors", model)
    meta = read_metadata(path)
    other = NetConfig.make("reg", 2, "small")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={**meta, "config": other.to_json()})
    with pytest.raises(ValueError, match="has shape|does not match"):
        load_model(path)


def test_failed_save_leaves_previous_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, RegNet(NetConfig.make("reg", 2, "tiny")))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="extra metadata"):
        save_model(path, RegNet(NetConfig.make("reg", 2, "tiny")), extra={"config": "clobber"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    with pytest.raises(ValueError, match=".safetensors"):
        save_model(tmp_path / "m.pt", RegNet(NetConfig.make("reg", 2, "tiny")))
    assert not os.path.exists(tmp_path / "m.pt")


@pytest.mark.parametrize(
    ("make_input", "match"),
    [
        (lambda: torch.rand(1, 1, 16, 16, 16), "2D model"),
        (lambda: torch.rand(1, 2, 16, 16), "channel"),
        (lambda: torch.rand(1, 1, 18, 16), "multiple of 8"),
        (lambda: torch.randint(0, 3, (1, 1, 16, 16)), "floating-point"),
        (lambda: torch.rand(16, 16), "4D"),
    ],
)
def test_bad_model_inputs(make_input, match):
    model = RegNet(NetConfig.make("reg", 2, "tiny"))
    x = make_input()
    with pytest.raises(ValueError, match=match):
        model(x, x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="seg", ndim=2, preset="tiny"), "n_classes"),
        (dict(kind="reg", ndim=4, preset="tiny"), "unknown preset"),
        (dict(kind="gan", ndim=2, preset="tiny"), "kind"),
        (dict(kind="reg", ndim=2, preset="huge"), "unknown preset"),
        (dict(kind="reg", ndim=2, preset="tiny", padding="reflect"), "padding"),
        (dict(kind="reg", ndim=2, preset="tiny", integrate_steps=-1), "integrate_steps"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NetConfig.make(**kwargs)


def test_build_model_picks_class_by_kind():
    assert type(build_model(NetConfig.make("ae", 3, "tiny"))) is AutoEncoder
    with pytest.raises(ValueError, match="kind 'seg'"):
        SegNet(NetConfig.make("ae", 3, "tiny"))


def test_checkpoint_records_the_training_scale(tmp_path):
    """spacing_mm / train_grid: JSON lists in tensor order, read back as tuples; files without them read as None."""
    model = RegNet(NetConfig.make("reg", 3, "tiny"))
    extra = scale_metadata((2.0, 2.0, 2.5), (80, 96, 80))
    assert extra == {"spacing_mm": "[2.0, 2.0, 2.5]", "train_grid": "[80, 96, 80]"}
    path = save_model(tmp_path / "m.safetensors", model, extra=extra)
    assert read_spacing(path) == (2.0, 2.0, 2.5) and read_train_grid(path) == (80, 96, 80)
    assert read_scale(path) == ((2.0, 2.0, 2.5), (80, 96, 80))
    old = save_model(tmp_path / "old.safetensors", model)
    assert read_scale(old) == (None, None)
    assert scale_metadata(None, [8, 8, 8]) == {"train_grid": "[8, 8, 8]"}


def test_update_metadata_adds_the_scale_without_touching_the_weights(tmp_path):
    from safetensors.torch import load_file

    old = save_model(tmp_path / "old.safetensors", RegNet(NetConfig.make("reg", 2, "tiny")))
    new = update_metadata(old, scale_metadata((4.0, 4.0), (48, 40)), tmp_path / "new.safetensors")
    assert read_scale(new) == ((4.0, 4.0), (48, 40)) and read_scale(old) == (None, None)
    a, b = load_file(str(old)), load_file(str(new))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(new)["config"] == read_metadata(old)["config"]
    with pytest.raises(ValueError, match="other than format/config"):
        update_metadata(old, {"config": "{}"}, tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "spacing, grid, match",
    [
        ([2.0, 0.0, 2.0], None, "spacing_mm must be"),
        ([2.0, float("nan"), 2.0], None, "spacing_mm must be"),
        (None, [80, 96.5, 80], "train_grid must be"),
        ([2.0, 2.0], [80, 96, 80], "different lengths"),
    ],
)
def test_malformed_scale_is_refused(spacing, grid, match):
    with pytest.raises(ValueError, match=match):
        scale_metadata(spacing, grid)


def test_scale_entry_that_disagrees_with_the_model_is_a_clear_error(tmp_path):
    model = RegNet(NetConfig.make("reg", 3, "tiny"))
    path = save_model(tmp_path / "m.safetensors", model, extra={"spacing_mm": "[2.0, 2.0]"})
    with pytest.raises(ValueError, match=r"one entry per spatial axis \(3\)"):
        read_spacing(path)
    path = save_model(tmp_path / "n.safetensors", model, extra={"train_grid": "[80, 96"})
    with pytest.raises(ValueError, match="not JSON"):
        read_train_grid(path)


# (weights folder, file, synthetic preset it was trained on). default-3d/ae is the 4 mm autoencoder (no 2 mm one
# was trained; deepsim_rt/weights/README.md), and says so.
_BUNDLED_SCALE = [(name, part, name) for name in ("default-2d", "default-3d-4mm") for part in ("seg", "ae", "reg")] + [
    ("default-3d", "seg", "default-3d"), ("default-3d", "reg", "default-3d"), ("default-3d", "ae", "default-3d-4mm")]


@pytest.mark.parametrize("name, part, preset", _BUNDLED_SCALE)
def test_bundled_checkpoints_record_the_scale_of_their_training_data(name, part, preset):
    """Every bundled file says the voxel spacing and grid of the synthetic preset it was trained on."""
    from pathlib import Path

    import deepsim_rt
    from deepsim_rt.data.atlas import atlas_shape
    from deepsim_rt.data.synthetic import SyntheticConfig

    cfg = SyntheticConfig.preset(preset)
    path = Path(deepsim_rt.__file__).parent / "weights" / name / f"{part}.safetensors"
    assert read_scale(path) == ((float(cfg.voxel_size),) * cfg.ndim, atlas_shape(cfg.ndim, cfg.voxel_size))
