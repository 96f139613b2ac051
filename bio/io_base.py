"""Shared types of the microscopy readers: a multi-channel :class:`Image` addressed by channel name, its lazy channel
sources, and channel-name resolution. The format modules (:mod:`bio.io_tiff`, :mod:`bio.io_zarr`,
:mod:`bio.io_manifest`) build on this module; the public entry points in :mod:`bio.io` dispatch to them, and nothing
imports :mod:`bio.io` back, so the readers form no import cycle.

Channels are addressed by name, never by index, because toolchains disagree on channel order
(DeepProfiler and DINO4Cells use DNA, RNA, ER, AGP, Mito; the cpg0000 arrays used by theislab/IMPA are Mito, AGP, ER,
RNA, DNA).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.errors import DinoscopeError

ZProjection = Literal["first", "max"]

# Reading past the end of a truncated file surfaces as a variety of library errors; these are never user input
# problems of the indexing kind, which we let through untouched.
_INDEXING_ERRORS = (IndexError, TypeError, KeyboardInterrupt)


class FileCloser:
    """Closes the files behind a set of channels once no view refers to them any more (or on :meth:`close`)."""

    def __init__(self, *closables: Any) -> None:
        self._finalizer = weakref.finalize(self, _close_all, closables)

    def close(self) -> None:
        """Close the files now (idempotent: the finalizer runs at most once)."""
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
        """``(Y, X)`` size of the plane in pixels."""
        shape = dict(zip(self.axes, self.array.shape, strict=False))
        return shape["y"], shape["x"]

    def read(self, ys: slice | int = slice(None), xs: slice | int = slice(None)) -> np.ndarray:
        """Read rows ``ys`` and columns ``xs`` of the plane (maximum over ``z`` when ``project_z``); only the
        requested pixels are read from the array."""
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
            raise DinoscopeError(
                f"could not read pixel data ({type(exc).__name__}: {exc})",
                path=self.path,
                field=self.name,
                fix="the file is probably truncated or corrupt; re-export it",
            ) from exc
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
            raise DinoscopeError(
                f"channels have different shapes {sorted(shapes)}",
                path=sources[0].path,
                fix="all channels of one field must have the same Y x X size",
            )
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
        """A lazy stack of the channels at ``indices``, in that order (nothing is read)."""
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
        """``(C, Y, X)`` in channels and pixels."""
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        """The pixel dtype every channel is read as."""
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

    def renamed(self, mapping: Mapping[str, str]) -> Image:
        """The same field with channels renamed by ``mapping`` (names it does not list are kept)."""
        if not mapping or not set(mapping) & set(self.channel_names):
            return self
        names = [mapping.get(name, name) for name in self.channel_names]
        names = resolve_channel_names(names, None, self.path or "")
        sources = [replace(src, name=name) for src, name in zip(self.data.sources, names, strict=True)]
        return replace(self, channel_names=names, data=ChannelStack(sources))

    def close(self) -> None:
        """Release open file handles now instead of when the image is garbage collected."""
        for closer in {id(s.keepalive): s.keepalive for s in self.data.sources if s.keepalive}.values():
            closer.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel_indices(
    available: Sequence[str],
    requested: Sequence[str],
    path: str | os.PathLike | None = None,
) -> list[int]:
    """Positions of ``requested`` names in ``available``; unknown or repeated names raise a DinoscopeError."""
    if isinstance(requested, str):
        requested = [requested]
    indices = []
    for name in requested:
        if name not in available:
            near = [a for a in available if a.lower() == str(name).lower()]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise DinoscopeError(
                f"channel {name!r} not found{hint}; available channels: {', '.join(available)}",
                path=path,
                field=str(name),
                fix="request channels by one of the available names",
            )
        indices.append(list(available).index(name))
    if len(set(indices)) != len(indices):
        raise DinoscopeError(
            f"channels requested more than once: {list(requested)}", path=path, fix="name each channel once"
        )
    return indices


def resolve_channel_names(
    found: Sequence[str | None], override: Sequence[str] | None, path: str | os.PathLike
) -> list[str]:
    """Channel names from the file, an explicit override, or ``ch0, ch1, ...`` for unnamed channels."""
    if override is not None:
        if len(override) != len(found):
            raise DinoscopeError(
                f"channel_names has {len(override)} names but the image has {len(found)} channels",
                path=path,
                field="channel_names",
                fix=f"give exactly {len(found)} names",
            )
        names = [str(n) for n in override]
    else:
        names = [str(n) if n else f"ch{i}" for i, n in enumerate(found)]
    if len(set(names)) != len(names):
        raise DinoscopeError(
            f"duplicate channel names {names}",
            path=path,
            field="channel_names",
            fix="pass channel_names=[...] with one distinct name per channel",
        )
    return names


def well_name(row: str, column: str | int) -> str:
    """JUMP/CellProfiler well id from plate coordinates: ``("A", "1") -> "A01"``."""
    column = str(column)
    return f"{row}{int(column):02d}" if column.isdigit() else f"{row}{column}"
