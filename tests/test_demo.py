"""`deepsim-rt demo` end to end on the tiny presets with the bundled weights (2D and 3D)."""

from __future__ import annotations

import json

from deepsim_rt.demo import DemoConfig


def test_demo_runs_end_to_end_on_tiny_presets(run_cli, tmp_path):
    out = tmp_path / "demo"
    code, text = run_cli("demo", "--out", str(out), "--data-2d", "tiny-2d", "--data-3d", "tiny-3d", "--pairs", "2",
                         "--threads", "1")
    assert code == 0, text
    for nd in ("2D", "3D"):
        assert f"{nd}  tiny-{nd.lower()}" in text
    assert "Dice (foreground mean)  before" in text and "latency" in text and "folding" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"2d", "3d"}
    for nd, s in summary.items():
        assert s["pairs"] == 2 and len(s["per_pair"]) == 2
        assert 0.0 < s["dice_fg_before"] <= 1.0 and 0.0 < s["dice_fg_after"] <= 1.0
        assert s["latency_ms_median"] > 0.0
        png = out / f"demo_{nd}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_bad_input(run_cli, tmp_path):
    code, text = run_cli("demo", "--out", str(tmp_path), "--dims", "4")
    assert code == 2 and "dims must be" in text
    code, text = run_cli("demo", "--out", str(tmp_path), "--dims", "2", "--data-2d", "tiny-3d")
    assert code == 2 and "is 3D data, expected 2D" in text
    code, text = run_cli("demo", "--out", str(tmp_path), "--dims", "3", "--model-3d", "default-2d")
    assert code == 2 and "is a 2D model, the data are 3D" in text


def test_demo_config_defaults_are_the_bundled_ones():
    cfg = DemoConfig()
    assert (cfg.model_2d, cfg.model_3d, cfg.data_2d, cfg.data_3d) == ("default-2d", "default-3d", "default-2d",
                                                                      "default-3d")
    assert cfg.dim_list == [2, 3]
