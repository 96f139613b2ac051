"""Per-plot canopy statistics with exactextract (coverage-weighted at partial pixels).

For every plot: ``mean``, median (``p50``), 95th percentile (``p95``), ``max`` and standard deviation (``sd``) of
height in metres; canopy ``cover`` (share of the plot's valid area with height above ``cover_threshold``, 5 m by
default); ``n_pixels`` (valid pixels, coverage-weighted, so a half-covered pixel counts 0.5); ``nodata_fraction``
(share of the plot's area without a valid height: nodata or outside the raster); ``area_m2`` (the plot's area, in
a local equal-area projection, so it is right in any CRS) and ``valid_area_m2`` (``area_m2 x (1 -
nodata_fraction)``). ``prefix`` is put before every statistics column; a statistics column that would replace one of
the user's columns is refused, never overwritten.

Plots are polygons, points with a radius, or CSV rows of coordinates (:mod:`geodino.field_plots`), in any CRS; they
are reprojected to the raster's CRS for the computation, and the output keeps the input's columns and geometries.

Heights are read by this module, not by exactextract's raster readers: the band's GDAL mask decides validity (nodata
value, internal mask or alpha) *before* its scale and offset are applied, so a scaled uint16 raster (e.g. ``canopy
predict --dtype uint16``: centimetres with 65535 nodata) gives metres and never counts nodata as a height.

Plots outside the raster: when some lie entirely outside, they keep their row with empty statistics and a warning
says how many; when none overlaps the raster the command fails, giving both extents.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from exactextract import exact_extract
from exactextract.raster import RasterSource as ExactRasterSource
from rasterio.errors import RasterioError
from rasterio.windows import Window
from shapely.geometry import box

from core.errors import DinoscopeError
from core.io import atomic_path
from geodino.field_plots import extent_text, local_areas_m2, read_plots
from geodino.outputs import check_output_path

log = logging.getLogger(__name__)

STAT_COLUMNS = ("mean", "p50", "p95", "max", "sd", "cover", "n_pixels", "nodata_fraction", "area_m2", "valid_area_m2")
# Single-file formats only: a shapefile's sidecars could not be renamed into place atomically.
_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
_EXACT = {"mean": "mean", "p50": "quantile_50", "p95": "quantile_95", "max": "max", "sd": "stdev", "cover": "cover"}


class HeightSource(ExactRasterSource):
    """One band as exactextract reads it: metres (scale and offset applied) masked by the band's GDAL mask."""

    def __init__(self, ds: Any, band: int) -> None:
        super().__init__()
        self.ds, self.band = ds, band
        self.scale, self.offset = float(ds.scales[band - 1]), float(ds.offsets[band - 1])

    def res(self) -> tuple[float, float]:
        """Pixel width and height in CRS units."""
        return abs(self.ds.res[0]), abs(self.ds.res[1])

    def srs_wkt(self) -> str | None:
        """The raster's CRS as WKT."""
        return self.ds.crs.wkt if self.ds.crs else None

    def extent(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)``."""
        b = self.ds.bounds
        return b.left, b.bottom, b.right, b.top

    def nodata_value(self) -> None:
        """No sentinel: invalid pixels come masked."""
        return None

    def read_window(self, x0: int, y0: int, nx: int, ny: int) -> np.ma.MaskedArray:
        """Metres as float64, masked where the band's mask says nodata or the value is not finite."""
        window = Window(x0, y0, nx, ny)
        raw = self.ds.read(self.band, window=window).astype(np.float64)
        valid = (self.ds.read_masks(self.band, window=window) > 0) & np.isfinite(raw)
        return np.ma.MaskedArray(raw * self.scale + self.offset, mask=~valid)


def zonal_stats(
    raster_path: str | os.PathLike,
    polygons: Any,
    *,
    cover_threshold: float = 5.0,
    band: int = 1,
    areas: Any = None,
    prefix: str = "",
) -> Any:
    """Statistics per plot of ``band`` of ``raster_path``; returns ``polygons`` plus :data:`STAT_COLUMNS`.

    ``polygons`` is a GeoDataFrame or a vector file path, in any CRS; ``areas`` (same index) are the polygons the
    statistics cover when they differ from the rows' own geometry (buffered plot centres). Columns are named
    ``prefix + statistic``.

    Example::

        from geodino import zonal_stats
        plots = zonal_stats("chm.tif", "plots.gpkg", cover_threshold=5.0, prefix="chm_")
        plots[["plot_id", "chm_mean", "chm_p95", "chm_cover"]].head()
    """
    if isinstance(polygons, (str, os.PathLike)):
        polygons, areas = read_plots(polygons)
    areas = polygons if areas is None else areas
    kinds = set(areas.geometry.dropna().geom_type)
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise DinoscopeError(
            f"statistics need polygons, not {sorted(kinds - {'Polygon', 'MultiPolygon'})}",
            field="geometry",
            fix="buffer plot centres first: geodino.field_plots.read_plots(path, buffer=RADIUS_M), or --buffer",
        )
    names = {stat: f"{prefix}{stat}" for stat in STAT_COLUMNS}
    clashes = sorted(set(names.values()) & {str(c) for c in polygons.columns})
    if clashes:
        raise DinoscopeError(
            f"the plots already have column(s) {clashes}, which the statistics would overwrite",
            field="prefix",
            fix=f"give a prefix for the statistics columns, e.g. --prefix chm_ (then {prefix or ''}chm_mean, ...)",
        )
    raster_path = Path(raster_path)
    with _open_raster(raster_path, band) as ds:
        local = areas.to_crs(ds.crs).reset_index(drop=True)
        _check_inside(local, ds.bounds, raster_path)
        pixel_area = abs(ds.res[0] * ds.res[1])

        def cover(values: np.ma.MaskedArray, coverage: np.ndarray) -> float:
            ok = ~np.ma.getmaskarray(values)
            total = float(coverage[ok].sum())
            above = float(coverage[ok & (np.ma.getdata(values) > cover_threshold)].sum())
            return above / total if total > 0 else float("nan")

        ops = ["mean", "quantile(q=0.5)", "quantile(q=0.95)", "max", "stdev", "count", cover]
        try:
            stats = exact_extract(HeightSource(ds, band), local[["geometry"]], ops, output="pandas")
        except RasterioError as err:
            raise DinoscopeError(
                f"could not read the raster ({err})",
                path=raster_path,
                field="pixels",
                fix="the file is probably truncated or corrupt; re-export it",
            ) from None
    out = polygons.copy()
    for column, source in _EXACT.items():
        out[names[column]] = stats[source].to_numpy(dtype=np.float64)
    counts = stats["count"].to_numpy(dtype=np.float64)
    out[names["n_pixels"]] = counts
    area_px = local.geometry.area.to_numpy() / pixel_area
    with np.errstate(invalid="ignore", divide="ignore"):
        nodata = np.where(area_px > 0, np.clip(1 - counts / area_px, 0, 1), 1.0)
    out[names["nodata_fraction"]] = nodata
    area_m2 = local_areas_m2(areas.geometry.reset_index(drop=True))
    out[names["area_m2"]] = area_m2
    out[names["valid_area_m2"]] = area_m2 * (1 - nodata)
    return out


def _open_raster(raster_path: Path, band: int) -> Any:
    if not raster_path.exists():
        raise DinoscopeError("file not found", path=raster_path, field="raster", fix="check the path")
    try:
        ds = rasterio.open(raster_path)
    except RasterioError as err:
        raise DinoscopeError(
            f"not a readable raster ({err})",
            path=raster_path,
            field="raster",
            fix="give a GeoTIFF/COG; the file may be truncated",
        ) from None
    problem = None
    if ds.crs is None:
        problem = ("the raster has no CRS", "crs", "assign one, e.g. `gdal_edit.py -a_srs EPSG:32617 FILE`")
    elif ds.transform.b != 0 or ds.transform.d != 0:
        problem = ("rotated rasters are not supported", "transform", "warp it to a north-up grid with `gdalwarp`")
    elif not 1 <= band <= ds.count:
        problem = (f"band {band} does not exist (the raster has {ds.count})", "band", f"use --band 1..{ds.count}")
    if problem is not None:
        ds.close()
        raise DinoscopeError(problem[0], path=raster_path, field=problem[1], fix=problem[2])
    return ds


def _check_inside(local: Any, bounds: Any, raster_path: Path) -> None:
    """Every plot outside the raster is an error (wrong raster or CRS); some outside get empty rows and a
    warning (a plot network larger than the mapped area is normal)."""
    inside = local.geometry.intersects(box(*bounds)).to_numpy()
    if inside.any():
        if not inside.all():
            log.warning(
                "%d of %d polygons lie entirely outside %s: their statistics are empty (n_pixels 0, nodata_fraction 1)",
                int((~inside).sum()),
                len(inside),
                raster_path.name,
            )
        return
    raise DinoscopeError(
        f"none of the {len(local)} polygons overlaps the raster (polygons {extent_text(*local.total_bounds)}; raster "
        f"{extent_text(*bounds)}, both in the raster's CRS)",
        path=raster_path,
        field="polygons",
        fix="check that the plots belong to this raster's area and that both files declare their CRS correctly",
    )


def zonal_to_file(
    raster_path: str | os.PathLike,
    polygons_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    cover_threshold: float = 5.0,
    band: int = 1,
    buffer: float = 0.0,
    crs: str = "",
    x_column: str = "",
    y_column: str = "",
    prefix: str = "",
) -> Path:
    """Read plots (:func:`geodino.field_plots.read_plots`), compute :func:`zonal_stats` and write them atomically
    (format from the suffix: .gpkg, .parquet, .geojson, or .csv with the geometry as WKT).

    Example::

        from geodino import zonal_to_file
        zonal_to_file("chm.tif", "plots.shp", "plots_stats.gpkg", cover_threshold=2.0)
        zonal_to_file("chm.tif", "plot_centres.csv", "stats.csv", buffer=11.28, crs="EPSG:4326", prefix="chm_")
    """
    out_path = check_output_path(out_path, is_dir=False, field="output", suffix=".gpkg")
    suffix = out_path.suffix.lower()
    driver = _DRIVERS.get(suffix)
    if driver is None and suffix not in (".parquet", ".geoparquet", ".csv"):
        raise DinoscopeError(
            f"unknown output format {out_path.suffix!r}",
            path=out_path,
            field="output",
            fix="use .gpkg (recommended), .parquet, .geojson or .csv",
        )
    plots, areas = read_plots(polygons_path, crs=crs, buffer=buffer, x_column=x_column, y_column=y_column)
    result = zonal_stats(raster_path, plots, cover_threshold=cover_threshold, band=band, areas=areas, prefix=prefix)
    with atomic_path(out_path) as tmp:
        tmp.unlink()  # OGR drivers refuse to create over the empty placeholder
        if suffix == ".csv":
            table = result.drop(columns=result.geometry.name)
            table[result.geometry.name] = result.geometry.to_wkt()
            table.to_csv(tmp, index=False)
        elif driver is None:
            result.to_parquet(tmp)
        else:
            layer = {"layer": re.sub(r"\W", "_", out_path.stem) or "zonal"} if driver == "GPKG" else {}
            result.to_file(tmp, driver=driver, **layer)
    log.info("zonal statistics for %d plots -> %s", len(result), out_path)
    return out_path
