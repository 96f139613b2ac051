"""Per-polygon canopy statistics with exactextract (coverage-weighted at partial pixels).

For every polygon: mean, median (``p50``) and 95th percentile (``p95``) height, the canopy cover fraction
(share of the polygon's valid area with height above ``cover_threshold``, 5 m by default), the valid pixel count
(``n_pixels``, coverage-weighted, so a half-covered pixel counts 0.5) and ``nodata_fraction`` (share of the polygon's
area without a valid height: nodata or outside the raster). exactextract reads the raster polygon by polygon, so
memory stays bounded; GDAL band scale/offset (e.g. uint16 centimetres) is applied, so statistics are in metres.

Polygons may come in any CRS and are reprojected to the raster's CRS for the computation; the output keeps the
input's attribute columns and geometries (in the input CRS) and adds the statistics columns. Polygons must declare
their CRS: a file without one (or a GeoJSON whose coordinates are not degrees) is refused with the fix.

Polygons outside the raster: when some lie entirely outside, they keep their row with empty statistics (``mean``,
``p50``, ``p95`` and ``cover`` missing, ``n_pixels`` 0, ``nodata_fraction`` 1) and a warning says how many, so a plot
network larger than the mapped area still comes back whole and in order. When none overlaps the raster the command
fails instead, giving both extents: that is a wrong raster or a wrong CRS, never a result.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
from exactextract import exact_extract
from exactextract.raster import RasterioRasterSource
from rasterio.errors import RasterioError
from shapely.geometry import box

from core.errors import DinoscopeError
from core.io import atomic_path
from geodino.outputs import check_output_path

log = logging.getLogger(__name__)

STAT_COLUMNS = ("mean", "p50", "p95", "cover", "n_pixels", "nodata_fraction")
# Single-file formats only: a shapefile's sidecars could not be renamed into place atomically.
_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


def read_polygons(path: str | os.PathLike) -> Any:
    """Read a GeoPackage, GeoParquet, shapefile or GeoJSON into a GeoDataFrame of polygons with a CRS."""
    path = Path(path)
    if not path.exists():
        raise DinoscopeError("file not found", path=path, field="polygons", fix="check the path")
    try:
        gdf = gpd.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(path)
    except Exception as err:  # pyogrio/pyarrow raise many types; all mean "not a readable vector file"
        raise DinoscopeError(
            f"not a readable vector file ({type(err).__name__}: {err})",
            path=path,
            field="polygons",
            fix="give a GeoPackage, GeoParquet, shapefile or GeoJSON",
        ) from None
    if len(gdf) == 0 or gdf.geometry.isna().all() or gdf.geometry.is_empty.all():
        raise DinoscopeError(
            "the file contains no polygons",
            path=path,
            field="geometry",
            fix="check the layer and any filter that produced it",
        )
    kinds = set(gdf.geometry.dropna().geom_type)
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise DinoscopeError(
            f"expected polygons but found {sorted(kinds)}",
            path=path,
            field="geometry",
            fix="buffer points/lines into polygons first (e.g. a plot radius)",
        )
    if gdf.crs is None:
        raise DinoscopeError(
            "the polygons have no CRS, so they cannot be placed on the raster",
            path=path,
            field="crs",
            fix=f"assign the CRS the coordinates are in, e.g. `ogr2ogr -a_srs EPSG:32617 fixed.gpkg {path}` "
            "(or add the shapefile's .prj)",
        )
    _check_degrees(gdf, path)
    return gdf


def _check_degrees(gdf: Any, path: Path) -> None:
    """A geographic CRS with coordinates beyond +-180 / +-90 is a file without a CRS read as WGS84 (GeoJSON has no
    other default) or a wrong CRS: refuse it rather than let every polygon land nowhere."""
    if not gdf.crs.is_geographic:
        return
    left, bottom, right, top = gdf.total_bounds
    if -180.5 <= left <= right <= 360.5 and -90.5 <= bottom <= top <= 90.5:
        return
    raise DinoscopeError(
        f"the coordinates ({_extent(left, bottom, right, top)}) are not degrees, but the file's CRS is "
        f"{gdf.crs.to_string()} (longitude/latitude; a GeoJSON without a CRS is read as WGS84)",
        path=path,
        field="crs",
        fix=f"assign the CRS the coordinates are in, e.g. `ogr2ogr -a_srs EPSG:32617 fixed.gpkg {path}`, "
        "then use fixed.gpkg",
    )


def zonal_stats(raster_path: str | os.PathLike, polygons: Any, *, cover_threshold: float = 5.0, band: int = 1) -> Any:
    """Statistics per polygon of ``band`` of ``raster_path``; returns ``polygons`` plus :data:`STAT_COLUMNS`.

    ``polygons`` is a GeoDataFrame or a vector file path, in any CRS. Heights in metres; cover is the fraction of
    the polygon's valid area above ``cover_threshold``.

    Example::

        from geodino import zonal_stats
        plots = zonal_stats("chm.tif", "plots.gpkg", cover_threshold=5.0)
        plots[["plot_id", "mean", "p95", "cover"]].head()
    """
    raster_path = Path(raster_path)
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
    with ds:
        if ds.crs is None:
            raise DinoscopeError(
                "the raster has no CRS",
                path=raster_path,
                field="crs",
                fix="assign one, e.g. `gdal_edit.py -a_srs EPSG:32617 FILE`",
            )
        if ds.transform.b != 0 or ds.transform.d != 0:
            raise DinoscopeError(
                "rotated rasters are not supported",
                path=raster_path,
                field="transform",
                fix="warp it to a north-up grid with `gdalwarp`",
            )
        if not 1 <= band <= ds.count:
            raise DinoscopeError(
                f"band {band} does not exist (the raster has {ds.count})", path=raster_path, field="band"
            )
        local = polygons.to_crs(ds.crs)
        _check_inside(local, ds.bounds, raster_path)
        pixel_area = abs(ds.res[0] * ds.res[1])

        def cover(values: np.ma.MaskedArray, coverage: np.ndarray) -> float:
            ok = ~np.ma.getmaskarray(values)
            total = float(coverage[ok].sum())
            above = float(coverage[ok & (np.ma.getdata(values) > cover_threshold)].sum())
            return above / total if total > 0 else float("nan")

        ops = ["mean", "quantile(q=0.5)", "quantile(q=0.95)", "count", cover]
        try:
            stats = exact_extract(
                RasterioRasterSource(ds, band), local.reset_index(drop=True)[["geometry"]], ops, output="pandas"
            )
        except RasterioError as err:
            raise DinoscopeError(
                f"could not read the raster ({err})",
                path=raster_path,
                field="pixels",
                fix="the file is probably truncated or corrupt; re-export it",
            ) from None
    out = polygons.copy()
    clashes = [c for c in STAT_COLUMNS if c in out.columns]
    if clashes:
        log.warning("input columns %s are replaced by the statistics of the same name", clashes)
    names = {"mean": "mean", "p50": "quantile_50", "p95": "quantile_95", "cover": "cover", "n_pixels": "count"}
    for column, source in names.items():
        out[column] = stats[source].to_numpy(dtype=np.float64)
    area_px = local.geometry.area.to_numpy() / pixel_area
    with np.errstate(invalid="ignore", divide="ignore"):
        out["nodata_fraction"] = np.where(area_px > 0, np.clip(1 - out["n_pixels"].to_numpy() / area_px, 0, 1), 1.0)
    return out


def _check_inside(local: Any, bounds: Any, raster_path: Path) -> None:
    """Every polygon outside the raster is an error (wrong raster or CRS); some outside get empty rows and a
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
        f"none of the {len(local)} polygons overlaps the raster (polygons {_extent(*local.total_bounds)}; raster "
        f"{_extent(*bounds)}, both in the raster's CRS)",
        path=raster_path,
        field="polygons",
        fix="check that the polygons belong to this raster's area and that both files declare their CRS correctly",
    )


def _extent(left: float, bottom: float, right: float, top: float) -> str:
    return f"x {left:.10g} to {right:.10g}, y {bottom:.10g} to {top:.10g}"


def zonal_to_file(
    raster_path: str | os.PathLike,
    polygons_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    cover_threshold: float = 5.0,
    band: int = 1,
) -> Path:
    """Read polygons, compute :func:`zonal_stats` and write them atomically (format from the suffix).

    Example::

        from geodino import zonal_to_file
        zonal_to_file("chm.tif", "plots.shp", "plots_stats.gpkg", cover_threshold=2.0)
    """
    out_path = check_output_path(out_path, is_dir=False, field="output", suffix=".gpkg")
    driver = _DRIVERS.get(out_path.suffix.lower())
    parquet = out_path.suffix.lower() in (".parquet", ".geoparquet")
    if driver is None and not parquet:
        raise DinoscopeError(
            f"unknown output format {out_path.suffix!r}",
            path=out_path,
            field="output",
            fix="use .gpkg (recommended), .parquet or .geojson",
        )
    result = zonal_stats(raster_path, read_polygons(polygons_path), cover_threshold=cover_threshold, band=band)
    with atomic_path(out_path) as tmp:
        tmp.unlink()  # OGR drivers refuse to create over the empty placeholder
        if parquet:
            result.to_parquet(tmp)
        else:
            layer = {"layer": re.sub(r"\W", "_", out_path.stem) or "zonal"} if driver == "GPKG" else {}
            result.to_file(tmp, driver=driver, **layer)
    log.info("zonal statistics for %d polygons -> %s", len(result), out_path)
    return out_path
