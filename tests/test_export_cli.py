"""`deepsim-rt export` refuses every bad argument BEFORE any export (issue 20 item 7): one line naming expected vs
got, exit code 2, nothing written. The exporters are replaced by functions that fail the test if called, so
"refused before the 15-99 s of work" is checked directly (no timing)."""

from __future__ import annotations

import zipfile

import pytest

from deepsim_rt.export._io import check_out_path, check_pt2_package


@pytest.fixture
def no_export(monkeypatch):
    """Record the exporter calls instead of exporting (each returns a stub result with report None)."""
    calls: list[tuple[str, dict]] = []

    class _Res:
        report = None
        opset, seconds, device, precision = 20, 0.0, "cpu", "fp32"

        def __init__(self, path):
            self.path = path

    def fake(name):
        def run(src, out, **kw):
            calls.append((name, kw))
            return _Res(out)
        return run

    import deepsim_rt.export.aoti as aoti
    import deepsim_rt.export.onnx as onnx

    monkeypatch.setattr(onnx, "export_onnx", fake("onnx"))
    monkeypatch.setattr(aoti, "export_aoti", fake("aoti"))
    return calls


def _one_line_refusal(code: int, text: str, expected: str) -> None:
    assert code == 2, text
    assert expected in text, text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text


@pytest.mark.parametrize("argv, expected", [
    (["--format", "onnx", "--tolerance", "-1"], "--tolerance must be a finite number > 0"),
    (["--format", "onnx", "--tolerance", "nan"], "--tolerance must be a finite number > 0"),
    (["--format", "onnx", "--precision", "bf16"], "expected --no-verify with bf16"),
    (["--format", "onnx", "--precision", "bf16", "--opset", "21", "--no-verify"], "from opset 22), got 21"),
    (["--format", "tensorrt", "--precision", "bf16"], "fp32 or fp16 engines, got --precision bf16"),
    (["--format", "triton-repo", "--name", "a b"], "--name must be letters"),
])
def test_bad_arguments_are_refused_before_any_export(argv, expected, run_cli, tmp_path, no_export):
    suffix = {"onnx": ".onnx", "aoti": ".pt2", "tensorrt": ".plan", "triton-repo": ""}[argv[1]]
    code, text = run_cli("export", *argv, "--out", str(tmp_path / f"x{suffix}"))
    _one_line_refusal(code, text, expected)
    assert no_export == [] and list(tmp_path.iterdir()) == []


def test_out_under_a_file_and_existing_outputs(run_cli, tmp_path, no_export):
    (tmp_path / "file").write_text("not a folder")
    # was FileExistsError (a traceback) from mkdir after the 15 s export
    code, text = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "file" / "a.onnx"))
    _one_line_refusal(code, text, "is a file, not a folder")
    code, text = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "a.pt2"))
    _one_line_refusal(code, text, "--out must end in .onnx for this format")
    # an existing .onnx was replaced without --overwrite
    (tmp_path / "old.onnx").write_bytes(b"previous export")
    code, text = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "old.onnx"))
    _one_line_refusal(code, text, "already exists; pass --overwrite")
    assert (tmp_path / "old.onnx").read_bytes() == b"previous export" and no_export == []
    code, _ = run_cli("export", "--format", "onnx", "--out", str(tmp_path / "old.onnx"), "--overwrite")
    assert code == 0 and [c[0] for c in no_export] == ["onnx"]


def test_triton_repo_model_folder_is_refused_before_the_export(run_cli, tmp_path, no_export):
    # was refused by write_triton_repo only after the 15 s ONNX export
    (tmp_path / "repo" / "deepsim_reg_2d").mkdir(parents=True)
    code, text = run_cli("export", "--format", "triton-repo", "--out", str(tmp_path / "repo"))
    _one_line_refusal(code, text, "already holds model folder(s) deepsim_reg_2d")
    assert no_export == []
    (tmp_path / "f").write_text("x")
    code, text = run_cli("export", "--format", "triton-repo", "--out", str(tmp_path / "f"))
    _one_line_refusal(code, text, "is a file; expected a folder")


def test_graph_defaults_follow_the_format(run_cli, tmp_path, no_export):
    """No --graph: the serving graph for every format and dimensionality (3D AOTInductor too, since its packages are
    exact at batch 1: export.aoti, issue 18 #1)."""
    assert run_cli("export", "--format", "aoti", "--model", "default-3d", "--out", str(tmp_path / "a.pt2"))[0] == 0
    assert run_cli("export", "--format", "aoti", "--model", "default-2d", "--out", str(tmp_path / "b.pt2"))[0] == 0
    assert run_cli("export", "--format", "onnx", "--model", "default-3d", "--out", str(tmp_path / "c.onnx"))[0] == 0
    assert [(n, kw["graph"]) for n, kw in no_export] == [("aoti", "serving"), ("aoti", "serving"), ("onnx", "serving")]
    assert run_cli("export", "--format", "onnx", "--artifact", "metric", "--out", str(tmp_path / "m.onnx"))[0] == 0
    assert no_export[-1][1]["graph"] is None  # the graph choice exists for registration artifacts only


def test_unwritable_out_folder(monkeypatch, tmp_path):
    # the suite may run as root, for whom every folder is writable: os.access is what the check asks
    monkeypatch.setattr("os.access", lambda p, mode: str(p) != str(tmp_path))
    with pytest.raises(ValueError, match="cannot write into .* \\(permission denied\\)"):
        check_out_path(tmp_path / "sub" / "a.onnx", ".onnx")
    with pytest.raises(ValueError, match="must name a file ending in .onnx, got ''"):
        check_out_path("", ".onnx")


def test_pt2_package_check(tmp_path):
    """A zip that is not a .pt2 gave torch's 15-line loader message; now one line naming the expected layout."""
    plain = tmp_path / "notes.pt2"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("notes/readme.txt", "hello")
    with pytest.raises(ValueError) as exc:
        check_pt2_package(plain)
    msg = str(exc.value)
    assert "not an AOTInductor .pt2 package" in msg and "archive_format" in msg and "notes/readme.txt" in msg
    assert "\n" not in msg
    (tmp_path / "raw.pt2").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="expected a zip archive, got 100 bytes"):
        check_pt2_package(tmp_path / "raw.pt2")
    with pytest.raises(ValueError, match="not found"):
        check_pt2_package(tmp_path / "missing.pt2")
    # the layout torch writes (torch.export.pt2_archive: <root>/archive_format = "pt2", <root>/data/aotinductor/)
    good = tmp_path / "reg.pt2"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("reg/archive_format", "pt2")
        zf.writestr("reg/data/aotinductor/model/x.cpp", "")
    assert check_pt2_package(good) == good


def test_pt2_layout_constants_match_torch():
    from torch._C._export import pt2_archive_constants as c

    from deepsim_rt.export import _io

    assert (c.ARCHIVE_FORMAT_PATH, c.ARCHIVE_FORMAT_VALUE.encode(), c.AOTINDUCTOR_DIR) == (
        _io._PT2_FORMAT_FILE, _io._PT2_FORMAT_VALUE, _io._PT2_AOTI_DIR)

