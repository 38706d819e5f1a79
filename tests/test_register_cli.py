"""`deepsim-rt register`: NIfTI affine/header round trip, outputs agree with the library, bad input writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsim_rt.cli import main
from deepsim_rt.export.verify import random_regnet
from deepsim_rt.kernels import warp
from deepsim_rt.nn import save_model
from deepsim_rt.runtime import Registrator

nib = pytest.importorskip("nibabel")  # optional (GPU machines lack it): a skip, never a collection error


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {2: save_model(d / "reg2.safetensors", random_regnet(2, seed=21)),
            3: save_model(d / "reg3.safetensors", random_regnet(3, seed=22))}


def _affine() -> np.ndarray:
    # rotation about z, anisotropic voxels, shear-free, a world offset: nothing an identity default would match
    c, s = np.cos(0.3), np.sin(0.3)
    a = np.array([[c * 1.5, -s * 1.2, 0, -40.5], [s * 1.5, c * 1.2, 0, 12.25], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    return a


def _write(path, data, affine, descrip=b"subject-7"):
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = descrip
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))


@pytest.fixture
def pair3d(tmp_path):
    g = np.random.default_rng(0)
    shape = (13, 10, 9)  # odd sizes: the runtime pads to 8 and crops back
    mov = (g.random(shape) * 800).astype(np.float32)
    fix = (g.random(shape) * 800).astype(np.float32)
    lab = g.integers(0, 4, shape).astype(np.int16)
    aff = _affine()
    _write(tmp_path / "m.nii.gz", mov, aff)
    _write(tmp_path / "f.nii.gz", fix, aff, descrip=b"fixed-one")
    _write(tmp_path / "l.nii.gz", lab, aff)
    return tmp_path, mov, fix, lab, aff


def test_register_nifti_round_trips_affine_and_matches_library(pair3d, models, capsys):
    d, mov, fix, lab, aff = pair3d
    out = d / "out"
    rc = main(["register", "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
               str(d / "l.nii.gz"), "--out", str(out), "--model", str(models[3]), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    fixed_img = nib.load(str(d / "f.nii.gz"))
    for name in ("warped", "displacement", "warped_labels"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(img.affine, aff, rtol=0, atol=1e-5)
        assert img.header["descrip"].tobytes().rstrip(b"\0") in (b"fixed-one",
                                                                   b"deepsim_rt displacement, voxels, last axis=voxel"
                                                                   b" axis i")
        assert int(img.header["sform_code"]) == int(fixed_img.header["sform_code"]) == 2
        assert img.header.get_xyzt_units() == ("mm", "sec")
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata(dtype=np.float32)
    disp = nib.load(str(out / "displacement.nii.gz")).get_fdata(dtype=np.float32)
    wl = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert warped.shape == mov.shape and disp.shape == (*mov.shape, 3) and wl.shape == mov.shape
    assert wl.dtype == np.int16 and set(np.unique(wl)) <= {0, 1, 2, 3}
    # the library on the same arrays brought to the model's axis order (pipeline.orientation: exact flips and
    # permutation, SAR), mapped back onto the file's axes
    from deepsim_rt.pipeline.orientation import Reorientation

    r = Reorientation.of(aff, mov.shape)
    assert r.source == ("R", "A", "S") and not r.identity
    ref = Registrator.load(models[3], device="cpu").register(r.to_model(mov), r.to_model(fix), r.to_model(lab))
    np.testing.assert_allclose(disp, np.moveaxis(r.vector_from_model(ref.displacement), 0, -1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(warped, r.from_model(ref.warped), rtol=0, atol=1e-3)  # up to 800, float32 on disk
    np.testing.assert_array_equal(wl, r.from_model(ref.warped_labels))
    # the written field means what the docstring says: warped(p) = moving(p + u(p)), voxel units, last axis
    mn = (mov - mov.min()) / (mov.max() - mov.min())
    direct = warp(torch.from_numpy(mn)[None, None], torch.from_numpy(np.moveaxis(disp, -1, 0))[None])[0, 0]
    np.testing.assert_allclose(warped, direct.numpy() * (mov.max() - mov.min()) + mov.min(), rtol=0, atol=2e-3)
    assert float(np.abs(disp).max()) > 0.5


def test_register_png_and_npy_2d(tmp_path, models):
    from PIL import Image

    g = np.random.default_rng(1)
    m8 = (g.random((27, 19)) * 255).astype(np.uint8)
    f8 = (g.random((27, 19)) * 255).astype(np.uint8)
    Image.fromarray(m8).save(tmp_path / "m.png")
    Image.fromarray(f8).save(tmp_path / "f.png")
    Image.fromarray((g.integers(0, 3, (27, 19)) * 50).astype(np.uint8)).save(tmp_path / "l.png")
    assert main(["register", "--moving", str(tmp_path / "m.png"), "--fixed", str(tmp_path / "f.png"), "--labels",
                 str(tmp_path / "l.png"), "--out", str(tmp_path / "o"), "--model", str(models[2])]) == 0
    w = np.array(Image.open(tmp_path / "o" / "warped.png"))
    assert w.dtype == np.uint8 and w.shape == (27, 19)
    assert np.load(tmp_path / "o" / "displacement.npy").shape == (27, 19, 2)
    assert set(np.unique(np.array(Image.open(tmp_path / "o" / "warped_labels.png")))) <= {0, 50, 100}
    np.save(tmp_path / "m.npy", m8.astype(np.float32))
    np.save(tmp_path / "f.npy", f8.astype(np.float32))
    assert main(["register", "--moving", str(tmp_path / "m.npy"), "--fixed", str(tmp_path / "f.npy"), "--out",
                 str(tmp_path / "o2"), "--model", str(models[2])]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "o2" / "displacement.npy"),
                               np.load(tmp_path / "o" / "displacement.npy"), rtol=0, atol=1e-6)


def _fails(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_bad_inputs_write_nothing(pair3d, models, capsys):
    d, mov, fix, lab, aff = pair3d
    out = d / "never"
    base = ["register", "--out", str(out), "--model", str(models[3])]
    _write(d / "small.nii.gz", mov[:12], aff)
    # moving and fixed on different grids are resampled (tests/test_transforms_runtime.py); labels must share the
    # moving image's grid
    _fails([*base, "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
            str(d / "small.nii.gz")], capsys, "shapes differ")
    shifted = aff.copy()
    shifted[0, 3] += 2.0
    _write(d / "moved.nii.gz", lab, shifted)
    _fails([*base, "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
            str(d / "moved.nii.gz")], capsys, "affines differ")
    _write(d / "4d.nii.gz", np.stack([mov, mov], -1), aff)
    _fails([*base, "--moving", str(d / "4d.nii.gz"), "--fixed", str(d / "4d.nii.gz")], capsys, "expected a 3D image")
    _fails(["register", "--out", str(out), "--model", str(models[2]), "--moving", str(d / "m.nii.gz"), "--fixed",
            str(d / "f.nii.gz")], capsys, "model is 2D")
    _write(d / "frac.nii.gz", lab.astype(np.float32) + 0.5, aff)
    _fails([*base, "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--labels",
            str(d / "frac.nii.gz")], capsys, "integer-valued")
    (d / "trunc.nii.gz").write_bytes((d / "m.nii.gz").read_bytes()[:200])
    _fails([*base, "--moving", str(d / "trunc.nii.gz"), "--fixed", str(d / "f.nii.gz")], capsys, "trunc.nii.gz")
    _fails([*base, "--moving", str(d / "m.txt"), "--fixed", str(d / "f.nii.gz")], capsys, "unsupported file type")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Issue 11: all-or-nothing outputs (defects 3, 4), 2D single slices (6), labels (7), constant images (9),
# messages (10, 12)
# ----------------------------------------------------------------------------------------------------------------
def _reg_args(d, models, out, *extra):
    return ["register", "--moving", str(d / "m.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--out", str(out),
            "--model", str(models[3]), "--device", "cpu", *extra]


def _one_line_error(rc, text, match):
    assert rc == 2 and match in text and text.count("\n") == 1 and "Traceback" not in text, text


def test_existing_outputs_refused_and_inputs_never_overwritten(pair3d, models, run_cli):
    d = pair3d[0]
    out = d / "o"
    rc, text = run_cli(*_reg_args(d, models, out))
    assert rc == 0, text
    names = {p.name for p in out.iterdir()}
    assert {"warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "summary.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # the temporary folder is gone
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, text = run_cli(*_reg_args(d, models, out))
    _one_line_error(rc, text, "already exist")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, nothing added
    rc, text = run_cli(*_reg_args(d, models, out, "--overwrite"))
    assert rc == 0, text
    # its own earlier output as the input, written into the same folder: refused even with --overwrite
    warped = out / "warped.nii.gz"
    data = warped.read_bytes()
    rc, text = run_cli("register", "--moving", str(warped), "--fixed", str(d / "f.nii.gz"), "--out", str(out),
                       "--model", str(models[3]), "--device", "cpu", "--overwrite")
    _one_line_error(rc, text, "it is an input")
    assert warped.read_bytes() == data
    # also through another spelling of the same folder, and for the fixed image
    rc, text = run_cli("register", "--moving", str(d / "m.nii.gz"), "--fixed", str(warped), "--out",
                       str(out / ".." / "o"), "--model", str(models[3]), "--device", "cpu", "--overwrite")
    _one_line_error(rc, text, "it is an input")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_write_failures_are_one_line_and_leave_nothing(pair3d, models, run_cli):
    d = pair3d[0]
    (d / "afile").write_text("x")
    rc, text = run_cli(*_reg_args(d, models, d / "afile" / "sub"))
    _one_line_error(rc, text, "afile")
    rc, text = run_cli(*_reg_args(d, models, d / "afile"))
    _one_line_error(rc, text, "is not a folder")
    (d / "o2" / "warped.nii.gz").mkdir(parents=True)  # the IsADirectoryError of the report
    rc, text = run_cli(*_reg_args(d, models, d / "o2", "--overwrite"))
    _one_line_error(rc, text, "is a folder")
    assert [p.name for p in (d / "o2").iterdir()] == ["warped.nii.gz"]
    rc, text = run_cli(*_reg_args(d, models, d / "o3", "--device", "tpu"))
    _one_line_error(rc, text, "'tpu'")
    assert not (d / "o3").exists()


def test_commit_files_all_or_nothing(tmp_path):
    from deepsim_rt.pipeline.outputs import commit_files

    def text(s):
        return lambda p: p.write_text(s)

    def disk_full(p):
        p.write_text("partial")
        raise OSError(28, "No space left on device", str(p))

    out = tmp_path / "new" / "deeper"
    with pytest.raises(ValueError, match=r"^cannot write .*/c\.txt: No space left on device$"):
        commit_files(out, {"a.txt": text("a"), "b.txt": text("b"), "c.txt": disk_full})
    assert not (tmp_path / "new").exists()  # folders it created are gone too
    assert commit_files(out, {"a.txt": text("a"), "b.txt": text("b")}) == [out / "a.txt", out / "b.txt"]
    # a failure while moving into place (b.txt cannot replace a folder... refused up front) or writing: the old
    # files stay as they were, with --overwrite too
    with pytest.raises(ValueError, match="No space left"):
        commit_files(out, {"a.txt": text("A"), "b.txt": disk_full}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]
    assert (out / "a.txt").read_text() == "a" and (out / "b.txt").read_text() == "b"
    commit_files(out, {"a.txt": text("A"), "b.txt": text("B")}, overwrite=True)
    assert (out / "a.txt").read_text() == "A" and (out / "b.txt").read_text() == "B"
    with pytest.raises(ValueError, match="it is an input"):
        commit_files(out, {"a.txt": text("x")}, protected=[out / "a.txt"], overwrite=True)
    if __import__("os").path.isdir("/proc/self"):  # a file system nobody can create folders in, root included
        with pytest.raises(ValueError, match=r"^cannot write /proc/deepsim_rt_h11: [A-Z][a-z ]+$"):
            commit_files("/proc/deepsim_rt_h11/out", {"a.txt": text("a")})


def test_single_slice_nifti_goes_to_the_2d_model(tmp_path, run_cli):
    g = np.random.default_rng(4)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for name in ("m", "f"):
        nib.save(nib.Nifti1Image((g.random((30, 26, 1)) * 100).astype(np.float32), aff), str(tmp_path / f"{name}.nii"))
    rc, text = run_cli("register", "--moving", str(tmp_path / "m.nii"), "--fixed", str(tmp_path / "f.nii"), "--out",
                       str(tmp_path / "o"), "--device", "cpu")
    assert rc == 0, text
    import json

    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["model"].endswith("default-2d/reg.safetensors") and summary["shape"] == [30, 26]
    disp = nib.load(str(tmp_path / "o" / "displacement.nii.gz"))
    assert disp.shape == (30, 26, 1, 2)


def test_api_labels_agree_with_cli(models):
    reg = Registrator.load(models[2], device="cpu")
    g = np.random.default_rng(5)
    mov, fix = g.random((19, 21)).astype(np.float32), g.random((19, 21)).astype(np.float32)
    lab = g.integers(0, 4, (19, 21))
    with pytest.raises(ValueError, match="integer-valued") as exc:
        reg.register(mov, fix, lab + 0.5)
    assert "\n" not in str(exc.value)
    ref = reg.register(mov, fix, lab.astype(np.int64)).warped_labels
    out = reg.register(mov, fix, lab.astype(np.float64)).warped_labels
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, ref.astype(np.float64))


def test_constant_images_warn(pair3d, models, run_cli):
    d, mov, fix, lab, aff = pair3d
    reg = Registrator.load(models[3], device="cpu")
    with pytest.warns(RuntimeWarning, match="moving image is constant"):
        reg.register(np.zeros_like(mov), fix)
    with pytest.warns(RuntimeWarning, match=r"fixed image is constant \(every voxel 7\)"):
        reg.register(mov, np.full_like(fix, 7.0))
    _write(d / "zero.nii.gz", np.zeros_like(mov), aff)
    rc, text = run_cli("register", "--moving", str(d / "zero.nii.gz"), "--fixed", str(d / "f.nii.gz"), "--out",
                       str(d / "oz"), "--model", str(models[3]), "--device", "cpu")
    assert rc == 0 and "warning: moving image is constant" in text, text
    import json

    assert any("constant" in w for w in json.loads((d / "oz" / "summary.json").read_text())["warnings"])


def test_clear_messages(tmp_path, models, run_cli):
    import gzip

    bad = np.random.default_rng(6).random((12, 10)).astype(np.float32)
    bad[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "ok.npy", np.ones((12, 10), np.float32))
    rc, text = run_cli("register", "--moving", str(tmp_path / "nan.npy"), "--fixed", str(tmp_path / "ok.npy"),
                       "--out", str(tmp_path / "o"), "--model", str(models[2]))
    _one_line_error(rc, text, "nan.npy: contains 1 NaN or Inf values")
    # a header claiming 2000^3 int16 voxels over a few bytes of data
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + np.zeros(500, np.int16).tobytes()
    (tmp_path / "huge.nii").write_bytes(raw)
    from deepsim_rt.data.nifti import load_nifti

    with pytest.raises(ValueError, match=r"huge\.nii: .*2000x2000x2000 int16 voxels, which need 44\.7 GiB.*holds "
                                         r"only 1000 bytes"):
        load_nifti(tmp_path / "huge.nii")
    # compressed, the data size is unknown until read: refused when it exceeds the memory available (20000^3 int16:
    # 43.7 TiB, more than any machine this runs on)
    hdr.set_data_shape((20000, 20000, 20000))
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    with pytest.raises(ValueError, match=r"huge\.nii\.gz: the header claims 20000x20000x20000 int16 voxels, which "
                                         r"need 44703\.5 GiB to read .*, more than the [0-9.]+ GiB of memory "
                                         r"available"):
        load_nifti(tmp_path / "huge.nii.gz")
    # NaN weights are named at load, not as a NaN flow later
    from safetensors.torch import load_file, save_file

    from deepsim_rt.nn.checkpoint import load_model, read_metadata

    state = load_file(str(models[2]))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=read_metadata(models[2]))
    with pytest.raises(ValueError, match=rf"weight '{key}' contains NaN or Inf values"):
        load_model(tmp_path / "nan.safetensors")
    rc, text = run_cli("evaluate", "--max-pairs", "-3", "--out", str(tmp_path / "ev"))
    _one_line_error(rc, text, "--max-pairs must be >= 0")
    assert not (tmp_path / "ev").exists()


_OOM_SCRIPT = """
import resource, sys
import numpy as np
from deepsim_rt.cli import main
from deepsim_rt import runtime  # noqa: F401
from deepsim_rt.pipeline import qc, register  # noqa: F401  (imported before the cap)
import torch  # noqa: F401

def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            return int(line.split()[1]) * 1024

# 200 MiB more: reading (2 x 16 MiB) and the model fit; the network or the QC (~10 copies of the field) do not
resource.setrlimit(resource.RLIMIT_AS, (vm() + 200 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a subprocess importing torch: 23 s under load, ~8 s idle
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc for RLIMIT_AS")
def test_out_of_memory_is_one_line_and_writes_nothing(tmp_path, models):
    import subprocess
    import sys

    g = np.random.default_rng(7)
    for name in ("m", "f"):
        np.save(tmp_path / f"{name}.npy", g.random((160, 160, 160), dtype=np.float32))
    (tmp_path / "oom.py").write_text(_OOM_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "oom.py"), "register", "--moving", str(tmp_path / "m.npy"),
                           "--fixed", str(tmp_path / "f.npy"), "--out", str(tmp_path / "o"), "--model", str(models[3]),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "out of memory registering a 160x160x160 image on cpu (16 MiB" in \
        proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
