"""VRT mosaics of single-band outputs (``mosaic.vrt``): one virtual raster over the per-input COGs, with their nodata,
unit and scale, so GIS tools open a folder of predictions as one layer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.errors import RasterioError

from core.errors import DinoscopeError
from core.io import atomic_path


def write_vrt(paths: Sequence[str | os.PathLike], vrt_path: str | os.PathLike) -> Path:
    """Write a VRT mosaic over single-band rasters sharing CRS, pixel size and dtype (as ``gdalbuildvrt``).

    Sources are referenced relative to the VRT. Where rasters overlap the later one wins, except where it is
    nodata (each source carries its own NODATA, so nodata never hides valid pixels underneath).

    Why the XML is written here rather than by GDAL's BuildVRT: rasterio bundles libgdal but exposes no public
    BuildVRT (``rasterio.vrt`` offers only ``WarpedVRT``, a single warped source; its mosaic helper
    ``_boundless_vrt_doc`` is private; ``rio`` has no buildvrt command); ``osgeo.gdal`` is not installed and PyPI's
    ``gdal`` ships no wheels (pip finds no binary for it: it must be compiled against a system libgdal-dev), and
    ``gdalbuildvrt`` comes only with a system GDAL (Debian ``gdal-bin``). Each route would add a heavy,
    non-pip dependency for one small XML file. GDAL itself checks the result: the tests open the mosaic with rasterio.
    """
    vrt_path = Path(vrt_path)
    if not paths:
        raise DinoscopeError("no rasters to mosaic", path=vrt_path, field="inputs")
    infos = [_raster_info(Path(p)) for p in paths]
    first = infos[0]
    for info in infos[1:]:
        for key in ("crs", "res", "dtype"):
            if info[key] != first[key]:
                raise DinoscopeError(
                    f"cannot mosaic rasters with different {key}: {info[key]} vs {first[key]} ({first['path']})",
                    path=info["path"],
                    field=key,
                    fix="predict rasters that share one CRS and pixel size, or reproject them",
                )
    resx, resy = first["res"]
    left = min(i["bounds"].left for i in infos)
    top = max(i["bounds"].top for i in infos)
    right = max(i["bounds"].right for i in infos)
    bottom = min(i["bounds"].bottom for i in infos)
    width, height = round((right - left) / resx), round((top - bottom) / resy)
    nodata = first["nodata"]
    nodata_text = "nan" if nodata is not None and np.isnan(nodata) else ("" if nodata is None else repr(nodata))
    data_type = {
        "float32": "Float32",
        "uint16": "UInt16",
        "uint8": "Byte",
        "int16": "Int16",
        "float64": "Float64",
        "int32": "Int32",
        "uint32": "UInt32",
    }[first["dtype"]]
    sources = []
    for info in infos:
        xoff = round((info["bounds"].left - left) / resx)
        yoff = round((top - info["bounds"].top) / resy)
        rel = os.path.relpath(Path(info["path"]).resolve(), vrt_path.parent.resolve())
        nodata_tag = f"      <NODATA>{nodata_text}</NODATA>\n" if nodata_text else ""
        sources.append(
            "    <ComplexSource>\n"
            f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>\n'
            "      <SourceBand>1</SourceBand>\n"
            f'      <SrcRect xOff="0" yOff="0" xSize="{info["width"]}" ySize="{info["height"]}" />\n'
            f'      <DstRect xOff="{xoff}" yOff="{yoff}" xSize="{info["width"]}" ySize="{info["height"]}" />\n'
            f"{nodata_tag}"
            "    </ComplexSource>\n"
        )
    band_nodata = f"    <NoDataValue>{nodata_text}</NoDataValue>\n" if nodata_text else ""
    scale = f"    <Offset>0</Offset>\n    <Scale>{first['scale']!r}</Scale>\n"
    unit = f"    <UnitType>{escape(first['unit'])}</UnitType>\n" if first["unit"] else ""
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{escape(first['crs'])}</SRS>\n"
        f"  <GeoTransform>{left!r}, {resx!r}, 0.0, {top!r}, 0.0, {-resy!r}</GeoTransform>\n"
        f'  <VRTRasterBand dataType="{data_type}" band="1">\n'
        f"{band_nodata}{unit}{scale}{''.join(sources)}"
        "  </VRTRasterBand>\n"
        "</VRTDataset>\n"
    )
    with atomic_path(vrt_path) as tmp:
        tmp.write_text(xml)
    return vrt_path


def _raster_info(path: Path) -> dict[str, Any]:
    try:
        with rasterio.open(path) as ds:
            if ds.transform.b != 0 or ds.transform.d != 0:
                raise DinoscopeError("rotated rasters cannot be mosaicked", path=path, field="transform")
            return {
                "path": str(path),
                "crs": ds.crs.to_wkt() if ds.crs else "",
                "res": ds.res,
                "dtype": ds.dtypes[0],
                "bounds": ds.bounds,
                "width": ds.width,
                "height": ds.height,
                "nodata": ds.nodata,
                "scale": ds.scales[0],
                "unit": ds.units[0] or "",
            }
    except RasterioError as err:
        raise DinoscopeError(f"not a readable raster ({err})", path=path, field="path") from None
