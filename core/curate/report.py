"""Reports of the curation stages: cluster-size histograms before and after, thumbnail grids per cluster (image
inputs), the counts each stage removed, and one small HTML page tying them together (``report.html``).

Figures use :mod:`core.plots` (matplotlib's object API, atomic PNG writes); the page is static HTML with relative
links, so a report directory can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.curate.sources import CollectionImages
from core.io import atomic_path
from core.plots import new_figure, save_png

_BARS_MAX = 60  # up to this many clusters, sizes before and after are drawn as bars side by side


def cluster_size_plot(path: str | os.PathLike, series: Mapping[str, np.ndarray], *, title: str, unit: str) -> Path:
    """Two panels for named arrays of cluster sizes: sizes per cluster (log scale; bars side by side when the arrays
    count the same few clusters, before and after a stage) and a log-binned histogram of the sizes.

    Args:
        path: the PNG to write.
        series: ``{label: sizes}``, e.g. ``{"pool": ..., "sample": ...}`` (before and after a stage).
        title: the figure title.
        unit: what a cluster holds (``items``), for the axis labels.
    """
    fig = new_figure(10.0, 3.8)
    by_cluster, histogram = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    arrays = {label: np.asarray(sizes) for label, sizes in series.items()}
    largest = max([int(s.max()) for s in arrays.values() if len(s)] + [1])
    edges = np.unique(np.logspace(0, np.log10(largest + 1), 30).astype(int))
    first = next(iter(arrays.values()))
    aligned = len({len(s) for s in arrays.values()}) == 1 and len(first) <= _BARS_MAX
    order = np.argsort(-first, kind="stable")
    width = 0.8 / max(1, len(arrays))
    for i, (label, sizes) in enumerate(arrays.items()):
        if aligned:  # the same clusters before and after: side by side, in the order of the first series
            by_cluster.bar(
                np.arange(len(sizes)) + i * width, sizes[order], width=width, label=f"{label} ({sizes.sum()})"
            )
        else:
            ranked = np.sort(sizes)[::-1]
            by_cluster.plot(np.arange(1, len(ranked) + 1), np.maximum(ranked, 0.5), label=f"{label} ({sizes.sum()})")
        histogram.hist(sizes[sizes > 0], bins=edges, alpha=0.5, label=label)
    if aligned and len(first) <= 30:
        centre = np.arange(len(first)) + width * (len(arrays) - 1) / 2
        by_cluster.set_xticks(centre, [str(c) for c in order], fontsize=7)
    by_cluster.set_yscale("log")
    by_cluster.set_xlabel("cluster (largest first)" if aligned else "cluster rank (largest first)")
    by_cluster.set_ylabel(f"{unit} per cluster")
    histogram.set_xscale("log")
    histogram.set_xlabel(f"{unit} per cluster")
    histogram.set_ylabel("clusters")
    for ax in (by_cluster, histogram):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_png(fig, path)


def similarity_histogram(path: str | os.PathLike, values: np.ndarray, *, title: str, threshold: float | None) -> Path:
    """A histogram of similarities, with the threshold as a vertical line."""
    fig = new_figure(6.0, 3.5)
    ax = fig.add_subplot()
    ax.hist(np.asarray(values, dtype=np.float64), bins=50, color="0.4")
    if threshold is not None:
        ax.axvline(threshold, color="C3", ls="--", label=f"threshold {threshold:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("items")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def thumbnail_grid(
    path: str | os.PathLike,
    images: CollectionImages,
    groups: Sequence[tuple[str, Sequence[int]]],
    *,
    title: str,
    side: int = 64,
) -> Path | None:
    """One row of thumbnails per group (``(label, collection rows)``); ``None`` when there are no images."""
    groups = [(label, list(rows)) for label, rows in groups if len(rows)]
    if not images.available or not groups:
        return None
    cols = max(len(rows) for _, rows in groups)
    fig = new_figure(1.0 + 1.1 * cols, 0.4 + 1.1 * len(groups), dpi=90)
    for r, (label, rows) in enumerate(groups):
        for c, row in enumerate(rows):
            ax = fig.add_subplot(len(groups), cols, r * cols + c + 1)
            ax.imshow(images.thumbnail(int(row), side), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


def write_report(
    directory: str | os.PathLike,
    *,
    title: str,
    counts: Mapping[str, Any],
    figures: Sequence[tuple[str, str | os.PathLike | None]],
    settings: Mapping[str, Any] | None = None,
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
) -> Path:
    """Write ``directory/report.html``: the counts, the figures (``(caption, png)``; ``None`` skipped), tables
    (``(caption, header, rows)``) and the settings. Figure paths are linked relative to ``directory``."""
    directory = Path(directory)
    esc = html.escape
    parts = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
        "pre{background:#f7f7f7;padding:1em;overflow:auto}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Counts</h2>",
        _table(["", "value"], [[key, value] for key, value in counts.items()]),
    ]
    for caption, header, rows in tables:
        parts += [f"<h2>{esc(caption)}</h2>", _table(header, rows)]
    for caption, figure in figures:
        if figure is None:
            continue
        link = esc(os.path.relpath(figure, directory))
        parts.append(f"<figure><img src='{link}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>")
    if settings:
        parts += ["<h2>Settings</h2>", f"<pre>{esc(json.dumps(dict(settings), indent=2, default=str))}</pre>"]
    parts.append("</body></html>")
    path = directory / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
