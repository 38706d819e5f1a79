"""Training: loss goes down, checkpoints round-trip, resume is exact, interrupted writes keep the last good
checkpoint, bad input gives clear errors. Tiny nets on the tiny-2d synthetic preset (48 x 40)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deepsim_rt.nn import load_model
from deepsim_rt.nn.checkpoint import read_scale
from deepsim_rt.train import (
    FeatureTrainConfig,
    RegistrationTrainConfig,
    load_train_state,
    save_train_state,
    train_features,
    train_registration,
)
from deepsim_rt.train.loop import CHECKPOINT_NAME
from deepsim_rt.train.registration import RegistrationJob

TINY = dict(data="tiny-2d", preset="tiny", batch_size=4, lr=1e-3, progress=False, val_items=2)



@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("seg")
    return train_features(FeatureTrainConfig(task="seg", out=str(out), steps=2, val_every=2, checkpoint_every=2,
                                             **TINY))["model"]


def _reg_cfg(tmp_path, **kw) -> RegistrationTrainConfig:
    base = dict(loss="mse", out=str(tmp_path / "reg"), steps=4, val_every=2, checkpoint_every=2, **TINY)
    base.update(kw)
    return RegistrationTrainConfig(**base)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_few_steps_lower_the_loss(tmp_path):
    """8 Adam steps of MSE registration on a fixed seed lower the training loss on a fixed batch."""
    cfg = _reg_cfg(tmp_path, steps=8, lam=0.01)
    job = RegistrationJob(cfg)
    torch.manual_seed(cfg.seed)
    initial = job.build_model().eval()  # the run's own initialization (same seed)
    batch = job.make_batch(list(range(4)), epoch=0)
    with torch.no_grad():
        before = float(job.loss(initial, batch))
    trained = load_model(train_registration(cfg)["model"])
    with torch.no_grad():
        after = float(job.loss(trained, batch))
    assert after < before, (before, after)


def test_feature_training_lowers_cross_entropy(tmp_path):
    cfg = FeatureTrainConfig(task="seg", out=str(tmp_path / "seg"), steps=6, val_every=6, checkpoint_every=6,
                             augment=False, dropout=0.0, **TINY)
    from deepsim_rt.train.features import FeatureJob

    job = FeatureJob(cfg)
    torch.manual_seed(cfg.seed)
    initial = job.build_model().eval()
    batch = job.make_batch(list(range(4)), epoch=0)
    with torch.no_grad():
        before = float(job.loss(initial, batch))
    trained = load_model(train_features(cfg)["model"])
    with torch.no_grad():
        after = float(job.loss(trained, batch))
    assert after < before, (before, after)


def test_checkpoint_round_trip(tmp_path):
    """save -> load -> identical model outputs and optimizer state."""
    cfg = _reg_cfg(tmp_path, steps=2, checkpoint_every=2)
    summary = train_registration(cfg)
    state = load_train_state(tmp_path / "reg" / CHECKPOINT_NAME)
    assert state.step == 2
    assert state.train_config == dataclasses.asdict(cfg)
    model = load_model(summary["model"])
    # The model file records the scale of its data: tiny-2d is a 48 x 40 slice at 4 mm.
    assert read_scale(summary["model"]) == ((4.0, 4.0), (48, 40))
    from deepsim_rt.nn import build_model

    rebuilt = build_model(state.net_config)
    rebuilt.load_state_dict(state.model_state, strict=True)
    rebuilt.eval()
    x = torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(model(x, y), rebuilt(x, y), strict=True):
            assert torch.equal(a, b)
    # Re-save the loaded state and read it back: same tensors, same scalars.
    opt = torch.optim.Adam(rebuilt.parameters(), lr=cfg.lr)
    opt.load_state_dict(state.optimizer_state)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    sched.load_state_dict(state.scheduler_state)
    save_train_state(tmp_path / "again.safetensors", state.step, rebuilt, opt, sched, state.train_config,
                     state.history)
    again = load_train_state(tmp_path / "again.safetensors")
    assert again.step == state.step and again.history == state.history
    assert again.scheduler_state == state.scheduler_state
    for pid, st in state.optimizer_state["state"].items():
        for name, t in st.items():
            assert torch.equal(again.optimizer_state["state"][pid][name], t)


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tmp_path):
    full = train_registration(_reg_cfg(tmp_path, out=str(tmp_path / "full"), steps=4))
    first = train_registration(_reg_cfg(tmp_path, out=str(tmp_path / "split"), steps=2))
    assert first["resumed_from"] == 0
    second = train_registration(_reg_cfg(tmp_path, out=str(tmp_path / "split"), steps=4, resume=True))
    assert second["resumed_from"] == 2
    assert load_train_state(tmp_path / "split" / CHECKPOINT_NAME).step == 4
    history = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    # Same data order, same optimizer state: bit-identical to the run that was never stopped.
    a, b = _params(load_model(full["model"])), _params(load_model(second["model"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_checkpoint_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = _reg_cfg(tmp_path, steps=2)
    train_registration(cfg)
    ckpt = tmp_path / "reg" / CHECKPOINT_NAME
    good = ckpt.read_bytes()

    import deepsim_rt.train.state as state_mod

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:  # a partial file, then the process is "killed"
            fh.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(state_mod, "save_file", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train_registration(dataclasses.replace(cfg, steps=4, resume=True))
    assert ckpt.read_bytes() == good
    assert load_train_state(ckpt).step == 2
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    # ... and the run continues from it.
    assert train_registration(dataclasses.replace(cfg, steps=4, resume=True))["resumed_from"] == 2


def test_existing_run_without_resume_is_refused(tmp_path):
    cfg = _reg_cfg(tmp_path, steps=2)
    train_registration(cfg)
    with pytest.raises(ValueError, match="--resume"):
        train_registration(cfg)


def test_resume_with_different_settings_is_refused(tmp_path):
    train_registration(_reg_cfg(tmp_path, steps=2))
    with pytest.raises(ValueError, match="lam"):
        train_registration(_reg_cfg(tmp_path, steps=4, lam=0.5, resume=True))


def test_deepsim_training_keeps_the_extractor_frozen(tmp_path, seg_model):
    job = RegistrationJob(_reg_cfg(tmp_path, loss="deepsim_seg", extractor=seg_model))
    before = _params(job.sim.extractor)
    torch.manual_seed(0)
    model = job.build_model().train()
    job.sim.train()
    assert not job.sim.extractor.training
    loss = job.loss(model, job.make_batch([0, 1], epoch=0))
    loss.backward()
    assert all(p.grad is None for p in job.sim.extractor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    after = _params(job.sim.extractor)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats untouched too


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss", "nope"], "unknown loss 'nope'"),
        (["--loss", "mse", "--lam", "-0.5"], "lam (regularization weight) must be a finite number >= 0"),
        (["--loss", "vgg", "--vgg-weights", "/nonexistent/vgg16.safetensors"], "VGG16 weights file not found"),
        (["--loss", "vgg"], "needs --vgg-weights"),
        (["--loss", "deepsim_seg"], "needs --extractor"),
        (["--loss", "deepsim_seg", "--extractor", "/nonexistent.safetensors"], "feature model not found"),
    ],
)
def test_bad_registration_arguments_give_one_clear_line(run_cli, tmp_path, argv, message):
    code, text = run_cli("train-registration", "--data", "tiny-2d", "--out", str(tmp_path / "r"), *argv)
    assert code == 2
    assert message in text
    assert "Traceback" not in text


def test_2d_feature_model_given_3d_data_is_refused(run_cli, tmp_path, seg_model):
    code, text = run_cli("train-registration", "--data", "tiny-3d", "--loss", "deepsim_seg", "--extractor",
                         seg_model, "--out", str(tmp_path / "r"))
    assert code == 2
    assert "is 2D, the data are 3D" in text


def test_wrong_kind_of_feature_model_is_refused(tmp_path, seg_model):
    with pytest.raises(ValueError, match="needs a ae feature model"):
        RegistrationJob(_reg_cfg(tmp_path, loss="deepsim_ae", extractor=seg_model))


def test_unknown_task_and_data_are_refused(run_cli, tmp_path):
    code, text = run_cli("train-features", "--task", "cls", "--data", "tiny-2d", "--out", str(tmp_path / "f"))
    assert code == 2 and "task must be one of ('seg', 'ae')" in text
    code, text = run_cli("train-features", "--data", "no-such-preset", "--out", str(tmp_path / "f"))
    assert code == 2 and "synthetic preset" in text


def test_cli_defaults_come_from_the_config_dataclasses():
    import argparse

    from deepsim_rt.train.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train-registration"])
    for f in dataclasses.fields(RegistrationTrainConfig):
        assert getattr(args, f.name) == f.default, f.name
    args = parser.parse_args(["train-features"])
    for f in dataclasses.fields(FeatureTrainConfig):
        assert getattr(args, f.name) == f.default, f.name


def test_nifti_folder_trains_and_evaluates(tmp_path):
    """A folder with images/ and labels/ (2D slices stored as X x Y x 1 NIfTI) is a training data source."""
    import numpy as np

    from deepsim_rt.data import save_nifti
    from deepsim_rt.evaluate.study import evaluate_model
    from deepsim_rt.train.data import open_source

    synth = open_source("tiny-2d")
    affine = np.diag([1.5, -2.0, 3.0, 1.0])  # anisotropic, one axis flipped: the spacing is the column norm
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    for i in range(8):
        image, labels = synth.subject("train", i)
        save_nifti(tmp_path / "data" / "images" / f"s{i}.nii.gz", (image[0] * 800.0).numpy()[..., None],
                   affine)
        save_nifti(tmp_path / "data" / "labels" / f"s{i}.nii.gz", labels[0].numpy().astype(np.uint8)[..., None],
                   affine)
    source = open_source(str(tmp_path / "data"))
    assert (source.ndim, source.shape, source.size("train"), source.size("val"), source.size("test")) == \
        (2, (48, 40), 4, 2, 2)
    image, _ = source.subject("train", 0)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # min-max normalized like the runtime does
    cfg = {**TINY, "data": str(tmp_path / "data")}
    out = train_registration(RegistrationTrainConfig(loss="mse", out=str(tmp_path / "reg"), steps=2, val_every=2,
                                                     checkpoint_every=2, **cfg))
    assert source.spacing == (1.5, 2.0) and read_scale(out["model"]) == ((1.5, 2.0), (48, 40))
    rows = evaluate_model(out["model"], str(tmp_path / "data"))
    assert [(r["moving"], r["fixed"]) for r in rows] == [(0, 1), (1, 0)]
    assert all(r["epe"] is None for r in rows)  # no ground truth for user data


def test_random_crop_cuts_one_window_from_every_tensor():
    from deepsim_rt.train.data import random_crop

    a = torch.arange(60).view(1, 6, 10)
    ca, cb = random_crop([a, 10 * a], 8, torch.Generator().manual_seed(3))
    # The 6-voxel axis is kept whole, the 10-voxel one cut to 8 at one offset, the same offset in both tensors.
    assert ca.shape == (1, 6, 8) and torch.equal(cb, 10 * ca)
    c0 = int(ca[0, 0, 0])
    assert torch.equal(ca, a[:, :, c0:c0 + 8])
    offsets = {int(random_crop([a], 4, torch.Generator().manual_seed(s))[0][0, 0, 0]) for s in range(40)}
    assert offsets <= {r * 10 + c for r in range(3) for c in range(7)} and len(offsets) > 10
    with pytest.raises(ValueError, match="one spatial shape"):
        random_crop([a, a[:, :5]], 4, torch.Generator())


def test_crop_trains_on_windows_and_the_model_records_the_data_grid(tmp_path):
    """crop: batches of CROP^2 windows (image and labels, moving and fixed cut alike); validation and the recorded
    scale are those of the whole images."""
    from deepsim_rt.train.features import FeatureJob

    job = FeatureJob(FeatureTrainConfig(task="seg", out=str(tmp_path / "s"), crop=16, **TINY))
    job.build_model()
    batch = job.make_batch([0, 1], epoch=0)
    assert batch["image"].shape == (2, 1, 16, 16) and batch["labels"].shape == (2, 1, 16, 16)
    rjob = RegistrationJob(_reg_cfg(tmp_path, crop=24))
    rjob.build_model()
    wjob = RegistrationJob(_reg_cfg(tmp_path))
    wjob.build_model()
    whole = wjob.make_batch([0, 1, 2], epoch=0)
    batch = rjob.make_batch([0, 1, 2], epoch=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, 1, 24, 24) for k in batch}
    for b in range(3):
        # Every crop is the window of its whole image at the offset where the moving image matches.
        hits = [(r, c) for r in range(48 - 23) for c in range(40 - 23)
                if torch.equal(whole["moving"][b, :, r:r + 24, c:c + 24], batch["moving"][b])]
        assert len(hits) == 1, hits
        (r, c), = hits
        for k in batch:
            assert torch.equal(whole[k][b, :, r:r + 24, c:c + 24], batch[k][b]), k
    out = train_registration(_reg_cfg(tmp_path, crop=24, steps=2))
    assert read_scale(out["model"]) == ((4.0, 4.0), (48, 40))


def test_init_starts_from_a_trained_model(tmp_path, seg_model):
    first = train_registration(_reg_cfg(tmp_path, steps=2))["model"]
    # One Adam step at lr 1e-12 moves each weight by ~1e-12: the result is the init model, not a fresh one.
    cfg = _reg_cfg(tmp_path, steps=1, init=first, lr=1e-12, out=str(tmp_path / "again"))
    again = load_model(train_registration(cfg)["model"])
    init = load_model(first)
    for k, v in init.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="is a 2D seg model, this run trains a 2D reg model"):
        train_registration(_reg_cfg(tmp_path, steps=1, init=seg_model, out=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="crop must be an int >= 0"):
        _reg_cfg(tmp_path, crop=-8)
