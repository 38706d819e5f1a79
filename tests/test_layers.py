"""The package's layer table holds in its imports: no import circles (module- or function-level) and no import up a
floor. Parses every module of deepsim_rt with ast (nothing is imported), so it runs in well under a second.

The floors, lowest first, are FLOORS below (the README's architecture table follows them): a module may import its
own floor and the floors below, never a floor above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepsim_rt"

# floor -> the packages / top-level modules on it. A module named `cli` anywhere, and the subcommand modules, are
# the command-line floor (the top): they parse arguments and call down.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("deepsim_rt", "_io", "_checks"),        # 0 foundations: atomic writes, argument checks, the version
    ("kernels",),                            # 1 warp / integrate / cosine ops (reference + Triton)
    ("data", "nn", "losses"),                # 2 data sources, networks + checkpoints, similarity losses
    ("transforms",),                         # 3 grids, resampling, padding, ITK fields, spacing, pre-alignment
    ("export",),                             # 4 ONNX / AOTI / TensorRT artifacts and their runners
    ("refine",),                             # 5 instance optimisation (imports no runtime)
    ("runtime",),                            # 6 Registrator: arrays, any backend, network + refinement
    ("train", "evaluate"),                   # 7 training loops, metrics, studies
    ("pipeline",),                           # 8 files on disk: images with geometry, register, QC, batch, apply
    ("anomaly", "realbench"),                # 9 change maps, the real-brain benchmark (over the pipeline)
    ("cli", "register_cli", "apply_cli", "demo"),  # 10 the `deepsim-rt` command line
)
CLI_FLOOR = len(FLOORS) - 1
# Circles known and owned elsewhere: (a, b) module pairs, each with why it is not fixed. None today.
KNOWN_CIRCLES: set[frozenset[str]] = set()
# Imports up a floor known and owned elsewhere: (importer, imported), each with its fix. None today.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(("deepsim_rt", *p.relative_to(PACKAGE).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the deepsim_rt modules it imports anywhere in its source (module level or inside functions)."""
    edges: dict[str, set[str]] = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` imports the submodule; `from mod import name` resolves back to mod
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != m:
                    found.add(name)
        edges[m] = found
    return edges


def floor_of(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "cli":
        return CLI_FLOOR
    key = parts[1] if len(parts) > 1 else parts[0]
    for i, names in enumerate(FLOORS):
        if key in names:
            return i
    raise KeyError(f"{module}: its package {key!r} is on no floor; add it to FLOORS in tests/test_layers.py and to "
                   "the README's architecture table")


def _circles(edges: dict[str, set[str]], mods: dict[str, Path]) -> list[tuple[str, str]]:
    """Pairs (a, b) where a imports b and b reaches a again. Edges into a package's __init__ are left out, as the
    stop hook does: `from pkg import x` names the package, and its __init__ only re-exports lower modules."""
    real = {m: {b for b in bs if mods[b].name != "__init__.py"} for m, bs in edges.items()}

    def reaches(a: str, b: str) -> bool:
        stack, seen = [a], set()
        while stack:
            v = stack.pop()
            if v == b:
                return True
            if v not in seen:
                seen.add(v)
                stack.extend(real[v])
        return False

    out, seen_pairs = [], set()
    for a in sorted(real):
        for b in sorted(real[a]):
            key = frozenset((a, b))
            if key not in seen_pairs and reaches(b, a):
                seen_pairs.add(key)
                out.append((a, b))
    return out


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return mods, _imports(mods)


def test_every_module_is_on_a_floor(graph):
    mods, _ = graph
    missing = []
    for m in sorted(mods):
        try:
            floor_of(m)
        except KeyError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)


def test_no_import_circles(graph):
    mods, edges = graph
    circles = [f"{a} <-> {b}" for a, b in _circles(edges, mods) if frozenset((a, b)) not in KNOWN_CIRCLES]
    assert not circles, "import circles (each pair reaches the other, directly or around a loop): " + "; ".join(circles)


def test_no_import_runs_up_a_floor(graph):
    _, edges = graph
    up = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
          for a in sorted(edges) for b in sorted(edges[a]) if floor_of(b) > floor_of(a) and (a, b) not in KNOWN_UPWARD]
    assert not up, "imports up the floor order:\n" + "\n".join(up)


def test_the_checker_sees_function_level_imports_and_circles(tmp_path):
    # the checker itself: a function-level import and a two-module circle are found, an __init__ edge is not one
    pkg = tmp_path / "deepsim_rt"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("from deepsim_rt.runtime.a import f\n")
    (pkg / "runtime" / "a.py").write_text("def f():\n    from deepsim_rt.runtime.b import g\n")
    (pkg / "runtime" / "b.py").write_text("from deepsim_rt.runtime import a\nimport deepsim_rt.pipeline\n")
    (pkg / "pipeline.py").write_text("")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        mods = _modules()
        edges = _imports(mods)
    finally:
        PACKAGE = saved
    assert edges["deepsim_rt.runtime.a"] == {"deepsim_rt.runtime.b"}
    assert edges["deepsim_rt.runtime.b"] == {"deepsim_rt.runtime.a", "deepsim_rt.pipeline"}
    assert _circles(edges, mods) == [("deepsim_rt.runtime.a", "deepsim_rt.runtime.b")]
    assert floor_of("deepsim_rt.runtime.b") < floor_of("deepsim_rt.pipeline")  # b imports up: the rule catches it
    assert floor_of("deepsim_rt.anomaly.cli") == CLI_FLOOR  # any `cli` module is the command line
