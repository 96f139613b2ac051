"""Stopping a training run cleanly when the scheduler says so.

Schedulers warn before they stop a job: SLURM sends the signal of ``--signal=USR2@300`` to the job's tasks before the
time limit, and SIGTERM before SIGKILL on pre-emption or ``scancel`` (``KillWait``, 30 s by default); torchrun and
most other launchers forward SIGTERM to their workers (cluster.md, "Pre-emption"). A handler here only records the
signal; the training loop notices it at the end of the current iteration (every rank agrees through the loss
all-reduce), saves a checkpoint at that iteration on every rank, and then either:

* hands the signal to the handler that was installed before ours, which under submitit is its
  ``checkpoint_and_try_requeue`` (it calls ``TrainingJob.checkpoint()`` and requeues the job), or
* raises :class:`TrainingInterrupted`, which the CLI turns into a one-line message and exit status ``128 + signal``
  (143 for SIGTERM), the shell convention for "terminated by a signal".

Ctrl-C (SIGINT) keeps Python's behaviour (KeyboardInterrupt), so an interactive user can still stop at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from core.errors import TrainingInterrupted

log = logging.getLogger(__name__)

__all__ = ["STOP_SIGNALS", "StopRequest", "TrainingInterrupted"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR2)
Handler = Callable[[int, FrameType | None], Any] | int | None


class StopRequest:
    """Context manager that records SIGTERM/SIGUSR2 instead of dying, and restores the previous handlers on exit.

    Outside the main thread (where Python cannot install handlers) it does nothing and :attr:`signum` stays None.
    """

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Handler] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[int(signum)] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning(
                "received %s: saving a checkpoint at the end of this iteration, then stopping",
                signal.Signals(signum).name,
            )
        self.signum = signum
        self._frame = frame

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop as if ``signum`` had arrived (other ranks learn of it through the loop's all-reduce)."""
        self.signum = int(signum)
        self._frame = None

    def previous_handler(self, signum: int) -> Handler:
        """The handler installed before ours for ``signum`` (None where ours was never installed)."""
        return self._previous.get(int(signum))

    def finish(self, iteration: int, checkpoint: Path | None) -> None:
        """After the state is saved: give the signal to the earlier Python handler (submitit requeues there),
        then raise :class:`TrainingInterrupted` if that handler returned."""
        assert self.signum is not None
        previous = self.previous_handler(self.signum)
        if callable(previous):
            log.info(
                "handing %s to the previously installed handler %s",
                signal.Signals(self.signum).name,
                getattr(previous, "__qualname__", previous),
            )
            # The CLI's own handler raises KeyboardInterrupt ("stop like Ctrl-C"); the state is saved, so say so.
            with contextlib.suppress(KeyboardInterrupt):
                previous(self.signum, getattr(self, "_frame", None))
        raise TrainingInterrupted(self.signum, iteration, checkpoint)
