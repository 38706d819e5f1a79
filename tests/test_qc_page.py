"""QC pictures and the batch page (deepsim_rt.pipeline.qc_page, issue 20 item 6): known NCC answers, the
outlier rules, relative links, atomic writes, and the page opened in a real headless browser (Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deepsim_rt.pipeline.qc_page import (
    NCC_MIN,
    PAGE_NAME,
    PICTURE_NAME,
    flag_reasons,
    pair_ncc,
    write_batch_page,
    write_pair_picture,
)


def _blobs(shape: tuple[int, ...], shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """A smooth anatomy-like image: a few Gaussian blobs, shifted along the first axis by `shift` voxels."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(5):
        c = [rng.uniform(0.25, 0.75) * n for n in shape]
        c[0] += shift
        r2 = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True))
        out += rng.uniform(0.5, 1.0) * np.exp(-r2 / (2 * (0.12 * min(shape)) ** 2))
    return out.astype(np.float32)


def test_ncc_known_answers():
    x = _blobs((24, 20))
    assert pair_ncc(x, 3.0 * x + 7.0) == pytest.approx(1.0, abs=1e-9)
    assert pair_ncc(x, -x) == pytest.approx(-1.0, abs=1e-9)
    assert pair_ncc(x, np.full_like(x, 2.0)) is None  # a constant warped image has no correlation
    assert 0.0 < pair_ncc(x, _blobs((24, 20), shift=3.0)) < 0.99
    with pytest.raises(ValueError, match=r"same shape, got \(24, 20\) and \(20, 24\)"):
        pair_ncc(x, x.T)


@pytest.mark.parametrize("shape", [(40, 48), (20, 24, 18)])
def test_pair_picture(tmp_path, shape):
    f = _blobs(shape)
    w = _blobs(shape, shift=2.0)
    jac = np.ones(shape, np.float32)
    jac[(slice(4, 7),) * len(shape)] = -0.5  # a folded patch (outlined in the picture)
    summary = {"name": "m_to_f", "qc": {"folding_percent": 0.4, "sd_log_jacobian": 0.1}}
    path = write_pair_picture(tmp_path / PICTURE_NAME, f, w, jac, summary)
    assert path == tmp_path / PICTURE_NAME and [p.name for p in tmp_path.iterdir()] == [PICTURE_NAME]  # atomic
    assert summary["qc"]["ncc"] == pytest.approx(pair_ncc(f, w)) and summary["qc"]["folding_percent"] == 0.4
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    rows = 1 if len(shape) == 2 else 3  # 3D: the middle slice across each axis
    assert img.shape[0] > rows * 200 and img.std() > 20  # drawn, not blank
    # without a Jacobian: two panels per row, narrower
    narrow = write_pair_picture(tmp_path / "two.png", f, w, None, {})
    assert np.asarray(Image.open(narrow)).shape[1] < img.shape[1]


def test_pair_picture_errors(tmp_path):
    f = _blobs((16, 16))
    with pytest.raises(ValueError, match=r"same shape, got \(16, 16\) and \(16, 15\)"):
        write_pair_picture(tmp_path / "a.png", f, f[:, :15], None, {})
    with pytest.raises(ValueError, match=r"jacobian must have the fixed image's shape \(16, 16\), got \(4, 4\)"):
        write_pair_picture(tmp_path / "a.png", f, f, np.ones((4, 4)), {})
    with pytest.raises(ValueError, match="2D or 3D"):
        write_pair_picture(tmp_path / "a.png", np.ones(5), np.ones(5), None, {})
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_flag_rules():
    assert flag_reasons({"status": "done", "folding_percent": 0.2, "ncc": 0.9}) == []
    assert flag_reasons({"status": "done", "folding_percent": 2.5, "ncc": 0.9}) == ["folding 2.500 % > 1 %"]
    assert flag_reasons({"status": "done", "ncc": 0.3}) == [f"low similarity: NCC 0.300 < {NCC_MIN:.3f}"]
    assert flag_reasons({"status": "failed", "error": "bad file"}) == ["failed: bad file"]
    assert flag_reasons({"status": "done", "ncc": "0.9"}, picture_exists=False) == ["no QC picture"]
    assert flag_reasons({"status": "skipped", "folding_percent": "", "ncc": None}) == []  # CSV blanks


def _batch(tmp_path: Path, nccs: list[float], foldings: list[float] | None = None) -> list[dict]:
    rows = []
    for i, ncc in enumerate(nccs):
        name = f"pair {i} <&>"  # names are escaped in the page and percent-encoded in its links
        (tmp_path / name).mkdir()
        f = _blobs((32, 28), seed=i)
        summary = {"name": name, "qc": {"folding_percent": (foldings or [0.0] * len(nccs))[i]}}
        write_pair_picture(tmp_path / name / PICTURE_NAME, f, f, None, summary)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        rows.append({"name": name, "status": "done", "ncc": ncc, "folding_percent": summary["qc"]["folding_percent"]})
    return rows


def test_batch_page_flags_outliers_with_relative_links(tmp_path):
    nccs = [0.91, 0.90, 0.92, 0.905, 0.915, 0.75]  # the last is within NCC_MIN but far below the batch
    rows = _batch(tmp_path, nccs, foldings=[0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    rows.append({"name": "lost", "status": "failed", "error": "moving.nii.gz: file not found"})
    rows.append({"name": "nopic", "status": "done", "ncc": 0.91, "folding_percent": 0.0})
    page = write_batch_page(tmp_path, rows)
    assert page == tmp_path / PAGE_NAME
    text = page.read_text()
    assert str(tmp_path) not in text  # every link relative: the folder can be moved or served as it is
    assert "pair 0 &lt;&amp;&gt;" in text and "<&>" not in text
    assert 'src="pair%205%20%3C%26%3E/qc.png"' in text
    assert "8 pairs, 4 flagged" in text
    flagged = re.search(r"<h2>Flagged</h2><ol>(.*?)</ol>", text).group(1)
    assert "folding 3.000 % &gt; 1 %" in flagged and "low similarity: NCC 0.750" in flagged
    assert "failed: moving.nii.gz: file not found" in flagged and "nopic</a>: no QC picture" in flagged
    assert "batch median" in text  # the robust bound was used (6 NCCs >= ROBUST_MIN_ROWS)
    assert not list(tmp_path.glob(".*tmp*"))


def test_batch_table_rows_take_their_qc_from_summary_json(tmp_path):
    """The batch's summary.csv rows (blank cells, no ncc) work as they are: the figures come from summary.json."""
    rows = _batch(tmp_path, [0.9, 0.9])
    summary = json.loads((tmp_path / rows[1]["name"] / "summary.json").read_text())
    summary["qc"].update(ncc=0.2, folding_percent=4.0)
    (tmp_path / rows[1]["name"] / "summary.json").write_text(json.dumps(summary))
    table = [{"name": r["name"], "status": "done", "error": "", "folding_percent": "", "register_s": "1.5"}
             for r in rows]
    text = write_batch_page(tmp_path, table).read_text()
    assert "2 pairs, 1 flagged" in text and "folding 4.000 % &gt; 1 %" in text and "NCC 0.200" in text


def test_batch_page_errors(tmp_path):
    with pytest.raises(ValueError, match="out_dir must be an existing folder"):
        write_batch_page(tmp_path / "missing", [])
    with pytest.raises(ValueError, match=r"rows\[0\] needs a 'name'"):
        write_batch_page(tmp_path, [{"status": "done"}])
    with pytest.raises(ValueError, match="ncc_min must be a number in"):
        write_batch_page(tmp_path, [], ncc_min=2)
    assert list(tmp_path.iterdir()) == []


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium / chromium-browser / google-chrome on PATH (Debian: "
                                                "`apt-get install chromium`, or `make chromium`)")
def test_batch_page_renders_in_a_headless_browser(tmp_path):
    rows = _batch(tmp_path, [0.9, 0.88, 0.4])
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / PICTURE_NAME).write_bytes(b"not a png")  # must show as broken, not as loaded
    rows.append({"name": "corrupt", "status": "done", "ncc": 0.9})
    page = write_batch_page(tmp_path, rows)
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=5000", "--window-size=1300,1600"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    assert 'data-images-loaded="3"' in body.group(0) and 'data-images-broken="1"' in body.group(0), body.group(0)
    assert re.search(r'class="card broken"[^>]*id="pair-3"', dom)  # the corrupt picture's card is marked
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert img.shape[:2] == (1600, 1300) and img.std() > 20  # the page and its pictures drew, not a blank page
