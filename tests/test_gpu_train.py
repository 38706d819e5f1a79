"""benchmarks/gpu_train.py (make gpu-train) in its CPU smoke mode: tiny-3d data, tiny nets, 4 steps per phase.

The GPU run differs only in its options (2 mm data, paper widths, thousands of steps), so this checks the whole
schedule: chunked resumable training through deepsim_rt.train, selection on validation Dice, test-pair scoring,
and the files a lent machine sends back (3, each <= 16 MiB).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_train
from deepsim_rt.nn import load_model


@pytest.mark.slow
def test_smoke_run_selects_on_validation_dice_and_scores_the_test_pairs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_train.main(["--smoke", "--out", str(out), "--work", str(work)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_train.json", "reg.safetensors", "seg.safetensors"]
    res = json.loads((out / "gpu_train.json").read_text())
    assert res["smoke"] and res["data"] == "tiny-3d" and res["device"] == "cpu"
    for phase, kind in (("seg", "seg"), ("reg", "reg")):
        hist = res[phase]["history"]
        assert [h["step"] for h in hist] == [2, 4] and res[phase]["steps_done"] == 4  # two chunks, resumed
        best = max(hist, key=lambda h: (h["dice"], -h["step"]))
        assert res[phase]["selected"] == best
        assert load_model(out / f"{phase}.safetensors").cfg.kind == kind
    test = res["test"]
    assert test["identity"]["pairs"] == test["deepsim_seg"]["pairs"] == 2
    assert len(test["dice_fg_per_pair"]) == 2
    assert all(0 < size <= gpu_train.MAX_FILE_BYTES for size in res["files"].values())


def test_data_falls_back_to_default_3d_when_the_2mm_preset_is_missing():
    assert gpu_train.data_name("default-3d-2mm") == "default-3d-2mm"
    assert gpu_train.data_name("no-such-preset") == "default-3d"


@pytest.mark.slow  # 3 phases on 4 mm brains: 41 s wall, 14 s CPU alone at 1 thread (load 4); 249 s at load 8
def test_synth_recipe_smoke_trains_seg_deepsim_and_ncc_and_scores_both(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_train.main(["--recipe", "synth-3d", "--smoke", "--out", str(out), "--work", str(work)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_train.json", "reg.safetensors", "reg_ncc.safetensors",
                                                     "seg.safetensors"]
    res = json.loads((out / "gpu_train.json").read_text())
    assert res["recipe"] == "synth-3d" and res["data"] == gpu_train.SMOKE_SYNTH_PRESET and res["smoke"]
    assert res["losses"] == ["deepsim_seg", "ncc"]
    for key, kind, loss in (("seg", "seg", None), ("reg", "reg", "deepsim_seg"), ("reg_ncc", "reg", "ncc")):
        hist = res[key]["history"]
        assert [h["step"] for h in hist] == [2, 4] and res[key]["steps_done"] == 4
        assert res[key]["selected"] == max(hist, key=lambda h: (h["dice"], -h["step"]))
        model = load_model(out / f"{key}.safetensors")
        assert model.cfg.kind == kind and model.cfg.ndim == 3
        if loss is not None:
            assert res[key]["loss"] == loss
    # the same steps and budget for both losses, each at its default lambda
    assert res["reg"]["lam"] == res["reg_ncc"]["lam"] == 0.5
    test = res["test"]
    assert test["identity"]["pairs"] == test["deepsim_seg"]["pairs"] == test["ncc"]["pairs"] == 2
    assert len(test["dice_fg_per_pair"]) == len(test["dice_fg_per_pair_ncc"]) == 2
    assert all(0 < size <= gpu_train.MAX_FILE_BYTES for size in res["files"].values())


def test_recipes_keep_the_default_and_name_the_synthesis_one():
    full, smoke, losses = gpu_train.RECIPES["default-3d-2mm"]
    assert full is gpu_train.DEFAULTS and losses == ("deepsim_seg",)
    full, smoke, losses = gpu_train.RECIPES["synth-3d"]
    assert full["data"] == "synth-3d" and full["preset"] == "paper" and losses == ("deepsim_seg", "ncc")
    assert set(gpu_train.REG_FILES) >= set(losses)
    # 7 minutes: startup + seg + one budget per registration loss + the test pairs
    assert full["seg_budget_s"] + len(losses) * full["reg_budget_s"] <= 7 * 60 - 60
    assert gpu_train.data_name("synth-3d") == "synth-3d"


def test_unknown_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_train.main(["--recipe", "no-such-recipe", "--smoke"])
    assert "invalid choice" in capsys.readouterr().err
