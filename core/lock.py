"""An exclusive, non-blocking lock for an output that a long run writes (a run directory, a raster, a zarr store).

Two runs writing the same output silently interleave checkpoints and logs, so the second one must fail at once with
a message naming the first. The lock is ``fcntl.flock`` on a small file next to (or inside) the output:

* a directory ``D`` is locked through ``D/.dinoscope.lock``; a file ``F`` through ``F.parent/.F.name.lock``;
* the kernel drops the lock when the holder dies (even on SIGKILL), so a leftover lock file is never "stale": it is
  simply locked again and its record overwritten. Only the flock counts, never the file's presence or content;
* the file holds a JSON record of the holder (pid, host, start time, argv, user), read only to explain a conflict.

``flock`` is advisory and only as good as the file system: local disks are fine; NFS emulates it with POSIX locks;
Lustre mounted with ``localflock`` locks per node only, which no program can detect. File systems that refuse locks
(ENOLCK, EOPNOTSUPP, ENOSYS) get a clear error; ``DINOSCOPE_NO_LOCK=1`` runs without any lock, at the user's risk.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import getpass
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DinoscopeError
from core.io import remove_stale_temporaries

log = logging.getLogger(__name__)

NO_LOCK_ENV = "DINOSCOPE_NO_LOCK"
DIR_LOCK_NAME = ".dinoscope.lock"
CONFLICT_FIX = "wait for that run to finish, stop it, or choose another output"
UNSUPPORTED_FIX = (
    "put the output on a local or lock-capable file system, or set DINOSCOPE_NO_LOCK=1 to run without "
    "the lock (at your own risk)"
)
# errno values meaning "this file system cannot lock" rather than "someone else holds it" (ENOTSUP is EOPNOTSUPP on
# Linux but a distinct value elsewhere).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_CONFLICT = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_RECORD_BYTES = 64 * 1024

# Lock files this process holds, by real path -> file descriptor. flock() on a second descriptor of the same file
# conflicts even inside one process, so without this registry a nested acquire would report the process as locked
# by itself; with it, the nesting is reported as the programming error it is.
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


def _close_inherited_locks() -> None:
    """After fork, the child shares the parent's open lock files, which would keep the lock alive after the parent
    died (e.g. orphaned data-loader workers). Closing the child's copies ties the lock to the acquiring process only;
    closing never releases the parent's lock because the parent still holds its own descriptor."""
    for fd in list(_HELD.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass(frozen=True)
class LockInfo:
    """What was locked and by whom. ``locked`` is False when ``DINOSCOPE_NO_LOCK`` made the lock a no-op."""

    target: Path
    lock_file: Path
    locked: bool
    pid: int
    host: str
    started: str
    argv: list[str] = field(default_factory=list)
    user: str = ""


def lock_file_for(target: str | os.PathLike, *, is_dir: bool | None = None) -> Path:
    """The lock file guarding ``target``.

    ``is_dir`` None guesses: an existing directory or a missing path without a suffix is a directory, anything else
    a file. Pass it explicitly when the output may not exist yet and its name has a dot (``runs/v1.5``), otherwise
    the guess could change once the output exists and two runs would lock different files.
    """
    target = Path(target)
    if is_dir is None:
        is_dir = target.is_dir() or (not target.exists() and not target.suffix)
    return target / DIR_LOCK_NAME if is_dir else target.parent / f".{target.name}.lock"


def no_lock_requested() -> bool:
    """Whether ``DINOSCOPE_NO_LOCK`` is 1/true/yes/on (write without a lock, at the user's risk)."""
    return os.environ.get(NO_LOCK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class OutputLock:
    """An exclusive lock on ``target`` that a training loop can hold across a long function.

    ``acquire()`` never waits: it returns a :class:`LockInfo` or raises :class:`DinoscopeError` naming the holder.
    ``release()`` is idempotent. Also usable as a context manager.
    """

    def __init__(self, target: str | os.PathLike, what: str = "output", *, is_dir: bool | None = None) -> None:
        self.target = Path(target)
        self.what = what
        self.lock_file = lock_file_for(self.target, is_dir=is_dir)
        self.info: LockInfo | None = None
        self._fd: int | None = None
        self._key: str | None = None
        self._owner_pid: int | None = None

    # -------------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> LockInfo:
        """Take the lock without waiting and write the holder record; returns it.

        Raises :class:`~core.errors.DinoscopeError` naming the holder when another process has it, or when the file
        system refuses locks; ``RuntimeError`` when this process already holds it. ``DINOSCOPE_NO_LOCK=1`` skips it.
        """
        try:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DinoscopeError(
                f"cannot create the directory for the lock file: {err.strerror or err}",
                path=self.target,
                field=self.what,
                fix="choose an output in a location you can write to",
            ) from None
        key = os.path.realpath(self.lock_file)
        with _HELD_GUARD:
            if key in _HELD:
                raise RuntimeError(
                    f"{self.lock_file} is already locked by this process; a lock is not re-entrant "
                    "(release it before acquiring it again)"
                )
            if no_lock_requested():
                log.warning(
                    "%s=1: writing %s without a lock; a second run on the same output would corrupt it",
                    NO_LOCK_ENV,
                    self.target,
                )
                self.info = _describe(self.target, self.lock_file, locked=False)
                return self.info
            fd, writable = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                try:
                    self._refuse(fd, err)
                finally:
                    os.close(fd)
            info = _describe(self.target, self.lock_file, locked=True)
            if writable:
                self._write_record(fd, info)
            else:
                log.warning(
                    "%s is not writable: locked, but the holder record still names the previous run", self.lock_file
                )
            _HELD[key] = fd
        self._fd, self._key, self._owner_pid, self.info = fd, key, os.getpid(), info
        if self.lock_file.name == DIR_LOCK_NAME or not self.target.is_dir():
            remove_stale_temporaries(self.target)
        return info

    def _open(self) -> tuple[int, bool]:
        """Open (creating) the lock file. Mode 0o666 lets the umask decide, like any other output file.

        A lock file left by another user may be read-only for us; flock works on a read-only descriptor, so the
        lock still protects the output, only the record cannot be rewritten.
        """
        flags = os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.lock_file, flags | os.O_RDWR, 0o666), True
        except PermissionError:
            if not self.lock_file.exists():
                raise DinoscopeError(
                    f"cannot create the lock file {self.lock_file.name}: permission denied",
                    path=self.target,
                    field=self.what,
                    fix="choose an output in a directory you can write to",
                ) from None
            try:
                return os.open(self.lock_file, flags | os.O_RDONLY, 0o666), False
            except OSError as err:
                raise DinoscopeError(
                    f"cannot open the lock file {self.lock_file}: {err.strerror}",
                    path=self.target,
                    field=self.what,
                    fix="make the lock file readable or choose another output",
                ) from None
        except OSError as err:
            raise DinoscopeError(
                f"cannot create the lock file {self.lock_file.name}: {err.strerror}",
                path=self.target,
                field=self.what,
                fix="choose an output on a writable file system",
            ) from None

    def _refuse(self, fd: int, err: OSError) -> None:
        """Turn a failed flock into the right exception (always raises)."""
        if err.errno in _UNSUPPORTED:
            raise DinoscopeError(
                f"the file system does not support locks ({err.strerror or err}), so this {self.what} "
                f"cannot be protected against a second run writing it (lock file {self.lock_file})",
                path=self.target,
                field=self.what,
                fix=UNSUPPORTED_FIX,
            )
        if err.errno not in _CONFLICT:
            raise DinoscopeError(
                f"cannot lock {self.lock_file}: {err.strerror or err}",
                path=self.target,
                field=self.what,
                fix=UNSUPPORTED_FIX,
            )
        record = _read_record(fd)
        if record.get("host") == socket.gethostname() and record.get("pid") == os.getpid():
            # Our own record, yet not in the registry: the same file reached through another path (bind mount).
            raise RuntimeError(f"{self.lock_file} is already locked by this process through another path")
        raise DinoscopeError(
            f"this {self.what} is in use: {describe_holder(record)}",
            path=self.target,
            field=self.what,
            fix=CONFLICT_FIX,
        )

    def _write_record(self, fd: int, info: LockInfo) -> None:
        """Replace the record in place (truncate, write, fsync): the file itself must stay, see :meth:`release`."""
        record = {"pid": info.pid, "host": info.host, "started": info.started, "argv": info.argv, "user": info.user}
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as err:
            # A run that cannot write a few hundred bytes next to its output will not get far; say so now.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise DinoscopeError(
                f"cannot write the lock record {self.lock_file}: {err.strerror or err}",
                path=self.target,
                field=self.what,
                fix="free space on, or fix permissions of, the output file system",
            ) from None

    # -------------------------------------------------------------------------------------------------- release
    def release(self) -> None:
        """Unlock and close; the lock file stays.

        Deleting it would race: a second process may already have opened the old file and be about to lock it,
        while a third creates a fresh file under the same name and locks that, and both would believe they hold
        the lock. A leftover file costs nothing because only the flock counts.
        """
        fd, key = self._fd, self._key
        self._fd = self._key = None
        self.info = None
        if fd is None:
            return
        with _HELD_GUARD:
            if key is not None and _HELD.get(key) == fd:
                del _HELD[key]
        if os.getpid() != self._owner_pid:
            # A forked child: LOCK_UN would unlock the parent's shared open file, and the at-fork hook already closed
            # the child's copy, so the number may now belong to another file of the child's. Touch nothing.
            return
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def __enter__(self) -> LockInfo:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OutputLock({str(self.target)!r}, what={self.what!r}, held={self.held})"


@contextlib.contextmanager
def exclusive_lock(
    target: str | os.PathLike, *, what: str = "output", is_dir: bool | None = None
) -> Iterator[LockInfo]:
    """Hold an exclusive lock on ``target`` for the body of a ``with``; see :class:`OutputLock`.

    Args:
        target: the output directory or file to protect.
        what: how to call it in messages and the error's ``field`` (``"run directory"``, ``"prediction"``).
        is_dir: whether ``target`` is a directory; None guesses (see :func:`lock_file_for`).
    """
    lock = OutputLock(target, what, is_dir=is_dir)
    info = lock.acquire()
    try:
        yield info
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------------ records
def _describe(target: Path, lock_file: Path, *, locked: bool) -> LockInfo:
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return LockInfo(
        target=target,
        lock_file=lock_file,
        locked=locked,
        pid=os.getpid(),
        host=socket.gethostname(),
        started=started,
        argv=[str(a) for a in sys.argv],
        user=_user(),
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - containers often run under a uid without a passwd entry
        return str(os.getuid())


def _read_record(fd: int, attempts: int = 5, pause_s: float = 0.02) -> dict[str, Any]:
    """The holder's record; {} when empty or unreadable.

    The holder truncates and rewrites the record right after locking, so an empty or partial record usually means
    it is mid-write: re-read a few times (at most ~0.1 s, only to improve the message, never to wait for the lock).
    """
    for attempt in range(attempts):
        try:
            text = os.pread(fd, _RECORD_BYTES, 0).decode("utf-8", errors="replace")
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except (OSError, ValueError):
            pass
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return True
    return True


def describe_holder(record: dict[str, Any]) -> str:
    """One phrase naming the holder, e.g. ``locked by pid 1234 on host node7 since ..., running `dinoscope ...```."""
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or not host:
        return (
            "locked by another process whose record is empty or incomplete (it may be starting right now, or "
            "predate lock records)"
        )
    text = f"locked by pid {pid} on host {host}"
    if record.get("user"):
        text += f" (user {record['user']})"
    if record.get("started"):
        text += f" since {record['started']}"
    argv = record.get("argv")
    if isinstance(argv, list) and argv:
        command = shlex.join(str(a) for a in argv)
        text += f", running `{command if len(command) <= 200 else command[:197] + '...'}`"
    if host == socket.gethostname() and not _pid_alive(pid):
        # flock dies with its holder, so a dead pid still "holding" means another process inherited the open file,
        # e.g. a child started with os.fork outside Python's fork hooks, or a launcher that passed the descriptor.
        text += (
            f"; pid {pid} no longer exists on this host, so either a process it started (sharing its open lock "
            "file) still holds the lock, or the current holder could not rewrite a read-only record: look for "
            "leftover processes using this output"
        )
    return text
