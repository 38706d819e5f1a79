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
