"""Seamless tiled canopy-height prediction of a whole raster into a Cloud-Optimised GeoTIFF.

Pipeline (memory bounded by one strip of tiles, never by the raster's area):

1. reader threads cut the raster into overlapping tiles (:class:`geodino.tiling.TileGrid`), read them windowed
   and boundless, normalise them with scene-level constants and queue whole batches (bounded queue), so I/O
   overlaps the model (:class:`geodino.tiling.TileBatchReader`);
2. the model predicts each batch; tiles are blended into a strip accumulator with smooth Hann weights;
3. once a tile row is done, the raster rows no later tile touches are divided out and written, on a background
   thread, to a partial GeoTIFF next to the output; a small JSON sidecar records the progress (plus the overlap sums
   still pending), so an interrupted run resumes without redoing finished strips and produces the identical file
   (:class:`geodino.cog.ResumableOutputs`);
4. the partial file becomes a COG (:func:`geodino.cog.write_cog`) renamed onto the final name.

Batches never span tile rows: a resumed run then sees exactly the batches of an uninterrupted one, so even
batch-size-dependent kernels give bit-identical output.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from core.errors import DinoscopeError
from core.logging import progress as progress_bar
from geodino.cog import ResumableOutputs, check_out_dtype
from geodino.outputs import RECORD_TAG
from geodino.raster import RasterSource
from geodino.tiling import StripAccumulator, TileBatchReader, TileGrid

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def predict_raster(
    model_fn: ModelFn,
    source: RasterSource | Any,
    normaliser: Callable[..., np.ndarray],
    out_path: str | os.PathLike,
    *,
    tile: int = 256,
    overlap: int = 64,
    margin: int = 0,
    batch_size: int = 8,
    out_dtype: str = "float32",
    uint16_scale: float = 100,
    uncertainty_path: str | os.PathLike | None = None,
    resume: bool = True,
    num_workers: int = 1,
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> Path:
    """Predict canopy height over ``source`` and write it as a COG at ``out_path``.

    Args:
        model_fn: ``batch float32 [B, C, tile, tile] -> {"height": [B, tile, tile] metres, "std": optional}``;
            called under ``torch.inference_mode``; it moves the batch to its device itself.
        source: the input raster (its selected bands are the model's channels): a
            :class:`geodino.raster.RasterSource`, or a :class:`geodino.mosaic.RegionSource` (one input of a mosaic,
            whose border tiles read the neighbours' pixels) or :class:`geodino.mosaic.MosaicSource`.
        normaliser: ``(data C x H x W, valid H x W) -> float32``, e.g. a :class:`geodino.normalise.BandNormaliser`
            holding scene-level constants.
        out_path: the COG to write; CRS, transform and size are the input's; input nodata stays nodata.
        tile, overlap: tile size and overlap in pixels (stride ``tile - overlap``).
        margin: inner tile border given weight 0 (see :mod:`geodino.tiling`); 0 keeps every weight positive.
        batch_size: tiles per model call (a batch never spans two tile rows).
        out_dtype: ``"float32"`` (metres, nodata NaN) or ``"uint16"`` (``metres * uint16_scale``, nodata 65535).
        uncertainty_path: where to write the per-pixel ``std`` as a second COG (same encoding); overlapping tiles'
            std values are averaged with the same blending weights as the heights.
        resume: continue from a previous interrupted run's partial file and sidecar when they match this run.
        num_workers: reader threads, each with its own file handle.
        progress: show a progress bar over tile rows.
        record: how this prediction is made (:func:`geodino.outputs.prediction_record`): stored in the COG's tags
            and part of what a resumed run must match, so a partial file of another model is never continued.

    Returns:
        ``out_path``.

    Example::

        from geodino import RasterSource, load_canopy_model, predict_raster
        model = load_canopy_model("model.safetensors", device="cuda")
        with RasterSource("scene.tif", bands=model.band_names) as src:
            predict_raster(model.predict_batch, src, model.normaliser, "scene_chm.tif", tile=512, overlap=128)
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_out_dtype(out_dtype, uint16_scale)
    if batch_size < 1 or num_workers < 1:
        raise DinoscopeError(
            f"batch_size and num_workers must be at least 1, got {batch_size} and {num_workers}", field="batch_size"
        )
    grid = TileGrid(source.height, source.width, tile, overlap, margin, origin=source.origin, extent=source.extent)
    paths = [out_path] + ([Path(uncertainty_path)] if uncertainty_path is not None else [])
    config = _run_config(source, grid, batch_size, out_dtype, uint16_scale, paths) | {"record": record}
    outputs = ResumableOutputs(paths, source, out_dtype=out_dtype, uint16_scale=uint16_scale, config=config)
    accumulator = StripAccumulator(grid, len(paths))
    # GDAL's block cache defaults to 5 % of RAM and would fill up with blocks that are never read again.
    with rasterio.Env(GDAL_CACHEMAX=_gdal_cache_bytes(source, tile)):
        try:
            start_row, carry = outputs.start(resume)
            if carry is not None:
                accumulator.restore(carry)
            reader = TileBatchReader(source, normaliser, grid, start_row, batch_size, num_workers)
            try:
                rows = progress_bar(
                    range(start_row, len(grid.rows)),
                    total=len(grid.rows),
                    initial=start_row,
                    desc=f"predict {source.path.name}",
                    unit="strip",
                    disable=None if progress else True,
                )
                for row_index in rows:
                    y = grid.rows[row_index]
                    for cols, batch, valid in reader.row(row_index):
                        predicted = _run_model(model_fn, batch, tile, n_values=len(paths))
                        for k, x in enumerate(cols):
                            accumulator.add(y, x, predicted[:, k], valid[k])
                    first, stop = grid.finished_rows(row_index)
                    values, valid_rows = accumulator.pop_rows(stop)
                    outputs.commit(row_index, first, values, valid_rows, accumulator.carry())
            finally:
                reader.close()
            outputs.finish(source.path.name, {RECORD_TAG: json.dumps(record, sort_keys=True)} if record else None)
        finally:
            outputs.close()
    return out_path


# -- internals -------------------------------------------------------------------------------------------------
def _run_model(model_fn: ModelFn, batch: torch.Tensor, tile: int, *, n_values: int) -> np.ndarray:
    """``n_values x B x tile x tile`` float32 predictions: height, then std when two values are asked for."""
    with torch.inference_mode():
        out = model_fn(batch)
    keys = ["height", "std"][:n_values]
    values = []
    for key in keys:
        if key not in out:
            raise DinoscopeError(
                f"the model returned no {key!r} output (keys: {sorted(out)})",
                field=key,
                fix="drop the uncertainty output or use a model that predicts height bins"
                if key == "std"
                else "model_fn must return a dict with a 'height' tensor",
            )
        value = out[key].detach().float().cpu().numpy()
        if value.shape != (batch.shape[0], tile, tile):
            raise DinoscopeError(
                f"model output {key!r} has shape {tuple(value.shape)}, expected {(batch.shape[0], tile, tile)}",
                field=key,
                fix="the model must return one value per input pixel (upsample its output)",
            )
        values.append(value)
    return np.stack(values)


def _run_config(
    source: Any, grid: TileGrid, batch_size: int, out_dtype: str, uint16_scale: float, outputs: list[Path]
) -> dict[str, Any]:
    """What must match between an interrupted run and its resumption."""
    return {
        "source": str(Path(source.path).resolve()),
        "bands": list(map(int, source.indexes)),
        "size": [source.height, source.width],
        "transform": list(source.transform)[:6],
        "tile": grid.tile,
        "overlap": grid.overlap,
        "margin": grid.margin,
        "batch_size": batch_size,
        "out_dtype": out_dtype,
        "uint16_scale": float(uint16_scale),
        "outputs": [str(p.resolve()) for p in outputs],
        "origin": list(source.origin),
        "extent": list(source.extent),
        "context": source.context(),
        "convert": source.convert.to_dict() if source.convert is not None else None,
    }


def _gdal_cache_bytes(source: Any, tile: int) -> int:
    """Enough GDAL block cache to keep the input blocks under two tile rows across the full width, plus 16 MiB.

    Consecutive tile rows overlap, so those blocks are read again by the next row; anything more is never reused
    and would only make memory grow with the raster.
    """
    block_rows = int(source.profile.get("blockysize") or 1)
    row_bytes = source.width * source.count * np.dtype(source.dtype).itemsize
    return 2 * max(tile, block_rows) * row_bytes + (16 << 20)
