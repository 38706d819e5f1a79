"""The real-brain benchmark's model methods (deepsim_rt.realbench): the nets trained on synthesized brains
(net:synth-3d, net:synth-3d-ncc) and candidate model files (file:PATH), and how the report shows them. Hand rows and
names only: no registration runs here (tests/test_real_brains.py runs the benchmark end to end)."""

from __future__ import annotations

import pytest

from deepsim_rt.realbench import runner
from deepsim_rt.realbench.report import summary_table, targets_section


def test_synth_methods_name_the_committed_weights_after_affine_in_3d():
    for name, file in (("net:synth-3d", "reg.safetensors"), ("net:synth-3d-ncc", "reg_ncc.safetensors")):
        m = runner.METHODS[name]
        assert m.kind == "ours" and m.affine == "affine" and m.ndims == (3,) and m.refine is None
        assert m.model == str(runner.SYNTH3D_DIR / file)
    assert runner.SYNTH3D_DIR.parts[-2:] == ("weights", "synth-3d")


def test_file_method_names_its_folder_and_stem_and_runs_after_affine():
    a = runner.file_method("file:runs/reg3d_ncc/model_step150.safetensors")
    b = runner.file_method("file:runs/reg3d/model_step150.safetensors")
    assert a.name == "file:reg3d_ncc-model_step150" and b.name == "file:reg3d-model_step150"  # two runs stay apart
    assert a.model == "runs/reg3d_ncc/model_step150.safetensors" and a.affine == "affine" and a.ndims == (3,)
    assert a.label == "runs/reg3d_ncc/model_step150.safetensors after affine"
    # the JSON file stem (runner.run_benchmark: ':' -> '_') holds no path separator
    assert "/" not in a.name.replace(":", "_")
    odd = runner.file_method("file:/tmp/my run/x y.onnx")
    assert odd.name == "file:my_run-x_y"


def test_select_methods_mixes_names_and_files_and_refuses_in_one_line():
    got = runner.select_methods("affine, file:a/b.pt2,net:synth-3d,affine")
    assert [m.name for m in got] == ["affine", "file:a-b", "net:synth-3d"]
    with pytest.raises(ValueError, match=r"ending in .safetensors, .onnx, .pt2, got 'file:a/b.pt'$"):
        runner.select_methods("file:a/b.pt")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['net:synth-3e'\]") as e:
        runner.select_methods("net:synth-3e")
    assert "file:PATH" in str(e.value) and "\n" not in str(e.value)


def _row(method, dice, fold=0.0, pair="a->b", label=None):
    r = {"pair": pair, "tier": "labelled", "grid": "2mm", "method": method, "mean_dice12": dice, "cpu_seconds": 3.0,
         "seconds": 6.0, "folding_percent": fold, "ncc": 0.5}
    if label:
        r["label"] = label
    return r


def test_report_shows_file_methods_with_their_label_and_the_synthesis_target():
    rows = [_row("affine", 0.60), _row("affine", 0.70, pair="b->a"),
            _row("net:synth-3d", 0.71), _row("net:synth-3d", 0.75, pair="b->a"),  # +0.08: met
            _row("net:synth-3d-ncc", 0.66), _row("net:synth-3d-ncc", 0.70, pair="b->a"),  # +0.03: not met
            _row("file:r-model_step50", 0.65, 0.02, label="r/model_step50.safetensors after affine")]
    text = "\n".join(targets_section(rows, "2mm"))
    assert "net:synth-3d after affine 0.730 vs affine only 0.650 (+0.080; target ≥ +0.05): met" in text
    assert "net:synth-3d-ncc after affine 0.680 vs affine only 0.650 (+0.030; target ≥ +0.05): NOT met" in text
    assert "file:r-model_step50 after affine 0.650 vs affine only 0.650 (+0.000; target ≥ +0.05): NOT met" in text
    table = summary_table(rows, "labelled", "2mm")
    assert "| synth-3d DeepSim_seg net after affine | 2/2 | 0.730 |" in "\n".join(table)
    # METHODS order first, then the file methods, labelled from their rows
    assert table[-1].startswith("| r/model_step50.safetensors after affine | 1/2 | 0.650 |")


def test_the_committed_synth_3d_nets_are_3d_percentile_2mm_registration_nets_with_their_recipe():
    import json

    from deepsim_rt.nn.checkpoint import load_config, read_metadata, read_spacing

    for file in ("reg.safetensors", "reg_ncc.safetensors"):
        path = runner.SYNTH3D_DIR / file
        cfg = load_config(path)
        assert (cfg.kind, cfg.ndim, cfg.intensity) == ("reg", 3, "percentile")
        assert read_spacing(path) == (2.0, 2.0, 2.0)
        meta = read_metadata(path)
        synth = json.loads(meta["synthesis"])
        assert synth["ndim"] == 3 and synth["pair_affine"] == 0.2 and "label_maps" in synth
        assert json.loads(meta["train"])["config"]["data"] == "synth-3d"
