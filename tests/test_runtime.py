"""Registrator (eager backend) and its helpers: padding, normalization, input forms, labels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsim_rt.export.verify import random_regnet
from deepsim_rt.kernels import warp
from deepsim_rt.nn import save_model
from deepsim_rt.runtime import (
    Registrator,
    as_batch,
    bundled_model_path,
    crop,
    minmax_normalize,
    pad_amounts,
    pad_to_multiple,
    resolve_model,
)


@pytest.fixture(scope="module")
def reg2d():
    return random_regnet(2, seed=1)


@pytest.fixture(scope="module")
def reg3d():
    return random_regnet(3, seed=2)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def test_pad_amounts_known_answers():
    assert pad_amounts((8, 13, 1), 8) == ((0, 0), (1, 2), (3, 4))
    assert pad_amounts((16,), 8) == ((0, 0),)


@pytest.mark.parametrize("mode", ["replicate", "zeros"])
def test_pad_crop_round_trip(rng, mode):
    x = torch.rand(2, 3, 13, 7, 9, generator=rng)
    xp, pads = pad_to_multiple(x, 8, mode)
    assert xp.shape == (2, 3, 16, 8, 16)
    assert torch.equal(crop(xp, pads), x)
    if mode == "replicate":
        # before-padding replicates the first slice, after-padding the last
        assert pads[0] == (1, 2)
        assert torch.equal(xp[:, :, 0], xp[:, :, 1]) and torch.equal(xp[:, :, -1], xp[:, :, -3])
    else:
        assert float(xp[:, :, 0].abs().max()) == 0.0 and float(xp[:, :, -1].abs().max()) == 0.0


def test_pad_no_op_returns_same_tensor(rng):
    x = torch.rand(1, 1, 16, 8, generator=rng)
    xp, pads = pad_to_multiple(x, 8)
    assert xp is x and pads == ((0, 0), (0, 0))


def test_minmax_normalize_known_answer():
    x = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    xn, lo, scale = minmax_normalize(x)
    assert torch.equal(xn[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(xn[1], torch.zeros(1, 2, 2))  # a constant sample normalizes to zeros
    assert lo.flatten().tolist() == [2.0, 5.0] and scale.flatten().tolist() == [8.0, 0.0]
    assert torch.allclose(xn * scale + lo, x)


def test_as_batch_forms():
    assert as_batch("x", torch.zeros(5, 6), 2, 1)[0].shape == (1, 1, 5, 6)
    assert as_batch("x", torch.zeros(1, 5, 6), 2, 1)[0].shape == (1, 1, 5, 6)
    assert as_batch("x", torch.zeros(3, 1, 5, 6), 2, 1)[1] == 0
    with pytest.raises(ValueError, match="expects 1 channel"):
        as_batch("x", torch.zeros(3, 5, 6), 2, 1)  # rank ndim+1 is (C, *S), not (B, *S)
    with pytest.raises(ValueError, match=r"2D model.*rank 6"):
        as_batch("x", torch.zeros(1, 1, 1, 5, 6, 7), 2, 1)


# ---------------------------------------------------------------------------------------------------------------
# Registrator
# ---------------------------------------------------------------------------------------------------------------
def test_register_equals_network_when_nothing_to_do(reg2d, rng):
    """Size a multiple and intensities already spanning [0, 1]: register is exactly the network."""
    m = torch.rand(2, 1, 24, 16, generator=rng)
    f = torch.rand(2, 1, 24, 16, generator=rng)
    for x in (m, f):
        x.view(2, -1)[:, 0] = 0.0
        x.view(2, -1)[:, 1] = 1.0
    out = Registrator.from_model(reg2d, device="cpu").register(m, f)
    with torch.inference_mode():
        w_ref, d_ref = reg2d(m, f)
    torch.testing.assert_close(out.displacement, d_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.warped, w_ref, rtol=0, atol=1e-6)
    assert out.warped_labels is None
    assert float(d_ref.std()) > 0.5, "the test model must move pixels, else the comparison is vacuous"


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("ndim,size", [(2, (21, 13)), (3, (9, 11, 6))])
def test_odd_size_crop_is_exact(ndim, size, padding, rng):
    """Padding (replicate for border, zeros for zeros) then cropping == warping the unpadded image directly."""
    model = random_regnet(ndim, seed=3, padding=padding)
    m = torch.rand(1, 1, *size, generator=rng) * 50 + 10  # arbitrary intensity units
    f = torch.rand(1, 1, *size, generator=rng) * 50 + 10
    out = Registrator.from_model(model, device="cpu").register(m, f)
    assert out.warped.shape == m.shape and out.displacement.shape == (1, ndim, *size)
    assert float(out.displacement.abs().max()) > 1.0
    mn, lo, scale = minmax_normalize(m)
    direct = warp(mn, out.displacement, mode="linear", padding=padding) * scale + lo
    torch.testing.assert_close(out.warped, direct, rtol=0, atol=1e-4)  # intensity range 50: ~2e-6 relative


def test_forms_numpy_and_batches_agree(reg3d, rng):
    size = (9, 10, 7)
    m = torch.rand(2, 1, *size, generator=rng)
    f = torch.rand(2, 1, *size, generator=rng)
    lab = torch.randint(0, 5, (2, 1, *size), generator=rng, dtype=torch.int64)
    reg = Registrator.from_model(reg3d, device="cpu")
    batched = reg.register(m, f, lab)
    assert batched.displacement.shape == (2, 3, *size)
    for i in range(2):
        single = reg.register(m[i, 0].numpy(), f[i, 0].numpy(), lab[i, 0].numpy().astype(np.uint8))
        assert isinstance(single.warped, np.ndarray) and single.warped.shape == size
        assert single.displacement.shape == (3, *size)
        assert single.warped_labels.dtype == np.uint8 and single.warped_labels.shape == size
        np.testing.assert_allclose(single.displacement, batched.displacement[i].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(single.warped, batched.warped[i, 0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(single.warped_labels, batched.warped_labels[i, 0].numpy())
        chan = reg.register(m[i], f[i])  # (C, *S) form
        assert chan.warped.shape == (1, *size) and chan.displacement.shape == (3, *size)


def test_labels_nearest(reg2d, rng):
    size = (19, 17)
    m = torch.rand(1, 1, *size, generator=rng)
    f = torch.rand(1, 1, *size, generator=rng)
    lab = torch.randint(0, 4, (1, 1, *size), generator=rng, dtype=torch.int32) * 7
    out = Registrator.from_model(reg2d, device="cpu").register(m, f, lab, label_mode="nearest")
    assert out.warped_labels.dtype == torch.int32
    assert set(out.warped_labels.unique().tolist()) <= {0, 7, 14, 21}
    assert torch.equal(out.warped_labels, warp(lab, out.displacement, mode="nearest", padding="border"))
    assert not torch.equal(out.warped_labels, lab)


def test_load_safetensors_matches_from_model(reg2d, tmp_path, rng):
    path = save_model(tmp_path / "reg.safetensors", reg2d)
    m = torch.rand(1, 1, 20, 20, generator=rng)
    f = torch.rand(1, 1, 20, 20, generator=rng)
    loaded = Registrator.load(path, device="cpu")
    assert loaded.backend_name == "eager" and len(loaded.info.source_sha256) == 64
    a = loaded.register(m, f)
    b = Registrator.from_model(reg2d, device="cpu").register(m, f)
    assert torch.equal(a.displacement, b.displacement)


def test_bad_inputs(reg2d, reg3d, rng):
    r2 = Registrator.from_model(reg2d, device="cpu")
    r3 = Registrator.from_model(reg3d, device="cpu")
    x = torch.rand(16, 16, generator=rng)
    with pytest.raises(ValueError, match="same shape"):
        r2.register(x, torch.rand(16, 15, generator=rng))
    with pytest.raises(ValueError, match="2D model"):
        r2.register(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))  # 3D data to a 2D model
    with pytest.raises(ValueError, match="3D model"):
        r3.register(torch.rand(8, 8), torch.rand(8, 8))  # rank 2 is neither (D,H,W) nor (C,D,H,W)
    with pytest.raises(ValueError, match="expects 1 channel"):
        r2.register(torch.rand(1, 2, 8, 8), torch.rand(1, 2, 8, 8))
    bad = x.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        r2.register(bad, x)
    with pytest.raises(ValueError, match="moving_labels"):
        r2.register(x, x, torch.zeros(16, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        r2.register([[0.0]], x)
    with pytest.raises(ValueError, match="backend must be one of"):
        Registrator.load("default-2d", backend="tvm")
    with pytest.raises(ValueError, match="registration model"):
        Registrator.from_model(torch.nn.Conv2d(1, 1, 1))


def test_model_names(tmp_path):
    with pytest.raises(ValueError, match="unknown bundled model"):
        bundled_model_path("default-4d")
    with pytest.raises(ValueError, match="ending in"):
        resolve_model(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="not found"):
        resolve_model(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="runs with backend 'onnxruntime'"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        Registrator.load(tmp_path / "m.onnx", backend="eager")
