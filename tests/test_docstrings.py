"""Documentation contract: at least 90% of the public functions, classes and methods of ``core``, ``geodino`` and
``bio`` carry a docstring, and no docstring points readers at notes that are not in this repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "geodino", "bio")
MIN_COVERAGE = 0.90
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _public(node: ast.AST) -> bool:
    return isinstance(node, Definition) and not node.name.startswith("_")


def _public_definitions() -> list[tuple[str, bool]]:
    """``(path:line name, has_docstring)`` for module-level public definitions and public methods of public classes."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                if not _public(node):
                    continue
                members = [m for m in node.body if _public(m)] if isinstance(node, ast.ClassDef) else []
                for item in (node, *members):
                    where = f"{path.relative_to(ROOT)}:{item.lineno} {item.name}"
                    found.append((where, ast.get_docstring(item) is not None))
    return found


def test_most_public_definitions_have_docstrings() -> None:
    found = _public_definitions()
    missing = [where for where, documented in found if not documented]
    coverage = 1 - len(missing) / len(found)
    assert coverage >= MIN_COVERAGE, f"{coverage:.1%} documented; first undocumented:\n" + "\n".join(missing[:40])


def test_docstrings_cite_no_notes_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|shared/reference|reference/[a-z]+\.md")
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if outside.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these modules point at notes that are not in this repository: {offenders}"
