"""Field metadata that recipe schemas declare and services read, and the walker that finds it.

A schema marks the fields that name inputs (files, directories, globs that must exist before a run starts)::

    @dataclass
    class PredictCfg:
        model: str = input_path()                                  # one path
        inputs: list[str] = input_path(default_factory=list)       # a list (or list of lists) of paths
        out: str = ""                                              # written by the run: not an input

Free-form keyword arguments of a dataset factory (``data.params``) are marked with :func:`dataset_params`: which of
them are paths is declared by the dataset kind itself (``factory.input_params``, see :mod:`core.data.datasets`),
since only the kind knows its keywords. ``dinoscope launch`` (:func:`core.launch.input_paths`) reads both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

INPUT_PATH = "input_path"
# Value: the name of the sibling field that holds the dataset kind whose factory receives the dict.
DATASET_PARAMS_OF = "dataset_params_of"


def input_path(default: str = "", *, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field naming an input path (or, with ``default_factory=list``, a list of them)."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={INPUT_PATH: True})
    return dataclasses.field(default=default, metadata={INPUT_PATH: True})


def dataset_params(kind_field: str = "kind") -> Any:
    """A ``dict`` field of keyword arguments for the dataset factory named by the sibling field ``kind_field``."""
    return dataclasses.field(default_factory=dict, metadata={DATASET_PARAMS_OF: kind_field})


class FieldRef(NamedTuple):
    """One dataclass field met by :func:`walk_fields`: dotted recipe key, value, metadata and owning instance."""

    key: str
    value: Any
    metadata: Mapping[str, Any]
    owner: Any


def walk_fields(node: Any, prefix: str = "") -> Iterator[FieldRef]:
    """Every field of a dataclass instance, depth first, descending into nested dataclasses and lists of them.

    Free-form values (dicts, strings) are not descended into: their meaning is the field's metadata's business.
    """
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        yield FieldRef(key, value, f.metadata, node)
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk_fields(item, f"{key}.{i}.")
        else:
            yield from walk_fields(value, f"{key}.")
