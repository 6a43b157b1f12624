"""The import graph of the package, function-local imports included: no cycles, no upward edges, small files."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gisp_fx": ROOT / "gisp_fx", "gisp_fx.passes": ROOT / "passes", "gisp_fx.exporters": ROOT / "exporters"}
# the layers above the passes and exporters: the settings, the orchestration, the API and the CLI
UPPER = {"gisp_fx", "gisp_fx.api", "gisp_fx.config", "gisp_fx.calibration", "gisp_fx.methods", "gisp_fx.prune",
         "gisp_fx.compile", "gisp_fx.rundir", "gisp_fx.rebuild", "gisp_fx.report", "gisp_fx.sharded",
         "gisp_fx.distributed", "gisp_fx.inspect", "gisp_fx.bench", "gisp_fx.__main__"}
DATA = {"gisp_fx.errors", "gisp_fx.plan", "gisp_fx.trajectory", "gisp_fx.version"}  # import only one another
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            mods[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of a project module, at any depth of the file (function-local ones too)."""
    edges = {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gisp_fx"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                out |= subs
                if node.module in mods and len(subs) < len(node.names):
                    out.add(node.module)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names} & mods.keys()
        edges[name] = out - {name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_function_local_imports_and_finds_a_planted_cycle():
    mods = _modules()
    edges = _edges(mods)
    assert "gisp_fx.api" in edges["gisp_fx"]  # imported inside __getattr__
    planted = {k: set(v) for k, v in edges.items()}
    planted["gisp_fx.plan"].add("gisp_fx.prune")  # prune -> ... -> plan, so this closes a loop
    assert _cycles(planted)


def test_no_import_cycles():
    assert _cycles(_edges(_modules())) == []


def test_no_upward_imports():
    edges = _edges(_modules())
    upward = sorted((a, b) for a, targets in edges.items() for b in targets
                    if a.startswith(("gisp_fx.passes", "gisp_fx.exporters")) and (b in UPPER or ".cli" in b))
    assert upward == []
    cli = sorted((a, b) for a, targets in edges.items() for b in targets
                 if ".cli" in b and not (a.startswith("gisp_fx.cli") or a == "gisp_fx.__main__"))
    assert cli == []
    data = sorted((a, b) for a in DATA for b in edges[a] if b not in DATA)
    assert data == []


def test_modules_stay_small():
    big = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert big == {}
