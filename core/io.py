"""Atomic file output: write to a temporary name in the same directory, then rename.

A crash therefore never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it onto ``final``.

    On an exception the temporary file or directory is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    # mkstemp/mkdtemp create 0600/0700; a final output follows the umask like any other tool's (0644/0755 under
    # 022).
    mode = (0o777 if is_dir else 0o666) & ~_current_umask()
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=final.suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, mode)
    try:
        yield tmp
        # A writer that recreated the file (safetensors) leaves its own 0600; a mode the caller chose is kept.
        if not is_dir and tmp.exists() and tmp.stat().st_mode & 0o777 == 0o600 != mode:
            os.chmod(tmp, mode)
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX offers no read-only call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete temporaries (``.NAME.tmp-*``, see :func:`core.io.atomic_path`) that a crashed writer left in or next
    to ``target``; returns them. Only the holder of ``target``'s lock calls this, so no live writer owns them.

    For a directory the top two levels are searched (a run's files and its per-item sub-directories), not the
    whole tree, so that a store of millions of chunks is not walked at every start.
    """
    target = Path(target)
    if target.is_dir():
        candidates = [*target.glob(".*.tmp-*"), *target.glob("*/.*.tmp-*")]
    else:
        candidates = list(target.parent.glob(f".{glob.escape(target.name)}.tmp-*"))
    removed = []
    for path in candidates:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    if removed:
        logging.getLogger(__name__).info(
            "removed %d temporary file(s) left by an interrupted run in %s", len(removed), target
        )
    return removed
