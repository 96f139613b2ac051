"""One adapter builds every ``dinoscope`` sub-command from its schema.

A :class:`Command` names a recipe schema (a dataclass whose fields declare their flags once, with
:func:`core.config.fields.option`), optional run switches (a second such dataclass for what is not part of the
recipe, e.g. ``--no-resume``) and the service that runs it as ``"module:function"``, imported only when the command
runs so that ``dinoscope --help`` loads neither torch nor rasterio. Every sub-command then has the same shape::

    dinoscope canopy predict scene.tif --model m.safetensors --out chm.tif tile=512   # flags, then key=value
    dinoscope canopy predict --recipe predict.yaml --set batch_size=16                # a recipe file
    dinoscope canopy predict --recipe predict.yaml --print-recipe                     # the resolved recipe, as YAML

Precedence, lowest first: schema defaults, the recipe file, flags, ``--set`` items, trailing ``key=value`` items.
The strict loader (:func:`core.config.load_recipe`) checks the merged result, so an unknown key or a value outside
its declared range fails before anything runs, with the key named.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml

from core.cli.outputs import OutputGuard, describe_up_to_date, has_outputs
from core.config.fields import OPTION, Option, check_rules
from core.config.loader import load_recipe, to_yaml
from core.errors import DinoscopeError

log = logging.getLogger("dinoscope")
_OVERRIDE = re.compile(r"^([A-Za-z_]\w*)(\.\w+)*=")


@dataclasses.dataclass(frozen=True)
class Command:
    """A sub-command: its schema, its run switches and the service that runs it.

    Attributes:
        name: the sub-command's name (``predict`` in ``dinoscope canopy predict``).
        help: one line for the parent's ``--help``.
        service: ``"module:function"``, called as ``function(recipe, options, invocation)``: the typed recipe, the
            run switches and the :class:`Invocation` (for run records). Without a ``schema`` (the recipe file's own
            ``kind`` picks it, as for ``launch``) ``recipe`` is ``None`` and the service loads it.
        schema: the recipe dataclass.
        options: a dataclass of run switches (flags that are not recipe keys); ``None`` when there are none.
        prefixed: ``(prefix, dataclass)`` pairs whose flags become ``prefix.key=value`` overrides.
        description: the paragraph under ``usage`` in ``--help``.
        examples: shown at the end of ``--help``, verbatim.
        recipe_positional: the first positional argument is the recipe file (``dinoscope pretrain RECIPE``).
        kinds: the recipe kinds the schema stands for; a recipe file of another ``kind:`` is refused. Empty: the
            schema is not a recipe kind, so a file with any ``kind:`` key is refused.
    """

    name: str
    help: str
    service: str
    schema: type | None = None
    options: type | None = None
    prefixed: tuple[tuple[str, type], ...] = ()
    description: str = ""
    examples: str = ""
    recipe_positional: bool = False
    kinds: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Invocation:
    """How a command was called: the recipe file, every ``key=value`` override (flags first, as merged), and
    whether only the resolved recipe is to be printed."""

    recipe_path: str | None
    overrides: list[str]
    print_recipe: bool


@dataclasses.dataclass(frozen=True)
class _Arg:
    key: str  # dotted recipe key (``data.sources``), ``prefix.key``, or an options field
    dest: str
    spec: Option
    type: Any
    default: Any
    to_options: bool


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _schema_args(schema: type, prefix: str, to_options: bool) -> Iterator[_Arg]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = _unwrap_optional(hints[f.name])
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _schema_args(tp, f"{key}.", to_options)
            continue
        spec = f.metadata.get(OPTION)
        if spec is not None and spec.cli:
            yield _Arg(key, f"{'option' if to_options else 'recipe'}:{key}", spec, tp, _field_default(f), to_options)


def command_args(command: Command) -> list[_Arg]:
    """Every command-line argument of ``command``, from its schemas' field metadata."""
    args: list[_Arg] = []
    if command.schema is not None:
        args += _schema_args(command.schema, "", False)
    for prefix, schema in command.prefixed:
        args += _schema_args(schema, f"{prefix}.", False)
    if command.options is not None:
        args += _schema_args(command.options, "", True)
    return args


def _scalar(tp: Any) -> Callable[[str], Any]:
    return tp if tp in (int, float) else str


def _comma_list(elem: Any) -> Callable[[str], list]:
    convert = _scalar(elem)
    return lambda text: [convert(part.strip()) for part in text.split(",") if part.strip()]


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, yaml.safe_load(value)


def _help_text(arg: _Arg) -> str:
    shown = arg.default not in (None, "", [], {}) and not isinstance(arg.default, bool)
    return f"{arg.spec.help} (default: {arg.default})" if shown and not arg.spec.positional else arg.spec.help


def _add_argument(parser: argparse.ArgumentParser, arg: _Arg) -> None:
    spec, tp = arg.spec, arg.type
    origin = typing.get_origin(tp)
    kwargs: dict[str, Any] = {"default": None, "help": _help_text(arg)}
    if origin is list:
        elem = (typing.get_args(tp) or (str,))[0]
        if spec.comma_list:
            kwargs["type"] = _comma_list(elem)
        else:
            kwargs.update(type=_scalar(elem), nargs="*" if spec.positional else "+")
    elif origin is dict or tp is dict:
        kwargs.update(type=_key_value, nargs="+", metavar=spec.metavar or "KEY=VALUE")
    elif tp is bool:
        # Run switches only ever turn something on; a recipe's booleans need both forms (`--resume/--no-resume`)
        # because the recipe file may have set either.
        kwargs["action"] = "store_true" if arg.to_options else argparse.BooleanOptionalAction
    else:
        kwargs["type"] = _scalar(tp)
        if spec.positional:
            kwargs["nargs"] = "?"
    if spec.choices is not None and tp is not bool:
        kwargs["choices"] = spec.choices
    if tp is not bool and "metavar" not in kwargs and spec.choices is None:
        kwargs["metavar"] = spec.metavar or arg.key.rpartition(".")[2].upper()
    if spec.positional:
        parser.add_argument(arg.dest, **kwargs)
        return
    flags = spec.flags or ("--" + arg.key.rpartition(".")[2].replace("_", "-"),)
    parser.add_argument(*flags, dest=arg.dest, **kwargs)
    for flag, value in spec.switches:
        parser.add_argument(flag, dest=arg.dest, action="store_const", const=value, help=f"same as {flags[0]} {value}")


def add_command(subparsers: argparse._SubParsersAction, command: Command) -> argparse.ArgumentParser:
    """Add ``command`` to ``subparsers``: its schema's flags, ``--recipe``, ``--set``, ``--print-recipe`` and
    trailing ``key=value`` overrides (collected by :func:`core.cli.main`)."""
    parser = subparsers.add_parser(
        command.name,
        help=command.help,
        description=textwrap.fill(command.description or command.help, width=100),
        epilog=command.examples or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command.recipe_positional:
        parser.add_argument("recipe_positional", nargs="?", metavar="RECIPE", help="YAML recipe (see recipes/)")
    specs = command_args(command)
    for arg in specs:
        _add_argument(parser, arg)
    parser.add_argument("--recipe", dest="recipe_file", metavar="FILE", help="YAML recipe; flags override it")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="override any recipe key (repeatable); trailing KEY=VALUE items do the same",
    )
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    if command.schema is not None and has_outputs(command.schema):
        parser.add_argument(
            "--overwrite",
            dest="overwrite_outputs",
            action="store_true",
            help="replace an existing output made with other settings or inputs, or by another tool",
        )
    parser.set_defaults(func=lambda args: run_command(command, specs, args), overrides=[])
    return parser


def add_group(
    subparsers: argparse._SubParsersAction, name: str, help: str, commands: Sequence[Command], description: str = ""
) -> argparse.ArgumentParser:
    """A parent command (``dinoscope canopy``) whose sub-commands are ``commands``."""
    group = subparsers.add_parser(name, help=help, description=description or help)
    sub = group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")
    sub.required = True
    for command in commands:
        add_command(sub, command)
    return group


def _split_overrides(value: Any, roots: set[str]) -> tuple[Any, list[str]]:
    """Positional values that are really ``key=value`` overrides (argparse cannot tell them apart)."""
    items = value if isinstance(value, list) else [value]
    moved = [v for v in items if isinstance(v, str) and (m := _OVERRIDE.match(v)) and m.group(1) in roots]
    if not moved:
        return value, []
    kept = [v for v in items if v not in moved]
    return (kept if isinstance(value, list) else None), moved


def _as_yaml_value(arg: _Arg, value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], tuple):  # KEY=VALUE items of a dict field
        value = dict(value)
    return json.dumps(value)


def _load_service(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def run_command(command: Command, specs: list[_Arg], args: argparse.Namespace) -> int:
    """Merge recipe file, flags and overrides into the typed recipe, then run the command's service."""
    roots = {a.key.split(".")[0] for a in specs if not a.to_options}
    if command.schema is not None:
        roots |= {f.name for f in dataclasses.fields(command.schema)}
    roots |= {prefix for prefix, _ in command.prefixed}
    recipe_path = args.recipe_file
    moved: list[str] = []
    if command.recipe_positional and args.recipe_positional is not None:
        positional, moved = _split_overrides(args.recipe_positional, roots)
        if recipe_path and positional:
            raise DinoscopeError(
                f"two recipes given ({positional} and --recipe {recipe_path})", field="RECIPE", fix="give one"
            )
        recipe_path = recipe_path or positional
    flag_overrides: list[str] = []
    option_values: dict[str, Any] = {}
    for arg in specs:
        value = getattr(args, arg.dest, None)
        if arg.spec.positional:
            value, extra = _split_overrides(value, roots)
            moved += extra
        if value is None or value == []:
            continue
        if arg.to_options:
            option_values[arg.key] = value
        else:
            flag_overrides.append(f"{arg.key}={_as_yaml_value(arg, value)}")
    overrides = flag_overrides + moved + list(args.overrides or [])
    options = None
    if command.options is not None:
        options = command.options(**option_values)
        check_rules(options)
    service = _load_service(command.service)
    invocation = Invocation(recipe_path, overrides, args.print_recipe)
    if command.schema is None:
        return int(service(None, options, invocation) or 0)
    recipe = load_recipe(command.schema, recipe_path, overrides, kinds=command.kinds)
    if args.print_recipe:
        print(to_yaml(recipe), end="")
        return 0
    guard = OutputGuard(
        f"{command.name} ({command.schema.__name__})", recipe, getattr(args, "overwrite_outputs", False)
    )
    if guard.up_to_date():
        log.info(describe_up_to_date(guard))
        return 0
    status = int(service(recipe, options, invocation) or 0)
    if status == 0:
        guard.record()
    return status
