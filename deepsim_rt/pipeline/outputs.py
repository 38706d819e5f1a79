"""The all-or-nothing output set of a registration: write every file into a temporary folder, then move them into
place together (the last, summary.json for a pair, marks it finished).

    result = PairResult(files={"warped.nii.gz": writer, ...}, summary={...})
    commit_outputs(out_dir, result, inputs=[moving, fixed], overwrite=False)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsim_rt.pipeline.write import save_json

__all__ = ["PairResult", "SUMMARY_NAME", "commit_outputs", "commit_files", "check_out_dir"]


@dataclass
class PairResult:
    """What one registration produced, still in memory.

    files:   output file name (inside the pair's folder) -> writer(path) that writes that file at `path`; the
             commit step calls every writer inside a temporary folder and moves the files into place together
             (summary.json last: its presence marks a finished pair).
    summary: JSON-able facts for summary.json (inputs, model, backend, timings_s, qc, warnings); steps may add
             keys. Its writer is added by the commit step and serializes the dict as it is then.
    """

    files: dict[str, Callable[[Path], Any]]
    summary: dict[str, Any]
    # names a previous run may have left in the folder that this result does not write (e.g. warped_labels.*
    # of a run with --labels): removed when the set is committed with overwrite, so the folder never holds a
    # stale file beside a summary that does not mention it
    stale: tuple[str, ...] = ()


SUMMARY_NAME = "summary.json"


def commit_outputs(out: str | os.PathLike, result: PairResult, inputs: list[Path],
                   overwrite: bool = False) -> list[Path]:
    """Write every file of `result` (plus summary.json) into `out`, all or nothing.

    The files are written into a temporary folder inside `out`, then moved into place together (summary.json
    last). Refuses (ValueError, nothing written) when a target exists and not `overwrite`, and ALWAYS when a target
    is one of `inputs`. On any failure nothing new is left behind: the temporary folder and any folder created
    here are removed, and files replaced with `overwrite` are restored. OSErrors become one-line ValueErrors
    naming the path. Returns the written paths.
    """
    files = dict(result.files)
    files[SUMMARY_NAME] = lambda p: save_json(p, result.summary)
    return commit_files(out, files, protected=inputs, overwrite=overwrite, stale=result.stale)


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _os_error_line(exc: OSError, fallback: Path) -> str:
    where = exc.filename or fallback
    return f"cannot write {where}: {exc.strerror or type(exc).__name__}"


def check_out_dir(out: str | os.PathLike | None) -> Path:
    """--out as a Path, refused (ValueError) before any work when empty or when it exists and is not a folder."""
    if out is None or str(out).strip() == "":
        raise ValueError("--out must name a folder, got an empty string (use --out . for the current folder)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a folder")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot write in {parent} (permission denied)")
    return path


def check_targets(out: Path, names: list[str], protected: list[Path] = (), overwrite: bool = False) -> None:
    """Refuse (ValueError) before any work what `commit_files` would refuse after it: a target that is an input,
    a folder, or exists without `overwrite`."""
    existing = []
    for name in names:
        target = out / name
        for src in protected:
            if _same_file(target, Path(src)):
                raise ValueError(f"refusing to write {target}: it is an input ({src}); choose another --out")
        if target.is_dir():
            raise ValueError(f"output {target} exists and is a folder")
        if target.exists() or target.is_symlink():
            existing.append(name)
    if existing and not overwrite:
        raise ValueError(f"outputs already exist in {out} ({', '.join(existing)}); pass --overwrite to replace them")


def commit_files(out: str | os.PathLike, files: dict[str, Callable[[Path], Any]], protected: list[Path] = (),
                 overwrite: bool = False, stale: tuple[str, ...] = ()) -> list[Path]:
    """Write `files` (name -> writer(path)) into folder `out`, all or nothing; the last name is moved last.

    Every writer runs inside a fresh temporary folder in `out` (same file system: the moves are renames); only
    when all have succeeded are the files moved into place, in order. Refuses with ValueError, before writing,
    when a target is one of `protected` (inputs; even with `overwrite`), when a target exists and not
    `overwrite`, or when a target is a folder. On any failure the temporary folder, folders created here and
    files already moved are removed, and files replaced with `overwrite` are restored. An OSError becomes a
    one-line ValueError naming the path. `stale`: names outside `files` removed (with overwrite, after the new
    set is in place; restored with the rest on failure). Returns the target paths in order.
    """
    out = check_out_dir(out)
    targets = {name: out / name for name in files}
    for name, target in targets.items():
        if Path(name).name != name:
            raise ValueError(f"output names must be plain file names, got {name!r}")  # pragma: no cover
        for src in protected:
            if _same_file(target, Path(src)):
                raise ValueError(f"refusing to write {target}: it is an input ({src}); choose another --out")
    existing = [t for t in targets.values() if t.exists() or t.is_symlink()]
    for t in existing:
        if t.is_dir():
            raise ValueError(f"output {t} exists and is a folder")
    if existing and not overwrite:
        names = ", ".join(t.name for t in existing)
        raise ValueError(f"outputs already exist in {out} ({names}); pass --overwrite to replace them")
    created: list[Path] = []
    tmp: Path | None = None
    done = False
    try:
        for parent in reversed([out, *out.parents]):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        tmp = Path(tempfile.mkdtemp(prefix=".deepsim_rt-partial-", dir=out))
        for name, write in files.items():
            write(tmp / name)
            if not (tmp / name).is_file():
                raise ValueError(f"internal error: the writer of {name} wrote no file")  # pragma: no cover
        backup = tmp / ".replaced"
        backup.mkdir()
        placed: list[str] = []
        replaced: list[str] = []
        gone = {name: out / name for name in stale if overwrite and name not in targets
                and ((out / name).is_file() or (out / name).is_symlink())}
        try:
            for name, old in gone.items():  # before the new set: the last file placed still marks a finished set
                os.replace(old, backup / name)
                replaced.append(name)
            for name, target in targets.items():
                if target.exists() or target.is_symlink():
                    os.replace(target, backup / name)
                    replaced.append(name)
                os.replace(tmp / name, target)
                placed.append(name)
        except BaseException:
            for name in placed:
                targets[name].unlink(missing_ok=True)
            for name in replaced:
                os.replace(backup / name, {**targets, **gone}[name])
            raise
        done = True
    except OSError as exc:
        raise ValueError(_os_error_line(exc, out)) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return list(targets.values())
