"""The package's wings, and the one direction its imports flow (read from the source with `ast`, nothing imported).

Wings, lowest first: the foundation (`errors`, `io`, `messages`, `progress`), `runs/`, `probes/`, `engine/`,
`analysis/`, `pipeline/`, `training/`, `viz`, the front door (`api`, `demo`, `testing`), `cli`. A module may import
its own wing and the wings below it, never one above; `analysis/` never reaches a module that opens a model
(`runs/checkpoints`, `runs/gguf`), not even through another module; and the imports have no cycle. Every import
counts: at the top of a module, inside a function, under `TYPE_CHECKING` (which, running nothing, does not count for
what `analysis/` reaches).

One exception, named in `HOOKS`: a result that presents itself (`CircuitDiff.figure`, `Timeline.text`,
`CircuitSet.to_networkx`, ...) imports the module that draws or writes it inside that method, so that notebooks
can ask the result. Those imports may point up or back; no other may.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "circuitdyn"
WINGS = ("foundation", "runs", "probes", "engine", "analysis", "pipeline", "training", "viz", "front", "cli")
TOP_LEVEL = {
    "circuitdyn": "foundation",
    "circuitdyn.errors": "foundation",
    "circuitdyn.io": "foundation",
    "circuitdyn.messages": "foundation",
    "circuitdyn.progress": "foundation",
    "circuitdyn.viz": "viz",
    "circuitdyn.api": "front",
    "circuitdyn.demo": "front",
    "circuitdyn.testing": "front",
    "circuitdyn.cli": "cli",
}
OPENS_MODELS = {"circuitdyn.runs.checkpoints", "circuitdyn.runs.gguf"}
HOOKS = {
    ("circuitdyn.engine.circuits", "CircuitSet.to_networkx", "circuitdyn.engine.export"),
    ("circuitdyn.analysis.diff", "CircuitDiff.describe", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.diff", "CircuitDiff.text", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.diff", "CircuitDiff._repr_html_", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.diff", "CircuitDiff.figure", "circuitdyn.viz"),
    ("circuitdyn.analysis.timeline", "Timeline.describe", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.timeline", "Timeline.text", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.timeline", "Timeline.to_dict", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.timeline", "Timeline._repr_html_", "circuitdyn.analysis.report"),
    ("circuitdyn.analysis.timeline", "Timeline.figure", "circuitdyn.viz"),
}
"""(module, method, module it imports inside that method): a result presenting itself."""


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def wing(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in WINGS:
        return parts[1]
    raise AssertionError(f"{module} is in no wing: put it in a subpackage, or name it in TOP_LEVEL")


def imports(source: str, known: set[str]) -> list[tuple[str, str, bool]]:
    """(target module, enclosing function or "", only for type checkers) of every circuitdyn import in `source`;
    `from circuitdyn.x import y` targets `circuitdyn.x.y` when that is a module."""
    found: list[tuple[str, str, bool]] = []

    def visit(node: ast.AST, where: str, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{where}.{child.name}" if where else child.name, typing_only)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, where, True)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, where, typing_only) for a in child.names if a.name.split(".")[0] == "circuitdyn")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "circuitdyn":
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in known else child.module, where, typing_only))
            visit(child, where, typing_only)

    visit(ast.parse(source), "", False)
    return found


def edges(sources: dict[str, str], runtime: bool = False) -> list[tuple[str, str, str]]:
    """(module, where, target) for every import between modules of `sources` (module -> source text); with
    `runtime`, only the imports that run (not those under `TYPE_CHECKING`)."""
    known = set(sources)
    return [
        (m, where, t)
        for m, src in sources.items()
        for t, where, typing_only in imports(src, known)
        if t != m and not (runtime and typing_only)
    ]


def hook(module: str, where: str, target: str) -> bool:
    return any(module == m and (where == f or where.startswith(f + ".")) and target == t for m, f, t in HOOKS)


def backwards(sources: dict[str, str]) -> list[str]:
    """Every import that points to a higher wing than its own (hooks aside)."""
    return [
        f"{m} ({where or 'module level'}) imports {t}: {wing(m)} -> {wing(t)}"
        for m, where, t in edges(sources)
        if WINGS.index(wing(t)) > WINGS.index(wing(m)) and not hook(m, where, t)
    ]


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """The strongly connected groups (more than one module) of the import graph, hooks aside."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for m, where, t in edges(sources):
        if not hook(m, where, t):
            graph[m].add(t)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            strong(v)
    return groups


def reach(sources: dict[str, str], start: str) -> set[str]:
    """Every module `start` runs an import of, directly or through others (hooks aside)."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for m, where, t in edges(sources, runtime=True):
        if not hook(m, where, t):
            graph[m].add(t)
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def package_sources() -> dict[str, str]:
    return {m: p.read_text(encoding="utf-8") for m, p in module_files().items()}


# --------------------------------------------------------------------------- the package


def test_every_module_is_in_a_wing():
    wings = {m: wing(m) for m in package_sources()}
    assert {"runs", "probes", "engine", "analysis", "pipeline", "training"} <= set(wings.values())


def test_imports_flow_one_way():
    assert backwards(package_sources()) == []


def test_no_import_cycles():
    assert cycles(package_sources()) == []


def test_analysis_never_reaches_a_module_that_opens_a_model():
    sources = package_sources()
    for m in sources:
        if wing(m) == "analysis":
            assert not reach(sources, m) & OPENS_MODELS, m


def test_every_hook_is_a_lazy_import_in_its_method():
    sources = package_sources()
    present = {(m, where, t) for m, where, t in edges(sources)}
    for m, method, t in HOOKS:
        assert any(pm == m and pw == method and pt == t for pm, pw, pt in present), (m, method, t)


# --------------------------------------------------------------------------- the checks can fail


def test_a_backwards_import_a_cycle_and_a_model_reached_are_caught():
    sources = package_sources()
    bad = {**sources, "circuitdyn.analysis.extra": "from circuitdyn.pipeline.extraction import extract_run\n"}
    assert backwards(bad) == [
        "circuitdyn.analysis.extra (module level) imports circuitdyn.pipeline.extraction: analysis -> pipeline"
    ]
    lazy = {**sources, "circuitdyn.engine.extra": "def f():\n    from circuitdyn import viz\n"}
    assert backwards(lazy) == ["circuitdyn.engine.extra (f) imports circuitdyn.viz: engine -> viz"]
    loop = {
        **sources,
        "circuitdyn.engine.a": "import circuitdyn.engine.b\n",
        "circuitdyn.engine.b": "from circuitdyn.engine import a\n",
    }
    assert cycles(loop) == [["circuitdyn.engine.a", "circuitdyn.engine.b"]]
    opens = {**sources, "circuitdyn.analysis.extra": "from circuitdyn.probes.facts import run_facts\n"}
    assert "circuitdyn.runs.checkpoints" in reach(opens, "circuitdyn.analysis.extra")
    typed = {
        **sources,
        "circuitdyn.analysis.extra": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from circuitdyn.runs.checkpoints import Run\n",
    }
    assert "circuitdyn.runs.checkpoints" not in reach(typed, "circuitdyn.analysis.extra")
    not_a_hook = {
        **sources,
        "circuitdyn.analysis.extra": "class R:\n    def figure(self):\n        from circuitdyn import viz\n",
    }
    assert backwards(not_a_hook) == ["circuitdyn.analysis.extra (R.figure) imports circuitdyn.viz: analysis -> viz"]
