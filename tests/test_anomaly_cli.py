"""`deepsim-rt changes` and `deepsim-rt evaluate-changes` end to end through the real entry point (run_cli)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepsim_rt.data.changes import ChangeBenchmark, ChangeBenchmarkConfig


@pytest.fixture(scope="module")
def case2d():
    return ChangeBenchmark(ChangeBenchmarkConfig(data="tiny-2d", split="test", n_cases=1))[0]


def _write_pair(folder, case, kind: str):
    m, f = case.moving[0].numpy(), case.fixed[0].numpy()
    if kind == "npy":
        np.save(folder / "m.npy", m)
        np.save(folder / "f.npy", f)
    elif kind == "png":
        from PIL import Image

        Image.fromarray((m * 255).astype(np.uint8)).save(folder / "m.png")
        Image.fromarray((f * 255).astype(np.uint8)).save(folder / "f.png")
    else:
        import nibabel as nib

        affine = np.diag([4.0, 4.0, 4.0, 1.0])
        affine[:3, 3] = (-80.0, -96.0, -60.0)
        nib.save(nib.Nifti1Image(m, affine), folder / "m.nii.gz")
        nib.save(nib.Nifti1Image(f, affine), folder / "f.nii.gz")
    ext = "nii.gz" if kind == "nifti" else kind
    return folder / f"m.{ext}", folder / f"f.{ext}"


@pytest.mark.parametrize("kind", ["npy", "png"])
def test_changes_2d(run_cli, tmp_path, case2d, kind):
    m, f = _write_pair(tmp_path, case2d, kind)
    out = tmp_path / "out"
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(f), "--out", str(out))
    assert code == 0, text
    names = {"semantic", "residual", "jacobian"}
    expect = {f"change_{n}.npy" for n in names} | {"overlay.png", "summary.json"}
    if kind == "png":
        expect |= {f"change_{n}.png" for n in names}
    assert {p.name for p in out.iterdir()} == expect  # no temporary leftovers
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extractor"].endswith("default-2d/seg.safetensors") and summary["backend"] == "eager"
    for n in names:
        arr = np.load(out / f"change_{n}.npy")
        assert arr.shape == (48, 40) and arr.dtype == np.float32 and np.isfinite(arr).all()
        assert summary["scores"][n]["max"] == pytest.approx(float(arr.max()))
    if kind == "png":
        from PIL import Image

        png = np.array(Image.open(out / "change_semantic.png"))
        assert png.dtype == np.uint8 and png.max() == 255
    # A second run refuses to replace the outputs, then does with --overwrite.
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(f), "--out", str(out))
    assert code == 2 and "--overwrite" in text
    code, _ = run_cli("changes", "--moving", str(m), "--fixed", str(f), "--out", str(out), "--overwrite")
    assert code == 0


def test_changes_3d_nifti_on_the_fixed_grid(run_cli, tmp_path):
    import nibabel as nib

    case = ChangeBenchmark(ChangeBenchmarkConfig(data="tiny-3d", split="test", n_cases=1))[0]
    m, f = _write_pair(tmp_path, case, "nifti")
    out = tmp_path / "out"
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(f), "--out", str(out))
    assert code == 0, text
    fixed = nib.load(f)
    for n in ("semantic", "residual", "jacobian"):
        img = nib.load(out / f"change_{n}.nii.gz")
        assert img.shape == (40, 48, 40) and np.allclose(img.affine, fixed.affine)
        assert img.get_data_dtype() == np.float32
    assert (out / "overlay.png").stat().st_size > 0


def test_changes_error_contracts(run_cli, tmp_path, case2d):
    m, f = _write_pair(tmp_path, case2d, "npy")
    out = tmp_path / "out"
    np.save(tmp_path / "small.npy", np.ones((40, 40), np.float32))
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(tmp_path / "small.npy"), "--out", str(out))
    assert code == 2 and "shapes differ" in text and len(text.strip().splitlines()) == 1
    bad = case2d.fixed[0].numpy().copy()
    bad[5, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(tmp_path / "nan.npy"), "--out", str(out))
    assert code == 2 and "NaN" in text
    (tmp_path / "empty.npy").write_bytes(b"")
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(tmp_path / "empty.npy"), "--out", str(out))
    assert code == 2 and "empty.npy" in text
    # A model without a feature extractor beside it: the error names the file to give.
    from deepsim_rt.nn import NetConfig, build_model, save_model

    reg = save_model(tmp_path / "models" / "reg.safetensors", build_model(NetConfig.make("reg", 2, "tiny")))
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(f), "--out", str(out), "--model", str(reg))
    assert code == 2 and "seg.safetensors" in text and "--extractor" in text
    assert not out.exists()  # nothing written by any failed run
    # An output that is an input is refused, even with --overwrite, and the input is left as it was.
    victim = tmp_path / "change_semantic.npy"
    np.save(victim, case2d.fixed[0].numpy())
    before = victim.read_bytes()
    code, text = run_cli("changes", "--moving", str(m), "--fixed", str(victim), "--out", str(tmp_path),
                         "--overwrite")
    assert code == 2 and "it is an input" in text and victim.read_bytes() == before


def test_evaluate_changes_end_to_end(run_cli, tmp_path):
    out = tmp_path / "eval"
    code, text = run_cli("evaluate-changes", "--data", "tiny-2d", "--split", "test", "--n-cases", "3",
                         "--out", str(out))
    assert code == 0, text
    res = json.loads((out / "results.json").read_text())
    assert res["benchmark"]["data"] == "tiny-2d" and len(res["cases"]) == 3
    assert res["models"]["mse"]["path"].endswith("default-2d/reg_mse.safetensors")
    for name in ("semantic_deepsim", "residual_mse", "jacobian_deepsim", "semantic_none"):
        s = res["summary"][name]
        assert 0.0 <= s["mean"] <= 1.0 and s["n"] == 3
        assert s["mean"] == pytest.approx(np.mean([c["auc"][name] for c in res["cases"]]))
    table = (out / "results.md").read_text()
    assert "| semantic score after DeepSim net |" in table and "| \\|log det J\\| of DeepSim net |" in table
    assert (out / "changes_auc.png").stat().st_size > 0
    code, text = run_cli("evaluate-changes", "--data", "tiny-2d", "--model", "default-3d", "--out", str(out))
    assert code == 2 and "3D but the 'tiny-2d' benchmark is 2D" in text
    code, text = run_cli("evaluate-changes", "--data", "tiny-2d", "--smooth", "-1", "--out", str(out))
    assert code == 2 and "smooth must be" in text


def test_evaluate_changes_names_the_missing_mse_model(run_cli, tmp_path):
    from deepsim_rt.nn import NetConfig, build_model, save_model

    reg = save_model(tmp_path / "m" / "reg.safetensors", build_model(NetConfig.make("reg", 2, "tiny")))
    code, text = run_cli("evaluate-changes", "--data", "tiny-2d", "--model", str(reg), "--out", str(tmp_path / "o"))
    assert code == 2 and "reg_mse.safetensors" in text and "--mse-model" in text
