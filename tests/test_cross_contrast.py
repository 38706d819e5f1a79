"""Cross-contrast pairs of the real-brain benchmark (deepsim_rt.realbench.contrast): the T2-like map of a brain's
own T1 intensities, in 2D and 3D, and the writer of the T2-like fixed brain (`evaluate-real --contrast t2like`)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deepsim_rt.data import real_brains as rb
from deepsim_rt.realbench.contrast import kmeans3, t2_like, t2like_array, t2like_brain

CSF, GM, WM = 0.25, 0.55, 0.85  # T1 intensities of a toy brain (background 0)


def _toy_t1(shape=(24, 28, 20), seed=0) -> np.ndarray:
    """A 3D toy 'T1': background 0, a ball of WM with a GM shell and CSF pockets, a little noise."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    img = np.where(r < 0.9, GM, 0.0)
    img = np.where(r < 0.6, WM, img)
    img = np.where((r < 0.6) & (np.abs(g[0]) < 0.15), CSF, img)  # a 'ventricle' slab
    img = np.where((r < 0.9) & (r > 0.78) & (g[1] > 0.3), CSF, img)  # sulcal CSF
    return (img + 0.01 * rng.standard_normal(shape) * (img > 0)).astype(np.float32) * 700.0  # any scanner scale


def test_kmeans3_finds_the_three_tissue_means():
    v = np.concatenate([np.full(50, 0.2), np.full(80, 0.5), np.full(120, 0.9)])
    np.testing.assert_allclose(kmeans3(v), [0.2, 0.5, 0.9], atol=1e-9)
    with pytest.raises(ValueError, match="at least 3 values"):
        kmeans3(np.array([0.1, 0.2]))


def test_t2_like_is_non_monotone_in_3d_csf_bright_white_dark():
    t1 = _toy_t1()
    out = t2like_array(t1)
    assert out.shape == t1.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    cls = {k: np.isclose(t1 / 700.0, v, atol=0.05) & (t1 > 0) for k, v in (("csf", CSF), ("gm", GM), ("wm", WM))}
    mean = {k: float(out[m].mean()) for k, m in cls.items()}
    bg = float(out[t1 == 0].mean())
    # T1 order CSF < GM < WM becomes CSF > GM > WM; the background (darkest in T1) stays dark: non-monotone
    assert mean["csf"] > mean["gm"] > mean["wm"] > bg
    assert mean["csf"] > 0.8 and mean["wm"] < 0.45 and bg < 0.05


def test_t2_like_reads_the_image_only_voxel_by_voxel():
    """A function of the T1 intensities alone: permuting the voxels permutes the output the same way (no
    neighbourhood, no label map enters), and equal T1 values give equal outputs."""
    t1 = _toy_t1(seed=1)
    perm = np.random.default_rng(2).permutation(t1.size)
    a = t2like_array(t1).ravel()[perm]
    b = t2like_array(t1.ravel()[perm].reshape(t1.shape)).ravel()
    np.testing.assert_allclose(a, b, atol=1e-6)  # k-means sums in another order: float rounding only
    vals, inv = np.unique(t1, return_inverse=True)
    out = t2like_array(t1).ravel()
    assert all(np.ptp(out[inv.ravel() == k]) == 0 for k in range(0, len(vals), max(1, len(vals) // 50)))


def test_t2_like_2d_and_bad_shapes():
    img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert t2_like(img, img > 0.05).shape == (8, 8)
    with pytest.raises(ValueError, match="mask shape"):
        t2_like(img, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="2D or 3D"):
        t2like_array(np.zeros((2, 2, 2, 2), np.float32))


def test_t2like_brain_writes_the_fixed_image_and_keeps_labels_and_grid(tmp_path):
    import nibabel as nib

    t1 = _toy_t1()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-20, -30, -10)
    paths = {}
    for which, data in (("image", t1), ("labels", (t1 > 0).astype(np.uint8) * 10), ("mask", (t1 > 0).astype(np.uint8))):
        paths[which] = tmp_path / f"toy_{which}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), str(paths[which]))
    brain = rb.RealBrain("toy", "a toy brain", "test", False, 3, paths["image"], None, paths["labels"], paths["mask"])
    out = t2like_brain(brain, tmp_path / "inputs")
    assert out.image != brain.image and out.image.is_file() and out.image.name == "toy_image_t2like.nii.gz"
    assert (out.labels, out.mask, out.head, out.name, out.ndim) == (brain.labels, brain.mask, None, "toy", 3)
    img = nib.load(str(out.image))
    np.testing.assert_allclose(img.affine, aff)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), t2like_array(t1))
    assert "T2-like" in out.description
    # reused when present (resumable runs do not rewrite it)
    mtime = os.stat(out.image).st_mtime_ns
    again = t2like_brain(brain, tmp_path / "inputs")
    assert again.image == out.image and os.stat(out.image).st_mtime_ns == mtime


def test_evaluate_real_refuses_an_unknown_contrast(tmp_path):
    from deepsim_rt.realbench import runner

    with pytest.raises(ValueError, match="contrast must be one of t1, t2like, got 't3'"):
        runner.run_benchmark(tmp_path, "2mm", [], [], contrast="t3")
    assert {"net+refine:deepsim_seg", "net+refine:ncc", "net+refine:mind", "net+refine:nmi"} <= set(runner.METHODS)
    assert runner.METHODS["net+refine:mind"].refine == {"loss": "mind"}
