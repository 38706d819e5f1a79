"""`deepsim-rt changes` reads geometry as `register` does (issue 20 item 7), and its bad inputs are one line.

Before: the networks ran on the files' arrays as stored (a first axis reversed, with its affine saying so, gave
other maps: semantic mean 0.00714 -> 0.00701 on the tiny-3d case below, 18x on the issue's pair; 2 mm nets on 1 mm
arrays). Now orientation and voxel size come from the affines: the same world image gives the same maps whatever
its array order, and a finer copy runs the networks at their spacing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepsim_rt.anomaly.geometry import extractor_spacing_note, world_change_maps
from deepsim_rt.data.changes import ChangeBenchmark, ChangeBenchmarkConfig


def _sar_affine(spacing: float, shape: tuple[int, ...]) -> np.ndarray:
    """Array axes (S, A, R), as the bundled models' training arrays; centred."""
    a = np.zeros((4, 4))
    a[2, 0] = a[1, 1] = a[0, 2] = spacing
    a[3, 3] = 1.0
    a[:3, 3] = -np.array([shape[2], shape[1], shape[0]]) * spacing / 2
    return a


def _flip_axis0(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same world image stored with its first array axis reversed."""
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + affine[:3, 0] * (arr.shape[0] - 1)
    out[:, 0] *= -1
    return np.ascontiguousarray(arr[::-1]), out


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same world image stored R, A, S (axes reversed: S,A,R -> R,A,S)."""
    out = np.zeros((4, 4))
    out[:, [0, 1, 2]] = affine[:, [2, 1, 0]]
    out[:3, 3] = affine[:3, 3]
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), out


@pytest.fixture(scope="module")
def case():
    c = ChangeBenchmark(ChangeBenchmarkConfig(data="tiny-3d", split="test", n_cases=1))[0]
    return c.moving[0].numpy(), c.fixed[0].numpy()


@pytest.fixture(scope="module")
def det4():
    from deepsim_rt.anomaly.detector import ChangeDetector

    return ChangeDetector.load("default-3d-4mm", backend="eager", device="cpu")


@pytest.fixture(scope="module")
def reference(case, det4):
    m, f = case
    a = _sar_affine(4.0, m.shape)
    return world_change_maps(det4, m, a, f, a)


@pytest.mark.parametrize("store", ["flip_axis0", "ras"])
def test_same_world_image_gives_the_same_maps_whatever_the_array_order(case, det4, reference, store):
    m, f = case
    a = _sar_affine(4.0, m.shape)
    move = _flip_axis0 if store == "flip_axis0" else _to_ras
    (m2, a2), (f2, _) = move(m, a), move(f, a)
    res = world_change_maps(det4, m2, a2, f2, a2)
    assert res.facts["orientation"]["reoriented"] and res.facts["orientation"]["model"] == "SAR"
    for name, ref in reference.maps.items():
        got = res.maps[name]
        assert got.shape == f2.shape  # on the fixed FILE's grid, in its own axis order
        back = got[::-1] if store == "flip_axis0" else got.transpose(2, 1, 0)
        np.testing.assert_allclose(back, ref, rtol=0, atol=1e-6, err_msg=f"{store}: {name}")
    assert float(reference.maps["semantic"].mean()) > 1e-3  # not trivially zero


def test_finer_copy_runs_the_networks_at_their_spacing(case, det4, reference):
    from scipy.ndimage import zoom

    m, f = case
    m2, f2 = zoom(m, 2, order=1), zoom(f, 2, order=1)  # the same anatomy at 2 mm
    res = world_change_maps(det4, m2, _sar_affine(2.0, m2.shape), f2, _sar_affine(2.0, f2.shape))
    net, sem = res.facts["network"], res.facts["semantic"]
    assert net["resampled"] and net["network_shape"] == list(m.shape) and net["model_spacing_mm"] == [4.0] * 3
    assert sem["resampled"] and sem["spacing_mm"] == [4.0] * 3 and sem["shape"] == list(m.shape)
    assert res.maps["semantic"].shape == f2.shape and res.notes == []
    # measured: 0.00719 at 2 mm vs 0.00714 at 4 mm (the old array-order path: 0.00731)
    assert res.maps["semantic"].mean() == pytest.approx(reference.maps["semantic"].mean(), rel=0.05)


def test_extractor_spacing_note():
    assert extractor_spacing_note((2.0,) * 3, (2.0,) * 3, "seg") is None
    assert extractor_spacing_note(None, (4.0,) * 3, "ae") is None
    note = extractor_spacing_note((2.0,) * 3, (4.0,) * 3, "ae.safetensors")
    assert "trained at 4x4x4 mm" in note and "model at 2x2x2 mm" in note


def _write(folder, m, f, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(m, affine), folder / "m.nii.gz")
    nib.save(nib.Nifti1Image(f, affine), folder / "f.nii.gz")
    return str(folder / "m.nii.gz"), str(folder / "f.nii.gz")


def test_changes_cli_says_a_mismatched_extractor_and_records_the_geometry(run_cli, tmp_path, case):
    """The 4 mm net with the 2 mm seg extractor (as default-3d's 2 mm net with its 4 mm autoencoder): a note."""
    from deepsim_rt.runtime import bundled_model_path

    m, f = case
    (m2, a2), (f2, _) = _flip_axis0(m, _sar_affine(4.0, m.shape)), _flip_axis0(f, _sar_affine(4.0, m.shape))
    mp, fp = _write(tmp_path, m2, f2, a2)
    ext = bundled_model_path("default-3d", "seg")
    code, text = run_cli("changes", "--moving", mp, "--fixed", fp, "--out", str(tmp_path / "out"),
                         "--model", "default-3d-4mm", "--extractor", str(ext))
    assert code == 0, text
    assert "note: the extractor" in text and "trained at 2x2x2 mm" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["notes"] and summary["grid"]["orientation"] == {
        "fixed_file": "IAR", "moving_file": "IAR", "model": "SAR", "reoriented": True}
    assert summary["grid"]["semantic"]["spacing_mm"] == [2.0] * 3


@pytest.mark.parametrize("argv, expected", [
    (["evaluate-changes", "--n-cases", "100000"], "n_cases must be None (one per subject) or an int in 1..1000"),
    (["evaluate-changes", "--n-cases", "0"], "got 0"),
    (["evaluate-changes", "--out", "{file}/x"], "is a file, not a folder"),
    (["changes", "--moving", "{m}", "--fixed", "{m}", "--out", "{file}/x"], "is a file, not a folder"),
    (["demo", "--threads", "-1"], "threads must be an int >= 0 (0: torch's default), got -1"),
    (["demo", "--out", "{file}/x", "--dims", "2"], "is a file, not a folder"),
    (["demo", "--out", ""], "--out must name a folder, got ''"),
])
def test_bad_arguments_are_one_line_before_any_work(argv, expected, run_cli, tmp_path, monkeypatch):
    """Were: 504 s and 1.4 GB unchecked; NotADirectoryError and RuntimeError tracebacks after the work."""
    (tmp_path / "file").write_text("not a folder")
    np.save(tmp_path / "m.npy", np.zeros((8, 8), np.float32))
    import deepsim_rt.anomaly.benchmark as bench
    import deepsim_rt.anomaly.detector as detector
    import deepsim_rt.demo as demo

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(bench, "ChangeBenchmark", no_work)
    monkeypatch.setattr(detector.ChangeDetector, "load", no_work)
    monkeypatch.setattr(demo, "_run_dim", no_work)
    argv = [a.format(file=tmp_path / "file", m=tmp_path / "m.npy") for a in argv]
    code, text = run_cli(*argv)
    assert code == 2 and expected in text and len(text.strip().splitlines()) == 1, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.npy"]
