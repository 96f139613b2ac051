"""Multi-channel microscopy images addressed by channel name: the public read/write entry points.

Every reader returns an :class:`Image` (:mod:`bio.io_base`): channel names in the order returned, plus a lazy
``C x Y x X`` view that only reads the channels and pixels it is indexed with. Format-specific code lives in
:mod:`bio.io_tiff` (OME-TIFF and plain TIFF), :mod:`bio.io_zarr` (OME-Zarr images and HCS plates, NGFF 0.4 and 0.5)
and :mod:`bio.io_manifest` (CellProfiler LoadData CSVs); this module dispatches to them by path.

Channels are addressed by name, never by index, because toolchains disagree on channel order
(DeepProfiler and DINO4Cells use DNA, RNA, ER, AGP, Mito; the cpg0000 arrays used by theislab/IMPA are Mito, AGP, ER,
RNA, DNA).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bio.io_base import (
    ChannelSource,
    ChannelStack,
    FileCloser,
    Image,
    ZProjection,
    channel_indices,
    resolve_channel_names,
    well_name,
)
from bio.io_manifest import ManifestField
from bio.io_manifest import iter_manifest_fields as _iter_manifest
from bio.io_manifest import read_manifest as _read_manifest
from bio.io_tiff import read_tiff
from bio.io_tiff import write_ome_tiff as _write_ome_tiff
from bio.io_zarr import PlateLayout, iter_plate_fields, read_ome_zarr_image, read_plate_layout, write_plate
from core.errors import DinoscopeError

__all__ = [
    "ChannelSource",
    "ChannelStack",
    "FileCloser",
    "Image",
    "ManifestField",
    "PlateLayout",
    "ZProjection",
    "channel_indices",
    "iter_fields",
    "iter_manifest_fields",
    "plate_layout",
    "read_image",
    "read_manifest",
    "resolve_channel_names",
    "well_name",
    "write_ome_tiff",
    "write_ome_zarr_plate",
]


def read_image(
    path: str | os.PathLike,
    channels: Sequence[str] | None = None,
    *,
    channel_names: Sequence[str] | None = None,
    z_projection: ZProjection = "first",
    timepoint: int = 0,
) -> Image:
    """Open an OME-TIFF / TIFF file or an OME-Zarr image group (also a plate field such as ``p.ome.zarr/A/1/0``).

    Args:
        path: the file or zarr group.
        channels: names to return, in this order; ``None`` returns all channels in file order.
        channel_names: names to use when the file carries none (plain TIFF) or wrong ones, one per channel.
        z_projection: ``"first"`` takes z=0; ``"max"`` takes a maximum-intensity projection over z.
        timepoint: the t index for time series.

    Example::

        from bio import read_image
        image = read_image("plate.ome.zarr/A/1/0", channels=["DNA", "Mito"])
        image.channel_names            # ['DNA', 'Mito']
        pixels = image.read()          # (2, Y, X) in the file's dtype
    """
    path = Path(path)
    if not path.exists():
        raise DinoscopeError("image not found", path=path, fix="check the path")
    options: dict[str, Any] = {"channel_names": channel_names, "z_projection": z_projection, "timepoint": timepoint}
    if path.is_dir() or path.suffix.lower() == ".zarr":
        image = read_ome_zarr_image(path, **options)
    elif path.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
        image = read_tiff(path, **options)
    else:
        raise DinoscopeError(
            f"unsupported image format {path.suffix!r}",
            path=path,
            fix="use an OME-TIFF (.ome.tif) file or an OME-Zarr image group",
        )
    return image.select(channels)


def iter_fields(
    plate_path: str | os.PathLike,
    channels: Sequence[str] | None = None,
    **options: Any,
) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(row, column, field, image)`` for every field of an OME-Zarr HCS plate, opened one at a time."""
    return iter_plate_fields(plate_path, channels, **options)


def plate_layout(plate_path: str | os.PathLike) -> PlateLayout:
    """The plate's name, rows, columns, wells and their field paths, read from NGFF metadata."""
    return read_plate_layout(plate_path)


def read_manifest(
    csv_path: str | os.PathLike, *, check_files: bool = True, channel_map: Mapping[str, str] | None = None
) -> list[ManifestField]:
    """Parse a CellProfiler LoadData CSV into one ManifestField (plate, well, site, channel paths) per row.

    ``FileName_OrigDNA`` names channel ``DNA`` (JUMP's ``Orig`` prefix is dropped; ``FileName_Illum*`` columns are
    illumination functions, not channels); ``channel_map`` renames channels explicitly (:mod:`bio.io_manifest`).
    """
    return _read_manifest(csv_path, check_files=check_files, channel_map=channel_map)


def iter_manifest_fields(
    csv_path: str | os.PathLike,
    channels: Sequence[str] | None = None,
    channel_map: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(plate, well, site, image)`` for every row of a LoadData CSV, opened one at a time."""
    return _iter_manifest(csv_path, channels, channel_map)


def write_ome_tiff(
    path: str | os.PathLike,
    data: np.ndarray,
    channel_names: Sequence[str],
    *,
    pixel_size: float | None = None,
    axes: str = "CYX",
) -> Path:
    """Write ``data`` (``axes`` order, default ``C x Y x X``) as an OME-TIFF with named channels, atomically."""
    return _write_ome_tiff(path, data, channel_names, pixel_size=pixel_size, axes=axes)


def write_ome_zarr_plate(
    path: str | os.PathLike,
    images: Mapping[tuple[str, str, str], Any] | Iterable[tuple[tuple[str, str, str], Any]],
    channel_names: Sequence[str],
    *,
    version: Literal["0.4", "0.5"] = "0.5",
    plate_name: str | None = None,
    pixel_size: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an OME-Zarr HCS plate from ``{(row, column, field): C x Y x X}`` (or an iterable of such pairs).

    NGFF 0.4 is written as zarr v2 with ``.zattrs``; NGFF 0.5 as zarr v3 with attributes under ``ome``.
    """
    return write_plate(
        path, images, channel_names, version=version, plate_name=plate_name, pixel_size=pixel_size, overwrite=overwrite
    )
