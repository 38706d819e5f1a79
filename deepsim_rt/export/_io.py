"""Atomic writes for exporters whose tools insist on a file suffix (.pt2, .onnx, .plan) or write a whole folder,
and the torch-free checks that run BEFORE an export or a load: the output path (`check_out_path`, so that a bad
`--out` is refused in milliseconds, not after the 15-99 s export) and the .pt2 package layout (`check_pt2_package`,
so that a zip that is not an AOTInductor package is one line, not torch's 15-line loader error)."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from deepsim_rt._io import atomic_write

__all__ = ["atomic_file", "atomic_dir", "atomic_named_file", "check_out_path", "check_pt2_package"]

# torch's PT2 archive layout (torch/csrc/export/pt2_archive_constants.h): <root>/archive_format holds b"pt2" and the
# AOTInductor model lives under <root>/data/aotinductor/. Literal copies: this module must not import torch.
_PT2_FORMAT_FILE, _PT2_FORMAT_VALUE, _PT2_AOTI_DIR = "archive_format", b"pt2", "data/aotinductor/"


def atomic_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp) on a temporary file beside `path` with the SAME suffix (AOTInductor wants '.pt2'), then rename."""
    return atomic_write(path, write)


def atomic_named_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp) where tmp has the SAME NAME as `path`, inside a temporary folder beside it; then rename.

    For writers that record their file name inside the file: AOTInductor names the archive's inner folder after the
    package file, so a package written as '.reg.pt2.1a2b.tmp.pt2' would carry that temp name forever (issue 11 #14).
    On failure the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(str(tmp_dir / path.name))
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """write(tmp_dir) fills a temporary folder beside `path`, which is then renamed to `path`.

    An existing `path` is refused unless overwrite=True (then replaced only after write succeeded). On failure the
    temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_out_path(out: str | os.PathLike, suffix: str | None, overwrite: bool = False, what: str = "--out") -> Path:
    """Refuse, before any work, an output the export could not write; returns it as a Path.

    suffix: the file suffix it must end in (".onnx", ".pt2", ".plan"), or None for a folder (a Triton repository,
    which may exist: models are added to it). One-line ValueError naming expected vs got for: an empty path, a wrong
    suffix, an existing file without `overwrite` (or an existing folder where a file is due, or a file where a
    folder is due), an ancestor that is a file (`file/a.onnx`: it was FileExistsError from mkdir after the export)
    and a first existing ancestor this process cannot write into.
    """
    if str(out).strip() == "":
        raise ValueError(f"{what} must name a {'file ending in ' + suffix if suffix else 'folder'}, got ''")
    path = Path(out)
    if suffix is not None:
        if path.suffix != suffix:
            raise ValueError(f"{what} must end in {suffix} for this format, got {str(path)!r}")
        if path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a folder; expected a {suffix} file path")
        if path.exists() and not overwrite:
            raise ValueError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
    elif path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; expected a folder (a repository)")
    parent = path.parent if suffix is not None or not path.exists() else path
    while not parent.exists():
        if parent == parent.parent:  # pragma: no cover (the root always exists)
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r}: cannot write into {str(parent)!r} (permission denied)")
    return path


def check_pt2_package(path: str | os.PathLike) -> Path:
    """Refuse what is not an AOTInductor .pt2 package before torch's loader sees it; returns the path.

    A .pt2 is a zip whose single root folder holds `archive_format` = "pt2" and the compiled model under
    `data/aotinductor/`. Any other zip (or non-zip) is one ValueError line naming what was expected and what the
    file holds; torch's own loader answered a plain zip with a 15-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"AOTInductor package not found: {str(path)!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{str(path)!r} is not an AOTInductor .pt2 package: expected a zip archive, got "
                         f"{path.stat().st_size} bytes that are not one (corrupt or truncated?)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            root = names[0].split("/", 1)[0] if names else ""
            fmt_name = f"{root}/{_PT2_FORMAT_FILE}"
            fmt = zf.read(fmt_name).strip() if fmt_name in names else None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} is a damaged .pt2 archive: {exc}") from exc
    has_model = any(n.startswith(f"{root}/{_PT2_AOTI_DIR}") for n in names)
    if fmt != _PT2_FORMAT_VALUE or not has_model:
        shown = ", ".join(names[:3]) + (f" ... ({len(names)} members)" if len(names) > 3 else "")
        raise ValueError(f"{str(path)!r} is a zip but not an AOTInductor .pt2 package: expected "
                         f"<root>/{_PT2_FORMAT_FILE} = 'pt2' and <root>/{_PT2_AOTI_DIR}, got "
                         f"{shown or 'an empty archive'}")
    return path
