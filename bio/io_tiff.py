"""OME-TIFF and plain TIFF reading (lazy, through tifffile's zarr store) and OME-TIFF writing.

Channel names come from the OME-XML ``Image/Pixels/Channel@Name`` of the series read; plain TIFFs carry no names
(tifffile maintainer, cgohlke/tifffile#202), so callers may pass ``channel_names``. Any T/Z/C order is accepted:
t and z are fixed (or z is max-projected) per channel.

Before a file is read its structure is checked (:func:`check_ifd_chain`): every page directory and tag value lies
inside the file, every strip or tile of the series read does, and an OME-TIFF holds every plane its OME-XML declares.
A truncated multi-page file is thus an error naming the file, never an image made of the pages that survived.
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
    pages = check_ifd_chain(path)
    tif = _open_tiff(path)
    try:
        if tif.is_ome and pages is not None:
            _check_declared_planes(tif.ome_metadata, pages, path)
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


# TIFF field types -> bytes per value (TIFF 6.0 and BigTIFF); values longer than the inline slot live at an offset.
_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TRUNCATED_FIX = "the copy is incomplete or the writer was stopped; copy or export the file again"


def check_ifd_chain(path: Path) -> int | None:
    """Walk the chain of image file directories (one per page) and return how many pages it holds.

    Raises a DinoscopeError naming the first pointer (next page, or a tag's value such as the OME-XML) that runs past
    the end of the file: a truncated multi-page file otherwise opens as its first page alone, so a 5-channel
    OME-TIFF would silently read as one channel called ``ch0``. Returns None when the header is not a TIFF header
    (tifffile then says what the file is not). Only a few bytes per page are read.
    """
    size = os.path.getsize(path)
    with path.open("rb") as handle:
        head = handle.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return None
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 42:
            count_fmt, offset_fmt, entry_bytes, inline = "H", "I", 12, 4
            offset = struct.unpack(order + "I", head[4:8])[0]
        elif version == 43 and len(head) >= 16:
            count_fmt, offset_fmt, entry_bytes, inline = "Q", "Q", 20, 8
            offset = struct.unpack(order + "Q", head[8:16])[0]
        else:
            return None
        count_bytes, offset_bytes = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
        pages, seen = 0, set()
        while offset and offset not in seen:  # a loop in the chain is tifffile's to report
            seen.add(offset)
            where = "its first page" if pages == 0 else f"page {pages + 1}"
            if offset + count_bytes > size:
                _truncated(path, f"{where} starts at byte {offset}", size, pages)
            handle.seek(offset)
            (n_tags,) = struct.unpack(order + count_fmt, handle.read(count_bytes))
            end = offset + count_bytes + n_tags * entry_bytes + offset_bytes
            if end > size:
                _truncated(path, f"the directory of {where} runs to byte {end}", size, pages)
            entries = handle.read(n_tags * entry_bytes)
            for k in range(n_tags):
                entry = entries[k * entry_bytes : (k + 1) * entry_bytes]
                tag, kind = struct.unpack(order + "HH", entry[:4])
                (n_values,) = struct.unpack(order + offset_fmt, entry[4 : 4 + offset_bytes])
                n_bytes = n_values * _TYPE_BYTES.get(kind, 0)
                if n_bytes > inline:
                    (at,) = struct.unpack(order + offset_fmt, entry[4 + offset_bytes :])
                    if at + n_bytes > size:
                        name = tifffile.TIFF.TAGS.get(tag, f"tag {tag}")
                        _truncated(path, f"the {name} of {where} lies at bytes {at}-{at + n_bytes}", size, pages)
            (offset,) = struct.unpack(order + offset_fmt, handle.read(offset_bytes))
            pages += 1
    return pages


def _truncated(path: Path, what: str, size: int, pages: int) -> None:
    prefix = "not a readable TIFF file: " if pages == 0 else ""
    complete = f"; only its first {pages} page{'s' * (pages != 1)} are complete" if pages else ""
    raise DinoscopeError(
        f"{prefix}file is truncated: {what}, but the file ends at byte {size}{complete}",
        path=path,
        fix=_TRUNCATED_FIX,
    )


def _check_declared_planes(ome_xml: str | None, pages: int, path: Path) -> None:
    """An OME-TIFF must hold every plane its OME-XML declares (``SizeZ x SizeT x`` channels per image).

    Planes stored in other files of a multi-file fileset (``TiffData/UUID@FileName``) are not counted here.
    """
    try:
        root = ET.fromstring(ome_xml or "")
    except ET.ParseError:
        return
    if any(uuid.get("FileName") not in (None, path.name) for uuid in root.iter("{*}UUID")):
        return
    declared = 0
    for pixels in root.iterfind("{*}Image/{*}Pixels"):
        try:
            sizes = [int(pixels.get(key, "1")) for key in ("SizeC", "SizeZ", "SizeT")]
        except ValueError:
            return
        n_channels = len(pixels.findall("{*}Channel")) or sizes[0]  # one plane per Channel (RGB: 3 samples)
        declared += n_channels * sizes[1] * sizes[2]
    if declared > pages:
        raise DinoscopeError(
            f"file is truncated or incompletely written: its OME-XML declares {declared} planes but the file "
            f"holds {pages}",
            path=path,
            fix=_TRUNCATED_FIX,
        )


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
