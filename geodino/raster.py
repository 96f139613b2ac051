"""Windowed, nodata-aware reading of GeoTIFF, COG and VRT rasters.

:class:`RasterSource` is the single entry point through which geodino reads imagery. It never loads a whole raster:
every read names a window (or, for statistics, a bounded decimated read that GDAL serves from overviews when the
file has them). Each read returns raw values as float32 plus a validity mask that combines the nodata value, the
dataset's own mask (internal mask, alpha band), NaN and, for boundless reads, the area outside the raster.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from core.errors import DinoscopeError

# Colour interpretations that make a meaningful band name; others (gray, undefined...) fall back to "band<i>".
_NAMED_INTERPS = {c for c in ColorInterp} - {ColorInterp.undefined, ColorInterp.gray, ColorInterp.palette}
_CORRUPT_FIX = (
    "the file is probably truncated or corrupt: check it with `gdalinfo -checksum`, then re-download or re-export it"
)


class RasterSource:
    """A raster opened for windowed reads of selected bands.

    Args:
        path: a GeoTIFF, COG, VRT or any other GDAL raster.
        bands: 1-based band indices or band names (descriptions, or colour interpretations such as ``red``),
            in the order wanted; ``None`` selects every band.

    Attributes:
        path, crs, transform, width, height, dtype, nodata, res: as in the file (``res`` is ``(x, y)`` > 0).
        count: number of *selected* bands.
        indexes: the selected 1-based band indices.
        band_names: one name per selected band.

    Example::

        from rasterio.windows import Window
        from geodino import RasterSource

        with RasterSource("naip.tif", bands=["red", "green", "blue"]) as src:
            data, valid = src.read(Window(0, 0, 512, 512))   # float32 (3, 512, 512) and bool (512, 512)
    """

    def __init__(self, path: str | os.PathLike, bands: Sequence[int | str] | None = None) -> None:
        self.path = Path(path)
        self._requested_bands = None if bands is None else list(bands)
        self._ds = open_dataset(self.path)
        ds = self._ds
        all_names = [_band_name(ds, i) for i in range(1, ds.count + 1)]
        try:
            self.indexes = _resolve_bands(self.path, ds, all_names, self._requested_bands)
        except DinoscopeError:
            ds.close()
            raise
        self.band_names = [all_names[i - 1] for i in self.indexes]
        self.count = len(self.indexes)
        self.crs = ds.crs
        self.transform: Affine = ds.transform
        self.width = ds.width
        self.height = ds.height
        self.dtype = ds.dtypes[self.indexes[0] - 1]
        self.nodata = ds.nodata
        self.res = (abs(ds.res[0]), abs(ds.res[1]))
        self.bounds = ds.bounds
        flags = [ds.mask_flag_enums[i - 1] for i in self.indexes]
        # Bands whose mask is neither "all valid" nor derived from the nodata value carry a real mask (internal
        # .msk, alpha band, per-band mask) that must be read explicitly.
        self._mask_indexes = [
            i
            for i, f in zip(self.indexes, flags, strict=False)
            if MaskFlags.all_valid not in f and MaskFlags.nodata not in f
        ]
        if any(MaskFlags.per_dataset in f for f in flags) and self._mask_indexes:
            self._mask_indexes = self._mask_indexes[:1]

    # -- reading -------------------------------------------------------------------------------------------
    def read(self, window: Window, boundless: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read a window of the selected bands.

        Returns:
            ``data`` float32 ``C x h x w`` raw values (0 outside the raster) and ``valid`` bool ``h x w``. With
            ``boundless`` the output always has the window's (rounded) size and pixels outside the raster are
            invalid; without it the window is clipped to the raster.
        """
        col, row, width, height = pixel_window(window)
        inner = intersect_window(col, row, width, height, self.width, self.height)
        if not boundless:
            if inner is None:
                return np.zeros((self.count, 0, 0), np.float32), np.zeros((0, 0), bool)
            col, row, width, height = inner
        data = np.zeros((self.count, height, width), np.float32)
        valid = np.zeros((height, width), bool)
        if inner is None:
            return data, valid
        icol, irow, iwidth, iheight = inner
        raw, inner_valid = self._read_inside(Window(icol, irow, iwidth, iheight))
        rows = slice(irow - row, irow - row + iheight)
        cols = slice(icol - col, icol - col + iwidth)
        data[:, rows, cols] = raw
        valid[rows, cols] = inner_valid
        return data, valid

    def read_decimated(self, max_pixels: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
        """Read the whole extent at reduced resolution, at most ``max_pixels`` pixels per band.

        Nearest-neighbour sampling keeps nodata values intact; GDAL serves the read from overviews when the file
        has them, so memory and I/O stay bounded by ``max_pixels`` however large the raster is.
        """
        factor = max(1.0, math.sqrt(self.width * self.height / max(1, max_pixels)))
        out_h = max(1, int(self.height / factor))
        out_w = max(1, int(self.width / factor))
        window = Window(0, 0, self.width, self.height)
        return self._read_inside(window, out_shape=(out_h, out_w))

    def _read_inside(self, window: Window, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        kwargs: dict[str, Any] = {"window": window}
        if out_shape is not None:
            kwargs.update(out_shape=(len(self.indexes), *out_shape), resampling=Resampling.nearest)
        try:
            raw = self._ds.read(self.indexes, **kwargs)
            valid = self._valid(raw)
            if self._mask_indexes:
                if out_shape is not None:
                    kwargs["out_shape"] = (len(self._mask_indexes), *out_shape)
                valid &= (self._ds.read_masks(self._mask_indexes, **kwargs) > 0).all(axis=0)
        except RasterioError as err:
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise DinoscopeError(
                f"could not read pixels (window {window.col_off:.0f},{window.row_off:.0f} "
                f"{window.width:.0f}x{window.height:.0f}): {err}{cause}",
                path=self.path,
                field="pixels",
                fix=_CORRUPT_FIX,
            ) from None
        return raw.astype(np.float32, copy=False), valid

    def _valid(self, raw: np.ndarray) -> np.ndarray:
        valid = np.ones(raw.shape[1:], bool)
        if np.issubdtype(raw.dtype, np.floating):
            valid &= np.isfinite(raw).all(axis=0)
        if self.nodata is not None and not np.isnan(self.nodata):
            valid &= ~(raw == np.asarray(self.nodata).astype(raw.dtype)).any(axis=0)
        return valid

    # -- geometry ------------------------------------------------------------------------------------------
    def window_transform(self, window: Window) -> Affine:
        """Affine transform of a window's top-left pixel."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of a window in the raster's CRS."""
        col, row, width, height = window.col_off, window.row_off, window.width, window.height
        xs, ys = zip(
            *(
                self.transform @ corner
                for corner in ((col, row), (col + width, row), (col, row + height), (col + width, row + height))
            ),
            strict=False,
        )
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def dataset(self) -> rasterio.io.DatasetReader:
        """The open rasterio dataset (for warping); prefer :meth:`read` for pixels."""
        return self._ds

    @property
    def profile(self) -> dict[str, Any]:
        """The dataset profile (driver, dtype, CRS, transform...) for writers that copy the grid."""
        return dict(self._ds.profile)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the rasterio dataset (also done on leaving a ``with`` block)."""
        self._ds.close()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # GDAL handles cannot cross process boundaries (DataLoader workers); reopen on unpickling instead.
        return {"path": self.path, "bands": self._requested_bands}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["bands"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"RasterSource({str(self.path)!r}, bands={self.band_names}, {self.width}x{self.height}, "
            f"{self.dtype}, crs={self.crs})"
        )


def check_band_count(source: RasterSource, expected: int, *, expected_by: str = "the model") -> None:
    """Raise a :class:`DinoscopeError` unless ``source`` has exactly ``expected`` selected bands."""
    if source.count != expected:
        raise DinoscopeError(
            f"{expected_by} expects {expected} bands but {source.count} are selected ({source.band_names})",
            path=source.path,
            field="bands",
            fix=f"select exactly {expected} bands, e.g. bands=[1, 2, 3] or by name from {source.band_names}",
        )


def grid_windows(width: int, height: int, size: int) -> Iterator[Window]:
    """Non-overlapping ``size`` x ``size`` windows covering a ``width`` x ``height`` grid (edges clipped)."""
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))


def tile_size_for(width: int, height: int) -> int:
    """Internal tile edge for a GeoTIFF we write: 256 (the COG default), smaller for small rasters.

    A single tile as large as the raster would read back as a striped file, so small rasters get smaller tiles.
    """
    return int(min(256, max(16, (min(width, height) // 2) // 16 * 16)))


def open_dataset(path: Path) -> rasterio.io.DatasetReader:
    """Open ``path`` with rasterio, turning a missing or unreadable file into a :class:`DinoscopeError`."""
    if not path.exists():
        raise DinoscopeError("file not found", path=path, field="path", fix="check the path and the working directory")
    if path.is_dir():
        raise DinoscopeError("expected a raster file but got a directory", path=path, field="path")
    try:
        return rasterio.open(path)
    except RasterioError as err:
        raise DinoscopeError(
            f"not a readable raster ({err})", path=path, field="path", fix="give a GeoTIFF, COG or VRT; " + _CORRUPT_FIX
        ) from None


def _band_name(ds: rasterio.io.DatasetReader, index: int) -> str:
    description = ds.descriptions[index - 1]
    if description:
        return description
    interp = ds.colorinterp[index - 1]
    return interp.name if interp in _NAMED_INTERPS else f"band{index}"


def _resolve_bands(
    path: Path, ds: rasterio.io.DatasetReader, names: list[str], bands: list[int | str] | None
) -> list[int]:
    if bands is None:
        return list(range(1, ds.count + 1))
    if not bands:
        raise DinoscopeError("no bands selected", path=path, field="bands", fix=f"choose from {names}")
    available = f"the file has {ds.count} bands: " + ", ".join(f"{i}={n}" for i, n in enumerate(names, 1))
    lowered = [n.lower() for n in names]
    interps = [c.name.lower() for c in ds.colorinterp]
    indexes = []
    for band in bands:
        if isinstance(band, (int, np.integer)) and not isinstance(band, bool):
            if not 1 <= band <= ds.count:
                raise DinoscopeError(
                    f"band index {band} is out of range (indices are 1-based)", path=path, field="bands", fix=available
                )
            indexes.append(int(band))
        elif isinstance(band, str):
            key = band.lower()
            if key in lowered:
                indexes.append(lowered.index(key) + 1)
            elif key in interps:
                indexes.append(interps.index(key) + 1)
            else:
                raise DinoscopeError(f"unknown band name {band!r}", path=path, field="bands", fix=available)
        else:
            raise DinoscopeError(
                f"bands must be 1-based indices or names, got {band!r}", path=path, field="bands", fix=available
            )
    return indexes


def pixel_window(window: Window) -> tuple[int, int, int, int]:
    """``(col, row, width, height)`` of a window snapped to whole pixels."""
    col = int(math.floor(window.col_off + 1e-9))
    row = int(math.floor(window.row_off + 1e-9))
    return col, row, int(round(window.width)), int(round(window.height))


def intersect_window(
    col: int, row: int, width: int, height: int, full_width: int, full_height: int
) -> tuple[int, int, int, int] | None:
    """The part of a pixel window inside a ``full_width`` x ``full_height`` grid, or None when disjoint."""
    c0, r0 = max(col, 0), max(row, 0)
    c1, r1 = min(col + width, full_width), min(row + height, full_height)
    if c1 <= c0 or r1 <= r0:
        return None
    return c0, r0, c1 - c0, r1 - r0
