"""Progress bars and JSONL metric logs for long-running work."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the ``dinoscope`` root handlers once: concise messages on stderr."""
    root = logging.getLogger()
    if any(getattr(h, "_dinoscope", False) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._dinoscope = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and notebooks swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool | None = None,
) -> Iterator[T]:
    """A tqdm progress bar with rate and ETA, silenced when ``DINOSCOPE_NO_PROGRESS`` is set or on ranks > 0."""
    if disable is None:
        disable = bool(os.environ.get("DINOSCOPE_NO_PROGRESS")) or int(os.environ.get("RANK", "0")) > 0
    yield from tqdm(
        iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True, smoothing=0.1
    )


class JsonlLogger:
    """Append one JSON object per line; each record gets a wall-clock ``time`` field.

    The file is opened in append mode so that a resumed run continues the same log.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        """Append ``record`` as one JSON line; ``time`` (Unix seconds) is added unless given."""
        record.setdefault("time", time.time())
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_to_builtin) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record so far, oldest first (``[]`` when the file does not exist)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _to_builtin(obj: Any) -> Any:
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
