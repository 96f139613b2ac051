"""User-facing errors.

Every error a user can fix by changing an input is a :class:`DinoscopeError`. It names the file, the field and the
fix, and the CLI turns it into one clear message and exit status 2, never a traceback from inside a library.
"""

from __future__ import annotations

import os
import signal


class DinoscopeError(Exception):
    """An input problem the user can fix.

    Args:
        message: what is wrong, in one sentence.
        path: the file or directory concerned, if any.
        field: the key, band, channel or column concerned, if any.
        fix: what to do about it.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None, fix: str | None = None
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.field = field
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if self.field:
            parts.append(f"[{self.field}]")
        parts.append(self.message)
        text = " ".join(parts)
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class TrainingInterrupted(Exception):  # noqa: N818 - it is an outcome, not an error: the state was saved
    """A run stopped on a scheduler signal (SIGTERM, SIGUSR2) after saving its state at the iteration reached.

    The CLI prints the message and exits with :attr:`exit_code` = 128 + signal number (143 for SIGTERM), the shell
    convention for "terminated by a signal"; running the same command again resumes.

    Attributes:
        signum: the signal received.
        iteration: completed iterations at the saved checkpoint.
        checkpoint: the step directory written.
    """

    def __init__(self, signum: int, iteration: int, checkpoint: os.PathLike | str | None) -> None:
        self.signum = int(signum)
        self.iteration = int(iteration)
        self.checkpoint = checkpoint
        name = signal.Signals(self.signum).name
        where = f"; state saved in {checkpoint}" if checkpoint else ""
        super().__init__(
            f"stopped by {name} after iteration {iteration}{where}; run the same command again to resume from there"
        )

    @property
    def exit_code(self) -> int:
        """``128 + signum``, the shell's status for a process stopped by that signal."""
        return 128 + self.signum
