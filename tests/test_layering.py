"""The package's floors hold: no module imports another that imports it back (imports inside
functions count), and lower floors never import higher ones (model/ knows nothing of training,
processes, generation or interop; parallel/ nothing of training)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moelab"


def _module(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (``from a import b``
    counts as importing ``a.b`` when that is a module). A package's ``__init__`` importing its own
    children, and a child importing its parent package, are left out: Python runs the parent's
    ``__init__`` first either way, so neither is a cycle between two concerns."""
    files = {_module(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = name if is_pkg else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)]
                    mod = ".".join(anchor + ([mod] if mod else []))
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name and not (is_pkg and t.startswith(name + ".")) \
                        and not (files[t].name == "__init__.py" and name.startswith(t + ".")):
                    found.add(t)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize("floor,above", [
    ("moelab.model", ("moelab.train", "moelab.parallel", "moelab.generate", "moelab.interop",
                      "moelab.runfolder", "moelab.compare", "moelab.inspect", "moelab.commands")),
    ("moelab.parallel", ("moelab.train", "moelab.generate", "moelab.interop", "moelab.compare",
                         "moelab.inspect", "moelab.commands")),
    ("moelab.config", ("moelab.",)),
])
def test_lower_floors_never_import_higher_ones(floor, above):
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if m == floor or m.startswith(floor + ".")
                 for t in targets if any(t == a or t.startswith(a if a.endswith(".") else a + ".") for a in above))
    assert not bad, f"{floor} reaches up: {bad}"
