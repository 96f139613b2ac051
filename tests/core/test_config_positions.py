"""``file:line`` of recipe errors comes from PyYAML's node marks: nested keys, repeated keys, lists, flow style."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.config import load_recipe
from core.config.loader import _line_of
from core.errors import DinoscopeError


@dataclass
class Leaf:
    c: int = 0


@dataclass
class Section:
    x: Leaf = field(default_factory=Leaf)
    c: int = 0


@dataclass
class Item:
    c: int = 0
    name: str = ""


@dataclass
class Recipe:
    b: Section = field(default_factory=Section)
    items: list[Item] = field(default_factory=list)


def _error(tmp_path: Path, text: str) -> DinoscopeError:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(DinoscopeError) as err:
        load_recipe(Recipe, path)
    return err.value


def test_nested_typo_names_its_own_line(tmp_path: Path) -> None:
    err = _error(tmp_path, "b:\n  c: 1\n  x:\n    cc: 2\n")
    assert err.path == f"{tmp_path / 'recipe.yaml'}:4" and err.field == "b.x.cc" and "'c'" in err.fix


def test_key_repeated_at_two_depths_gives_the_line_of_the_right_one(tmp_path: Path) -> None:
    # b.x.c comes first and is deeper: an indentation scan stops there, but the bad value is b.c on line 4
    err = _error(tmp_path, "b:\n  x:\n    c: 1\n  c: oops\n")
    assert err.field == "b.c" and err.path == f"{tmp_path / 'recipe.yaml'}:4"


def test_keys_in_flow_style_and_list_items_are_found(tmp_path: Path) -> None:
    err = _error(tmp_path, "items:\n  - c: 1\nb: {x: {c: 1}, cc: 2}\n")
    assert err.field == "b.cc" and err.path.endswith("recipe.yaml:3")
    # OmegaConf names a key inside a list element without its path; a unique key is still placed ...
    err = _error(tmp_path, "items:\n  - c: 1\n  - name: a\n    cc: 3\n")
    assert err.field == "cc" and err.path.endswith("recipe.yaml:4")
    # ... and an ambiguous one gets no line rather than a wrong one
    err = _error(tmp_path, "items:\n  - c: 1\n  - {name: a, c: bad}\n")
    assert err.field == "c" and err.path == str(tmp_path / "recipe.yaml")


def test_line_of_dotted_and_indexed_paths(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "a:\n  list:\n    - k: 1\n    - k: 2\n      deep: {k: 3}\n  k: 4\n"
        "note: |\n  k: not a key\ndup: 1\ndup: 2\nanchor: &x {k: 5}\nalias: *x\n"
    )
    assert _line_of(path, "a.list[1].k") == 4 and _line_of(path, "a.list.1.k") == 4
    assert _line_of(path, "a.list[1].deep.k") == 5 and _line_of(path, "a.k") == 6
    assert _line_of(path, "dup") == 10  # the later duplicate is the value safe_load keeps
    assert _line_of(path, "alias.k") == 11  # keys reached through an alias point at the anchored mapping
    assert _line_of(path, "k") is None  # k occurs at several paths (never inside the block scalar)
    assert _line_of(path, "a.missing") is None and _line_of(tmp_path / "absent.yaml", "a") is None
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    assert _line_of(tmp_path / "bad.yaml", "a") is None
