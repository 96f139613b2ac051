"""Field metadata that recipe schemas declare and services read, and the walker that finds it.

A schema marks the fields that name inputs (files, directories, globs that must exist before a run starts)::

    @dataclass
    class PredictCfg:
        model: str = input_path()                                  # one path
        inputs: list[str] = input_path(default_factory=list)       # a list (or list of lists) of paths
        out: str = ""                                              # written by the run: not an input

A field a command exposes as a flag or positional argument is declared once with :func:`option`: its default,
help, allowed values or range, and its flag names. :mod:`core.cli.adapter` builds the sub-command from these and
:func:`check_rules` enforces the choices and range on every resolved recipe (YAML, flags and overrides alike)::

    tile: int = option(256, help="tile side in pixels", minimum=32)
    dtype: str = option("float32", help="output pixel type", choices=("float32", "uint16"))

Free-form keyword arguments of a dataset factory (``data.params``) are marked with :func:`dataset_params`: which of
them are paths is declared by the dataset kind itself (``factory.input_params``, see :mod:`core.data.datasets`),
since only the kind knows its keywords. ``dinoscope launch`` (:func:`core.launch.input_paths`) reads both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from core.errors import DinoscopeError

INPUT_PATH = "input_path"
OUTPUT_PATH = "output_path"  # value: "file" or "dir"
OPTION = "option"
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


@dataclasses.dataclass(frozen=True)
class Option:
    """How a schema field appears on the command line, and the values it allows.

    Attributes:
        help: one line for ``--help``.
        flags: flag names; default ``--<field-name>`` with ``_`` as ``-``. Empty with ``positional``.
        positional: a positional argument (a list field takes any number of values).
        metavar: the placeholder shown in ``--help``.
        choices: allowed values (checked for every source: YAML, flags, ``key=value``).
        minimum, maximum: allowed range, inclusive.
        above, below: exclusive bounds (a learning rate is ``above=0``).
        switches: extra flags that set a fixed value, e.g. ``(("--float16", "float16"),)``.
        comma_list: a list field given as one comma-separated value (``--channels DNA,RNA``).
        cli: ``False`` keeps the rules but adds no flag (the field is set by YAML or ``key=value`` only).
    """

    help: str = ""
    flags: tuple[str, ...] = ()
    positional: bool = False
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    switches: tuple[tuple[str, Any], ...] = ()
    comma_list: bool = False
    cli: bool = True

    def bounds_text(self) -> str:
        """The allowed range in words, e.g. ``from 1``, ``0..1``, ``> 0``."""
        low = f">= {self.minimum}" if self.minimum is not None else f"> {self.above}" if self.above is not None else ""
        high = f"<= {self.maximum}" if self.maximum is not None else f"< {self.below}" if self.below is not None else ""
        if self.minimum is not None and self.maximum is not None:
            return f"{self.minimum}..{self.maximum}"
        if low and not high:
            return f"from {self.minimum}" if self.minimum is not None else low
        return " and ".join(part for part in (low, high) if part)

    def in_bounds(self, value: float) -> bool:
        """Whether ``value`` lies within the declared bounds."""
        return not (
            (self.minimum is not None and value < self.minimum)
            or (self.maximum is not None and value > self.maximum)
            or (self.above is not None and value <= self.above)
            or (self.below is not None and value >= self.below)
        )


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flags: tuple[str, ...] | str = (),
    positional: bool = False,
    metavar: str | None = None,
    choices: tuple[Any, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    switches: tuple[tuple[str, Any], ...] = (),
    comma_list: bool = False,
    cli: bool = True,
    is_input: bool = False,
    output: str | None = None,
) -> Any:
    """A dataclass field with its command-line form and rules (see :class:`Option`).

    A list or dict default is copied per instance. ``is_input=True`` also marks the field as an input path
    (:func:`input_path`), so ``dinoscope launch`` checks it exists before anything starts. ``output="file"`` or
    ``"dir"`` marks what the command writes, so an existing output is never replaced silently
    (:mod:`core.cli.outputs`).
    """
    spec = Option(
        help=help,
        flags=(flags,) if isinstance(flags, str) else tuple(flags),
        positional=positional,
        metavar=metavar,
        choices=tuple(choices) if choices is not None else None,
        minimum=minimum,
        maximum=maximum,
        above=above,
        below=below,
        switches=tuple(switches),
        comma_list=comma_list,
        cli=cli,
    )
    metadata: dict[str, Any] = {OPTION: spec}
    if is_input:
        metadata[INPUT_PATH] = True
    if output is not None:
        if output not in ("file", "dir"):
            raise ValueError(f"output must be 'file' or 'dir', got {output!r}")
        metadata[OUTPUT_PATH] = output
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_rules(recipe: Any, path: str | os.PathLike | None = None) -> None:
    """Raise a :class:`~core.errors.DinoscopeError` naming the key when a value breaks its :class:`Option`'s
    choices or range."""
    for ref in walk_fields(recipe):
        spec = ref.metadata.get(OPTION)
        if spec is None:
            continue
        values = ref.value if isinstance(ref.value, list) else [ref.value]
        for value in values:
            if spec.choices is not None and value not in spec.choices:
                raise DinoscopeError(
                    f"{ref.key} is {value!r}", path=path, field=ref.key, fix=f"use one of {list(spec.choices)}"
                )
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not spec.in_bounds(value):
                bounds = spec.bounds_text()
                plain = bounds[0].isdigit() or bounds.startswith("from")
                raise DinoscopeError(
                    f"{ref.key} is {value}, outside its range",
                    path=path,
                    field=ref.key,
                    fix=f"use {bounds}" if plain else f"use a value {bounds}",
                )


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
