"""Compare a predicted canopy-height raster with a reference CHM: metrics.json and figures.

The reference is warped lazily onto the prediction's grid (:class:`geodino.align.AlignedTarget`, the engine of
``align_to_grid``) and both are read window by window, so memory does not grow with the raster. Pixels that are
nodata in either raster are left out. Block R² follows HRCH: blocks of ``block`` pixels after a ``trim`` pixel
border, here the border of the whole raster, with windows whose origins stay on the global block grid.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from core.errors import DinoscopeError
from core.io import write_json
from geodino.align import AlignedTarget
from geodino.metrics import CanopyMetrics
from geodino.outputs import check_output_path
from geodino.plots import density_scatter, map_previews
from geodino.raster import RasterSource

log = logging.getLogger(__name__)

HIST_MAX_M = 100.0
HIST_BIN_M = 0.25


def evaluate_rasters(
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resampling: str = "bilinear",
    block: int = 50,
    trim: int = 3,
    pred_scale: float | None = None,
    ref_scale: float | None = None,
    preview_size: int = 800,
    window_blocks: tuple[int, int] = (10, 40),
) -> dict[str, Any]:
    """Evaluate ``pred_path`` against ``ref_path`` and write ``out_dir/metrics.json`` plus PNG figures.

    Args:
        resampling: how the reference is resampled onto the prediction grid (recorded in the output).
        block, trim: HRCH block-R² block size and border trim, in pixels.
        pred_scale, ref_scale: metres per stored unit; default from the file's GDAL scale/offset (1 when unset).
            Use e.g. ``ref_scale=0.1`` for a decimetre CHM without scale metadata.
        preview_size: longest side of the decimated map previews.
        window_blocks: window size in blocks (rows, columns); bounds memory.

    Returns:
        the metrics dictionary that was written.

    Example::

        from geodino import evaluate_rasters
        metrics = evaluate_rasters("chm_pred.tif", "lidar_chm.tif", "eval/", resampling="average")
        print(metrics["mae"], metrics["block_r2"])
    """
    out_dir = check_output_path(out_dir, is_dir=True)
    _check_single_band(pred_path, "PRED", "a canopy-height prediction", "the COG written by `canopy predict`")
    _check_single_band(ref_path, "REF", "a CHM", "the single-band canopy height model (e.g. a lidar CHM)")
    counts = {"pred": 0, "ref": 0}
    metrics = CanopyMetrics(block=block, trim=trim, blocks_from_updates=False)
    edges = np.arange(0.0, HIST_MAX_M + HIST_BIN_M / 2, HIST_BIN_M)
    hist = np.zeros((len(edges) - 1, len(edges) - 1), np.int64)
    with RasterSource(pred_path, bands=[1]) as pred_src, AlignedTarget(ref_path, pred_src, resampling) as ref_src:
        if not ref_src.overlaps():
            raise DinoscopeError(
                f"the reference does not overlap the prediction (reference CRS {_crs_name(_file_crs(ref_path))}, "
                f"prediction CRS {_crs_name(pred_src.crs)})",
                path=ref_path,
                field="bounds",
                fix="check that both rasters cover the same area and that each file's CRS is set correctly",
            )
        pred_scale, pred_offset = _scaling(pred_path, pred_scale)
        ref_scale, ref_offset = _scaling(ref_path, ref_scale)
        factor = max(1, math.ceil(max(pred_src.width, pred_src.height) / preview_size))
        preview_shape = (math.ceil(pred_src.height / factor), math.ceil(pred_src.width / factor))
        pred_preview = np.full(preview_shape, np.nan, np.float32)
        ref_preview = np.full(preview_shape, np.nan, np.float32)
        for window, blocks_ok in _windows(pred_src.height, pred_src.width, block, trim, window_blocks):
            raw, pred_valid = pred_src.read(window, boundless=False)
            pred = raw[0] * pred_scale + pred_offset
            ref, ref_valid = ref_src.read(window)
            ref = ref * ref_scale + ref_offset
            valid = pred_valid & ref_valid
            counts["pred"] += int(pred_valid.sum())
            counts["ref"] += int(ref_valid.sum())
            metrics.update(pred, ref, valid)
            if blocks_ok:
                metrics.update_blocks(pred, ref, valid, trim=0)
            pair = np.clip(np.stack([ref[valid], pred[valid]]), edges[0], edges[-1] - 1e-6)
            hist += np.histogram2d(pair[0], pair[1], bins=(edges, edges))[0].astype(np.int64)
            _fill_preview(pred_preview, np.where(pred_valid, pred, np.nan), window, factor)
            _fill_preview(ref_preview, np.where(ref_valid, ref, np.nan), window, factor)
    result = metrics.result()
    if result["n_pixels"] == 0:
        _no_common_pixels(pred_path, ref_path, counts)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "density": density_scatter(hist, edges, out_dir / "pred_vs_ref_density.png", metrics=result).name,
        "maps": map_previews(pred_preview, ref_preview, out_dir / "maps.png", factor=factor).name,
    }
    result.update(
        units="m",
        pred=str(pred_path),
        ref=str(ref_path),
        resampling=resampling,
        pred_scale=pred_scale,
        ref_scale=ref_scale,
        preview_factor=factor,
        plots=plots,
        definitions="HRCH (Tolan et al. 2024) and Open-Canopy (Fogel et al. 2025): bias = mean(pred - ref); "
        "nmae excludes ref < 2 m; iou = |A&B| / (|A|B| + 1) with cover = height > threshold; per_bin by reference "
        "height",
    )
    write_json(out_dir / "metrics.json", _finite(result))
    log.info(
        "MAE %.3f m, RMSE %.3f m, R2 %.3f, block R2 %.3f over %d pixels -> %s",
        result["mae"],
        result["rmse"],
        result["r2"],
        result["block_r2"],
        result["n_pixels"],
        out_dir / "metrics.json",
    )
    return result


def _check_single_band(path: str | os.PathLike, name: str, what: str, wanted: str) -> None:
    """Refuse a multi-band raster (an RGB image given instead of a height raster) before any pixel is compared."""
    with RasterSource(path) as src:
        if src.count != 1:
            raise DinoscopeError(
                f"{name} has {src.count} bands; {what} has one",
                path=path,
                field=name.lower(),
                fix=f"give {wanted}, not an image; to use one band of this file: "
                f"`gdal_translate -b 1 {path} {Path(path).stem}_band1.tif`",
            )


def _no_common_pixels(pred_path: str | os.PathLike, ref_path: str | os.PathLike, counts: dict[str, int]) -> None:
    """Explain why no pixel can be compared (always raises)."""
    if counts["pred"] == 0:
        why, path = "PRED has no valid pixel: every pixel is nodata", pred_path
        fix = "check PRED's nodata value, or predict again (an empty input tile?)"
    elif counts["ref"] == 0:
        why, path = "REF has no valid pixel inside PRED's extent: where they overlap, REF is all nodata", ref_path
        fix = "check REF's nodata value and that REF covers the predicted area, not just touches it"
    else:
        why, path = (
            f"PRED's {counts['pred']} valid pixels and REF's {counts['ref']} valid pixels (on PRED's grid) do not "
            "coincide anywhere",
            ref_path,
        )
        fix = "the valid parts of the two rasters do not overlap: check that they cover the same area"
    raise DinoscopeError(f"no pixel is valid in both rasters: {why}", path=path, field="nodata", fix=fix)


def _windows(
    height: int, width: int, block: int, trim: int, window_blocks: tuple[int, int]
) -> Iterator[tuple[Window, bool]]:
    """Windows covering the raster; the flag says whether the window lies on the trimmed, block-aligned area."""
    row_segments = _segments(height, block * window_blocks[0], trim)
    col_segments = _segments(width, block * window_blocks[1], trim)
    for r0, r1, r_inner in row_segments:
        for c0, c1, c_inner in col_segments:
            yield Window(c0, r0, c1 - c0, r1 - r0), r_inner and c_inner


def _segments(length: int, chunk: int, trim: int) -> list[tuple[int, int, bool]]:
    inner_start, inner_stop = min(trim, length), max(min(trim, length), length - trim)
    cuts = [(0, inner_start, False)] if inner_start > 0 else []
    cuts += [(s, min(s + chunk, inner_stop), True) for s in range(inner_start, inner_stop, chunk)]
    if inner_stop < length:
        cuts.append((inner_stop, length, False))
    return cuts


def _fill_preview(preview: np.ndarray, values: np.ndarray, window: Window, factor: int) -> None:
    row0, col0 = int(window.row_off), int(window.col_off)
    first_row = -row0 % factor
    first_col = -col0 % factor
    sampled = values[first_row::factor, first_col::factor]
    pr, pc = (row0 + first_row) // factor, (col0 + first_col) // factor
    preview[pr : pr + sampled.shape[0], pc : pc + sampled.shape[1]] = sampled


def _scaling(path: str | os.PathLike, scale: float | None) -> tuple[float, float]:
    if scale is not None:
        return float(scale), 0.0
    with rasterio.open(path) as ds:
        return float(ds.scales[0]), float(ds.offsets[0])


def _file_crs(path: str | os.PathLike) -> Any:
    with rasterio.open(path) as ds:
        return ds.crs


def _crs_name(crs: Any) -> str:
    if crs is None:
        return "none"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()[:60]


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics (e.g. R² of a constant reference) become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
