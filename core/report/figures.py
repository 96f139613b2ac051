"""The demo report's own figures: sample images of a dataset, kNN accuracy against labels, grouped bars.

Drawn with :mod:`core.plots` (matplotlib's object API, atomic PNG writes). Each function returns the PNG path, or
``None`` when there is nothing to draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.data.datasets import build_dataset, scale_to_unit
from core.plots import new_figure, save_png

# One colour per method, the same in every figure of the report.
COLOURS = {
    "pretrained": "#1f6f8b",
    "random init": "#d08c2b",
    "raw pixels": "#7a7a7a",
    "channel statistics": "#a33a1f",
    "statistics": "#a33a1f",
    "training mean": "#b9b9b9",
}


def colour_of(method: str) -> str:
    """The report colour of a method (matched on its first words)."""
    for key, colour in COLOURS.items():
        if method.startswith(key):
            return colour
    return "#555555"


def dataset_samples(kind: str, params: Mapping[str, Any], path: str | os.PathLike, n: int = 16) -> Path | None:
    """A grid of the first ``n`` images of a dataset kind, titled by class when the kind is labelled."""
    try:
        dataset = build_dataset(kind, **{**params, "labelled": True})
        labelled = True
    except Exception:  # a kind without labels (or one that cannot be rebuilt here): images alone
        try:
            dataset, labelled = build_dataset(kind, **params), False
        except Exception:
            return None
    n = min(n, len(dataset))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig = new_figure(1.3 * cols, 1.45 * rows)
    classes = getattr(dataset, "classes", [])
    for i in range(n):
        item = dataset[i]
        image, label = item if labelled else (item, None)
        image = scale_to_unit(np.asarray(image))
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.clip(image, 0, 1), cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
        ax.set_axis_off()
        if label is not None and classes:
            ax.set_title(classes[label].replace("_", " + "), fontsize=7)
    return save_png(fig, path)


def knn_curve(result: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """kNN top-1 against labelled examples per class, one line per method and feature, with chance level."""
    rows = result.get("rows") or []
    if not rows:
        return None
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        xs = [int(n) for n in row["top1"]]
        ys = [row["top1"][n] for n in row["top1"]]
        dashed = row["features"].startswith("mean patch")
        label = (
            f"{row['method']} ({row['features']})" if row["method"] in ("pretrained", "random init") else row["method"]
        )
        ax.plot(xs, ys, "--" if dashed else "-", marker="o", ms=4, color=colour_of(row["method"]), label=label)
    n_classes = len(result.get("classes") or []) or 4
    ax.axhline(100 / n_classes, color="k", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(result.get("per_class") or [])
    ax.set_xticklabels([str(n) for n in result.get("per_class") or []])
    ax.set_xlabel("labelled examples per class (kNN memory)")
    ax.set_ylabel(f"top-1 accuracy, k={result.get('k', '?')} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return save_png(fig, path)


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str = "",
    hline: float | None = None,
) -> Path | None:
    """Bars of ``series`` (method -> one value per group) side by side for each group; ``None`` leaves a gap."""
    if not groups or not series:
        return None
    fig = new_figure(max(5.0, 0.9 * len(groups) * max(1, len(series)) / 2 + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for j, (method, values) in enumerate(series.items()):
        heights = [np.nan if v is None else float(v) for v in values]
        ax.bar(x + (j - (len(series) - 1) / 2) * width, heights, width, label=method, color=colour_of(method))
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([g.replace("_", " ") for g in groups], rotation=20 if len(groups) > 3 else 0, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
