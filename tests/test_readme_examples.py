"""The README's notebook examples run as printed, and the notebook entry points are exported with examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import bio
import geodino

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## From a notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_has_one_example_per_domain() -> None:
    blocks = _python_blocks()
    assert len(blocks) == 2
    assert "from geodino import" in blocks[0] and "from bio import" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["canopy", "cells"])
def test_readme_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks()[index], f"README.md example {index}", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out
    if index == 0:
        assert (tmp_path / "eval" / "metrics.json").exists()
        assert "p95" in printed and printed.strip().endswith("0.0")  # a CHM against itself: MAE 0
    else:
        assert "['DNA', 'Mito'] (2, 96, 96)" in printed


@pytest.mark.parametrize("package", [geodino, bio], ids=["geodino", "bio"])
def test_exported_entry_points_resolve_and_show_an_example(package: object) -> None:
    assert package.__all__
    for name in package.__all__:
        obj = getattr(package, name)
        assert "Example::" in (obj.__doc__ or ""), f"{package.__name__}.{name} has no example in its docstring"
