"""The ``dinoscope`` command line.

Sub-commands from ``core`` are listed in :data:`CORE_COMMANDS`. Domain packages add theirs through the
entry-point group ``dinoscope.commands``: each entry point is a ``register(subparsers)`` function. This keeps
``core`` free of any import of ``geodino`` or ``bio``.

Every sub-command handler takes the parsed namespace and returns an exit status. A
:class:`~core.errors.DinoscopeError` becomes a one-paragraph message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from core.errors import DinoscopeError, TrainingInterrupted

log = logging.getLogger("dinoscope")

# name -> module holding a ``register(subparsers)`` function; imported lazily so ``--help`` stays fast.
CORE_COMMANDS: dict[str, str] = {
    "weights": "core.cli.weights",
    "pretrain": "core.cli.pretrain",
    "eval": "core.cli.evaluate",
    "launch": "core.cli.launch",
    "demo": "core.cli.demo",
}


def _plugin_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    registrars = []
    for ep in entry_points(group="dinoscope.commands"):
        registrars.append(ep.load())
    return registrars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinoscope",
        description="DINOv2 self-supervised vision for canopy height mapping and cell-painting screens.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in CORE_COMMANDS.values():
        importlib.import_module(module).register(sub)
    for register in _plugin_registrars():
        register(sub)
    return parser


def _leave_process_group() -> None:
    """After a successful command, stop the process group's communication threads before the interpreter exits
    (a live gloo group can abort the process at exit; see ``core.distributed.env.shutdown_distributed``)."""
    if "torch.distributed" not in sys.modules:  # nothing distributed ran; keeps `--help` free of torch
        return
    from core.distributed.env import shutdown_distributed  # deferred: torch is only loaded by commands that use it

    shutdown_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 user error, 1 unexpected failure)."""
    from core.logging import setup_logging

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`pretrain R --output-dir D a.b=1`); anything else is an error.
    stray = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(stray) != len(extra) or (stray and not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if stray:
        args.overrides = list(args.overrides) + stray
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        status = int(args.func(args) or 0)
        _leave_process_group()
        return status
    except DinoscopeError as err:
        if args.verbose:
            raise
        print(f"dinoscope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:  # a scheduler signal: state saved, resume by running the same command
        print(f"dinoscope {args.command}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
