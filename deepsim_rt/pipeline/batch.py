"""Batch registration: `deepsim-rt register --pairs pairs.csv --out DIR`, resumable and shardable with torchrun.

pairs.csv: a header row naming the columns
    moving, fixed      image paths (required)
    labels             label map of the moving image (optional column; an empty cell: none)
    name               output folder name inside DIR (optional; default "<moving stem>_to_<fixed stem>")
Relative paths are relative to the CSV file's folder. Every row is checked before anything runs (files exist,
names unique and plain); one bad row is a one-line ValueError naming its line.

Each pair is registered exactly as `deepsim-rt register` does (deepsim_rt.pipeline: read_pair ->
register_pair -> commit_outputs), into DIR/<name>/, all or nothing; summary.json is moved into place last, so its
presence marks a finished pair.
Resumable: a pair whose DIR/<name>/summary.json exists is skipped (its figures still go into the table); a pair
folder without it holds at most part of an interrupted commit and is redone, replacing those files. --overwrite
redoes every pair.
Shardable: under `torchrun --nproc-per-node N -m deepsim_rt.cli register --pairs ...` rank r takes rows
r, r + N, r + 2N, ... (RANK / WORLD_SIZE from the environment, process group via deepsim_rt.train.distributed:
gloo on CPU, nccl on CUDA with one GPU per LOCAL_RANK; --device cpu: gloo on any machine); rank 0 gathers every
rank's rows (torch.distributed.all_gather_object) and writes the table. One model load per rank and model.
Outputs of the batch itself: DIR/qc.html (every pair's qc.png, outliers first: pipeline.qc_page), DIR/summary.csv
and DIR/summary.json, one row per CSV row in CSV order: name, moving,
fixed, labels, status ("done" | "skipped" | "failed"), error, model, backend, device, shape, register_s,
folding_percent, sd_log_jacobian, max_displacement_voxels, warnings (count). A failed pair (bad input, one-line
reason) does not stop the others; the command then exits 1.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsim_rt._io import atomic_write
from deepsim_rt.pipeline.outputs import SUMMARY_NAME, check_out_dir, commit_outputs
from deepsim_rt.pipeline.pair import default_model, read_pair
from deepsim_rt.pipeline.register import register_pair, registrator_for

__all__ = ["PairRow", "read_pairs_csv", "run_batch", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("name", "moving", "fixed", "labels", "status", "error", "model", "backend", "device", "shape",
                 "register_s", "folding_percent", "sd_log_jacobian", "max_displacement_voxels", "warnings")
_RESERVED = ("summary.csv", "summary.json", "qc.html")
_NIFTI = (".nii.gz", ".nii")


@dataclass(frozen=True)
class PairRow:
    line: int  # line number in the CSV (the header is line 1)
    moving: Path
    fixed: Path
    labels: Path | None
    name: str


def _stem(path: Path) -> str:
    low = path.name.lower()
    for s in (*_NIFTI, ".png", ".npy"):
        if low.endswith(s):
            return path.name[: -len(s)]
    return path.stem


def read_pairs_csv(path: str | os.PathLike) -> list[PairRow]:
    """Parse and check a pairs CSV (see the module docstring); ValueError naming the line on any bad row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs CSV not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable UTF-8 CSV file: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    unknown = sorted(set(fields) - {"moving", "fixed", "labels", "name"})
    if "moving" not in fields or "fixed" not in fields or unknown:
        raise ValueError(f"{path}: header must name the columns moving, fixed (and optionally labels, name), got "
                         f"{fields}")
    base = path.parent
    rows: list[PairRow] = []
    seen: dict[str, int] = {}
    for line, raw in enumerate(reader, start=2):
        if None in raw:  # csv.DictReader files the extra cells under the key None, as a list
            raise ValueError(f"{path}, line {line}: more cells than the header's {len(fields)} columns")
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        if not any(row.values()):
            continue  # blank line
        if not row.get("moving") or not row.get("fixed"):
            raise ValueError(f"{path}, line {line}: moving and fixed are required, got {row}")
        files = {}
        for col in ("moving", "fixed", "labels"):
            if row.get(col):
                p = Path(row[col]).expanduser()
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise ValueError(f"{path}, line {line}: {col} file not found: {p}")
                files[col] = p
        name = row.get("name") or f"{_stem(files['moving'])}_to_{_stem(files['fixed'])}"
        if (not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name) or name in _RESERVED or name in (".", "..")):
            raise ValueError(f"{path}, line {line}: output name {name!r} must be a plain folder name (letters, "
                             "digits, _ . + -, not starting with '.'), not summary.csv / summary.json")
        if name in seen:
            raise ValueError(f"{path}, line {line}: output name {name!r} repeats line {seen[name]}; give the rows "
                             "distinct names (name column)")
        seen[name] = line
        rows.append(PairRow(line, files["moving"], files["fixed"], files.get("labels"), name))
    if not rows:
        raise ValueError(f"{path}: no pairs listed")
    return rows


def _table_row(row: PairRow, status: str, summary: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    s = summary or {}
    qc = s.get("qc") or {}
    return {"name": row.name, "moving": str(row.moving), "fixed": str(row.fixed),
            "labels": "" if row.labels is None else str(row.labels), "status": status, "error": error,
            "model": s.get("model", ""), "backend": s.get("backend", ""), "device": s.get("device", ""),
            "shape": "x".join(str(v) for v in s.get("shape", [])), "register_s": s.get("timings_s", {}).get("register"),
            "folding_percent": qc.get("folding_percent"), "sd_log_jacobian": qc.get("sd_log_jacobian"),
            "max_displacement_voxels": s.get("max_displacement_voxels"), "warnings": len(s.get("warnings", []))}


def _finished(folder: Path) -> dict[str, Any] | None:
    """The summary of a finished pair folder, or None (absent or unreadable: the pair is redone)."""
    try:
        return json.loads((folder / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
            w.writeheader()
            w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)

    atomic_write(out / "summary.csv", write_csv)
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text))


def _join(device: str):
    """DistInfo of this process: torchrun's process group (nccl + one GPU per LOCAL_RANK on CUDA machines), or gloo
    when the registrations run on the CPU (--device cpu: ranks need no GPU each, e.g. 2 ranks on a 1-GPU box)."""
    from deepsim_rt.train.distributed import DistInfo, setup_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and str(device).startswith("cpu"):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        return DistInfo(int(os.environ["RANK"]), world, torch.device("cpu"))
    return setup_distributed()


def run_batch(pairs_csv: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
              backend: str = "auto", device: str = "auto", overwrite: bool = False, progress: bool = True,
              pair_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Register every pair of `pairs_csv` into out/<name>/ (see the module docstring); returns the table rows of
    this process's pairs (rank 0 under torchrun: all rows). pair_options: keyword arguments for
    pipeline.register.register_pair (affine, label_mode, refine, ...)."""
    from tqdm.auto import tqdm

    from deepsim_rt.train.distributed import teardown_distributed

    out = check_out_dir(out)
    rows = read_pairs_csv(pairs_csv)
    info = _join(device)
    try:
        if info.distributed and device == "auto":
            device = str(info.device)  # one GPU per LOCAL_RANK (CPU: gloo ranks share the host)
        mine = rows[info.rank::info.world]
        regs: dict[str, Any] = {}
        table: list[tuple[int, dict[str, Any]]] = []
        bar = tqdm(mine, desc=f"register (rank {info.rank}/{info.world})" if info.distributed else "register",
                   unit="pair", disable=not (progress and info.is_main))
        for row in bar:
            folder = out / row.name
            done = None if overwrite else _finished(folder)
            if done is not None:
                table.append((row.line, _table_row(row, "skipped", done)))
                continue
            try:
                pair = read_pair(row.moving, row.fixed, row.labels)
            except ValueError as exc:
                table.append((row.line, _table_row(row, "failed", None, str(exc))))
                continue
            key = model or default_model(pair)
            if key not in regs:  # a bad --model / --device stops the batch: every pair would fail the same way
                regs[key] = registrator_for(pair, key, backend, device, (pair_options or {}).get("refine"))
            try:
                result = register_pair(regs[key], pair, **(pair_options or {}))
                # a folder without summary.json holds at most an interrupted commit of this pair: replace it
                commit_outputs(folder, result, pair.paths, overwrite=True)
                table.append((row.line, _table_row(row, "done", result.summary)))
            except ValueError as exc:
                table.append((row.line, _table_row(row, "failed", None, str(exc))))
        bar.close()
        if info.distributed:
            import torch.distributed as dist

            gathered: list[Any] = [None] * info.world
            dist.all_gather_object(gathered, table)
            table = [item for part in gathered for item in part]
        result_rows = [r for _, r in sorted(table, key=lambda t: t[0])]
        if info.is_main:
            from deepsim_rt.pipeline.qc_page import write_batch_page

            try:
                _write_table(out, result_rows)
                if out.is_dir():  # every pair's qc.png on one page, outliers (folding, low NCC, failed) first
                    write_batch_page(out, result_rows)
            except OSError as exc:
                raise ValueError(f"cannot write the summary table in {out}: {exc.strerror or exc}") from exc
        return result_rows
    finally:
        teardown_distributed(info)
