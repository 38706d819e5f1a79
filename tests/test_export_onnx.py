"""ONNX export + ONNX Runtime: serving graphs (raw images of any size) match Registrator.register, network-only
("minmax") graphs still run through the runtime, metadata states the contract in words and round-trips, bad files,
bad inputs and a bad opset fail clearly.

Exports are slow on 2 cores (~10-20 s each: torch.export + decompositions), so each model is exported once per
module and every test reads the same files.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from deepsim_rt.export.metadata import FORMAT_MAJOR
from deepsim_rt.export.onnx import ExportError, check_opset, export_onnx, read_onnx_info
from deepsim_rt.export.ort import OrtRunner
from deepsim_rt.export.verify import FP32_TOL, random_extractor, random_regnet
from deepsim_rt.kernels import multilayer_cosine
from deepsim_rt.losses.deepsim import DeepSimLoss
from deepsim_rt.nn import save_model
from deepsim_rt.nn.checkpoint import scale_metadata
from deepsim_rt.runtime import Registrator

warnings.filterwarnings("ignore", module=r"torch\.onnx.*")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    models = {"reg2": random_regnet(2, seed=11), "reg3": random_regnet(3, seed=12, integrate_steps=2),
              "seg2": random_extractor("seg", 2, seed=13)}
    # a checkpoint that records its training scale (nn.checkpoint): it must travel into the artifact's metadata
    ckpt = save_model(d / "reg2.safetensors", models["reg2"], extra=scale_metadata([2.0, 1.5], [96, 80]))
    out = {
        "reg2": export_onnx(ckpt, d / "reg2.onnx"),  # registration default: the serving graph
        "reg3": export_onnx(models["reg3"], d / "reg3.onnx"),
        "reg2_full": export_onnx(models["reg2"], d / "reg2_full.onnx", graph="full"),  # the pre-serving contract
        "metric2": export_onnx(models["seg2"], d / "metric2.onnx", artifact="metric"),
    }
    return models, out, d


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_export_reports_small_error_on_random_and_real_inputs(exported):
    _, out, _ = exported
    for key in ("reg2", "reg3", "reg2_full", "metric2"):
        rep = out[key].report
        assert rep is not None and rep.max_abs <= FP32_TOL
        cases = {r.case.split()[0] for r in rep.rows}
        assert cases == {"random", "atlas"}, f"{key}: verification must use random AND real inputs, got {cases}"
        outputs = {r.output for r in rep.rows}
        assert outputs == set(out[key].info.outputs)


def test_graph_is_clean_and_opset_as_documented(exported):
    _, out, _ = exported
    for key, opset, steps in (("reg2", 19, 0), ("reg3", 20, 2)):
        path = out[key].path
        ops = _ops(path)
        # one GridSample for the warp plus one per scaling-and-squaring step (reg3 integrates a velocity field)
        assert out[key].info.extra["integrate_steps"] == steps
        assert ops["GridSample"] == 1 + steps and ops["BatchNormalization"] == 0 and ops["Dropout"] == 0
        proto = onnx.load(str(path))
        assert {o.domain: o.version for o in proto.opset_import}[""] == opset
        dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and dims[1] == 1 and all(isinstance(d, str) for d in dims[2:])


@pytest.mark.parametrize("key,sizes", [("reg2", [(21, 13), (37, 41), (9, 17)]), ("reg3", [(9, 11, 10), (13, 15, 10)]),
                                       ("reg2_full", [(21, 13), (8, 8)])])
def test_registrator_onnx_matches_pytorch_at_odd_sizes(exported, key, sizes, rng):
    """Both artifact kinds through Registrator: serving graphs (given normalized padded inputs they return the
    network's output) and network-only "minmax" graphs exported before serving graphs existed."""
    models, out, _ = exported
    onnx_reg = Registrator.load(out[key].path, device="cpu")
    eager = Registrator.from_model(models[key.removesuffix("_full")], device="cpu")
    assert onnx_reg.backend_name == "onnxruntime"
    for size in sizes:
        m = torch.rand(2, 1, *size, generator=rng)
        f = torch.rand(2, 1, *size, generator=rng)
        a, b = onnx_reg.register(m, f), eager.register(m, f)
        assert float(b.displacement.abs().max()) > 0.5  # the model moves pixels: the comparison means something
        for name in ("warped", "displacement"):
            err = float((getattr(a, name) - getattr(b, name)).abs().max())
            assert err <= FP32_TOL, f"{key} {size} {name}: max abs error {err:.3g}"


def test_plain_onnxruntime_registers_raw_intensities_at_any_size(exported):
    """Issue 14 done-when: a bare onnxruntime.InferenceSession on the serving graph registers a raw-intensity
    45x53x47 pair (no normalization, no padding, no Python around it) exactly as Registrator.register does.
    Before serving graphs this gave |u| = 155 voxels on 0-100 intensities and failed with an opaque Concat error."""
    import onnxruntime as ort

    models, out, _ = exported
    g = torch.Generator().manual_seed(5)
    moving = torch.rand(1, 1, 45, 53, 47, generator=g) * 100.0
    fixed = torch.rand(1, 1, 45, 53, 47, generator=g) * 100.0 + 20.0
    sess = ort.InferenceSession(str(out["reg3"].path), providers=["CPUExecutionProvider"])
    warped, disp = sess.run(None, {"moving": moving.numpy(), "fixed": fixed.numpy()})
    ref = Registrator.from_model(models["reg3"], device="cpu").register(moving, fixed)
    assert warped.shape == (1, 1, 45, 53, 47) and disp.shape == (1, 3, 45, 53, 47)
    assert float(ref.displacement.abs().max()) > 0.5
    # warped is in the moving image's units (0-100): compare relative to that range
    assert float(np.abs(warped - ref.warped.numpy()).max()) / 100.0 <= FP32_TOL
    assert float(np.abs(disp - ref.displacement.numpy()).max()) <= FP32_TOL
    assert warped.min() >= float(moving.min()) - 1e-3 and warped.max() <= float(moving.max()) + 1e-3


def test_metric_reproduces_reference_deepsim(exported, rng):
    models, out, _ = exported
    runner = OrtRunner(out["metric2"].path, expect="metric")
    loss = DeepSimLoss(models["seg2"])
    a = torch.rand(1, 1, 40, 24, generator=rng)
    b = (a + 0.2 * torch.rand(1, 1, 40, 24, generator=rng)).clamp(0, 1)
    sim, *maps = runner(a, b)
    ref = loss.similarity(a, b)
    assert sim.shape == (1,) and abs(float(sim[0]) - float(ref)) <= 1e-5
    ref_maps = multilayer_cosine(models["seg2"].extract_features(a), models["seg2"].extract_features(b),
                                 reduction="none")
    for got, want in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)
    # per-sample similarity over a batch: sample i equals DeepSim of pair i alone
    a2 = torch.cat([a, b]), torch.cat([b, b])
    sim2 = runner(*a2)[0]
    assert abs(float(sim2[0]) - float(ref)) <= 1e-5 and abs(float(sim2[1]) - 1.0) <= 1e-5  # DeepSim(x, x) = 1


def test_metadata_round_trips(exported):
    models, out, d = exported
    info = read_onnx_info(out["reg2"].path, expect="registration")
    assert info == out["reg2"].info
    assert info.cfg == models["reg2"].cfg and info.spatial_multiple == 8
    assert info.intensity == "raw" and info.serving and info.extra["graph"] == "serving"
    full = read_onnx_info(out["reg2_full"].path)
    assert full.intensity == "minmax" and not full.serving and full.extra["graph"] == "full"
    assert len(info.source_sha256) == 64  # exported from a checkpoint
    assert out["reg3"].info.source_sha256 == ""  # exported from an in-memory model
    assert info.extra["opset"] == 19 and info.extra["batchnorm"] == "folded"
    # the checkpoint's training scale travels into the artifact (and only from a checkpoint that has it)
    assert info.extra["spacing_mm"] == [2.0, 1.5] and info.extra["train_grid"] == [96, 80]
    assert "spacing_mm" not in out["reg3"].info.extra
    assert info.inputs == ("moving", "fixed") and info.outputs == ("warped", "displacement")
    assert read_onnx_info(out["metric2"].path).outputs == ("similarity", "map0", "map1", "map2")


def test_metadata_states_the_contract_in_words(exported):
    """Issue 11 #13: a reader without deepsim_rt (Netron, onnx.load) learns the displacement convention, units,
    channel order, intensity and size contracts from metadata_props alone."""
    _, out, _ = exported
    for key, intensity in (("reg2", "raw float32 intensities"), ("reg2_full", "already min-max normalized")):
        meta = {p.key: p.value for p in onnx.load(str(out[key].path)).metadata_props}
        assert "warped(p) = moving(p + displacement(p))" in meta["displacement_convention"]
        assert meta["displacement_units"].startswith("voxels")
        assert "NC(D)HW" in meta["channel_order"]
        assert intensity in meta["intensity_contract"]
    size_words = {p.key: p.value for p in onnx.load(str(out["reg2"].path)).metadata_props}["size_contract"]
    assert size_words.startswith("any spatial size from 9")


def test_io_binding_path_agrees(exported, rng):
    _, out, _ = exported
    plain = OrtRunner(out["reg3"].path)
    bound = OrtRunner(out["reg3"].path, io_binding=True, threads=1, graph_optimization="basic")
    m, f = torch.rand(2, 1, 16, 9, 24, generator=rng), torch.rand(2, 1, 16, 9, 24, generator=rng)
    for x, y in zip(plain(m, f), bound(m, f), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_contract_violations_are_clear(exported):
    _, out, _ = exported
    r2 = OrtRunner(out["reg2"].path)
    with pytest.raises(ValueError, match="rank 4"):
        r2(torch.rand(1, 1, 9, 9, 9), torch.rand(1, 1, 9, 9, 9))
    with pytest.raises(ValueError, match="expects 1 channel"):
        r2(torch.rand(1, 3, 9, 9), torch.rand(1, 3, 9, 9))
    with pytest.raises(ValueError, match="takes float32, got torch.float64"):
        r2(torch.rand(1, 1, 9, 9, dtype=torch.float64), torch.rand(1, 1, 9, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"serving graph takes spatial sizes 9\.\.8192"):
        r2(torch.rand(1, 1, 12, 8), torch.rand(1, 1, 12, 8))
    with pytest.raises(ValueError, match="multiple of 8"):  # network-only graphs keep their contract
        OrtRunner(out["reg2_full"].path)(torch.rand(1, 1, 12, 8), torch.rand(1, 1, 12, 8))
    with pytest.raises(ValueError, match="same shape"):
        r2(torch.rand(1, 1, 9, 9), torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match="takes 2 input"):
        r2(torch.rand(1, 1, 9, 9))
    with pytest.raises(ValueError, match="'metric' artifact, expected a 'registration'"):
        Registrator.load(out["metric2"].path)
    with pytest.raises(ValueError, match="3D model"):
        Registrator.load(out["reg3"].path).register(torch.rand(9, 9), torch.rand(9, 9))


def _rewrite_metadata(src, dst, edit):
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    edit(meta)
    del proto.metadata_props[:]
    for k, v in meta.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(proto, str(dst))


def test_bad_files(exported, tmp_path):
    _, out, _ = exported
    src = out["reg2"].path
    data = src.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x00not an onnx model at all" * 10)
    for name in ("trunc.onnx", "junk.onnx"):
        with pytest.raises(ValueError, match="not a loadable ONNX model"):
            Registrator.load(tmp_path / name)
        with pytest.raises(ValueError, match="not a readable ONNX model"):
            read_onnx_info(tmp_path / name)
    _rewrite_metadata(src, tmp_path / "nometa.onnx", lambda m: m.clear())
    with pytest.raises(ValueError, match="no deepsim_rt metadata"):
        Registrator.load(tmp_path / "nometa.onnx")
    _rewrite_metadata(src, tmp_path / "future.onnx", lambda m: m.update(format_version=f"{FORMAT_MAJOR + 1}.0"))
    with pytest.raises(ValueError, match=f"reads major {FORMAT_MAJOR} only"):
        Registrator.load(tmp_path / "future.onnx")
    _rewrite_metadata(src, tmp_path / "minor.onnx", lambda m: m.update(format_version=f"{FORMAT_MAJOR}.7"))
    assert OrtRunner(tmp_path / "minor.onnx").info.format_version == f"{FORMAT_MAJOR}.7"  # minor bumps are fine
    _rewrite_metadata(src, tmp_path / "liar.onnx", lambda m: m.update(ndim="3"))
    with pytest.raises(ValueError, match="disagrees with its config"):
        OrtRunner(tmp_path / "liar.onnx")
    _rewrite_metadata(src, tmp_path / "rawfull.onnx", lambda m: m.update(intensity="minmax"))
    with pytest.raises(ValueError, match="only a serving graph takes raw intensities"):
        OrtRunner(tmp_path / "rawfull.onnx")


def test_failed_export_leaves_nothing(tmp_path):
    model = random_regnet(2, seed=5)
    with pytest.raises(ExportError, match="disagrees with PyTorch.*tolerance 1e-12"):
        export_onnx(model, tmp_path / "reg.onnx", tolerance=1e-12)  # ORT's ~1e-6 is "too much" here
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="opset <= 19"):
        export_onnx(model, tmp_path / "reg.onnx", target="tensorrt", opset=20)
    with pytest.raises(ValueError, match="kind"):
        export_onnx(model, tmp_path / "f.onnx", artifact="features")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset", [99, 17, 0])
def test_unsupported_opset_is_refused_before_exporting(opset, tmp_path, run_cli):
    """Issue 11 #2: `export --opset 99` exited 0, printed "opset 99" and stored it, while the file was opset 18.
    Now the range is checked first (nothing exported, nothing written) and the written file's own opset is read
    back against the request (export_onnx)."""
    with pytest.raises(ValueError, match=f"opset must be between 18 .* got {opset}"):
        check_opset(opset)
    with pytest.raises(ValueError, match="opset must be between"):
        export_onnx(random_regnet(2, seed=5), tmp_path / "reg.onnx", opset=opset)
    code, text = run_cli("export", "--format", "onnx", "--opset", str(opset), "--out", str(tmp_path / "x.onnx"))
    assert code == 2 and f"got {opset}" in text and "Traceback" not in text
    assert list(tmp_path.iterdir()) == []
