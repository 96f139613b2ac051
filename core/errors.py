"""User-facing errors.

Every error a user can fix by changing an input is a :class:`DinoscopeError`. It names the file, the field and the
fix, and the CLI turns it into one clear message and exit status 2, never a traceback from inside a library.
"""

from __future__ import annotations

import os


class DinoscopeError(Exception):
    """An input problem the user can fix.

    Args:
        message: what is wrong, in one sentence.
        path: the file or directory concerned, if any.
        field: the key, band, channel or column concerned, if any.
        fix: what to do about it.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None,
                 fix: str | None = None) -> None:
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
