"""The study's statistics and table, its input checks, and (slow) a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from deepsim_rt.evaluate.study import StudyConfig, markdown_table, run_study, summarize, wilcoxon_vs


def _rows(values: list[float]) -> list[dict]:
    return [{"dice_fg": v, "dice_paper": v, "dice_per_class": {"bg": 1.0, "a": v}, "folding": 0.0,
             "std_log_jac": 0.1, "epe": None, "seconds": 0.01} for v in values]


def test_wilcoxon_known_answer_and_undefined_cases():
    base = [0.50 + 0.01 * k for k in range(10)]
    better = [b + 0.001 * (k + 1) for k, b in enumerate(base)]  # DeepSim_seg better on all 10 pairs
    p = wilcoxon_vs({"deepsim_seg": _rows(better), "mse": _rows(base), "ncc": _rows(base[:]),
                     "same": _rows(better)})
    # Exact two-sided signed-rank test, all 10 differences positive: p = 2 / 2**10.
    assert p["mse"] == pytest.approx(2 / 1024, rel=1e-12)
    assert p["same"] is None  # identical results: no test
    assert "deepsim_seg" not in p
    assert wilcoxon_vs({"mse": _rows(base)}) == {}


def test_summary_and_table():
    s = summarize(_rows([0.6, 0.8]))
    assert s["dice_fg"] == pytest.approx(0.7) and s["dice_fg_std"] == pytest.approx(0.1414213562, rel=1e-9)
    assert s["epe"] is None and s["pairs"] == 2
    table = markdown_table({"none": s, "deepsim_seg": s}, {"none": 0.0123}, {"deepsim_seg": 0.5})
    lines = table.splitlines()
    assert lines[0].startswith("| method | lambda | Dice fg")
    assert "| no registration | — | 0.700 ± 0.141 |" in table
    assert "| DeepSim_seg | 0.5 |" in table and "0.012" in table
    # Every row of the main table has the header's number of cells.
    n = lines[0].count("|")
    assert all(line.count("|") == n for line in lines[:4])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"losses": "mse,nope"}, "unknown loss"),
        ({"vgg_weights": "/nonexistent/vgg16.safetensors"}, "VGG16 weights file not found"),
        ({"seg_model": "/nonexistent/seg.safetensors"}, "seg-model not found"),
        ({"eval_pairs": -1}, "eval_pairs must be >= 0"),
    ],
)
def test_study_config_rejects_bad_input(kw, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig(**kw)


def test_full_preset_switches_to_paper_sizes():
    cfg = StudyConfig(full=True)
    assert (cfg.preset, cfg.lr) == ("paper", 1e-4) and cfg.reg_steps >= 20000


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    res = run_study(StudyConfig(data="tiny-2d", out=str(out), preset="tiny", feature_steps=2, reg_steps=2,
                                batch_size=4, progress=False, threads=1, weights_out=str(tmp_path / "w")))
    assert "skipping vgg: no --vgg-weights" in capsys.readouterr().out
    assert set(res["summaries"]) == {"none", "mse", "ncc", "ncc_sup", "deepsim_ae", "deepsim_seg"}
    data = json.loads((out / "results.json").read_text())
    assert all(len(rows) == 4 for rows in data["pairs"].values())
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["ae.safetensors", "reg.safetensors",
                                                                   "seg.safetensors"]
