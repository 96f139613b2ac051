"""Strict recipe loading: typed dataclass schema <- YAML recipe <- ``key=value`` overrides.

Errors are raised before anything runs and name the key, the file and line where possible, and the valid choices
(with the closest match for a typo). The resolved recipe is a plain dataclass object; derived values (scaled
learning rate, iteration counts) are computed by the code that needs them and never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from core.config.fields import check_rules
from core.errors import DinoscopeError

T = TypeVar("T")


def _line_of(path: Path | None, dotted: str) -> int | None:
    """1-based line of the key ``dotted`` in a YAML file, from PyYAML's node marks (``a.b``, list items ``a[0].b``).

    The exact path wins; a duplicated key gives its last occurrence (the one ``safe_load`` keeps). OmegaConf reports
    keys inside list elements without their path (``cc`` for ``items[1].cc``), so a key not found at its full path
    is located only if exactly one key path in the file ends with it: an ambiguous key gives no line, never a wrong one.
    """
    if path is None or not path.exists():
        return None
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    parts = tuple(re.findall(r"[^.\[\]]+", dotted))
    if root is None or not parts:
        return None
    keys = list(_key_lines(root, (), set()))
    exact = [line for key_path, line in keys if key_path == parts]
    if exact:
        return exact[-1]
    ending = [line for key_path, line in keys if key_path[-len(parts) :] == parts]
    return ending[0] if len(ending) == 1 else None


def _key_lines(node: yaml.Node, prefix: tuple[str, ...], walking: set[int]) -> Iterator[tuple[tuple[str, ...], int]]:
    """``(key path, line)`` for every mapping key under ``node``; list items add their index to the path."""
    if id(node) in walking:  # a recursive anchor (``a: &x [*x]``) would otherwise never end
        return
    walking.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            key_path = (*prefix, str(key.value))
            yield key_path, key.start_mark.line + 1
            yield from _key_lines(value, key_path, walking)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _key_lines(item, (*prefix, str(index)), walking)
    walking.discard(id(node))


def _fields_at(schema: type, dotted_parent: str) -> list[str]:
    cls: Any = schema
    for part in [p for p in dotted_parent.split(".") if p]:
        hints = typing.get_type_hints(cls)
        cls = hints.get(part)
        if not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _recipe_error(err: OmegaConfBaseException, schema: type, path: Path | None, source: str) -> DinoscopeError:
    key = str(getattr(err, "full_key", "") or "")
    parent, _, leaf = key.rpartition(".")
    line = _line_of(path, key) if source == "file" else None
    where = f"{path}:{line}" if line else (str(path) if path and source == "file" else None)
    if isinstance(err, ConfigKeyError) or "Key '" in str(err) and "not in struct" in str(err):
        valid = _fields_at(schema, parent)
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]!r}? " if close else ""
        origin = "on the command line" if source == "cli" else "in the recipe"
        return DinoscopeError(
            f"unknown key {key!r} {origin}",
            path=where,
            field=key,
            fix=f"{hint}valid keys{' under ' + parent if parent else ''}: {', '.join(valid)}",
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return DinoscopeError(
            f"wrong type for {key!r}: {msg}",
            path=where,
            field=key,
            fix="give a value of the type the schema declares (see recipes/README.md)",
        )
    return DinoscopeError(str(err).splitlines()[0], path=where, field=key or None)


def _open_free_dicts(node: Any) -> None:
    """Plain ``dict[str, Any]`` fields (e.g. dataset ``params``) accept any key; their factory checks them."""
    if not isinstance(node, DictConfig):
        return
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (dict, None):
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def load_recipe(
    schema: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    kinds: tuple[str, ...] | None = None,
) -> T:
    """Merge ``schema`` defaults, the YAML file at ``path`` and ``a.b=c`` overrides, strictly, into a ``schema``.

    ``kinds``: the recipe kinds this schema stands for; a file whose ``kind:`` is another one is refused (a typo
    such as ``kind: pretrian`` would otherwise be ignored). ``None`` accepts any ``kind:``.
    """
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    _open_free_dicts(base)
    rpath = Path(path) if path is not None else None
    cfg = base
    if rpath is not None:
        if not rpath.is_file():
            what = "is a directory, not a recipe file" if rpath.is_dir() else "recipe not found"
            raise DinoscopeError(what, path=rpath, fix="give a YAML recipe file (recipes live under recipes/)")
        try:
            data = yaml.safe_load(rpath.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{rpath}:{mark.line + 1}" if mark else rpath
            raise DinoscopeError(f"the recipe is not valid YAML ({getattr(err, 'problem', err)})", path=where) from None
        if not isinstance(data, dict):
            raise DinoscopeError("a recipe must be a mapping of sections", path=rpath)
        if "kind" not in _fields_at(schema, ""):
            kind = data.pop("kind", None)
            if kinds is not None and kind is not None and kind not in kinds:
                line = _line_of(rpath, "kind")
                close = difflib.get_close_matches(str(kind), kinds, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise DinoscopeError(
                    f"this command runs recipes of kind {' or '.join(map(repr, kinds))}, not {kind!r}",
                    path=f"{rpath}:{line}" if line else rpath,
                    field="kind",
                    fix=f"{hint}`dinoscope launch RECIPE` runs a recipe of any kind",
                )
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except OmegaConfBaseException as err:
            raise _recipe_error(err, schema, rpath, "file") from None
    for item in overrides or []:
        if "=" not in item:
            raise DinoscopeError(f"override {item!r} is not key=value", field=item, fix="e.g. optim.base_lr=0.001")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _recipe_error(err, schema, rpath, "cli") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _recipe_error(err, schema, rpath, "file") from None
    check_rules(obj, rpath)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(rpath)
    return obj  # type: ignore[return-value]


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def check_kwargs(factory: Any, params: dict[str, Any], field: str, path: str | os.PathLike | None = None) -> None:
    """Reject keyword arguments that ``factory`` does not take, listing the valid ones."""
    sig = inspect.signature(factory)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DinoscopeError(
                f"unknown key {field}.{key!r}",
                path=path,
                field=f"{field}.{key}",
                fix=f"{hint}valid keys: {', '.join(valid)}",
            )
    missing = [
        n
        for n, p in sig.parameters.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in params
    ]
    if missing:
        raise DinoscopeError(f"missing required keys {missing} in {field}", path=path, field=f"{field}.{missing[0]}")
