"""Progress, console logging and metric logs for long-running work.

Progress is a tqdm bar on a terminal. Where stderr is not a terminal (a SLURM log, a pipe, CI) a ``\r`` bar turns
into noise, so :func:`progress` logs a plain line instead: at every ``set_postfix`` (training calls it each
``log_every`` iterations with loss, lr and images/s) and otherwise every 30 s, each with the rate and an ETA.
``DINOSCOPE_PROGRESS=bar|plain|off`` overrides the choice (``DINOSCOPE_NO_PROGRESS=1`` also turns it off).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from core.errors import DinoscopeError

T = TypeVar("T")


OUR_LOGGERS = ("dinoscope", "core", "geodino", "bio")
_PLAIN_EVERY_S = 30.0


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root handler once: concise messages on stderr.

    At INFO, only dinoscope's own loggers speak at INFO; third-party libraries (copairs, DeepSpeed, pyogrio, ...)
    are held to WARNING. ``-v`` (DEBUG) lets everything through.
    """
    root = logging.getLogger()
    if not any(getattr(h, "_dinoscope", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._dinoscope = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if level <= logging.DEBUG:
        root.setLevel(level)
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    root.setLevel(max(level, logging.WARNING))
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and notebooks swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def progress_mode() -> str:
    """``bar`` on a terminal, ``plain`` elsewhere, ``off`` on ranks > 0 or when asked (see the module docstring)."""
    if os.environ.get("DINOSCOPE_NO_PROGRESS") or int(os.environ.get("RANK", "0")) > 0:
        return "off"
    asked = os.environ.get("DINOSCOPE_PROGRESS", "").strip().lower()
    if asked in ("bar", "plain", "off"):
        return asked
    return "bar" if sys.stderr.isatty() else "plain"


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool | None = None,
) -> Iterable[T]:
    """Iterate ``iterable`` showing progress: a tqdm bar, plain log lines, or nothing (:func:`progress_mode`).

    The result supports ``set_postfix(**values)`` in every mode.
    """
    mode = "off" if disable else progress_mode()
    if mode == "bar":
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, smoothing=0.1)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, quiet=mode == "off")


class PlainProgress:
    """Progress as log lines: ``pretrain 120/1000 (12%) loss=5.12 lr=0.001 | 3.1 it/s, ETA 0:04:44``."""

    def __init__(
        self, iterable: Iterable[T], *, total: int | None, desc: str, unit: str, initial: int, quiet: bool
    ) -> None:
        self.iterable, self.total, self.desc, self.unit, self.quiet = iterable, total, desc or "progress", unit, quiet
        self.n = self.start = initial
        self.t0 = self.last_line = time.monotonic()
        self.log = logging.getLogger("dinoscope.progress")

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            if time.monotonic() - self.last_line >= _PLAIN_EVERY_S:
                self._line("")
            self.n += 1  # counted when handed out: a set_postfix inside the loop body reports it as done
            yield item
        if self.n > self.start and time.monotonic() - self.last_line > 0.5:
            self._line("")

    def set_postfix(self, **values: Any) -> None:
        """Log a line now with ``values`` (``key=value`` each)."""
        self._line(" ".join(f"{k}={v}" for k, v in values.items()))

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done outside iteration (as tqdm's ``update``)."""
        self.n += n
        if time.monotonic() - self.last_line >= _PLAIN_EVERY_S:
            self._line("")

    def close(self) -> None:
        """End early (as tqdm's ``close``): log where it stopped."""
        if self.n > self.start:
            self._line("stopped")

    def _line(self, extra: str) -> None:
        self.last_line = now = time.monotonic()
        if self.quiet:
            return
        done = self.n - self.start
        rate = done / max(now - self.t0, 1e-9)
        where = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {datetime.timedelta(seconds=round((self.total - self.n) / rate))}"
        speed = f"{rate:.0f}" if rate >= 100 else f"{rate:.2f}" if rate >= 1 else f"{rate:.3g}"
        self.log.info("%s %s %s| %s %s/s%s", self.desc, where, f"{extra} " if extra else "", speed, self.unit, eta)


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


class TensorBoardLog:
    """Scalars for TensorBoard in ``directory`` (``train.tensorboard: true``): every number of a metrics record,
    at its iteration. Needs the optional extra ``dinoscope[tensorboard]``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # deferred: optional extra [tensorboard]
        except ImportError:
            raise DinoscopeError(
                "train.tensorboard is on but the tensorboard package is not installed",
                field="train.tensorboard",
                fix="pip install 'dinoscope[tensorboard]', or set train.tensorboard=false",
            ) from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write every numeric value of ``record`` as a scalar at ``step``."""
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
