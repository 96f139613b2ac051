"""Windowed, nodata-aware reading of GeoTIFF, COG and VRT rasters.

:class:`RasterSource` is the single entry point through which geodino reads imagery. It never loads a whole raster:
every read names a window (or, for statistics, a bounded decimated read that GDAL serves from overviews when the
file has them). Each read returns raw values as float32 plus a validity mask, as GDAL means it (rasterio's
``dataset_mask()``):

* a per-dataset mask (internal ``.msk`` or mask band) or an alpha band, when the file has one;
* otherwise the union of the band masks: a pixel is nodata only where *every* selected band equals its nodata
  value (a saturated red channel at 255 is a colour, not a hole);
* NaN in any selected band is never fed to a model, so it is invalid too; and for boundless reads, the area
  outside the raster.

An alpha band is a mask, not imagery: it is left out when every band is selected. An optional
:class:`geodino.values.InputRule` converts the values as they are read (``--input-range`` / ``--input-scale``).
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
from geodino.values import InputRule

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
            in the order wanted; ``None`` selects every band but an alpha band.
        convert: an input rule applied to every read (values are then in the model's range).

    Attributes:
        path, crs, transform, width, height, dtype, nodata, res: as in the file (``res`` is ``(x, y)`` > 0).
        count: number of *selected* bands.
        indexes: the selected 1-based band indices.
        band_names: one name per selected band.
        mask_kind: how validity is decided (``per-dataset mask``, ``alpha band 4``, ``nodata value 255 ...``).
        convert: the :class:`geodino.values.InputRule` applied to values as they are read, or None.

    Example::

        from rasterio.windows import Window
        from geodino import RasterSource

        with RasterSource("naip.tif", bands=["red", "green", "blue"]) as src:
            data, valid = src.read(Window(0, 0, 512, 512))   # float32 (3, 512, 512) and bool (512, 512)
    """

    def __init__(
        self, path: str | os.PathLike, bands: Sequence[int | str] | None = None, convert: InputRule | None = None
    ) -> None:
        self.path = Path(path)
        self.convert = convert
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
        alpha = [i for i, c in enumerate(ds.colorinterp, 1) if c == ColorInterp.alpha]
        # One band whose mask is the dataset's mask (per-dataset mask or alpha), else per-band rules (see module).
        self._mask_band: int | None = None
        self._alpha_band = alpha[0] if alpha else None  # valid where alpha > 0 (GDAL's alpha mask)
        if alpha:
            self.mask_kind = f"alpha band {alpha[0]}"
        elif any(MaskFlags.per_dataset in f for f in flags):
            self._mask_band, self.mask_kind = self.indexes[0], "per-dataset mask"
        self._band_nodata = [ds.nodatavals[i - 1] for i in self.indexes]
        self._band_masks = {
            k for k, f in enumerate(flags) if MaskFlags.all_valid not in f and MaskFlags.nodata not in f
        }
        if self._mask_band is None and self._alpha_band is None:
            values = sorted({v for v in self._band_nodata if v is not None}, key=str)
            self.mask_kind = (
                "per-band masks"
                if self._band_masks
                else f"nodata value {', '.join(f'{v:g}' for v in values)} (in every band)"
                if values
                else "none (every pixel valid)"
            )

    # -- reading -------------------------------------------------------------------------------------------
    def read(self, window: Window, boundless: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read a window of the selected bands.

        Returns:
            ``data`` float32 ``C x h x w`` raw values (0 outside the raster) and ``valid`` bool ``h x w``. With
            ``boundless`` the output always has the window's (rounded) size and pixels outside the raster are
            invalid; without it the window is clipped to the raster.
        """
        return self._read(window, boundless, raw=False)

    def read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`read` (boundless) in the file's own dtype, without the input rule (``convert``): for callers that
        convert and normalise in one pass (:class:`geodino.tile_batches.TileBatchReader`)."""
        return self._read(window, True, raw=True)

    def _read(self, window: Window, boundless: bool, raw: bool) -> tuple[np.ndarray, np.ndarray]:
        col, row, width, height = pixel_window(window)
        inner = intersect_window(col, row, width, height, self.width, self.height)
        dtype = self.dtype if raw else np.float32
        if not boundless:
            if inner is None:
                return np.zeros((self.count, 0, 0), dtype), np.zeros((0, 0), bool)
            col, row, width, height = inner
        if inner == (col, row, width, height):  # all inside: no padding to add
            return self._read_inside(Window(col, row, width, height), raw=raw)
        data = np.zeros((self.count, height, width), dtype)
        valid = np.zeros((height, width), bool)
        if inner is None:
            return data, valid
        icol, irow, iwidth, iheight = inner
        values, inner_valid = self._read_inside(Window(icol, irow, iwidth, iheight), raw=raw)
        rows = slice(irow - row, irow - row + iheight)
        cols = slice(icol - col, icol - col + iwidth)
        data[:, rows, cols] = values
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

    def _read_inside(
        self, window: Window, out_shape: tuple[int, int] | None = None, raw: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        kwargs: dict[str, Any] = {"window": window}
        if out_shape is not None:
            kwargs.update(out_shape=(len(self.indexes), *out_shape), resampling=Resampling.nearest)
        try:
            values = self._ds.read(self.indexes, **kwargs)
            valid = self._valid(values, kwargs)
        except RasterioError as err:
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise DinoscopeError(
                f"could not read pixels (window {window.col_off:.0f},{window.row_off:.0f} "
                f"{window.width:.0f}x{window.height:.0f}): {err}{cause}",
                path=self.path,
                field="pixels",
                fix=_CORRUPT_FIX,
            ) from None
        if raw:
            return values, valid
        data = values.astype(np.float32, copy=False)
        return (self.convert.apply(data) if self.convert is not None else data), valid

    def _valid(self, raw: np.ndarray, kwargs: dict[str, Any]) -> np.ndarray:
        """The dataset mask of the selected bands (module docstring), and no NaN in any of them."""
        shape = raw.shape[1:]

        def mask_of(index: int) -> np.ndarray:
            extra = {"out_shape": shape} if "out_shape" in kwargs else {}
            return self._ds.read_masks(index, **{**kwargs, **extra}) > 0

        if self._alpha_band is not None:
            extra = {"out_shape": shape} if "out_shape" in kwargs else {}
            valid = self._ds.read(self._alpha_band, **{**kwargs, **extra}) > 0
        elif self._mask_band is not None:
            valid = mask_of(self._mask_band)
        else:
            valid = np.zeros(shape, bool)
            for k, index in enumerate(self.indexes):
                nodata = self._band_nodata[k]
                if k in self._band_masks:
                    valid |= mask_of(index)
                elif nodata is None or np.isnan(nodata):
                    valid[:] = True
                    break
                else:
                    valid |= raw[k] != np.asarray(nodata).astype(raw.dtype)
        if np.issubdtype(raw.dtype, np.floating):
            valid &= np.isfinite(raw).all(axis=0)
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

    def reopen(self) -> RasterSource:
        """A second, independent handle on the same bands (GDAL handles are not shared between threads)."""
        return RasterSource(self.path, bands=self.indexes, convert=self.convert)

    @property
    def origin(self) -> tuple[int, int]:
        """Row and column of this raster in the grid its tiles are laid on: ``(0, 0)``, its own grid."""
        return 0, 0

    @property
    def extent(self) -> tuple[int, int]:
        """Height and width of the grid its tiles are laid on: its own size."""
        return self.height, self.width

    def context(self) -> list[dict[str, Any]] | None:
        """Other rasters whose pixels a prediction of this one reads: none."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        # GDAL handles cannot cross process boundaries (DataLoader workers); reopen on unpickling instead.
        return {"path": self.path, "bands": self._requested_bands, "convert": self.convert}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["bands"], state.get("convert"))  # type: ignore[misc]

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
        imagery = [i for i, c in enumerate(ds.colorinterp, 1) if c != ColorInterp.alpha]
        return imagery or list(range(1, ds.count + 1))
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
