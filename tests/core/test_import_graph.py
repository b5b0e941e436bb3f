"""The import graph of ``src/kdguard``: no cycles between modules, packages in their layers.

The graph is read with :mod:`ast`, not by importing: every ``import`` / ``from ... import`` at
any depth (module level, inside functions, under ``TYPE_CHECKING``), relative imports resolved,
``from pkg import name`` counted as an import of the module ``pkg.name`` when that is a module
(else of ``pkg``), and a package's ``__init__`` counted as the module ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "src" / "kdguard"

#: The layers, lowest first (issue 30). A unit (a top-level module or package of kdguard, or a
#: named submodule such as ``commands._app``) may import only units of a LOWER rank; within a
#: unit anything goes (its own module graph must still be acyclic). Ranks inside one layer order
#: its units: in L2, the run engine sits below the feature packages that use it, and ``abd``
#: plugs into ``datafree``.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("L0 foundation", ("kdguard", "errors")),
    ("L0 foundation", ("distributed",)),
    ("L0 foundation", ("registry", "trust", "runtime", "io", "taps", "log", "presets")),
    ("L0 foundation", ("config",)),
    ("L0 foundation", ("optim",)),
    ("L1 domain", ("augment",)),
    ("L1 domain", ("data", "losses")),
    ("L1 domain", ("attacks", "metrics", "models")),
    ("L2 methods", ("checkpoint", "report", "distill", "rundir")),
    ("L2 methods", ("train",)),
    ("L2 methods", ("runs",)),
    ("L2 methods", ("datafree", "defenses", "ssl")),
    ("L2 methods", ("abd",)),
    ("L2 methods", ("audit",)),
    ("L3 jobs", ("jobs",)),
    ("L3 jobs", ("suites", "diagnostics")),
    ("L4 fronts", ("commands._app",)),
    ("L4 fronts", ("commands",)),
    ("L4 fronts", ("cli",)),
    ("L4 fronts", ("__main__",)),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
LAYER = {unit: layer for layer, units in LAYERS for unit in units}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``)."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, dict[str, int]]:
    """Module → {imported kdguard module: line of the first such import}."""
    mods = module_files()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from pkg import name` imports pkg
                submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in mods]
                candidates = submodules if len(submodules) == len(node.names) else [target, *submodules]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for cand in candidates:
                # `import kdguard.a.b` imports kdguard, kdguard.a and kdguard.a.b; the deepest known one counts
                while cand and cand not in mods:
                    cand = cand.rpartition(".")[0]
                if cand and cand != name:
                    deps.setdefault(cand, node.lineno)
        graph[name] = deps
    return graph


def unit_of(module: str) -> str:
    """The layer-table unit of a dotted module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "kdguard"
    for depth in range(len(parts), 1, -1):
        unit = ".".join(parts[1:depth])
        if unit in RANK:
            return unit
    return parts[1]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_graph_is_read(graph):
    assert "kdguard.runs" in graph and "kdguard.jobs.datafree" in graph
    assert "kdguard.abd" in graph["kdguard.jobs.datafree"]  # the jobs layer composes ABD in
    assert "kdguard.commands._app" in graph["kdguard.cli"]


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_unit_has_a_layer(graph):
    unknown = sorted({unit_of(m) for m in graph} - set(RANK))
    assert not unknown, f"add these kdguard modules/packages to LAYERS in {Path(__file__).name}: {unknown}"


def test_layering(graph):
    mods = module_files()
    bad = []
    for module, deps in graph.items():
        src = unit_of(module)
        for dep, line in deps.items():
            dst = unit_of(dep)
            if src == dst or src not in RANK or dst not in RANK:
                continue
            if RANK[dst] >= RANK[src]:
                path = mods[module][0].relative_to(ROOT.parents[1])
                bad.append(f"{path}:{line}: {module} imports {dep} "
                           f"({src} [{LAYER[src]}] may not import {dst} [{LAYER[dst]}])")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
