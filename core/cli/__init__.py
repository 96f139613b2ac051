"""The ``dinoscope`` command line.

Every sub-command is declared once, from its schema (:mod:`core.cli.commands`), and built by one adapter
(:mod:`core.cli.adapter`): flags with help, defaults and ranges from the schema, ``--recipe FILE``, ``--set``,
trailing ``key=value`` overrides and ``--print-recipe`` everywhere. Domain packages add their command groups through
the entry-point group ``dinoscope.commands`` (each entry point is a ``register(subparsers)`` function), so ``core``
never imports ``geodino`` or ``bio``.

A :class:`~core.errors.DinoscopeError` becomes a one-paragraph message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version

from core.cli import commands
from core.cli.adapter import add_command, add_group
from core.cli.failures import (
    DEBUG_ENV,
    Terminated,
    debug_requested,
    internal_error_message,
    os_error_message,
    sigterm_as_interrupt,
)
from core.errors import DinoscopeError, TrainingInterrupted
from core.logging import setup_logging

log = logging.getLogger("dinoscope")


def _plugin_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    registrars = []
    for ep in entry_points(group="dinoscope.commands"):
        registrars.append(ep.load())
    return registrars


def _version() -> str:
    try:
        return version("dinoscope")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinoscope",
        description="DINOv2 self-supervised vision for canopy height mapping and cell-painting screens.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        "--debug",
        dest="verbose",
        action="store_true",
        help=f"debug logging and full tracebacks (also {DEBUG_ENV}=1)",
    )
    parser.add_argument("--version", action="version", version=f"dinoscope {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_command(sub, commands.PRETRAIN)
    add_command(sub, commands.EXPORT)
    add_group(sub, "eval", "kNN and linear evaluation of frozen backbone features", commands.EVAL)
    add_command(sub, commands.LAUNCH)
    add_group(sub, "weights", "inspect and convert backbone checkpoints", commands.WEIGHTS)
    add_command(sub, commands.DEMO)
    add_group(sub, "curate", "deduplicate, retrieve and rebalance a collection before pretraining", commands.CURATE)
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
    """Run the CLI; returns the exit status (see :mod:`core.cli.failures`: 0 success, 1 unexpected failure, 2 a
    problem the message explains, 128 + N stopped by signal N)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`pretrain R --output-dir D a.b=1`); anything else is an error.
    stray = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(stray) != len(extra) or (stray and not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if stray:
        args.overrides = list(args.overrides) + stray
    debug = debug_requested(args.verbose)
    setup_logging(logging.DEBUG if debug else logging.INFO)
    name = " ".join(str(getattr(args, key)) for key in vars(args) if key == "command" or key.endswith("_command"))
    try:
        with sigterm_as_interrupt():
            status = int(args.func(args) or 0)
        _leave_process_group()
        return status
    except TrainingInterrupted as stopped:  # a scheduler signal: state saved, resume by running the same command
        print(f"dinoscope {name}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: outputs are atomic, so a rerun resumes
        signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
        print(
            f"dinoscope {name}: stopped by {signal.Signals(signum).name}; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + int(signum)
    except Exception as err:  # the one place every failure becomes a message instead of a traceback
        if debug:
            raise
        if isinstance(err, OSError):
            err = os_error_message(err)
        text = str(err) if isinstance(err, DinoscopeError) else internal_error_message(err)
        print(f"dinoscope {name}: error: {text}", file=sys.stderr)
        return 2 if isinstance(err, DinoscopeError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
