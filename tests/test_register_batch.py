"""`deepsim-rt register --pairs`: same outputs as one pair at a time, one table, resumable, bad rows reported,
sharded across torchrun ranks (2 gloo processes)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepsim_rt.export.verify import random_regnet
from deepsim_rt.nn import save_model


@pytest.fixture(scope="module")
def model2d(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("m") / "reg2.safetensors", random_regnet(2, seed=31))


@pytest.fixture
def cohort(tmp_path):
    """Four 2D .npy pairs (one with labels), a pairs.csv with relative paths and one explicit name."""
    g = np.random.default_rng(11)
    d = tmp_path / "data"
    d.mkdir()
    for i in range(5):
        np.save(d / f"s{i}.npy", (g.random((23, 17)) * 300).astype(np.float32))
    np.save(d / "s0_lab.npy", g.integers(0, 3, (23, 17)).astype(np.int16))
    rows = [("data/s0.npy", "data/s4.npy", "data/s0_lab.npy", ""), ("data/s1.npy", "data/s4.npy", "", "second"),
            ("data/s2.npy", "data/s4.npy", "", ""), ("data/s3.npy", "data/s4.npy", "", "")]
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["moving", "fixed", "labels", "name"])
        w.writerows(rows)
    return tmp_path


def _table(out):
    with open(out / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_batch_matches_single_pairs_and_resumes(cohort, model2d, run_cli):
    out = cohort / "out"
    rc, text = run_cli("register", "--pairs", str(cohort / "pairs.csv"), "--out", str(out), "--model", str(model2d),
                       "--device", "cpu")
    assert rc == 0, text
    assert "4 pairs: 4 registered, 0 already done (skipped), 0 failed" in text
    names = ["s0_to_s4", "second", "s2_to_s4", "s3_to_s4"]
    table = _table(out)
    assert [r["name"] for r in table] == names and {r["status"] for r in table} == {"done"}
    assert json.loads((out / "summary.json").read_text())[1]["name"] == "second"
    assert sorted(p.name for p in (out / "s0_to_s4").iterdir()) == ["displacement.npy", "jacobian.npy", "qc.png",
                                                                     "summary.json", "warped.npy",
                                                                     "warped_labels.npy"]
    page = (out / "qc.html").read_text()  # one page: every pair's picture, linked relative to the batch folder
    assert all(f'src="{n}/qc.png"' in page for n in names), page[:2000]
    # the same files as `deepsim-rt register` on that pair
    rc, text = run_cli("register", "--moving", str(cohort / "data" / "s0.npy"), "--fixed",
                       str(cohort / "data" / "s4.npy"), "--labels", str(cohort / "data" / "s0_lab.npy"), "--out",
                       str(cohort / "single"), "--model", str(model2d), "--device", "cpu")
    assert rc == 0, text
    for f in ("displacement.npy", "warped.npy", "warped_labels.npy", "jacobian.npy"):
        np.testing.assert_array_equal(np.load(out / "s0_to_s4" / f), np.load(cohort / "single" / f))
    s = json.loads((out / "s2_to_s4" / "summary.json").read_text())
    assert float(table[2]["folding_percent"]) == s["qc"]["folding_percent"]

    # resume: finished pairs are skipped (files untouched); an interrupted pair (no summary.json) is redone
    before = (out / "second" / "displacement.npy").stat().st_mtime_ns
    (out / "s3_to_s4" / "summary.json").unlink()
    (out / "s3_to_s4" / "warped.npy").write_bytes(b"partial")
    rc, text = run_cli("register", "--pairs", str(cohort / "pairs.csv"), "--out", str(out), "--model", str(model2d),
                       "--device", "cpu")
    assert rc == 0 and "4 pairs: 1 registered, 3 already done (skipped), 0 failed" in text, text
    assert (out / "second" / "displacement.npy").stat().st_mtime_ns == before
    assert np.load(out / "s3_to_s4" / "warped.npy").shape == (23, 17)
    assert [r["status"] for r in _table(out)] == ["skipped", "skipped", "skipped", "done"]
    assert _table(out)[1]["folding_percent"] == table[1]["folding_percent"]  # skipped rows keep their figures
    # --overwrite redoes them all
    rc, text = run_cli("register", "--pairs", str(cohort / "pairs.csv"), "--out", str(out), "--model", str(model2d),
                       "--device", "cpu", "--overwrite")
    assert rc == 0 and "4 registered" in text, text


def test_failed_pair_does_not_stop_the_batch(cohort, model2d, run_cli):
    (cohort / "data" / "s2.npy").write_bytes(b"not an array")
    out = cohort / "out"
    rc, text = run_cli("register", "--pairs", str(cohort / "pairs.csv"), "--out", str(out), "--model", str(model2d),
                       "--device", "cpu")
    assert rc == 1 and "3 registered, 0 already done (skipped), 1 failed" in text, text
    assert "failed s2_to_s4: " in text and "s2.npy is not a readable .npy array" in text
    table = _table(out)
    assert [r["status"] for r in table] == ["done", "done", "failed", "done"]
    assert "s2.npy" in table[2]["error"] and not (out / "s2_to_s4").exists()


@pytest.mark.parametrize("content, match", [
    ("moving,target\na.npy,b.npy\n", "header must name the columns moving, fixed"),
    ("moving,fixed\ndata/s0.npy,data/nope.npy\n", "line 2: fixed file not found"),
    ("moving,fixed,name\ndata/s0.npy,data/s4.npy,a\ndata/s1.npy,data/s4.npy,a\n",
     "line 3: output name 'a' repeats line 2"),
    ("moving,fixed,name\ndata/s0.npy,data/s4.npy,../up\n", "must be a plain folder name"),
    ("moving,fixed\n", "no pairs listed"),
])
def test_bad_pairs_csv_is_one_line_and_writes_nothing(cohort, model2d, run_cli, content, match):
    (cohort / "bad.csv").write_text(content)
    rc, text = run_cli("register", "--pairs", str(cohort / "bad.csv"), "--out", str(cohort / "o"), "--model",
                       str(model2d))
    assert rc == 2 and match in text and text.count("\n") == 1, text
    assert not (cohort / "o").exists()


def test_pairs_excludes_single_pair_arguments(cohort, run_cli):
    rc, text = run_cli("register", "--pairs", str(cohort / "pairs.csv"), "--moving", "x.npy", "--out", "o")
    assert rc == 2 and "drop --moving" in text
    rc, text = run_cli("register", "--out", "o")
    assert rc == 2 and "give --moving and --fixed" in text


@pytest.mark.slow  # two torchrun processes importing torch: 30 s under load
def test_torchrun_two_ranks_share_the_rows(cohort, model2d):
    out = cohort / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "deepsim_rt.cli", "register", "--pairs", str(cohort / "pairs.csv"), "--out", str(out), "--model",
           str(model2d), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("4 pairs: 4 registered") == 1  # rank 0 reports for everyone, once
    table = _table(out)
    assert [r["status"] for r in table] == ["done"] * 4
    for r in table:
        assert json.loads((out / r["name"] / "summary.json").read_text())["moving"] == r["moving"]
