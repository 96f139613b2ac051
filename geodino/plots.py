"""Figures: a pred-vs-ref density plot, evaluation map previews and the prediction preview (the input RGB beside
the heights, with colour and scale bars), drawn with matplotlib's Figure API (no pyplot, no global backend switch:
``core.plots``).

All take small, already-reduced inputs (a 2-D histogram, decimated reads), so drawing costs the same for any raster
size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from matplotlib.colors import LogNorm
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from rasterio.enums import Resampling

from core.plots import new_figure, save_png
from geodino.raster import RasterSource


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
    rgb: Any = None,
    max_side: int = 640,
    label: str = "canopy height (m)",
) -> Path:
    """PNG preview of a single-band height raster: the input RGB beside the height map, a colour bar and a scale bar.

    ``rgb`` is the image the heights were predicted from (a path, or any reader with ``read_decimated``,
    ``transform``, ``width``, ``height`` and ``crs`` such as :class:`geodino.raster.RasterSource` or a mosaic); its
    first three selected bands are shown with a 2-98 % stretch. Both are read decimated (overviews when present), so
    memory stays bounded whatever the raster size; nodata is drawn blank. Panels share map coordinates, so the scale
    bar (in metres, or converted from degrees at the centre latitude) holds for both.
    """
    tif_path = Path(tif_path)
    with rasterio.open(tif_path) as src:
        factor = max(1, -(-max(src.width, src.height) // max_side))
        shape = (max(1, src.height // factor), max(1, src.width // factor))
        band = src.read(1, out_shape=shape, masked=True, resampling=Resampling.average).astype("float32")
        values = np.where(band.mask, np.nan, band.filled(0) * src.scales[0] + src.offsets[0])
        extent = _extent(src.transform, src.width, src.height)
        crs = src.crs
    panels = 2 if rgb is not None else 1
    fig = new_figure(5.6 * panels + 0.8, 5.2, dpi=110)
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if rgb is not None:
        image, rgb_extent = _rgb_image(rgb, max_side)
        axes[0].imshow(image, extent=rgb_extent, interpolation="nearest")
        axes[0].set_title("input image", fontsize=9)
    finite = values[np.isfinite(values)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    im = axes[-1].imshow(
        np.ma.masked_invalid(values),
        cmap="viridis",
        vmin=0.0,
        vmax=max(vmax, 1e-6),
        interpolation="nearest",
        extent=extent,
    )
    axes[-1].set_title(f"{tif_path.name}" + (f" (decimated {factor}x)" if factor > 1 else ""), fontsize=9)
    for ax in axes:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xticks([])
        ax.set_yticks([])
        _scale_bar(ax, crs, extent)
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.04, label=label)
    return save_png(fig, png_path or tif_path.with_suffix(".png"))


def _extent(transform: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` of a north-up grid, as imshow's ``extent``."""
    xs = (transform.c, transform.c + width * transform.a)
    ys = (transform.f, transform.f + height * transform.e)
    return min(xs), max(xs), min(ys), max(ys)


def _rgb_image(source: Any, max_side: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """RGBA float image (2-98 % stretch per band, transparent where invalid) of up to three bands, and its extent."""
    own = isinstance(source, (str, os.PathLike))
    reader = RasterSource(source) if own else source
    try:
        data, valid = reader.read_decimated(max_side * max_side)
        extent = _extent(reader.transform, reader.width, reader.height)
    finally:
        if own:
            reader.close()
    bands = data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, axis=0)
    out = np.zeros((*bands.shape[1:], 4), np.float32)
    for k in range(3):
        values = bands[k][valid]
        low, high = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        out[..., k] = np.clip((bands[k] - low) / max(high - low, 1e-6), 0, 1)
    out[..., 3] = valid
    return out, extent


def _scale_bar(ax: Any, crs: Any, extent: tuple[float, float, float, float]) -> None:
    """A scale bar of a round length (1, 2 or 5 x 10^k m) about a quarter of the map's width, lower left."""
    left, right, bottom, top = extent
    if crs is not None and crs.is_geographic:
        metres_per_unit = 111_320.0 * max(math.cos(math.radians((bottom + top) / 2)), 1e-6)
    elif crs is not None:
        metres_per_unit = float(crs.linear_units_factor[1])
    else:
        return
    width_m = (right - left) * metres_per_unit
    if not width_m > 0:
        return
    magnitude = 10 ** math.floor(math.log10(width_m / 4))
    length = max(m * magnitude for m in (1, 2, 5) if m * magnitude <= width_m / 4)
    text = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    bar = AnchoredSizeBar(
        ax.transData,
        length / metres_per_unit,
        text,
        "lower left",
        pad=0.4,
        color="black",
        frameon=True,
        size_vertical=(top - bottom) / 150,
    )
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)


def _axis_limit(hist: np.ndarray, edges: np.ndarray, coverage: float) -> float:
    total = hist.sum()
    if total == 0:
        return float(edges[-1])
    limits = []
    for marginal in (hist.sum(axis=1), hist.sum(axis=0)):
        index = int(np.searchsorted(np.cumsum(marginal) / total, coverage))
        limits.append(edges[min(index + 1, len(edges) - 1)])
    return float(max(max(limits), edges[0] + 1.0))
