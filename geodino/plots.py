"""Evaluation figures: a pred-vs-ref density plot and map previews, drawn with matplotlib's Figure API (no pyplot,
no global backend switch: ``core.plots``).

Both take small, already-reduced inputs (a 2-D histogram, decimated previews), so drawing costs the same for any
raster size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from matplotlib.colors import LogNorm
from rasterio.enums import Resampling

from core.plots import new_figure, save_png


def density_scatter(
    hist: np.ndarray,
    edges: np.ndarray,
    path: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    coverage: float = 0.999,
) -> Path:
    """Log-scaled 2-D histogram of (reference, prediction) pairs with a colour bar and the 1:1 line.

    Args:
        hist: counts, ``hist[i, j]`` = pixels with reference in bin ``i`` and prediction in bin ``j``.
        edges: the shared bin edges (metres).
        metrics: optional ``mae``/``rmse``/``r2``/``bias``/``n_pixels`` for the title.
        coverage: axes stop where this fraction of both marginals is included, so rare outliers don't squash it.
    """
    top = _axis_limit(hist, edges, coverage)
    fig = new_figure(5.5, 4.8, dpi=120)
    ax = fig.subplots()
    shown = np.ma.masked_equal(hist.T, 0)
    vmax = max(1, int(hist.max()))
    mesh = ax.pcolormesh(edges, edges, shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(vmax, 2)))
    ax.plot([0, top], [0, top], color="crimson", lw=1, ls="--", label="1:1")
    ax.set_xlim(edges[0], top)
    ax.set_ylim(edges[0], top)
    ax.set_aspect("equal")
    ax.set_xlabel("reference height (m)")
    ax.set_ylabel("predicted height (m)")
    ax.legend(loc="upper left", frameon=False)
    fig.colorbar(mesh, ax=ax, label="pixels")
    if metrics:
        ax.set_title(
            f"n={metrics.get('n_pixels', 0):,}  MAE={metrics.get('mae', float('nan')):.2f} m  "
            f"RMSE={metrics.get('rmse', float('nan')):.2f} m\nR²={metrics.get('r2', float('nan')):.3f}  "
            f"bias={metrics.get('bias', float('nan')):+.2f} m",
            fontsize=9,
        )
    return save_png(fig, path)


def map_previews(pred: np.ndarray, ref: np.ndarray, path: str | os.PathLike, *, factor: int = 1) -> Path:
    """Side-by-side prediction, reference and error (pred - ref) maps with colour bars; NaN is drawn blank."""
    both = np.concatenate([pred[np.isfinite(pred)], ref[np.isfinite(ref)]])
    vmax = float(np.percentile(both, 99)) if both.size else 1.0
    error = pred - ref
    finite_err = np.abs(error[np.isfinite(error)])
    emax = float(np.percentile(finite_err, 99)) if finite_err.size else 1.0
    fig = new_figure(14, 4.6, dpi=110)
    axes = fig.subplots(1, 3)
    panels = [
        (pred, "prediction (m)", "viridis", 0.0, max(vmax, 1e-6)),
        (ref, "reference (m)", "viridis", 0.0, max(vmax, 1e-6)),
        (error, "error: prediction - reference (m)", "RdBu_r", -max(emax, 1e-6), max(emax, 1e-6)),
    ]
    for ax, (image, title, cmap, lo, hi) in zip(axes, panels, strict=True):
        im = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="m")
    if factor > 1:
        fig.suptitle(f"previews decimated {factor}x", fontsize=9)
    return save_png(fig, path)


def raster_preview(
    tif_path: str | os.PathLike,
    png_path: str | os.PathLike | None = None,
    *,
    max_side: int = 1024,
    label: str = "canopy height (m)",
) -> Path:
    """PNG preview of a single-band height raster with a colour bar, read decimated (overviews when present), so
    memory stays bounded whatever the raster size; nodata is drawn blank."""
    tif_path = Path(tif_path)
    with rasterio.open(tif_path) as src:
        factor = max(1, -(-max(src.width, src.height) // max_side))
        shape = (max(1, src.height // factor), max(1, src.width // factor))
        band = src.read(1, out_shape=shape, masked=True, resampling=Resampling.average).astype("float32")
        scale = src.scales[0] if src.scales else 1.0
        values = np.where(band.mask, np.nan, band.filled(0) * scale)
    fig = new_figure(6.4, 5.2, dpi=110)
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    im = ax.imshow(
        np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-6), interpolation="nearest"
    )
    ax.set_title(f"{tif_path.name}" + (f" (decimated {factor}x)" if factor > 1 else ""), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    return save_png(fig, png_path or tif_path.with_suffix(".png"))


def _axis_limit(hist: np.ndarray, edges: np.ndarray, coverage: float) -> float:
    total = hist.sum()
    if total == 0:
        return float(edges[-1])
    limits = []
    for marginal in (hist.sum(axis=1), hist.sum(axis=0)):
        index = int(np.searchsorted(np.cumsum(marginal) / total, coverage))
        limits.append(edges[min(index + 1, len(edges) - 1)])
    return float(max(max(limits), edges[0] + 1.0))
