"""Import contract: the layers of ``../shared/design/layers.md`` hold.

The import graph is read from the sources with ``ast`` (module-level *and* function-level imports, so a deferred
import cannot hide a cycle), then checked for:

* cycles between modules of ``core``, ``geodino`` and ``bio``;
* ``core`` importing a domain package;
* two ``core`` sub-packages importing each other (both directions);
* schema modules (``core/config``, ``geodino/config.py``, ``bio/config.py``) importing anything of their package but
  errors and other schemas;
* a source folder named ``dist`` or ``build`` (tools and ``.gitignore`` templates skip such folders).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "geodino", "bio")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _imports(module: str) -> Iterator[tuple[str, int]]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name)) is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                if target is not None:
                    yield target, node.lineno


GRAPH = {m: {t for t, _ in _imports(m) if t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_between_modules() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_never_imports_a_domain() -> None:
    offenders = [
        (m, t)
        for m, targets in GRAPH.items()
        if m.startswith("core")
        for t in targets
        if t.split(".")[0] in ("geodino", "bio")
    ]
    assert offenders == []


def _core_subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "core" and len(parts) > 1 and (ROOT / "core" / parts[1]).is_dir() else None


def test_core_subpackages_form_layers() -> None:
    edges: dict[tuple[str, str], tuple[str, str]] = {}
    for module, targets in GRAPH.items():
        source = _core_subpackage(module)
        for target in targets:
            destination = _core_subpackage(target)
            if source and destination and source != destination:
                edges.setdefault((source, destination), (module, target))
    both_ways = sorted((a, b, edges[(a, b)], edges[(b, a)]) for a, b in edges if (b, a) in edges and a < b)
    assert both_ways == []


def test_schema_modules_import_only_errors_and_schemas() -> None:
    schemas = [m for m in MODULES if m.startswith("core.config") and m != "core.config.kinds"]
    schemas += [m for m in ("geodino.config", "bio.config") if m in MODULES]
    allowed = ("core.errors", "core.config", "core.lazy")
    offenders = [(m, t) for m in schemas for t in GRAPH[m] if not t.startswith(allowed)]
    assert offenders == []


def test_no_source_folder_is_named_dist_or_build() -> None:
    folders = [p for package in PACKAGES for p in (ROOT / package).rglob("*") if p.is_dir()]
    assert [str(p) for p in folders if p.name in ("dist", "build")] == []


def test_no_source_file_exceeds_400_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for folder in (*PACKAGES, "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > 400
    ]
    assert not long, long
