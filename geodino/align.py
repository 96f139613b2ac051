"""Put a target raster (lidar CHM, DEM, label map) on an image's pixel grid.

A lidar canopy-height model rarely shares the image's CRS, resolution or extent. :class:`AlignedTarget` wraps the
target in a GDAL warped VRT (rasterio ``WarpedVRT``) defined on the image grid, so any image window can be read
from it lazily, and windows read separately agree exactly with a whole-grid warp (no seams). Outside the target's
footprint the result is invalid (NaN, ``valid`` False), never 0, since 0 m is a real canopy height.

Resampling matters for canopy height (it moves MAE by metres) and must be recorded: bilinear when the target is
upsampled; ``max`` (canopy top) or ``average`` (mean height) when it is downsampled (Open-Canopy, Fogel et al.,
CVPR 2025, uses bilinear up and max-pooling down).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from core.errors import DinoscopeError
from core.io import atomic_path
from geodino.raster import RasterSource, grid_windows, intersect_window, pixel_window, tile_size_for

log = logging.getLogger(__name__)

RESAMPLING: dict[str, Resampling] = {
    "nearest": Resampling.nearest,
    "bilinear": Resampling.bilinear,
    "cubic": Resampling.cubic,
    "average": Resampling.average,
    "max": Resampling.max,
    "min": Resampling.min,
    "med": Resampling.med,
    "mode": Resampling.mode,
}


class AlignedTarget:
    """Band ``band`` of ``target_path`` warped lazily onto the grid of ``like``.

    Args:
        target_path: the raster to align (any CRS GDAL understands).
        like: the image whose CRS, transform and size define the output grid.
        resampling: one of :data:`RESAMPLING`.
        band: 1-based band of the target to read.
    """

    def __init__(
        self, target_path: str | os.PathLike, like: RasterSource, resampling: str = "bilinear", band: int = 1
    ) -> None:
        self.path = Path(target_path)
        self.like = like
        self.resampling = resampling
        self.band = band
        method = _resampling(resampling)
        self._target = RasterSource(self.path, bands=[band])
        self._vrt = None
        try:
            self._open_warp(method)
        except DinoscopeError:
            self._target.close()
            raise

    def _open_warp(self, method: Resampling) -> None:
        src, like = self._target.dataset, self.like
        for name, crs, path in (("target", src.crs, self.path), ("image", like.crs, like.path)):
            if crs is None:
                raise DinoscopeError(
                    f"the {name} raster has no CRS, so it cannot be aligned",
                    path=path,
                    field="crs",
                    fix="assign the CRS, e.g. `gdal_edit.py -a_srs EPSG:32617 FILE`",
                )
        # On an identical grid, read directly: no warping cost and bit-exact values.
        if (
            src.crs == like.crs
            and src.transform == like.transform
            and (src.width, src.height) == (like.width, like.height)
        ):
            return
        try:
            self._vrt = WarpedVRT(
                src,
                crs=like.crs,
                transform=like.transform,
                width=like.width,
                height=like.height,
                resampling=method,
                dtype="float32",
                nodata=np.nan,
            )
        except RasterioError as err:
            raise DinoscopeError(
                f"cannot warp the target onto the image grid ({err})",
                path=self.path,
                field="crs",
                fix="check that both rasters have valid, compatible CRSs",
            ) from None

    def overlaps(self) -> bool:
        """Whether the target's footprint intersects the image extent at all."""
        left, bottom, right, top = transform_bounds(self._target.crs, self.like.crs, *self._target.bounds)
        image = self.like.bounds
        return left < image.right and right > image.left and bottom < image.top and top > image.bottom

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Target values float32 ``h x w`` (NaN where invalid) and ``valid`` bool ``h x w`` for an image window.

        Parts of the window outside the image grid are invalid.
        """
        if self._vrt is None:
            data, valid = self._target.read(window)
            return np.where(valid, data[0], np.float32(np.nan)), valid
        col, row, width, height = pixel_window(window)
        values = np.full((height, width), np.nan, np.float32)
        inner = intersect_window(col, row, width, height, self.like.width, self.like.height)
        if inner is not None:
            icol, irow, iwidth, iheight = inner
            try:
                part = self._vrt.read(self.band, window=Window(icol, irow, iwidth, iheight))
            except RasterioError as err:
                cause = f": {err.__cause__}" if err.__cause__ else ""
                raise DinoscopeError(
                    f"could not read the target while warping it: {err}{cause}",
                    path=self.path,
                    field="pixels",
                    fix="the file is probably truncated or corrupt",
                ) from None
            values[irow - row : irow - row + iheight, icol - col : icol - col + iwidth] = part
        return values, np.isfinite(values)

    def close(self) -> None:
        """Close the warped VRT and the target dataset (also done on leaving a ``with`` block)."""
        if self._vrt is not None:
            self._vrt.close()
        self._target.close()

    def __enter__(self) -> AlignedTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "like": self.like, "resampling": self.resampling, "band": self.band}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["like"], state["resampling"], state["band"])  # type: ignore[misc]


def align_to_grid(
    target_path: str | os.PathLike, like: RasterSource, window: Window | None = None, resampling: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """Reproject and resample band 1 of ``target_path`` onto ``like``'s grid, or one window of it.

    Returns:
        ``values`` float32 ``h x w`` (NaN where invalid) and ``valid`` bool ``h x w``; invalid outside the
        target's footprint and where the target is nodata/masked.
    """
    window = window if window is not None else Window(0, 0, like.width, like.height)
    with AlignedTarget(target_path, like, resampling=resampling) as target:
        return target.read(window)


def align_raster_file(
    target_path: str | os.PathLike,
    like_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    resampling: str = "bilinear",
    block_size: int = 512,
) -> Path:
    """Write ``target_path`` aligned to ``like_path``'s grid as a tiled float32 GeoTIFF (nodata NaN).

    The output is written window by window (memory bounded by ``block_size``) to a temporary name and renamed on
    success. The resampling method is recorded in the file's tags.
    """
    out_path = Path(out_path)
    with RasterSource(like_path) as like, AlignedTarget(target_path, like, resampling=resampling) as target:
        if not target.overlaps():
            raise DinoscopeError(
                "the target raster does not overlap the image",
                path=target_path,
                field="bounds",
                fix=f"give a target that covers part of {like_path}",
            )
        tile = tile_size_for(like.width, like.height)
        profile = {
            "driver": "GTiff",
            "dtype": "float32",
            "count": 1,
            "width": like.width,
            "height": like.height,
            "crs": like.crs,
            "transform": like.transform,
            "nodata": np.nan,
            "tiled": True,
            "blockxsize": tile,
            "blockysize": tile,
            "compress": "deflate",
            "predictor": 3,
            "BIGTIFF": "IF_SAFER",
        }
        with atomic_path(out_path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            for window in grid_windows(like.width, like.height, block_size):
                values, _ = target.read(window)
                dst.write(values, 1, window=window)
            dst.update_tags(source=str(target_path), resampling=resampling, grid_of=str(like_path))
            dst.set_band_description(1, Path(target_path).stem)
    log.info("aligned %s onto the grid of %s -> %s (%s)", target_path, like_path, out_path, resampling)
    return out_path


def _resampling(name: str) -> Resampling:
    try:
        return RESAMPLING[name]
    except KeyError:
        raise DinoscopeError(
            f"unknown resampling {name!r}", field="resampling", fix=f"use one of {sorted(RESAMPLING)}"
        ) from None
