"""Imports: each module of agent/ and tools/ loads alone, and no new import cycle appears.

Like aiohttp's tests/test_circular_imports.py: every module imported on its own in a fresh
interpreter with warnings as errors (a module that only works after another one was imported
first, or that warns on import, fails here). And, read from the source (the AST, nothing run),
the graph of module-level imports between our modules, those for types included: a cycle in
it makes the order of imports matter and the modules one lump. Cycles that exist today are
listed, by name, below: a new one fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lantern.agent", "lantern.tools")

# Import cycles known today, each a strongly connected set of modules. Remove an entry when
# its cycle is gone; never add one (break the cycle instead: pass the other side what it needs).
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = ("lantern", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    # lantern/agent and lantern/tools are the repository's agent/ and tools/ (see lantern/)
    return {module_name(p): p for pkg in ("agent", "tools")
            for p in sorted((ROOT / pkg).rglob("*.py"))}


ALL = modules()


@pytest.mark.parametrize("name", sorted(ALL))
def test_module_imports_alone_without_warnings(name: str) -> None:
    r = subprocess.run([sys.executable, "-W", "error", "-c", f"import {name}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def _top_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """A module's own imports: those it runs when it loads, and those under
    `if TYPE_CHECKING:` (a module that needs another's types depends on it too: two modules
    that import each other only for types are still one lump). Not the imports inside
    functions: those defer a dependency on purpose (a plug-in loaded when configured)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody,
                         *(h.body for h in node.handlers)):
                yield from _top_level_imports(part)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _top_level_imports(node.body)


def imports_of(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports when it loads."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = node.module or ""
            base = (f"{base}.{mod}" if base and mod else base or mod) if node.level else mod
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        out |= {t for t in targets if t in ALL and t != name and t not in PACKAGES}
    return out


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.add(frozenset(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_new_import_cycle() -> None:
    graph = {name: imports_of(name, path) for name, path in ALL.items()}
    new = cycles(graph) - KNOWN_CYCLES
    assert not new, [sorted(c) for c in new]


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == {frozenset({"a", "b", "c"})}
