"""Figures shared by every command, drawn with matplotlib's object API.

A :class:`~matplotlib.figure.Figure` with its own Agg canvas never touches pyplot's global state or the process-wide
backend, so library code can draw from threads, notebooks and headless jobs alike. Files are written atomically
(:func:`core.io.atomic_path`), so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.io import atomic_path

Series = tuple[Sequence[float], Sequence[float]]  # (x values, y values)


def new_figure(width: float = 7.0, height: float = 4.0, dpi: int = 110) -> Figure:
    """A figure bound to its own Agg canvas (no pyplot, no global backend switch)."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Lay out ``fig`` and write it as a PNG at ``path`` (atomically); returns the path."""
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def loss_curves(
    series: Mapping[str, Series],
    path: str | os.PathLike,
    *,
    xlabel: str = "epoch",
    ylabel: str = "loss",
    title: str | None = None,
    log_y: bool | None = False,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    secondary: Mapping[str, Series] | None = None,
    secondary_label: str = "learning rate",
    size: tuple[float, float] = (7.0, 4.0),
) -> Path:
    """Several named curves on one axis, optionally with a second quantity (the lr) on a twin axis.

    Args:
        series: ``{label: (x, y)}``, drawn in order; NaN values leave gaps.
        path: the PNG to write.
        xlabel, ylabel, title: axis labels and an optional title.
        log_y: log-scaled y axis; ``None`` chooses it when every finite value is positive.
        styles: optional matplotlib line keywords per label (``{"total": {"lw": 1.4}}``, dashed validation...).
        secondary: ``{label: (x, y)}`` drawn in grey on a twin y axis labelled ``secondary_label``.
        size: figure size in inches.
    """
    styles = styles or {}
    fig = new_figure(*size)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), [float(y) for y in ys], label=label, **{"lw": 1.0, **styles.get(label, {})})
    if log_y is None:
        finite = [float(y) for _, ys in series.values() for y in ys if math.isfinite(float(y))]
        log_y = bool(finite) and min(finite) > 0
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if secondary:
        twin = ax.twinx()
        for label, (xs, ys) in secondary.items():
            twin.plot(list(xs), [float(y) for y in ys], color="0.6", ls="--", lw=0.8, label=label)
        twin.set_ylabel(secondary_label, color="0.5")
        ax.set_zorder(twin.get_zorder() + 1)  # the main curves and their legend above the twin's line
        ax.patch.set_visible(False)  # ... without hiding it behind the main axes' background
    if series:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    if title:
        ax.set_title(title)
    return save_png(fig, path)
