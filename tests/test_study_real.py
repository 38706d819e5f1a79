"""`deepsim-rt study --eval real-2d` (deepsim_rt.evaluate.real_slices + study.evaluate_real): the real slice pairs,
their score, the T2-like map, the pairwise Wilcoxon matrix and the table, hand cases first; then the 12 real pairs
from the user's real-brain cache (known answer: no registration 0.6295, as benchmarks/results/synth.md measured)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepsim_rt.data import real_brains as rb
from deepsim_rt.evaluate.real_slices import RealSlicePair, evaluate_real_pairs, real_pairs, slice_dice, t2_like
from deepsim_rt.evaluate.study import StudyConfig, real_markdown, run_study, summarize, wilcoxon_matrix

USER_CACHE = rb.default_cache()  # read at collection, before conftest's per-run cache takes over (test_real_brains)


def test_slice_dice_hand_case():
    fixed = torch.zeros(1, 1, 10, 10, dtype=torch.int64)
    fixed[..., 0:4, 0:4] = 10  # 16 voxels
    fixed[..., 6:8, 6:8] = 49  # 4 voxels: below MIN_VOXELS, not scored
    warped = torch.zeros_like(fixed)
    warped[..., 0:4, 2:6] = 10  # overlap 8 of 16 + 16: Dice 0.5
    mean, per = slice_dice(warped, fixed)
    assert per == {10: pytest.approx(0.5)} and mean == pytest.approx(0.5)
    assert np.isnan(slice_dice(torch.zeros_like(fixed), torch.zeros_like(fixed))[0])
    with pytest.raises(ValueError, match="one shape"):
        slice_dice(warped[..., :5], fixed)


def test_t2_like_is_non_monotone_on_the_slices_own_classes():
    """CSF (dark in T1) becomes the brightest, WM (brightest in T1) dark, background stays dark."""
    img = np.zeros((30, 30), np.float32)
    img[5:25, 5:11], img[5:25, 11:18], img[5:25, 18:25] = 0.2, 0.5, 0.9  # CSF, GM, WM
    mask = img > 0
    out = t2_like(img, mask)
    csf, gm, wm, bg = out[10, 7], out[10, 14], out[10, 20], out[0, 0]
    assert csf > gm > wm > bg == 0.0 and csf == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask shape must equal"):
        t2_like(img, mask[:5])


def _pair(shift: int) -> RealSlicePair:
    lab = torch.zeros(1, 1, 16, 16, dtype=torch.int64)
    lab[..., 4:10, 4:10] = 10
    img = (lab > 0).float()
    return RealSlicePair(f"shift{shift}", torch.roll(img, shift, -1), img, torch.roll(lab, shift, -1), lab)


def test_evaluate_real_pairs_known_answers():
    """A 2-voxel shift: no registration Dice 4/6; the true displacement (+2 along W) recovers it exactly."""
    pairs = [_pair(2), _pair(2)]
    none = evaluate_real_pairs(pairs, None)
    assert none[0]["dice_fg"] == pytest.approx(2 * 24 / 72) and none[0]["folding"] == 0.0
    assert set(none[0]["dice_per_class"]) == {n for n, _, _ in rb.STRUCTURES}
    assert none[0]["dice_per_class"]["thalamus_left"] == pytest.approx(2 / 3)
    assert none[0]["dice_per_class"]["thalamus_right"] is None

    def true_shift(moving, fixed):
        u = torch.zeros(1, 2, *moving.shape[2:])
        u[:, 1] = 2.0
        return u

    rows = evaluate_real_pairs(pairs, true_shift)
    assert rows[0]["dice_fg"] == 1.0 and rows[0]["pair"] == "shift2"
    assert summarize(rows)["dice_fg"] == 1.0


def test_wilcoxon_matrix_and_real_table():
    def rows(vals):
        return [{"dice_fg": v, "dice_paper": v, "dice_per_class": {"a": v}, "folding": 0.0, "std_log_jac": 0.1,
                 "epe": None, "seconds": 0.0} for v in vals]

    base = [0.5 + 0.01 * k for k in range(10)]
    per = {"none": rows(base), "ncc": rows([b + 0.001 * (k + 1) for k, b in enumerate(base)]),
           "deepsim_seg": rows([b - 0.002 * (k + 1) for k, b in enumerate(base)])}
    mat = wilcoxon_matrix(per)
    assert mat["ncc"]["none"] == mat["none"]["ncc"] == pytest.approx(2 / 1024)  # all 10 pairs one way
    assert "ncc" not in mat["ncc"]
    md = real_markdown({"t1": {n: summarize(r) for n, r in per.items()}}, {"t1": mat})
    assert "### real_t1" in md and "| NCC | 0.551 ± 0.033 | 10 |" in md and "(row vs column, two-sided, 10 pairs)" in md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert all(line.count("|") == header.count("|") for line in md.splitlines()[2:6])


def test_study_eval_option_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation set"):
        StudyConfig(eval="test,real-3d")
    with pytest.raises(ValueError, match="real-2d scores 2D nets"):
        run_study(StudyConfig(data="tiny-3d", out=str(tmp_path), eval="real-2d", losses="ncc"))
    with pytest.raises(ValueError, match="real pair set must be one of"):
        real_pairs("pd", slices={})


@pytest.fixture(scope="module")
def real():
    try:
        rb.ensure_real_brains(USER_CACHE, names=("colin27", "fsaverage", "cat12"))
    except ValueError as exc:  # no registry and nothing cached
        pytest.skip(f"real brains not cached in {USER_CACHE} and not fetchable: {exc}")
    from deepsim_rt.evaluate.real_slices import real_slices

    sl = real_slices(str(USER_CACHE))
    return {"slices": sl, **{k: real_pairs(k, slices=sl) for k in ("t1", "xc")}}


def test_the_12_real_pairs(real):
    t1, xc = real["t1"], real["xc"]
    assert len(t1) == len(xc) == 12 and t1[0].name == "colin27->fsaverage z=+4mm"
    assert len({p.name for p in t1}) == 12
    for a, b in zip(t1, xc, strict=True):
        assert a.name == b.name and torch.equal(a.moving, b.moving) and torch.equal(a.fixed_labels, b.fixed_labels)
        assert not torch.equal(a.fixed, b.fixed) and a.fixed.shape == (1, 1, 96, 80)
    # known answer (benchmarks/results/synth.md, round 1: identity 0.630 on real_t1)
    assert summarize(evaluate_real_pairs(t1, None))["dice_fg"] == pytest.approx(0.6295, abs=5e-4)
    # the same T2-like map as the 3D benchmark's (realbench.contrast): one definition, data.contrast
    from deepsim_rt.realbench.contrast import t2_like as t2_like_realbench

    assert t2_like is t2_like_realbench



@pytest.mark.slow
def test_tiny_study_on_real_slices(tmp_path, real):
    """Two training steps of two losses on synth-tiny-2d (4 mm nets), scored on the real 2 mm slices (96 x 80, a
    multiple of the tiny net's 2**stages): the real tables, per-pair JSON and box plots, no test-pair evaluation."""
    out = tmp_path / "s"
    res = run_study(StudyConfig(data="synth-tiny-2d", out=str(out), preset="tiny", reg_steps=2, batch_size=2,
                                losses="ncc,mse", progress=False, eval="real-2d", cache=str(USER_CACHE)))
    assert res["summaries"] == {} and set(res["real"]) == {"t1", "xc"}
    assert set(res["real"]["t1"]) == {"none", "ncc", "mse"}
    data = json.loads((out / "real_2d.json").read_text())
    assert len(data["pairs"]["xc"]["ncc"]) == 12 and data["wilcoxon"]["t1"]["ncc"].keys() == {"none", "mse"}
    assert (out / "real_2d_t1_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### real_xc" in (out / "real_2d.md").read_text()
