"""Refuse work that cannot fit in memory before it starts, with an estimate (instead of the kernel's OOM killer
minutes later)."""

from __future__ import annotations

import os

from core.errors import DinoscopeError

_USABLE_FRACTION = 0.8  # leave room for the interpreter, libraries and the page cache


def available_memory_bytes() -> int | None:
    """Memory the kernel reports as available (``MemAvailable``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def check_fits_in_memory(needed_bytes: float, *, what: str, field: str, fix: str) -> None:
    """Raise a :class:`DinoscopeError` when ``needed_bytes`` exceeds 80% of the available memory.

    Args:
        needed_bytes: the estimate, in bytes.
        what: what needs it, e.g. ``"a 100000 x 100000 synthetic scene"``.
        field: the option to change.
        fix: how to change it.
    """
    available = available_memory_bytes()
    if available is None or needed_bytes <= _USABLE_FRACTION * available:
        return
    raise DinoscopeError(
        f"{what} needs about {human_bytes(needed_bytes)} of memory, but {human_bytes(available)} is available",
        field=field,
        fix=fix,
    )
