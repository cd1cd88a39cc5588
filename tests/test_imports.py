"""No import cycles between fedlora modules, and no runtime importing another runtime's internals.

The graph is read from the source (ast): an edge for every module-level ``import``/``from ... import`` of a
fedlora module, except those under ``if TYPE_CHECKING:`` (never executed). Imports inside functions are deferred
on purpose (to keep ``fedlora methods`` free of torch) and are not edges of the import-time graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "fedlora").rglob("*.py")}
    # An import of an ancestor package is no edge: Python has imported it before the module (``from fedlora import
    # registry`` inside fedlora.config names the package fedlora only to reach fedlora.registry).
    return {name: {m for m in top_level_imports(path, name) if m in files and m != name and not name.startswith(m + ".")}
            for name, path in files.items()}


def test_no_import_cycles_between_fedlora_modules() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            dfs(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_no_runtime_imports_another_runtimes_internals() -> None:
    edges = graph()
    flower = {m for m in edges if m.startswith("fedlora.runtime.flower")}
    embedded = {"fedlora.runtime.simulation"}
    for module in flower:
        assert not edges[module] & embedded, (module, edges[module] & embedded)
    assert not edges["fedlora.runtime.simulation"] & flower
