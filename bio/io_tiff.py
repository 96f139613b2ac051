"""OME-TIFF and plain TIFF reading (lazy, through tifffile's zarr store) and OME-TIFF writing.

Channel names come from the OME-XML ``Image/Pixels/Channel@Name`` of the series read; plain TIFFs carry no names
(tifffile maintainer, cgohlke/tifffile#202), so callers may pass ``channel_names``. Any T/Z/C order is accepted:
t and z are fixed (or z is max-projected) per channel.
"""

from __future__ import annotations

import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from bio.io_base import ChannelSource, ChannelStack, FileCloser, Image, ZProjection, resolve_channel_names
from core.errors import DinoscopeError
from core.io import atomic_path

_UNIT_TO_MICROMETRE = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "Å": 1e-4,
}


def length_in_micrometres(value: float | None, unit: str | None) -> float | None:
    """Convert an OME/NGFF physical size to micrometres; unknown units give ``None`` rather than a wrong number."""
    if value is None:
        return None
    factor = _UNIT_TO_MICROMETRE.get((unit or "µm").strip())
    return None if factor is None else float(value) * factor


def read_tiff(
    path: str | os.PathLike,
    *,
    channel_names: Sequence[str] | None = None,
    z_projection: ZProjection = "first",
    timepoint: int = 0,
    series: int = 0,
) -> Image:
    """Open series ``series`` of a TIFF lazily as an :class:`~bio.io.Image` (all channels, file order)."""
    path = Path(path)
    tif = _open_tiff(path)
    try:
        if series >= len(tif.series):
            raise DinoscopeError(
                f"the file has {len(tif.series)} image series, not {series + 1}",
                path=path,
                field="series",
                fix=f"choose a series below {len(tif.series)}",
            )
        tiff_series = tif.series[series]
        _check_complete(tif, tiff_series, path)
        axes = _normalise_axes(tiff_series.axes)
        sizes = dict(zip(axes, tiff_series.shape, strict=True))  # tifffile gives one axis letter per dimension
        if timepoint >= sizes.get("t", 1):
            raise DinoscopeError(
                f"timepoint {timepoint} requested but the file has {sizes.get('t', 1)}",
                path=path,
                field="timepoint",
                fix="choose an existing timepoint",
            )
        names_found, pixel_size = _ome_channels(tif.ome_metadata, series) if tif.is_ome else ([], None)
        n_channels = sizes.get("c", 1)
        if len(names_found) != n_channels:
            names_found = [None] * n_channels
        names = resolve_channel_names(names_found, channel_names, path)
        array = zarr.open_array(tiff_series.aszarr(level=0), mode="r")
    except tifffile.TiffFileError as exc:
        tif.close()
        raise DinoscopeError(f"unreadable TIFF structure ({exc})", path=path, fix="re-export the file") from exc
    except BaseException:
        tif.close()
        raise
    closer = FileCloser(tif)
    sources = [
        ChannelSource(
            array=array,
            axes=axes,
            fixed={"t": timepoint, "c": i, "z": 0},
            project_z=z_projection == "max" and "z" in axes,
            path=str(path),
            name=name,
            keepalive=closer,
        )
        for i, name in enumerate(names)
    ]
    return Image(
        channel_names=names,
        data=ChannelStack(sources),
        pixel_size=pixel_size,
        path=path,
        metadata={"format": "ome-tiff" if tif.is_ome else "tiff", "axes": axes},
    )


def write_ome_tiff(
    path: str | os.PathLike,
    data: np.ndarray,
    channel_names: Sequence[str],
    *,
    pixel_size: float | None = None,
    axes: str = "CYX",
) -> Path:
    """Write ``data`` laid out as ``axes`` to an OME-TIFF, channel names in the OME-XML; returns the path.

    tifffile writes the OME-XML itself (``tifffile.OmeXml`` behind ``imwrite(ome=True, metadata=...)``).
    """
    path = Path(path)
    data = np.asarray(data)
    axes = axes.upper()
    if len(axes) != data.ndim or not {"Y", "X"} <= set(axes):
        raise DinoscopeError(
            f"axes {axes!r} do not describe an array of shape {data.shape}",
            path=path,
            field="axes",
            fix="give one letter per dimension, including Y and X, e.g. 'CYX' or 'TCZYX'",
        )
    n_channels = data.shape[axes.index("C")] if "C" in axes else 1
    if len(channel_names) != n_channels:
        raise DinoscopeError(
            f"{len(channel_names)} channel names for {n_channels} channels",
            path=path,
            field="channel_names",
            fix="give one name per channel",
        )
    metadata: dict[str, Any] = {"axes": axes, "Channel": {"Name": [str(n) for n in channel_names]}}
    if pixel_size is not None:
        metadata.update(
            PhysicalSizeX=float(pixel_size),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(pixel_size),
            PhysicalSizeYUnit="µm",
        )
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, ome=True, metadata=metadata, photometric="minisblack")
    return path


def _open_tiff(path: Path) -> Any:
    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError, struct.error) as exc:
        raise DinoscopeError(
            f"not a readable TIFF file ({exc})",
            path=path,
            fix="check that the file is a complete TIFF; re-copy or re-export it",
        ) from exc


def _check_complete(tif: Any, series: Any, path: Path) -> None:
    """Fail early on truncated files: every strip/tile must lie inside the file (no pixel read needed)."""
    size = os.path.getsize(path)
    for page in series.pages:
        if page is None:
            continue
        # strict=False: a damaged file may list fewer byte counts than offsets; the pairs present still tell
        ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False) if count]
        if ends and max(ends) > size:
            raise DinoscopeError(
                f"file is truncated: pixel data runs to byte {max(ends)} but the file has {size}",
                path=path,
                fix="the copy is incomplete; copy or export the file again",
            )


def _normalise_axes(axes: str) -> str:
    """tifffile axes to lower case with the channel axis called ``c`` (RGB samples or unnamed pages count)."""
    axes = axes.lower()
    if "c" not in axes:
        for candidate in ("s", "i", "q"):
            if axes.count(candidate) == 1:
                return axes.replace(candidate, "c")
    return axes


def _ome_channels(ome_xml: str | None, series: int) -> tuple[list[str | None], float | None]:
    """Channel names and x pixel size (µm) of image ``series`` in an OME-XML document.

    Everything else (dtype, plane order, shape) comes from tifffile's own OME series parser. This stays on
    ElementTree (``{*}`` matches any OME schema namespace) instead of ``tifffile.xml2dict``: xml2dict turns attribute
    text into numbers and booleans, so channels named ``0405``, ``1.50`` or ``true`` would come back as ``405``,
    ``1.5`` and ``True`` (tests/bio/test_io.py checks such names survive).
    """
    if not ome_xml:
        return [], None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return [], None  # some vendor "OME" TIFFs carry no parsable XML (ark-analysis#1155): fall back to defaults
    images = root.findall("{*}Image")
    pixels = images[series].find("{*}Pixels") if series < len(images) else None
    if pixels is None:
        return [], None
    names = [channel.get("Name") for channel in pixels.findall("{*}Channel")]
    size_x = pixels.get("PhysicalSizeX")
    pixel_size = length_in_micrometres(float(size_x), pixels.get("PhysicalSizeXUnit")) if size_x else None
    return names, pixel_size
