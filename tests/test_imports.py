"""No import cycles among our modules, lazy imports (inside functions) included: each module's
imports, read from its source, form a graph without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def our_modules() -> dict[str, Path]:
    files = {f"compress.{p.stem}": p for p in (ROOT / "compress").glob("*.py")}
    files |= {f"compress.kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")}
    files.pop("compress.__init__")  # the package re-exports the API: it imports, nothing imports it back
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `name` imports anywhere in its source (top level or inside functions)."""
    package = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = f"{package}.{base}" if base else package
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return (found & known) - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_and_lazy_imports_are_seen(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from .grid import rtn\n\ndef f():\n    from . import obs\n    import compress.stats\n")
    known = {"compress.grid", "compress.obs", "compress.stats", "compress.m"}
    assert imports_of("compress.m", src, known) == {"compress.grid", "compress.obs", "compress.stats"}


def test_no_import_cycles():
    modules = our_modules()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
