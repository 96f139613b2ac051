"""Per-polygon canopy statistics with exactextract (coverage-weighted at partial pixels).

For every polygon: mean, median (``p50``) and 95th percentile (``p95``) height, the canopy cover fraction
(share of the polygon's valid area with height above ``cover_threshold``, 5 m by default), the valid pixel count
(``n_pixels``, coverage-weighted, so a half-covered pixel counts 0.5) and ``nodata_fraction`` (share of the polygon's
area without a valid height: nodata or outside the raster). exactextract reads the raster polygon by polygon, so
memory stays bounded; GDAL band scale/offset (e.g. uint16 centimetres) is applied, so statistics are in metres.

Polygons may come in any CRS and are reprojected to the raster's CRS for the computation; the output keeps the
input's attribute columns and geometries (in the input CRS) and adds the statistics columns.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DinoscopeError
from core.io import atomic_path

log = logging.getLogger(__name__)

STAT_COLUMNS = ("mean", "p50", "p95", "cover", "n_pixels", "nodata_fraction")
# Single-file formats only: a shapefile's sidecars could not be renamed into place atomically.
_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


def read_polygons(path: str | os.PathLike) -> Any:
    """Read a GeoPackage, GeoParquet, shapefile or GeoJSON into a GeoDataFrame of polygons with a CRS."""
    import geopandas as gpd

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
            "the polygons have no CRS",
            path=path,
            field="crs",
            fix="set it, e.g. `gdf.set_crs('EPSG:32617')`, or add the .prj of a shapefile",
        )
    return gdf


def zonal_stats(raster_path: str | os.PathLike, polygons: Any, *, cover_threshold: float = 5.0, band: int = 1) -> Any:
    """Statistics per polygon of ``band`` of ``raster_path``; returns ``polygons`` plus :data:`STAT_COLUMNS`."""
    import rasterio
    from exactextract import exact_extract
    from rasterio.errors import RasterioError

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
        pixel_area = abs(ds.res[0] * ds.res[1])

        def cover(values: np.ma.MaskedArray, coverage: np.ndarray) -> float:
            ok = ~np.ma.getmaskarray(values)
            total = float(coverage[ok].sum())
            above = float(coverage[ok & (np.ma.getdata(values) > cover_threshold)].sum())
            return above / total if total > 0 else float("nan")

        ops = ["mean", "quantile(q=0.5)", "quantile(q=0.95)", "count", cover]
        try:
            from exactextract.raster import RasterioRasterSource

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


def zonal_to_file(
    raster_path: str | os.PathLike,
    polygons_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    cover_threshold: float = 5.0,
    band: int = 1,
) -> Path:
    """Read polygons, compute :func:`zonal_stats` and write them atomically (format from the suffix)."""
    out_path = Path(out_path)
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
