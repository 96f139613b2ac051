"""What the command line says when a command fails: OS errors become one message naming the path and a fix,
SIGTERM stops a command like Ctrl-C does, and anything unexpected is summarised in one line (the traceback only
with ``--debug`` or ``DINOSCOPE_DEBUG=1``).

Exit statuses (README, "Exit statuses"): 0 success; 1 an unexpected failure (a bug: please report it with the
``--debug`` output); 2 a problem with the input, the command line or the file system that the message explains;
128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM), with the state kept so the same command resumes.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from core.errors import DinoscopeError

DEBUG_ENV = "DINOSCOPE_DEBUG"

# errno -> (what happened, how to fix it)
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space (or choose another output), then run the same command"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, then run the same command"),
    errno.EACCES: ("permission denied", "choose a location you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you own, or fix its permissions"),
    errno.EROFS: ("read-only file system", "write the output to a writable location"),
    errno.ENOENT: ("no such file or directory", "check the path; missing parent directories are not created"),
    errno.EISDIR: ("is a directory, but a file is needed here", "give a file path"),
    errno.ENOTDIR: ("a path component is a file, not a directory", "give a path whose parents are directories"),
    errno.EEXIST: ("already exists", "remove it or choose another output"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or lower --workers"),
}


def debug_requested(flag: bool) -> bool:
    """Whether full tracebacks are wanted: ``--debug`` / ``-v`` or ``DINOSCOPE_DEBUG=1``."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def os_error_message(err: OSError) -> DinoscopeError:
    """The user-facing form of an OS error: what happened, to which path, and what to do."""
    what, fix = _OS_ERRORS.get(err.errno or -1, (err.strerror or type(err).__name__, "check the path and retry"))
    path = err.filename if err.filename is not None else None
    if err.filename2 is not None:
        path = f"{err.filename} -> {err.filename2}"
    return DinoscopeError(what, path=path, fix=fix)


def internal_error_message(err: BaseException) -> str:
    """One paragraph for an unexpected exception (a bug, or a library failing in a way not yet translated)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (
        f"unexpected {type(err).__name__}{': ' + text if text else ''}\n"
        f"  fix: rerun with --debug (or {DEBUG_ENV}=1) for the full traceback and report it"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send) raised like Ctrl-C, so the same clean-up and resume paths run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (training installs its own handler,
    which saves a checkpoint first, and restores this one afterwards)."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread (e.g. main() called from a worker thread in a test)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
