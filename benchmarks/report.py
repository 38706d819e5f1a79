"""Saved pytest-benchmark JSON -> benchmarks/RESULTS.md (tables per machine) + a PNG plot.

    python benchmarks/report.py                         # every benchmarks/results/*.json
    python benchmarks/report.py a.json b.json --out X.md --plot X.png

Every result carries the machine it ran on (extra_info["machine"]: the GPU name on a GPU box, else the CPU model
and thread count). Results are grouped by machine and speed-ups are computed only between results of the same
machine: numbers from different cards are shown side by side, never mixed. When the same case (machine, op, pass,
provider, shape, dtype) appears in several files, the newest file wins.

Tables per machine:
  kernels    median, IQR, speed-up vs "reference" and vs "compile", GB/s, % of the measured copy bandwidth
             (= % of the roofline: bytes from benchmarks/roofline.py over the copy bandwidth)
  inference  median per backend, speed-up vs eager, setup time (export/compile), GFLOP/s where counted
  training   median step time per loss, speed-up vs reference, peak memory
  targets    the kernels/export issues' targets, measured: met or not, by how much

Text in RESULTS.md outside the GENERATED markers (notes written by hand) is kept as is.
Standard library + matplotlib only (imports no torch), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- BEGIN GENERATED (benchmarks/report.py) -->"
END = "<!-- END GENERATED -->"

KERNEL_PROVIDERS = ("reference", "compile", "triton")
INFER_BACKENDS = ("eager", "compile", "onnxruntime", "aoti", "tensorrt")
TRAIN_PROVIDERS = ("reference", "kernels")


@dataclass(frozen=True)
class Row:
    """One benchmark result, flattened from pytest-benchmark JSON."""

    machine: str
    op: str
    pass_: str
    provider: str
    shape: str
    dtype: str
    median_s: float
    iqr_s: float | None = None
    rounds: int | None = None
    timer: str = ""
    gbps: float | None = None
    pct_copy_bw: float | None = None
    gflops: float | None = None
    peak_mem_bytes: int | None = None
    device: str = ""
    source: str = ""
    when: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def case(self) -> tuple[str, str, str, str]:
        """What two providers must share to be compared."""
        return (self.op, self.pass_, self.shape, self.dtype)

    @property
    def key(self) -> tuple:
        return (self.machine, *self.case, self.provider)

    @property
    def kind(self) -> str:
        if self.op.startswith("register"):
            return "inference"
        if self.op.startswith("train"):
            return "training"
        return "kernels"


@dataclass
class Machine:
    name: str
    rows: list[Row]
    info: dict  # the session block (copy bandwidth, versions, sha, ...) of the newest file seen
    sources: list[str]
    copy_gbps: dict = field(default_factory=dict)  # file name -> the copy bandwidth measured in that session


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------
def _machine_of(bench: dict, session: dict, machine_info: dict) -> str:
    ex = bench.get("extra_info", {})
    if ex.get("machine"):
        return str(ex["machine"])
    if session.get("machine"):
        return str(session["machine"])
    cpu = machine_info.get("cpu", {})
    return str(cpu.get("brand_raw") or machine_info.get("processor") or machine_info.get("node") or "unknown")


def load_rows(path: str | Path) -> tuple[list[Row], dict]:
    """Rows of one pytest-benchmark JSON file and its session block (machine_info["deepsim_rt"], may be {})."""
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    machine_info = data.get("machine_info", {}) or {}
    session = machine_info.get("deepsim_rt", {}) or {}
    when = str(data.get("datetime", ""))
    rows = []
    for b in data["benchmarks"]:
        ex = b.get("extra_info", {}) or {}
        stats = b.get("stats", {}) or {}
        median = ex.get("median_s", stats.get("median"))
        if median is None or "op" not in ex:
            continue  # not one of ours (or a benchmark that did not finish)
        rows.append(Row(
            machine=_machine_of(b, session, machine_info),
            op=str(ex["op"]), pass_=str(ex.get("pass", "")), provider=str(ex.get("provider", "")),
            shape=str(ex.get("shape", "")), dtype=str(ex.get("dtype", "")),
            median_s=float(median), iqr_s=ex.get("iqr_s", stats.get("iqr")), rounds=ex.get("rounds",
                                                                                            stats.get("rounds")),
            timer=str(ex.get("timer", "")), gbps=ex.get("gbps"), pct_copy_bw=ex.get("pct_copy_bw"),
            gflops=ex.get("gflops"), peak_mem_bytes=ex.get("peak_mem_bytes"), device=str(ex.get("device", "")),
            source=path.name, when=when, extra=ex,
        ))
    return rows, session


def collect(paths: list[Path]) -> dict[str, Machine]:
    """Machines by name, each with its de-duplicated rows (newest file wins per case and provider)."""
    best: dict[tuple, Row] = {}
    infos: dict[str, tuple[str, dict]] = {}
    sources: dict[str, set[str]] = defaultdict(set)
    copy: dict[str, dict[str, float]] = defaultdict(dict)
    for p in paths:
        rows, session = load_rows(p)
        for r in rows:
            if r.extra.get("copy_gbps") is not None:
                copy[r.machine][r.source] = r.extra["copy_gbps"]
            old = best.get(r.key)
            if old is None or r.when >= old.when:
                best[r.key] = r
            sources[r.machine].add(r.source)
            if session.get("machine") == r.machine and (r.machine not in infos or r.when >= infos[r.machine][0]):
                infos[r.machine] = (r.when, session)
    machines: dict[str, Machine] = {}
    for r in best.values():
        m = machines.setdefault(r.machine, Machine(r.machine, [], infos.get(r.machine, ("", {}))[1],
                                                   sorted(sources[r.machine]), copy[r.machine]))
        m.rows.append(r)
    for m in machines.values():
        m.rows.sort(key=lambda r: (r.kind, r.op, r.pass_, r.shape, r.dtype, _order(r.provider)))
    return machines


def _order(provider: str) -> int:
    for seq in (KERNEL_PROVIDERS, INFER_BACKENDS, TRAIN_PROVIDERS):
        if provider in seq:
            return seq.index(provider)
    return 99


def speedup(rows: list[Row], row: Row, baseline: str) -> float | None:
    """baseline's median / row's median for the same case on the same machine; None if no baseline."""
    for r in rows:
        if r.machine == row.machine and r.case == row.case and r.provider == baseline:
            return r.median_s / row.median_s if row.median_s > 0 else None
    return None


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------
def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def fmt_num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{float(x):.{digits}g}"


def fmt_mb(b) -> str:
    return "–" if b is None else f"{b / 2**20:.1f} MiB"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def kernel_table(rows: list[Row]) -> list[str]:
    body = []
    for r in rows:
        body.append([r.op, r.pass_, r.shape, r.dtype, r.provider, fmt_time(r.median_s), fmt_time(r.iqr_s),
                     fmt_x(speedup(rows, r, "reference")), fmt_x(speedup(rows, r, "compile")), fmt_num(r.gbps),
                     "–" if r.pct_copy_bw is None else f"{r.pct_copy_bw:.1f} %"])
    return _table(["op", "pass", "shape", "dtype", "provider", "median", "IQR", "vs reference", "vs compile",
                   "GB/s", "% copy BW"], body)


def inference_table(rows: list[Row]) -> list[str]:
    body = []
    for r in rows:
        dev = r.extra.get("backend_device", r.device)
        body.append([r.op, r.shape, r.provider, dev, fmt_time(r.median_s), fmt_time(r.iqr_s),
                     fmt_x(speedup(rows, r, "eager")), fmt_num(r.extra.get("setup_s")), fmt_num(r.gflops),
                     str(r.extra.get("model", ""))])
    return _table(["op", "shape", "backend", "device", "median", "IQR", "vs eager", "setup s", "GFLOP/s",
                   "model"], body)


def training_table(rows: list[Row]) -> list[str]:
    body = []
    for r in rows:
        body.append([r.op, r.shape, str(r.extra.get("preset", "")), r.provider, fmt_time(r.median_s),
                     fmt_time(r.iqr_s), fmt_x(speedup(rows, r, "reference")), fmt_mb(r.peak_mem_bytes),
                     str(r.extra.get("peak_mem_method", ""))])
    return _table(["op", "batch shape", "preset", "provider", "median", "IQR", "vs reference", "peak memory",
                   "memory method"], body)


# ----------------------------------------------------------------------------------------------------------------
# Targets of the kernels (4) and export (5) issues
# ----------------------------------------------------------------------------------------------------------------
# (description, op prefix, pass, measure, threshold): measure is ("speedup", provider, baseline) or ("pct_bw",
# provider) or ("best_export_vs_eager",).
TARGETS = (
    ("DeepSim fwd+bwd ≥ 5× eager", "deepsim", "fwd+bwd", ("speedup", "triton", "reference"), 5.0),
    ("DeepSim fwd+bwd ≥ 1.5× compiled", "deepsim", "fwd+bwd", ("speedup", "triton", "compile"), 1.5),
    ("DeepSim fwd ≥ 85 % of copy bandwidth", "deepsim", "fwd", ("pct_bw", "triton"), 85.0),
    ("warp3d fwd ≥ 3× eager grid + grid_sample", "warp3d", "fwd", ("speedup", "triton", "reference"), 3.0),
    ("warp3d bwd (flow only) ≥ 5× ATen", "warp3d", "bwd_flow", ("speedup", "triton", "reference"), 5.0),
    ("warp3d bwd (image + flow) ≥ 5× ATen", "warp3d", "bwd_both", ("speedup", "triton", "reference"), 5.0),
    ("integration fwd ≥ 3× eager", "integrate", "fwd", ("speedup", "triton", "reference"), 3.0),
    ("best exported backend ≥ 1.3× eager (CPU)", "register", "infer", ("best_export_vs_eager",), 1.3),
)


def target_rows(rows: list[Row]) -> list[list[str]]:
    body = []
    for desc, prefix, pass_, measure, thr in TARGETS:
        cands = [r for r in rows if r.op.startswith(prefix) and r.pass_ == pass_]
        for case in sorted({r.case for r in cands}):
            same = [r for r in cands if r.case == case]
            by = {r.provider: r for r in same}
            value = None
            note = ""
            if measure[0] == "speedup" and measure[1] in by and measure[2] in by:
                value = by[measure[2]].median_s / by[measure[1]].median_s
            elif measure[0] == "pct_bw" and measure[1] in by:
                value = by[measure[1]].pct_copy_bw
            elif measure[0] == "best_export_vs_eager" and "eager" in by:
                exported = [r for p, r in by.items() if p in ("onnxruntime", "aoti", "tensorrt")
                            and r.extra.get("backend_device", r.device) == by["eager"].device]
                if exported:
                    best = min(exported, key=lambda r: r.median_s)
                    value = by["eager"].median_s / best.median_s
                    note = f" ({best.provider})"
            if value is None:
                continue
            unit = " %" if measure[0] == "pct_bw" else "×"
            met = value >= thr
            body.append([desc, " ".join(case), f"{value:.2f}{unit}{note}", "met" if met else
                         f"NOT met ({value / thr:.0%} of target)"])
    return body


# ----------------------------------------------------------------------------------------------------------------
# Markdown and plot
# ----------------------------------------------------------------------------------------------------------------
def machine_section(m: Machine) -> list[str]:
    info = m.info
    out = [f"### {m.name}", ""]
    if info:
        v = info.get("versions", {})
        out.append(f"- device: {info.get('device', '?')} · {info.get('device_name', '?')}; host CPU "
                   f"{info.get('cpu', '?')}; torch threads {info.get('torch_threads', '?')}")
        per_file = ", ".join(f"{v} GB/s ({k})" for k, v in sorted(m.copy_gbps.items()))
        out.append(f"- copy bandwidth measured in each session (bytes read + written, {fmt_mb(info.get('copy_bytes'))}"
                   f" per copy): {per_file or info.get('copy_gbps', '?')}")
        out.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val not in ("absent", "None"))
                   + f"; git {info.get('git_sha', '?')}")
    whens = sorted({r.when[:19] for r in m.rows if r.when})
    out.append(f"- results: {', '.join(m.sources)}" + (f" ({whens[0]} … {whens[-1]} UTC)" if whens else ""))
    out.append("")
    kinds = defaultdict(list)
    for r in m.rows:
        kinds[r.kind].append(r)
    if kinds["kernels"]:
        out += ["#### Kernels", ""] + kernel_table(kinds["kernels"]) + [""]
    if kinds["inference"]:
        out += ["#### Registration inference (end to end, `Registrator.register`)", ""]
        out += inference_table(kinds["inference"]) + [""]
    if kinds["training"]:
        out += ["#### Training step (forward + loss + backward + Adam)", ""] + training_table(kinds["training"])
        out += [""]
    t = target_rows(m.rows)
    if t:
        out += ["#### Targets", ""] + _table(["target", "case", "measured", "status"], t) + [""]
    return out


def render(machines: dict[str, Machine]) -> str:
    lines = [BEGIN, "", "## Results by machine", ""]
    if not machines:
        lines += ["No results yet: run `make bench` (CPU) or `make gpu-check` (GPU).", ""]
    # GPUs first (their device is cuda), then CPUs; alphabetical inside.
    order = sorted(machines.values(), key=lambda m: (m.info.get("device") != "cuda", m.name))
    for m in order:
        lines += machine_section(m)
    lines += [END]
    return "\n".join(lines) + "\n"


DEFAULT_HEAD = """# deepsim_rt benchmark results

Generated from `benchmarks/results/*.json` by `python benchmarks/report.py` (`make bench` runs it). Times are
medians over rounds with rotating input sets, warm-up excluded (benchmarks/harness.py); GB/s counts the minimum
bytes each op must move (benchmarks/roofline.py); "% copy BW" compares it with a device-to-device copy measured in
the same session. Speed-ups compare providers on the same machine only.

"""


def write_markdown(machines: dict[str, Machine], out: Path) -> None:
    """Replace the generated block of `out`, keeping any hand-written text around it."""
    block = render(machines)
    if out.is_file():
        text = out.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1].lstrip("\n")
            out.write_text(head + block + ("\n" + tail if tail else ""))
            return
        out.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    out.write_text(DEFAULT_HEAD + block)


def plot(machines: dict[str, Machine], out: Path) -> bool:
    """One row per machine: speed-ups (log scale) of the kernels vs reference, of inference backends vs eager and
    of the training step with the kernels vs reference."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a runtime dependency
        print("matplotlib not available: no plot", file=sys.stderr)
        return False
    ms = sorted(machines.values(), key=lambda m: (m.info.get("device") != "cuda", m.name))
    if not ms:
        return False
    panels = (("kernels", "reference", KERNEL_PROVIDERS), ("inference", "eager", INFER_BACKENDS),
              ("training", "reference", TRAIN_PROVIDERS))
    fig, axes = plt.subplots(len(ms), 3, figsize=(18, 0.5 + 4.5 * len(ms)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.2, 1.2]})
    for row_axes, m in zip(axes, ms, strict=True):
        for ax, (kind, base, order) in zip(row_axes, panels, strict=True):
            rows = [r for r in m.rows if r.kind == kind]
            cases = sorted({r.case for r in rows})
            provs = [p for p in order if p != base and any(r.provider == p for r in rows)]
            width = 0.8 / max(len(provs), 1)
            for j, p in enumerate(provs):
                xs, ys = [], []
                for i, c in enumerate(cases):
                    r = next((r for r in rows if r.case == c and r.provider == p), None)
                    s = speedup(rows, r, base) if r else None
                    if s:
                        xs.append(i + j * width)
                        ys.append(s)
                ax.bar(xs, ys, width=width, label=p)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks([i + width * (len(provs) - 1) / 2 for i in range(len(cases))])
            ax.set_xticklabels([f"{c[0]} {c[1]}\n{c[2]} {c[3]}" for c in cases], rotation=70, fontsize=6,
                               ha="right")
            ax.set_ylabel(f"speed-up vs {base} (×)")
            ax.set_title(f"{m.name}: {kind}", fontsize=9)
            if provs:
                ax.legend(fontsize=7)
            if not cases or not provs:
                msg = "no results" if not cases else f"only the baseline ({base}) ran here"
                ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def summary_lines(machines: dict[str, Machine]) -> list[str]:
    """A short plain-text table (gpu_check.sh prints it last): per machine and kind, rows and the median speed-up."""
    out = []
    for m in machines.values():
        for kind, base in (("kernels", "reference"), ("inference", "eager"), ("training", "reference")):
            rows = [r for r in m.rows if r.kind == kind]
            if not rows:
                continue
            by_p = defaultdict(list)
            for r in rows:
                s = speedup(rows, r, base)
                if s is not None and r.provider != base:
                    by_p[r.provider].append(s)
            parts = [f"{p} median {statistics.median(v):.2f}× ({len(v)})" for p, v in sorted(by_p.items())]
            out.append(f"{m.name[:40]:40s} {kind:9s} {len(rows):3d} rows; vs {base}: " + ("; ".join(parts) or "–"))
        for t in target_rows(m.rows):
            out.append(f"{m.name[:40]:40s} target   {t[0]} [{t[1]}]: {t[2]} {t[3]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files (default: benchmarks/results/*)")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--plot", type=Path, default=HERE / "results" / "speedups.png")
    ap.add_argument("--summary", action="store_true", help="print the short summary table")
    args = ap.parse_args(argv)
    paths = args.json or sorted((HERE / "results").glob("*.json"))
    machines = collect(paths)
    write_markdown(machines, args.out)
    made = plot(machines, args.plot)
    print(f"{args.out}: {sum(len(m.rows) for m in machines.values())} results from {len(paths)} file(s), "
          f"{len(machines)} machine(s)" + (f"; plot {args.plot}" if made else ""))
    if args.summary:
        print("\n".join(summary_lines(machines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
