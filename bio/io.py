"""Multi-channel microscopy images addressed by channel name, and the public read/write entry points.

Every reader returns an :class:`Image`: channel names in the order returned, plus a lazy ``C x Y x X`` view that only
reads the channels and pixels it is indexed with. Format-specific code lives in :mod:`bio.io_tiff` (OME-TIFF and plain
TIFF), :mod:`bio.io_zarr` (OME-Zarr images and HCS plates, NGFF 0.4 and 0.5) and :mod:`bio.io_manifest`
(CellProfiler LoadData CSVs); they are imported on first use so ``import bio.io`` stays cheap.

Channels are addressed by name, never by index, because toolchains disagree on channel order (bio.md section 7).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from core.errors import DinoscopeError

if TYPE_CHECKING:
    from bio.io_manifest import ManifestField
    from bio.io_zarr import PlateLayout

ZProjection = Literal["first", "max"]

# Reading past the end of a truncated file surfaces as a variety of library errors; these are never user input
# problems of the indexing kind, which we let through untouched.
_INDEXING_ERRORS = (IndexError, TypeError, KeyboardInterrupt)


class FileCloser:
    """Closes the files behind a set of channels once no view refers to them any more (or on :meth:`close`)."""

    def __init__(self, *closables: Any) -> None:
        self._finalizer = weakref.finalize(self, _close_all, closables)

    def close(self) -> None:
        self._finalizer()


def _close_all(closables: tuple[Any, ...]) -> None:
    for item in closables:
        item.close()


@dataclass(frozen=True)
class ChannelSource:
    """Where one channel's ``Y x X`` plane lives inside an N-d array.

    Attributes:
        array: any array supporting numpy basic indexing (zarr array, tifffile zarr store array, ndarray).
        axes: one lower-case letter per array dimension, containing ``y`` and ``x`` (e.g. ``"tczyx"``).
        fixed: the index taken along every other axis (e.g. ``{"t": 0, "c": 2, "z": 0}``).
        project_z: take the maximum over ``z`` instead of ``fixed["z"]``.
        path: the file, for error messages.
        name: the channel name, for error messages.
        keepalive: an object (a :class:`FileCloser`) that must live as long as the source.
    """

    array: Any
    axes: str
    fixed: Mapping[str, int]
    project_z: bool = False
    path: str = ""
    name: str = ""
    keepalive: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        shape = dict(zip(self.axes, self.array.shape))
        return shape["y"], shape["x"]

    def read(self, ys: slice | int = slice(None), xs: slice | int = slice(None)) -> np.ndarray:
        key: list[Any] = []
        kept: list[str] = []
        for axis in self.axes:
            if axis == "y" or axis == "x":
                key.append(ys if axis == "y" else xs)
            elif axis == "z" and self.project_z:
                key.append(slice(None))
            else:
                key.append(self.fixed.get(axis, 0))
            if isinstance(key[-1], slice):
                kept.append(axis)
        try:
            plane = np.asarray(self.array[tuple(key)])
        except _INDEXING_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is unreadable
            raise DinoscopeError(f"could not read pixel data ({type(exc).__name__}: {exc})", path=self.path,
                                 field=self.name, fix="the file is probably truncated or corrupt; re-export it") \
                from exc
        if self.project_z:
            plane = plane.max(axis=kept.index("z"))
        return plane


class ChannelStack:
    """A lazy ``C x Y x X`` array: indexing reads only the requested channels and window.

    Supports ``stack[c]``, ``stack[c, y0:y1, x0:x1]``, ``stack[[2, 0]]``, ``stack[1:3, ...]`` and ``np.asarray``.
    """

    def __init__(self, sources: Sequence[ChannelSource]) -> None:
        if not sources:
            raise ValueError("a ChannelStack needs at least one channel")
        shapes = {src.shape for src in sources}
        if len(shapes) != 1:
            raise DinoscopeError(f"channels have different shapes {sorted(shapes)}", path=sources[0].path,
                                 fix="all channels of one field must have the same Y x X size")
        self.sources = tuple(sources)
        self.dtype = np.result_type(*(np.dtype(src.array.dtype) for src in sources))
        self.shape: tuple[int, int, int] = (len(sources), *shapes.pop())
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if key and key[0] is Ellipsis:
            key = (slice(None),) * (4 - len(key)) + key[1:]
        key = tuple(slice(None) if k is Ellipsis else k for k in key)
        if len(key) > 3:
            raise IndexError(f"too many indices for a C x Y x X stack: {key}")
        c_key, ys, xs = key + (slice(None),) * (3 - len(key))
        if isinstance(c_key, (int, np.integer)):
            return self.sources[int(c_key)].read(ys, xs).astype(self.dtype, copy=False)
        indices = range(len(self.sources))[c_key] if isinstance(c_key, slice) else [int(i) for i in c_key]
        planes = [self.sources[i].read(ys, xs) for i in indices]
        if not planes:
            raise IndexError(f"channel index {c_key!r} selects no channel")
        return np.stack(planes).astype(self.dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype, copy=False)

    def select(self, indices: Sequence[int]) -> ChannelStack:
        return ChannelStack([self.sources[i] for i in indices])


@dataclass
class Image:
    """One field of view: named channels over a lazy ``C x Y x X`` array.

    Attributes:
        channel_names: names in the order of ``data``'s first axis.
        data: a :class:`ChannelStack`; index it to read pixels.
        pixel_size: micrometres per pixel along x, when the file says so.
        path: the file or zarr group read.
    """

    channel_names: list[str]
    data: ChannelStack
    pixel_size: float | None = None
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def read(self) -> np.ndarray:
        """Load every channel into memory, ``C x Y x X``."""
        return self.data[:]

    def channel(self, name: str) -> np.ndarray:
        """Load one channel by name, ``Y x X``."""
        return self.data[channel_indices(self.channel_names, [name], self.path)[0]]

    def select(self, channels: Sequence[str] | None) -> Image:
        """The same field restricted to ``channels``, in that order (``None`` keeps all)."""
        if channels is None:
            return self
        indices = channel_indices(self.channel_names, channels, self.path)
        return replace(self, channel_names=[self.channel_names[i] for i in indices], data=self.data.select(indices))

    def close(self) -> None:
        """Release open file handles now instead of when the image is garbage collected."""
        for closer in {id(s.keepalive): s.keepalive for s in self.data.sources if s.keepalive}.values():
            closer.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel_indices(available: Sequence[str], requested: Sequence[str], path: str | os.PathLike | None = None,
                    ) -> list[int]:
    """Positions of ``requested`` names in ``available``; unknown or repeated names raise a DinoscopeError."""
    if isinstance(requested, str):
        requested = [requested]
    indices = []
    for name in requested:
        if name not in available:
            near = [a for a in available if a.lower() == str(name).lower()]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DinoscopeError(f"channel {name!r} not found{hint}; available channels: {', '.join(available)}",
                                 path=path, field=str(name), fix="request channels by one of the available names")
        indices.append(list(available).index(name))
    if len(set(indices)) != len(indices):
        raise DinoscopeError(f"channels requested more than once: {list(requested)}", path=path,
                             fix="name each channel once")
    return indices


def resolve_channel_names(found: Sequence[str | None], override: Sequence[str] | None,
                          path: str | os.PathLike) -> list[str]:
    """Channel names from the file, an explicit override, or ``ch0, ch1, ...`` for unnamed channels."""
    if override is not None:
        if len(override) != len(found):
            raise DinoscopeError(f"channel_names has {len(override)} names but the image has {len(found)} channels",
                                 path=path, field="channel_names", fix=f"give exactly {len(found)} names")
        names = [str(n) for n in override]
    else:
        names = [str(n) if n else f"ch{i}" for i, n in enumerate(found)]
    if len(set(names)) != len(names):
        raise DinoscopeError(f"duplicate channel names {names}", path=path, field="channel_names",
                             fix="pass channel_names=[...] with one distinct name per channel")
    return names


def well_name(row: str, column: str | int) -> str:
    """JUMP/CellProfiler well id from plate coordinates: ``("A", "1") -> "A01"``."""
    column = str(column)
    return f"{row}{int(column):02d}" if column.isdigit() else f"{row}{column}"


def read_image(path: str | os.PathLike, channels: Sequence[str] | None = None, *,
               channel_names: Sequence[str] | None = None, z_projection: ZProjection = "first",
               timepoint: int = 0) -> Image:
    """Open an OME-TIFF / TIFF file or an OME-Zarr image group (also a plate field such as ``p.ome.zarr/A/1/0``).

    Args:
        path: the file or zarr group.
        channels: names to return, in this order; ``None`` returns all channels in file order.
        channel_names: names to use when the file carries none (plain TIFF) or wrong ones, one per channel.
        z_projection: ``"first"`` takes z=0; ``"max"`` takes a maximum-intensity projection over z.
        timepoint: the t index for time series.
    """
    path = Path(path)
    if not path.exists():
        raise DinoscopeError("image not found", path=path, fix="check the path")
    options: dict[str, Any] = {"channel_names": channel_names, "z_projection": z_projection, "timepoint": timepoint}
    if path.is_dir() or path.suffix.lower() == ".zarr":
        from bio.io_zarr import read_ome_zarr_image

        image = read_ome_zarr_image(path, **options)
    elif path.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
        from bio.io_tiff import read_tiff

        image = read_tiff(path, **options)
    else:
        raise DinoscopeError(f"unsupported image format {path.suffix!r}", path=path,
                             fix="use an OME-TIFF (.ome.tif) file or an OME-Zarr image group")
    return image.select(channels)


def iter_fields(plate_path: str | os.PathLike, channels: Sequence[str] | None = None, **options: Any,
                ) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(row, column, field, image)`` for every field of an OME-Zarr HCS plate, opened one at a time."""
    from bio.io_zarr import iter_plate_fields

    return iter_plate_fields(plate_path, channels, **options)


def plate_layout(plate_path: str | os.PathLike) -> PlateLayout:
    """The plate's name, rows, columns, wells and their field paths, read from NGFF metadata."""
    from bio.io_zarr import read_plate_layout

    return read_plate_layout(plate_path)


def read_manifest(csv_path: str | os.PathLike, *, check_files: bool = True) -> list[ManifestField]:
    """Parse a CellProfiler LoadData CSV into one ManifestField (plate, well, site, channel paths) per row."""
    from bio.io_manifest import read_manifest as _read

    return _read(csv_path, check_files=check_files)


def iter_manifest_fields(csv_path: str | os.PathLike, channels: Sequence[str] | None = None,
                         ) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(plate, well, site, image)`` for every row of a LoadData CSV, opened one at a time."""
    from bio.io_manifest import iter_manifest_fields as _iter

    return _iter(csv_path, channels)


def write_ome_tiff(path: str | os.PathLike, data: np.ndarray, channel_names: Sequence[str], *,
                   pixel_size: float | None = None, axes: str = "CYX") -> Path:
    """Write ``data`` (``axes`` order, default ``C x Y x X``) as an OME-TIFF with named channels, atomically."""
    from bio.io_tiff import write_ome_tiff as _write

    return _write(path, data, channel_names, pixel_size=pixel_size, axes=axes)


def write_ome_zarr_plate(path: str | os.PathLike,
                         images: Mapping[tuple[str, str, str], Any] | Iterable[tuple[tuple[str, str, str], Any]],
                         channel_names: Sequence[str], *, version: Literal["0.4", "0.5"] = "0.5",
                         plate_name: str | None = None, pixel_size: float | None = None,
                         overwrite: bool = False) -> Path:
    """Write an OME-Zarr HCS plate from ``{(row, column, field): C x Y x X}`` (or an iterable of such pairs).

    NGFF 0.4 is written as zarr v2 with ``.zattrs``; NGFF 0.5 as zarr v3 with attributes under ``ome``.
    """
    from bio.io_zarr import write_plate

    return write_plate(path, images, channel_names, version=version, plate_name=plate_name, pixel_size=pixel_size,
                       overwrite=overwrite)
