"""Triton Inference Server repo (parsed against the server's ModelConfig schema) serving the raw-image graph, the
flow-only graph older 3D TensorRT engines used (checked on CPU through ONNX Runtime), the export CLI, and TensorRT
engines (skips here: see reason; builder logic and the plugin are tested in tests/test_export_tensorrt.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from deepsim_rt.cli import main
from deepsim_rt.export.onnx import export_onnx
from deepsim_rt.export.tensorrt import Profile, build_registration_engine, read_engine_info, tensorrt_unavailable_reason
from deepsim_rt.export.triton_repo import parse_model_config, write_triton_repo
from deepsim_rt.export.verify import FP32_TOL, random_regnet
from deepsim_rt.nn import save_model
from deepsim_rt.runtime import Registrator

TRT_REASON = tensorrt_unavailable_reason()


@pytest.fixture(scope="module")
def reg3(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    model = random_regnet(3, seed=41, integrate_steps=2)
    ckpt = save_model(d / "reg3.safetensors", model)
    return model, ckpt, d


@pytest.fixture(scope="module")
def cli_repo(reg3):
    """`deepsim-rt export --format triton-repo` once (an ONNX export + verification + the repo)."""
    model, ckpt, d = reg3
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--format", "triton-repo", "--model", str(ckpt), "--out", str(d / "r"), "--name", "m"])
    return rc, buf.getvalue(), d / "r"


def test_triton_repo_parses_and_is_complete(cli_repo, tmp_path):
    onnx_path = cli_repo[2] / "m" / "1" / "model.onnx"
    repo = write_triton_repo(onnx_path, tmp_path / "repo", name="reg3")
    # Issue 11 #5: no `_trt` model folder (with an empty 1/) without an engine: Triton fails on such a folder
    assert repo.models == ("reg3",) and not (tmp_path / "repo" / "reg3_trt").exists()
    cfg = parse_model_config((tmp_path / "repo" / "reg3" / "config.pbtxt").read_text())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    assert [i.name for i in cfg.input] == ["moving", "fixed"] and list(cfg.input[0].dims) == [1, -1, -1, -1]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("warped", [1, -1, -1, -1]),
                                                           ("displacement", [3, -1, -1, -1])]
    # the server runs the serving graph: raw images in, nothing to do before or after
    assert cfg.parameters["deepsim_rt_intensity"].string_value == "raw"
    assert cfg.parameters["deepsim_rt_graph"].string_value == "serving"
    assert (tmp_path / "repo" / "reg3" / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    meta = json.loads((tmp_path / "repo" / "reg3" / "deepsim_rt.json").read_text())
    assert meta["spatial_multiple"] == "8" and len(meta["source_sha256"]) == 64 and meta["intensity"] == "raw"
    # Issue 11 #5: the instructions name the repository as served, never the temporary staging folder
    howto = (tmp_path / "repo" / "reg3" / "TENSORRT.txt").read_text()
    assert str((tmp_path / "repo").resolve() / "reg3_trt") in howto and "staging" not in howto
    assert "--engine" in howto and "Warp3D plugin" in howto
    with pytest.raises(ValueError, match="already exists"):
        write_triton_repo(onnx_path, tmp_path / "repo", name="reg3")
    assert not list((tmp_path / "repo").glob(".*"))  # no staging leftovers
    with pytest.raises(ValueError, match="does not parse"):
        parse_model_config('name: "x" max_batch_size: "eight"')


def test_flow_only_graph_matches_pytorch_through_ort(reg3, rng):
    """The graph a 3D TensorRT engine is built from, completed by the runtime (integrate + warp), on CPU."""
    model, ckpt, d = reg3
    res = export_onnx(ckpt, d / "flow.onnx", graph="flow", target="tensorrt")
    assert res.info.outputs == ("flow",) and res.report.max_abs <= FP32_TOL
    flow_reg = Registrator.load(d / "flow.onnx", device="cpu")
    eager = Registrator.from_model(model, device="cpu")
    m, f = torch.rand(2, 1, 11, 9, 14, generator=rng), torch.rand(2, 1, 11, 9, 14, generator=rng)
    a, b = flow_reg.register(m, f), eager.register(m, f)
    assert float(b.displacement.abs().max()) > 0.5
    for name in ("warped", "displacement"):
        assert float((getattr(a, name) - getattr(b, name)).abs().max()) <= FP32_TOL


def test_export_cli_triton_repo_and_errors(cli_repo, tmp_path, capsys):
    rc, out, root = cli_repo
    assert rc == 0
    assert "worst max abs error" in out and "within the stated tolerance 0.0001" in out
    assert "atlas" in out  # verified on real anatomy too
    assert parse_model_config((root / "m" / "config.pbtxt").read_text()).name == "m"
    assert main(["export", "--format", "onnx", "--model", str(tmp_path / "nope.safetensors"), "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "existing .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli_bad_max_batch_size_fails_at_once(run_cli, tmp_path):
    """Issue 11 #12: `--max-batch-size -5` failed after an 18 s export and left an empty folder."""
    code, text = run_cli("export", "--format", "triton-repo", "--max-batch-size", "-5", "--out", str(tmp_path / "r"))
    assert code == 2 and "--max-batch-size must be >= 1, got -5" in text
    assert len(text.strip().splitlines()) == 1 and "verification" not in text  # refused before exporting
    assert list(tmp_path.iterdir()) == []


def test_engine_metadata_sidecar_errors(tmp_path):
    (tmp_path / "e.plan").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="sidecar 'e.plan.json' is missing"):
        read_engine_info(tmp_path / "e.plan")
    (tmp_path / "e.plan.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_engine_info(tmp_path / "e.plan")
    (tmp_path / "e.plan.json").write_text(json.dumps({"format": "deepsim_rt.artifact", "format_version": "9.0"}))
    with pytest.raises(ValueError, match="reads major 1 only"):
        Registrator.load(tmp_path / "e.plan", device="cpu") if TRT_REASON is None else read_engine_info(
            tmp_path / "e.plan")


def test_profile_checks():
    p = Profile.around((96, 80), 8)
    assert p.min_spatial == (48, 40) and p.opt_spatial == (96, 80) and p.max_spatial == (192, 160)
    with pytest.raises(ValueError, match="multiples of 8"):
        Profile((12, 8), (16, 16), (32, 32)).check(2, 8)
    Profile((12, 9), (21, 37), (45, 53)).check(2, 8, serving=True)  # serving graphs: any size > the multiple
    with pytest.raises(ValueError, match="sizes > 8"):
        Profile((8, 9), (21, 37), (45, 53)).check(2, 8, serving=True)


@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT path not testable here: {TRT_REASON}")
@pytest.mark.parametrize("nd", [2, 3])
def test_tensorrt_engine_matches_pytorch(nd, tmp_path, rng):
    """One strongly typed engine per model, serving graph (3D: with the Warp3D plugin inside), verified at odd
    sizes against PyTorch, then through Registrator; a truncated engine is a clear error."""
    model = random_regnet(nd, seed=50 + nd, integrate_steps=2 if nd == 3 else 0)
    size = (45, 37) if nd == 2 else (21, 29, 19)
    build = build_registration_engine(model, tmp_path / "reg.plan", profiles=(Profile.around(size, 1),),
                                      timing_cache=tmp_path / "timing.cache")
    assert build.report.max_abs <= FP32_TOL and (tmp_path / "timing.cache").is_file()
    assert build.info.serving and build.extra["strongly_typed"]
    reg = Registrator.load(tmp_path / "reg.plan", device="cuda")
    eager = Registrator.from_model(model, device="cuda")
    odd = tuple(s - 3 for s in size)
    m, f = torch.rand(1, 1, *odd, generator=rng), torch.rand(1, 1, *odd, generator=rng)
    a, b = reg.register(m, f), eager.register(m, f)
    for name in ("warped", "displacement"):
        assert float((getattr(a, name) - getattr(b, name)).abs().max()) <= FP32_TOL
    data = (tmp_path / "reg.plan").read_bytes()
    (tmp_path / "bad.plan").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.plan.json").write_text((tmp_path / "reg.plan.json").read_text())
    with pytest.raises(ValueError, match="not a loadable TensorRT engine"):
        Registrator.load(tmp_path / "bad.plan", device="cuda")
