"""Field plots as crews record them: polygons, plot centres (points) with a radius, or a CSV of coordinates.

* Vector files (GeoPackage, GeoParquet, shapefile, GeoJSON) of polygons are used as they are.
* Points are plot centres: ``buffer`` (metres) turns each into a circle. Distances are only true in a metric CRS
  near the point, so every point is buffered in an azimuthal equidistant projection centred on its own 1-degree cell
  (distance error below 0.01 % within the cell; a degree-based or Web-Mercator buffer would be off by up to 1/cos(lat)),
  then brought back to the file's CRS.
* A CSV holds one plot per row with x/y (or lon/lat, easting/northing) columns; it carries no CRS, so ``crs`` is
  required.

:func:`local_areas_m2` measures areas the same way, in a Lambert azimuthal equal-area projection per cell, so
``area_m2`` is right in any CRS (degrees included).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from pyproj import CRS
from pyproj.exceptions import CRSError

from core.errors import DinoscopeError

log = logging.getLogger(__name__)

X_NAMES = ("x", "lon", "long", "longitude", "easting", "east", "x_coord", "utm_x")
Y_NAMES = ("y", "lat", "latitude", "northing", "north", "y_coord", "utm_y")
_WGS84 = "EPSG:4326"


def read_plots(
    path: str | os.PathLike, *, crs: str = "", buffer: float = 0.0, x_column: str = "", y_column: str = ""
) -> tuple[Any, Any]:
    """``(plots, areas)``: the file's rows with their own geometry, and the polygons statistics are computed over.

    Both GeoDataFrames share the index and the CRS; ``areas`` differs from ``plots`` only for points (buffered).

    Example::

        from geodino import read_plots, zonal_stats
        plots, areas = read_plots("plot_centres.csv", crs="EPSG:4326", buffer=11.28)   # 400 m² circles
        stats = zonal_stats("chm.tif", plots, areas=areas, prefix="chm_")
    """
    path = Path(path)
    if not path.exists():
        raise DinoscopeError("file not found", path=path, field="polygons", fix="check the path")
    if path.suffix.lower() in (".csv", ".txt", ".tsv"):
        plots = _read_csv(path, crs, x_column, y_column)
    else:
        plots = _read_vector(path, crs)
    kinds = set(plots.geometry.dropna().geom_type)
    if kinds <= {"Polygon", "MultiPolygon"}:
        if buffer:
            raise DinoscopeError(
                "--buffer is for point plots, but these plots are polygons",
                path=path,
                field="buffer",
                fix="drop --buffer: the polygons are used as they are",
            )
        return plots, plots
    if kinds <= {"Point", "MultiPoint"}:
        if not buffer > 0:
            raise DinoscopeError(
                f"the {len(plots)} plots are points (plot centres), which cover no area",
                path=path,
                field="buffer",
                fix="give the plot radius in metres, e.g. --buffer 11.28 (a 400 m² circular plot)",
            )
        areas = plots.copy()
        areas.geometry = buffer_metres(plots.geometry, buffer)
        return plots, areas
    raise DinoscopeError(
        f"expected polygons or points but found {sorted(kinds)}",
        path=path,
        field="geometry",
        fix="give plot polygons, or plot centres as points with --buffer",
    )


def _read_vector(path: Path, crs: str) -> Any:
    try:
        gdf = gpd.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(path)
    except Exception as err:  # pyogrio/pyarrow raise many types; all mean "not a readable vector file"
        raise DinoscopeError(
            f"not a readable vector file ({type(err).__name__}: {err})",
            path=path,
            field="polygons",
            fix="give a GeoPackage, GeoParquet, shapefile, GeoJSON, or a CSV with x/y columns",
        ) from None
    if len(gdf) == 0 or gdf.geometry.isna().all() or gdf.geometry.is_empty.all():
        raise DinoscopeError(
            "the file contains no polygons or points", path=path, field="geometry", fix="check the layer and any filter"
        )
    if gdf.crs is None:
        if not crs:
            raise DinoscopeError(
                "the plots have no CRS, so they cannot be placed on the raster",
                path=path,
                field="crs",
                fix=f"assign the CRS the coordinates are in: --crs EPSG:32617, or `ogr2ogr -a_srs EPSG:32617 "
                f"fixed.gpkg {path}` (or add the shapefile's .prj)",
            )
        gdf = gdf.set_crs(_crs(crs, path))
    elif crs and CRS.from_user_input(gdf.crs) != _crs(crs, path):
        raise DinoscopeError(
            f"--crs {crs} contradicts the file's own CRS ({gdf.crs.to_string()})",
            path=path,
            field="crs",
            fix="drop --crs (it is for CSV files and files without a CRS)",
        )
    _check_degrees(gdf, path)
    return gdf


def _read_csv(path: Path, crs: str, x_column: str, y_column: str) -> Any:
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DinoscopeError(f"not a readable CSV ({err})", path=path, field="polygons") from None
    x = _column(table, x_column, X_NAMES, "x", path)
    y = _column(table, y_column, Y_NAMES, "y", path)
    if not crs:
        raise DinoscopeError(
            f"a CSV has no CRS, so the plot coordinates ({x}, {y}) cannot be placed on the raster",
            path=path,
            field="crs",
            fix="give the CRS of the coordinates, e.g. --crs EPSG:4326 (GPS longitude/latitude) or --crs EPSG:32617",
        )
    coords = table[[x, y]].apply(pd.to_numeric, errors="coerce")
    bad = coords.isna().any(axis=1)
    if bad.any():
        rows = ", ".join(str(int(i) + 2) for i in np.flatnonzero(bad)[:5])
        raise DinoscopeError(
            f"{int(bad.sum())} row(s) have no numeric {x}/{y} (file lines {rows})",
            path=path,
            field=x,
            fix="fill in or remove those rows",
        )
    gdf = gpd.GeoDataFrame(table, geometry=gpd.points_from_xy(coords[x], coords[y]), crs=_crs(crs, path))
    _check_degrees(gdf, path)
    return gdf


def _column(table: Any, given: str, names: tuple[str, ...], axis: str, path: Path) -> str:
    if given:
        if given not in table.columns:
            raise DinoscopeError(
                f"no column {given!r}", path=path, field=f"{axis}_column", fix=f"the columns are {list(table.columns)}"
            )
        return given
    lowered = {str(c).strip().lower(): c for c in table.columns}
    found = [lowered[n] for n in names if n in lowered]
    if not found:
        raise DinoscopeError(
            f"no {axis} coordinate column (looked for {', '.join(names)})",
            path=path,
            field=f"{axis}_column",
            fix=f"name it with --{axis}-column; the columns are {list(table.columns)}",
        )
    return str(found[0])


def _crs(text: str, path: Path) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError as err:
        raise DinoscopeError(f"unknown CRS {text!r} ({err})", path=path, field="crs", fix="e.g. EPSG:4326") from None


def _check_degrees(gdf: Any, path: Path) -> None:
    """A geographic CRS with coordinates beyond +-180 / +-90 is a file without a CRS read as WGS84 (GeoJSON has no
    other default) or a wrong CRS: refuse it rather than let every plot land nowhere."""
    if not gdf.crs.is_geographic:
        return
    left, bottom, right, top = gdf.total_bounds
    if -180.5 <= left <= right <= 360.5 and -90.5 <= bottom <= top <= 90.5:
        return
    raise DinoscopeError(
        f"the coordinates ({extent_text(left, bottom, right, top)}) are not degrees, but the CRS is "
        f"{gdf.crs.to_string()} (longitude/latitude; a GeoJSON without a CRS is read as WGS84)",
        path=path,
        field="crs",
        fix=f"give the CRS the coordinates are in, e.g. `ogr2ogr -a_srs EPSG:32617 fixed.gpkg {path}`, or --crs for "
        "a CSV",
    )


def extent_text(left: float, bottom: float, right: float, top: float) -> str:
    """``x LEFT to RIGHT, y BOTTOM to TOP`` for messages."""
    return f"x {left:.10g} to {right:.10g}, y {bottom:.10g} to {top:.10g}"


def _local_cells(geometry: Any) -> tuple[Any, pd.Series]:
    """Each geometry's representative point in WGS84 and the key of its 1-degree cell."""
    centres = geometry.representative_point().to_crs(_WGS84)
    keys = pd.Series(list(zip(np.floor(centres.y) + 0.5, np.floor(centres.x) + 0.5, strict=True)), index=geometry.index)
    return centres, keys


def buffer_metres(geometry: Any, metres: float) -> Any:
    """``geometry`` (a GeoSeries) buffered by ``metres`` in a local azimuthal equidistant CRS, in its own CRS."""
    out = geometry.copy()
    _, keys = _local_cells(geometry)
    for (lat, lon), index in keys.groupby(keys).groups.items():
        local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
        part = geometry.loc[index].to_crs(local).buffer(metres, quad_segs=32)
        out.loc[index] = part.to_crs(geometry.crs)
    return out


def local_areas_m2(geometry: Any) -> np.ndarray:
    """Area of every geometry in square metres, in a local Lambert azimuthal equal-area CRS."""
    areas = np.zeros(len(geometry))
    _, keys = _local_cells(geometry)
    positions = {label: k for k, label in enumerate(geometry.index)}
    for (lat, lon), index in keys.groupby(keys).groups.items():
        local = CRS.from_proj4(f"+proj=laea +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
        values = geometry.loc[index].to_crs(local).area.to_numpy()
        areas[[positions[i] for i in index]] = values
    return areas
