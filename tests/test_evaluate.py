"""Evaluation protocol: identity registration scores exactly the unregistered pair, known answers for folding and
endpoint error, the CLI's JSON + markdown outputs, and clear errors for mismatched models."""

from __future__ import annotations

import json

import pytest
import torch

from deepsim_rt.evaluate.metrics import dice_foreground, dice_paper
from deepsim_rt.evaluate.study import evaluate_model, evaluate_pairs, model_register_fn, summarize
from deepsim_rt.nn import NetConfig, build_model, save_model
from deepsim_rt.train.data import open_source


@pytest.fixture(scope="module")
def source():
    return open_source("tiny-2d")



def _identity_regnet(ndim: int) -> torch.nn.Module:
    """A RegNet whose flow head outputs exactly 0: the identity registration through the real model path."""
    torch.manual_seed(0)
    model = build_model(NetConfig.make("reg", ndim, "tiny"))
    torch.nn.init.zeros_(model.head[-1].weight)
    return model.eval()


def test_identity_registration_dice_equals_the_unregistered_pair(source):
    rows_none = evaluate_pairs(source, None)
    rows_model = evaluate_pairs(source, model_register_fn(_identity_regnet(2)))
    assert len(rows_none) == len(source.pairs("test")) == 4
    for (m, f), a, b in zip(source.pairs("test"), rows_none, rows_model, strict=True):
        _, lm = source.subject("test", m)
        _, lf = source.subject("test", f)
        direct_fg = float(dice_foreground(lm[None], lf[None], source.n_classes)[0])
        direct_paper = float(dice_paper(lm[None], lf[None], source.n_classes)[0])
        for row in (a, b):
            assert (row["moving"], row["fixed"]) == (m, f)
            assert row["dice_fg"] == direct_fg
            assert row["dice_paper"] == direct_paper
            assert row["folding"] == 0.0
            assert row["std_log_jac"] == 0.0
    assert 0.0 < summarize(rows_none)["dice_fg"] < 1.0  # the pairs are genuinely misaligned


def test_true_displacement_scores_zero_endpoint_error(source):
    truths = iter([source.true_displacement("test", k) for k in range(4)])
    # nearest: the synthetic labels were generated with nearest-neighbour resampling (with generic labels the truth
    # scores below the unregistered pair on 1 of these 4 tiny pairs: 0.846 vs 0.851)
    rows = evaluate_pairs(source, lambda mov, fix: next(truths)[None], label_mode="nearest")
    assert all(r["epe"] == 0.0 for r in rows)
    base = evaluate_pairs(source, None, label_mode="nearest")
    # Registering with the true deformation improves Dice on every pair (nearest-neighbour label resampling).
    assert all(r["dice_fg"] > b["dice_fg"] for r, b in zip(rows, base, strict=True))


def test_a_mirroring_field_folds_every_voxel(source):
    def mirror(mov, fix):
        h = mov.shape[2]
        u = torch.zeros(1, 2, *mov.shape[2:])
        u[:, 0] = (h - 1) - 2 * torch.arange(h, dtype=torch.float32)[:, None]  # p -> (h-1) - p: det J = -1
        return u

    rows = evaluate_pairs(source, mirror)
    assert all(r["folding"] == 100.0 for r in rows)
    assert all(r["std_log_jac"] is None for r in rows)  # no voxel with det > 0


def test_evaluate_cli_writes_per_pair_json_and_a_table(run_cli, tmp_path):
    model_path = save_model(tmp_path / "identity.safetensors", _identity_regnet(2))
    code, text = run_cli("evaluate", "--data", "tiny-2d", "--model", f"ident={model_path}", "--out",
                         str(tmp_path / "ev"))
    assert code == 0, text
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(res["pairs"]) == {"none", "ident"}
    row = res["pairs"]["ident"][0]
    assert set(row) >= {"dice_fg", "dice_paper", "dice_per_class", "folding", "std_log_jac", "epe", "seconds"}
    assert list(row["dice_per_class"]) == list(open_source("tiny-2d").label_names)
    assert res["summary"]["ident"]["dice_fg"] == res["summary"]["none"]["dice_fg"]
    table = (tmp_path / "ev" / "results.md").read_text()
    assert "| no registration |" in table and "| ident |" in table and "csf_left" in table
    assert "| ident |" in text


def test_2d_model_on_3d_data_is_refused(run_cli, tmp_path):
    model_path = save_model(tmp_path / "m2d.safetensors", _identity_regnet(2))
    code, text = run_cli("evaluate", "--data", "tiny-3d", "--model", str(model_path), "--out", str(tmp_path / "e"))
    assert code == 2
    assert "is a 2D model, the data 'tiny-3d' are 3D" in text


def test_feature_model_is_not_a_registration_model(tmp_path):
    seg = build_model(NetConfig.make("seg", 2, "tiny", n_classes=7))
    path = save_model(tmp_path / "seg.safetensors", seg)
    with pytest.raises(ValueError, match="is a seg model; evaluate needs a registration"):
        evaluate_model(path, "tiny-2d")


def test_missing_model_file(run_cli, tmp_path):
    code, text = run_cli("evaluate", "--data", "tiny-2d", "--model", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "model not found" in text
