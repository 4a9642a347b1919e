"""No import cycle among alssl's modules: every `import` / `from ... import` (module level or inside a function) is an
edge, and importing `alssl.a.b` also runs the package `alssl.a`. (The root `alssl/__init__.py` is left out: it
re-exports lazily, and every module would otherwise close a cycle through it.)"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "alssl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """{module: the alssl modules it imports} for every .py file under alssl/."""
    files = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x / from .a import b
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets.add(mod)
                targets |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in files}  # a submodule
        edges = set()
        for t in targets:
            parts = t.split(".")
            # the module itself and the packages it runs on the way (alssl.a for alssl.a.b), not the root alssl
            edges |= {".".join(parts[:k]) for k in range(2, len(parts) + 1) if ".".join(parts[:k]) in files}
        edges.discard(name)
        graph[name] = {e for e in edges if not name.startswith(e + ".")}  # a submodule runs inside its own package
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "alssl.rounds" in graph["alssl.api"]  # the api imports rounds only inside its functions
    assert "alssl.labeling.files" in graph["alssl.rounds"]


def test_no_import_cycle_in_alssl():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
