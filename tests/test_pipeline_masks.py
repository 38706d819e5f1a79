"""Masks (issue 20 item 3): --fixed-mask / --moving-mask strip their images for the pre-alignment and the network
(a head registers as its brain) and restrict the refinement's similarity and the QC statistics.

Known answers: a masked similarity is the plain one with the outside counted as 0; a difference outside the mask
does not move the refined field; the CLI puts a mask from another grid onto the fixed grid, says what it used in
summary.json, and refuses empty or non-NIfTI masks in one line before any work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepsim_rt.refine import RefineConfig, refine
from deepsim_rt.refine.terms import FixedNCC, mse_term

nib = pytest.importorskip("nibabel")


def test_masked_similarity_counts_the_mask_only():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 1, 12, 14, generator=g), torch.rand(1, 1, 12, 14, generator=g)
    ones = torch.ones(1, 1, 12, 14)
    assert torch.allclose(FixedNCC(b, 5, mask=ones)(a), FixedNCC(b, 5)(a))
    half = torch.zeros(1, 1, 12, 14)
    half[..., :7] = 1
    # outside the mask counts as 0; divided by all voxels (the regulariser's balance does not change with a mask)
    assert torch.allclose(mse_term(a, b, half), (a - b)[..., :7].square().sum() / a.numel())


def _blob(shape, centre, r=3.0):
    """A Gaussian blob cut at 3 r: exactly zero farther out (Adam turns even a 1e-11 gradient into a full step)."""
    ij = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    d2 = ((ij - np.asarray(centre, np.float32).reshape(-1, *[1] * len(shape))) ** 2).sum(0)
    return np.where(d2 < 9 * r * r, np.exp(-d2 / (2 * r * r)), 0.0).astype(np.float32)


def test_what_lies_outside_the_mask_does_not_change_the_refined_field():
    """Two moving images that differ only outside the mask refine to the same field with the mask (bit for bit:
    the similarity's gradient is zero there, whatever the images hold), and to different fields without it."""
    shape = (48, 48)
    fixed = _blob(shape, (12, 12)) + _blob(shape, (40, 36))
    mov_a = _blob(shape, (13, 12)) + _blob(shape, (40, 40))
    mov_b = _blob(shape, (13, 12)) + _blob(shape, (38, 44))  # only the lower-right blob moved
    fix = torch.from_numpy(fixed)[None, None]
    cfg = RefineConfig(iterations=20, levels=1, progress=False)
    mask = torch.zeros(1, 1, *shape)
    # the upper-left quarter: the lower-right blobs (cut at 9 voxels: rows and columns >= 29) lie beyond the NCC
    # window (9: 4 voxels) of every voxel inside it
    mask[..., :24, :24] = 1

    def run(mov, m=None):
        return refine(torch.from_numpy(mov)[None, None], fix, config=cfg, mask=m).displacement

    assert not torch.equal(run(mov_a), run(mov_b))
    held_a, held_b = run(mov_a, mask), run(mov_b, mask)
    assert torch.equal(held_a, held_b)
    assert float(held_a[..., :24, :24].abs().max()) > 0.1  # and inside, the upper-left blob was registered
    with pytest.raises(ValueError, match="mask is empty"):
        refine(torch.from_numpy(mov_a)[None, None], fix, config=cfg, mask=torch.zeros(1, 1, *shape))
    with pytest.raises(ValueError, match=r"mask must be a \(B, 1, \*S\) = \(1, 1, 48, 48\) tensor"):
        refine(torch.from_numpy(mov_a)[None, None], fix, config=cfg, mask=torch.ones(1, 1, 10, 10))


def _nii(path, data, affine):
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def test_cli_masks_from_another_grid_restrict_qc_and_refinement(tmp_path, run_cli):
    shape = (24, 20, 22)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    g = np.random.default_rng(0)
    fix = (_blob(shape, (12, 10, 11), 5) * 500 + g.random(shape) * 20).astype(np.float32)
    mov = (_blob(shape, (13, 10, 10), 5) * 500 + g.random(shape) * 20).astype(np.float32)
    _nii(tmp_path / "m.nii.gz", mov, aff)
    _nii(tmp_path / "f.nii.gz", fix, aff)
    coarse = np.zeros((12, 10, 11), np.uint8)  # the fixed mask on a 4 mm grid: a box around the blob
    coarse[3:9, 2:8, 3:8] = 1
    _nii(tmp_path / "fmask.nii.gz", coarse, np.diag([4.0, 4.0, 4.0, 1.0]) @ np.diag([1, 1, 1, 1.0]))
    base = ["register", "--moving", str(tmp_path / "m.nii.gz"), "--fixed", str(tmp_path / "f.nii.gz"), "--model",
            "none", "--refine", "5", "--refine-levels", "1", "--device", "cpu"]
    rc, text = run_cli(*base, "--out", str(tmp_path / "o"), "--fixed-mask", str(tmp_path / "fmask.nii.gz"))
    assert rc == 0, text
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    # the 4 mm box on the 2 mm grid: voxel centres within it (linear, inside where > 1/2)
    n = s["masks"]["union_on_fixed_grid_voxels"]
    assert s["masks"]["fixed"].endswith("fmask.nii.gz") and s["masks"]["moving"] is None
    assert s["masks"]["restricts"] == ["qc statistics", "refinement similarity"]
    assert s["qc"]["mask_voxels"] == n and 0.5 * 12 * 12 * 10 < n < 1.5 * 12 * 12 * 10
    # errors, one line, before any work and nothing written
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _nii(tmp_path / "zero.nii.gz", np.zeros(shape, np.uint8), aff)
    for mask, match in (("zero.nii.gz", "is empty (no non-zero voxel)"), ("missing.nii.gz", "file not found")):
        rc, text = run_cli(*base, "--out", str(tmp_path / "o2"), "--fixed-mask", str(tmp_path / mask))
        assert rc == 2 and match in text and "Traceback" not in text, text
    np.save(tmp_path / "m.npy", mov[..., 0])
    np.save(tmp_path / "f.npy", fix[..., 0])
    rc, text = run_cli("register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"), "--out",
                       str(tmp_path / "o2"), "--moving-mask", str(tmp_path / "fmask.nii.gz"))
    assert rc == 2 and "--moving-mask needs NIfTI images" in text, text
    assert not (tmp_path / "o2").exists()


def test_a_head_with_its_mask_registers_as_its_brain(tmp_path, run_cli):
    """--moving-mask strips the head for the pre-alignment and the registration: the transform equals the one of
    the brain file (the head times its mask) exactly, while warped.nii.gz still shows the original head (skull)."""
    shape = (24, 20, 22)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    brain_fix = _blob(shape, (12, 10, 11), 5) * 500
    brain_mov = _blob(shape, (13, 9, 11), 5) * 500
    ij = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    r = np.sqrt(((ij - np.array([13, 9, 11], np.float32).reshape(3, 1, 1, 1)) ** 2).sum(0))
    skull = ((r > 7.5) & (r < 9.5)).astype(np.float32) * 900  # a bright shell the fixed brain does not have
    mask = (r <= 7.0).astype(np.uint8)
    _nii(tmp_path / "head.nii.gz", (brain_mov * mask + skull).astype(np.float32), aff)
    _nii(tmp_path / "brain.nii.gz", (brain_mov * mask).astype(np.float32), aff)
    _nii(tmp_path / "mask.nii.gz", mask, aff)
    _nii(tmp_path / "f.nii.gz", brain_fix.astype(np.float32), aff)
    base = ["--fixed", str(tmp_path / "f.nii.gz"), "--model", "none", "--affine", "rigid", "--refine", "3",
            "--refine-levels", "1", "--device", "cpu"]
    rc, text = run_cli("register", "--moving", str(tmp_path / "head.nii.gz"), *base, "--out", str(tmp_path / "h"),
                       "--moving-mask", str(tmp_path / "mask.nii.gz"))
    assert rc == 0, text
    rc, text = run_cli("register", "--moving", str(tmp_path / "brain.nii.gz"), *base, "--out", str(tmp_path / "b"),
                       "--moving-mask", str(tmp_path / "mask.nii.gz"))
    assert rc == 0, text
    sh, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("h", "b"))
    assert sh["grid"]["affine"] == sb["grid"]["affine"]  # the pre-alignment's record, matrix included
    wh, wb = (np.asarray(nib.load(tmp_path / d / "warped.nii.gz").dataobj) for d in ("h", "b"))
    uh, ub = (np.asarray(nib.load(tmp_path / d / "warp.nii.gz").dataobj) for d in ("h", "b"))
    np.testing.assert_array_equal(uh, ub)  # the same transform, bit for bit
    assert wh.max() > 800 and wb.max() < 600  # the head's warped image keeps its skull; the brain's has none
