"""AOTInductor packages: outputs match PyTorch at sizes never compiled for, metadata round-trips, bad files fail.

A CPU compile costs ~40-50 s on 2 cores, so each tiny model is compiled once per module; the extra packages that
only exercise metadata error paths are marked slow.
"""

from __future__ import annotations

import zipfile

import pytest
import torch

from deepsim_rt.export.aoti import AotiRunner, export_aoti
from deepsim_rt.export.metadata import FORMAT_MAJOR, build_metadata
from deepsim_rt.export.verify import FP32_TOL, random_regnet
from deepsim_rt.nn import NetConfig, save_model
from deepsim_rt.runtime import Registrator


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    d = tmp_path_factory.mktemp("aoti")
    models = {2: random_regnet(2, seed=31), 3: random_regnet(3, seed=32)}
    ckpt = save_model(d / "reg2.safetensors", models[2])
    out = {2: export_aoti(ckpt, d / "reg2.pt2"), 3: export_aoti(models[3], d / "reg3.pt2")}
    return models, out


def test_export_verifies_on_random_and_real_inputs(packages):
    _, out = packages
    for nd in (2, 3):
        rep = out[nd].report
        assert rep is not None and rep.max_abs <= FP32_TOL
        assert {r.case.split()[0] for r in rep.rows} == {"random", "atlas"}
        assert {r.output for r in rep.rows} == {"warped", "displacement"}


@pytest.mark.parametrize("nd,sizes", [(2, [(21, 13), (40, 8)]), (3, [(9, 11, 6), (17, 8, 5)])])
def test_registrator_aoti_matches_pytorch_at_odd_sizes(packages, nd, sizes, rng):
    models, out = packages
    aoti = Registrator.load(out[nd].path, device="cpu")
    eager = Registrator.from_model(models[nd], device="cpu")
    assert aoti.backend_name == "aoti"
    for size in sizes:
        for batch in (1, 3):
            m = torch.rand(batch, 1, *size, generator=rng)
            f = torch.rand(batch, 1, *size, generator=rng)
            a, b = aoti.register(m, f), eager.register(m, f)
            assert float(b.displacement.abs().max()) > 0.5
            for name in ("warped", "displacement"):
                err = float((getattr(a, name) - getattr(b, name)).abs().max())
                assert err <= FP32_TOL, f"{nd}D {size} b={batch} {name}: max abs error {err:.3g}"


def test_metadata_round_trips(packages):
    models, out = packages
    info = AotiRunner(out[2].path).info
    assert info == out[2].info and info.cfg == models[2].cfg and len(info.source_sha256) == 64
    assert info.extra["device"] == "cpu" and info.extra["batchnorm"] == "folded"
    info3 = AotiRunner(out[3].path, expect="registration").info
    assert info3.cfg.ndim == 3 and info3.source_sha256 == ""


def test_contract_and_device_errors(packages):
    _, out = packages
    runner = AotiRunner(out[3].path)
    with pytest.raises(ValueError, match="rank 5"):
        runner(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expects 1 channel"):
        runner(torch.rand(1, 2, 8, 8, 8), torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="'registration' artifact, expected a 'metric'"):
        AotiRunner(out[3].path, expect="metric")
    with pytest.raises(ValueError, match="runs with backend 'aoti'"):
        Registrator.load(out[3].path, backend="onnxruntime")


def test_bad_files(packages, tmp_path):
    _, out = packages
    data = out[2].path.read_bytes()
    (tmp_path / "trunc.pt2").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.pt2").write_bytes(b"definitely not a package" * 100)
    for name in ("trunc.pt2", "junk.pt2"):
        with pytest.raises(ValueError, match="not an AOTInductor .pt2 package"):
            Registrator.load(tmp_path / name)
    # flip bytes inside a member: the zip is intact but a CRC fails
    bad = bytearray(data)
    with zipfile.ZipFile(out[2].path) as zf:
        member = next(i for i in zf.infolist() if i.filename.endswith(".so"))
        offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + 4096
    bad[offset: offset + 64] = bytes(64)
    (tmp_path / "crc.pt2").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="damaged .pt2 archive"):
        AotiRunner(tmp_path / "crc.pt2")


class _Double(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


def _tiny_package(path, meta):
    ep = torch.export.export(_Double(), (torch.rand(2, 2),))
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                             inductor_configs={"aot_inductor.metadata": meta})


@pytest.mark.slow
def test_missing_and_foreign_metadata(tmp_path):
    _tiny_package(tmp_path / "plain.pt2", {})
    with pytest.raises(ValueError, match="no deepsim_rt metadata"):
        AotiRunner(tmp_path / "plain.pt2")
    meta = build_metadata("registration", NetConfig.make("reg", 2, "tiny"), extra={"device": "cpu"})
    meta["format_version"] = f"{FORMAT_MAJOR + 1}.0"
    _tiny_package(tmp_path / "future.pt2", meta)
    with pytest.raises(ValueError, match=f"reads major {FORMAT_MAJOR} only"):
        Registrator.load(tmp_path / "future.pt2")


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="must end in .pt2"):
        export_aoti(random_regnet(2), tmp_path / "reg.onnx")
    with pytest.raises(ValueError, match="kind"):
        export_aoti(random_regnet(2), tmp_path / "reg.pt2", artifact="metric")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            export_aoti(random_regnet(2), tmp_path / "reg.pt2", device="cuda")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_verification_failure_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="disagrees with PyTorch"):
        export_aoti(random_regnet(2), tmp_path / "reg.pt2", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []
