"""Many touching rasters read as one mosaic, so each is predicted with its neighbours' pixels around it.

Ecologists' imagery comes as folders of tiles. Predicted file by file, every tile edge sees padding where the
neighbour's pixels should be, and heights jump across tile borders. :func:`group_rasters` sorts the inputs into
groups that share a CRS, a pixel size and a pixel grid (tiles of one survey); each group is one virtual mosaic,
:class:`MosaicSource`, and :class:`RegionSource` is one input seen as a window of it: the tile grid is laid on the
whole mosaic (:class:`geodino.tiling.TileGrid` ``origin`` / ``extent``), tiles crossing a border read both sides,
and each input's output stays on that input's own grid. Predicting the parts one by one (on several ranks, resumably)
then gives the same heights as predicting the whole mosaic at once.

Why the mosaic is read member by member rather than through a GDAL VRT: a VRT band carries one nodata value and one
mask for every source, so it cannot keep each member's own dataset mask (internal mask, alpha, or "nodata only where
every band is nodata", see :mod:`geodino.raster`). Reading the members directly keeps their masks exact; only the
members a window touches are opened, a few handles at a time, so folders of thousands of tiles stay cheap.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from core.errors import DinoscopeError
from geodino.raster import RasterSource, intersect_window, pixel_window
from geodino.values import InputRule

MAX_OPEN = 16  # member handles kept open per mosaic reader


@dataclasses.dataclass(frozen=True)
class Member:
    """One input raster of a mosaic: its path and its pixel rectangle in the mosaic."""

    path: Path
    row: int
    col: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class MosaicGroup:
    """Rasters on one pixel grid: their union extent (``transform``, ``height``, ``width``) and the members."""

    key: str
    crs: Any
    transform: Affine
    height: int
    width: int
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        # Member rectangles as one array, so finding the members under a window is one vectorised test
        # (thousands of tiles are read window by window).
        boxes = np.array([[m.row, m.col, m.row + m.height, m.col + m.width] for m in self.members], np.int64)
        object.__setattr__(self, "_boxes", boxes.reshape(-1, 4))

    def touching(self, row: int, col: int, height: int, width: int) -> list[int]:
        """Indices of the members overlapping the mosaic pixel rectangle ``(row, col, height, width)``."""
        b = self._boxes  # type: ignore[attr-defined]
        hit = (b[:, 0] < row + height) & (row < b[:, 2]) & (b[:, 1] < col + width) & (col < b[:, 3])
        return np.flatnonzero(hit).tolist()

    def neighbours(self, index: int, margin: int) -> list[Member]:
        """The other members within ``margin`` pixels of member ``index`` (whose pixels its prediction reads)."""
        m = self.members[index]
        near = self.touching(m.row - margin, m.col - margin, m.height + 2 * margin, m.width + 2 * margin)
        return [self.members[k] for k in near if k != index]


def group_rasters(paths: Sequence[Path]) -> list[MosaicGroup]:
    """Sort rasters into mosaics: one per CRS, pixel size and pixel-grid phase, in order of first appearance.

    Rasters on the same grid need not touch; rotated rasters each form their own group.
    """
    infos: dict[tuple, list[tuple[Path, Any]]] = {}
    for path in paths:
        try:
            with rasterio.open(path) as ds:
                crs, transform, size = ds.crs, ds.transform, (ds.height, ds.width)
        except RasterioError as err:
            raise DinoscopeError(f"not a readable raster ({err})", path=path, field="inputs") from None
        if transform.b or transform.d:
            key: tuple = ("rotated", str(path))
        else:
            res = (round(transform.a, 9), round(transform.e, 9))
            phase = tuple(
                round((v / r) % 1.0, 3) % 1.0 for v, r in ((transform.c, transform.a), (transform.f, transform.e))
            )
            key = (crs.to_wkt() if crs else "", res, phase)
        infos.setdefault(key, []).append((path, (transform, size, crs)))
    groups = []
    for key, items in infos.items():
        transform0, _, crs = items[0][1]
        a, e = transform0.a, transform0.e
        lefts = [t.c for _, (t, _, _) in items]
        tops = [t.f for _, (t, _, _) in items]
        left, top = min(lefts), max(tops) if e < 0 else min(tops)
        members, right, bottom = [], 0, 0
        for path, (t, (h, w), _) in items:
            row, col = round((t.f - top) / e), round((t.c - left) / a)
            members.append(Member(path, row, col, h, w))
            right, bottom = max(right, col + w), max(bottom, row + h)
        transform = Affine(a, transform0.b, left, transform0.d, e, top) if key[0] != "rotated" else transform0
        groups.append(MosaicGroup(_group_name(crs, a), crs, transform, bottom, right, tuple(members)))
    return groups


def _group_name(crs: Any, res: float) -> str:
    epsg = crs.to_epsg() if crs else None
    name = f"EPSG{epsg}" if epsg else ("nocrs" if crs is None else "crs")
    return f"{name}_{abs(res):g}".replace(".", "p")


class MosaicSource:
    """The pixels of a :class:`MosaicGroup` with the interface of :class:`geodino.raster.RasterSource`.

    Where members overlap, the later one wins where it is valid; ``prefer`` names one that always wins, and inside
    whose rectangle only its own mask counts (so an input's nodata stays nodata in its own output).
    """

    def __init__(self, group: MosaicGroup, bands: Sequence[int | str] | None, convert: InputRule | None = None) -> None:
        self.group = group
        self.bands = None if bands is None else list(bands)
        self.convert = convert
        self._open: OrderedDict[int, RasterSource] = OrderedDict()
        first = self.member_source(0)
        self.indexes, self.band_names, self.count = first.indexes, first.band_names, first.count
        self.dtype, self.nodata, self.mask_kind = first.dtype, first.nodata, first.mask_kind
        self.crs, self.transform = group.crs, group.transform
        self.height, self.width = group.height, group.width
        self.res = (abs(group.transform.a), abs(group.transform.e))
        self.path = Path(first.path.parent) / f"mosaic of {len(group.members)} rasters"
        self.profile = {"blockysize": first.profile.get("blockysize")}

    def member_source(self, k: int) -> RasterSource:
        """The reader of member ``k`` (opened on first use; at most :data:`MAX_OPEN` stay open)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        source = RasterSource(self.group.members[k].path, bands=self.bands, convert=self.convert)
        if self._open and (source.count != self.count or source.indexes != self.indexes):
            source.close()
            raise DinoscopeError(
                f"the bands of {source.path.name} differ from those of the other inputs",
                path=source.path,
                field="bands",
                fix="give --bands explicitly, or predict rasters with different band layouts separately",
            )
        self._open[k] = source
        while len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return source

    def read(self, window: Window, boundless: bool = True, prefer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Values ``C x h x w`` and validity of a mosaic window; outside every member is invalid (zeros)."""
        col, row, width, height = pixel_window(window)
        if not boundless:
            inner = intersect_window(col, row, width, height, self.width, self.height)
            col, row, width, height = inner if inner is not None else (col, row, 0, 0)
        data = np.zeros((self.count, height, width), np.float32)
        valid = np.zeros((height, width), bool)
        order = [k for k in self.group.touching(row, col, height, width) if k != prefer]
        if prefer is not None:
            order.append(prefer)
        for k in order:
            m = self.group.members[k]
            inner = intersect_window(col - m.col, row - m.row, width, height, m.width, m.height)
            if inner is None:
                continue
            # Only the member's part of the window is read: a wide window (a batch of tiles) may touch many members.
            icol, irow, iwidth, iheight = inner
            part, part_valid = self.member_source(k).read(Window(icol, irow, iwidth, iheight), boundless=False)
            rows = slice(irow + m.row - row, irow + m.row - row + iheight)
            cols = slice(icol + m.col - col, icol + m.col - col + iwidth)
            np.copyto(data[:, rows, cols], part, where=part_valid[None])
            if k == prefer:  # inside its own rectangle, the preferred member's mask is the mask
                valid[rows, cols] = part_valid
            else:
                valid[rows, cols] |= part_valid
        return data, valid

    def read_decimated(self, max_pixels: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
        """The whole mosaic at reduced resolution (nearest neighbour, at most ``max_pixels`` pixels), member by
        member, so memory stays bounded by the output size."""
        factor = max(1.0, math.sqrt(self.width * self.height / max(1, max_pixels)))
        out_h, out_w = max(1, int(self.height / factor)), max(1, int(self.width / factor))
        data = np.zeros((self.count, out_h, out_w), np.float32)
        valid = np.zeros((out_h, out_w), bool)
        rows = np.minimum((np.arange(out_h) + 0.5) * self.height / out_h, self.height - 1).astype(int)
        cols = np.minimum((np.arange(out_w) + 0.5) * self.width / out_w, self.width - 1).astype(int)
        for k, m in enumerate(self.group.members):
            r = np.flatnonzero((rows >= m.row) & (rows < m.row + m.height))
            c = np.flatnonzero((cols >= m.col) & (cols < m.col + m.width))
            if r.size == 0 or c.size == 0:
                continue
            part, part_valid = self.member_source(k).read_decimated(max(1, r.size * c.size))
            pr = np.minimum(((rows[r] - m.row) * part.shape[1]) // m.height, part.shape[1] - 1)
            pc = np.minimum(((cols[c] - m.col) * part.shape[2]) // m.width, part.shape[2] - 1)
            block, block_valid = part[:, pr][:, :, pc], part_valid[pr][:, pc]
            target = np.ix_(r, c)
            sub = data[(slice(None), *target)]
            sub[:, block_valid] = block[:, block_valid]
            data[(slice(None), *target)] = sub
            valid[target] |= block_valid
        return data, valid

    def reopen(self) -> MosaicSource:
        """An independent reader of the same mosaic (for another thread)."""
        return MosaicSource(self.group, self.bands, self.convert)

    @property
    def origin(self) -> tuple[int, int]:
        """The mosaic is its own tile grid: ``(0, 0)``."""
        return 0, 0

    @property
    def extent(self) -> tuple[int, int]:
        """Height and width of the mosaic."""
        return self.height, self.width

    def context(self) -> list[dict[str, Any]]:
        """Every member (name, size and position): what a prediction of the whole mosaic depends on."""
        return [_describe(m) for m in self.group.members]

    def close(self) -> None:
        """Close every open member."""
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> MosaicSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegionSource:
    """Member ``index`` of a mosaic, read through the mosaic: its own grid, the mosaic's tiles and neighbours."""

    def __init__(self, mosaic: MosaicSource, index: int, margin: int) -> None:
        self.mosaic, self.index, self.margin, self.convert = mosaic, index, margin, mosaic.convert
        member = mosaic.group.members[index]
        self.member = member
        own = mosaic.member_source(index)
        self.path, self.crs, self.transform, self.res = own.path, own.crs, own.transform, own.res
        self.height, self.width = member.height, member.width
        self.indexes, self.band_names, self.count = own.indexes, own.band_names, own.count
        self.dtype, self.nodata, self.profile, self.bounds = own.dtype, own.nodata, own.profile, own.bounds

    def read(self, window: Window, boundless: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """A window in this member's pixels; with ``boundless`` the pixels around it come from its neighbours."""
        col, row, width, height = pixel_window(window)
        if not boundless:
            inner = intersect_window(col, row, width, height, self.width, self.height)
            col, row, width, height = inner if inner is not None else (col, row, 0, 0)
        shifted = Window(col + self.member.col, row + self.member.row, width, height)
        return self.mosaic.read(shifted, boundless=True, prefer=self.index)

    def read_decimated(self, max_pixels: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
        """The member's own decimated read."""
        return self.mosaic.member_source(self.index).read_decimated(max_pixels)

    def reopen(self) -> RegionSource:
        """An independent reader (for another thread)."""
        return RegionSource(self.mosaic.reopen(), self.index, self.margin)

    @property
    def origin(self) -> tuple[int, int]:
        """Row and column of this member in the mosaic."""
        return self.member.row, self.member.col

    @property
    def extent(self) -> tuple[int, int]:
        """Height and width of the mosaic whose tile grid this member shares."""
        return self.mosaic.height, self.mosaic.width

    def context(self) -> list[dict[str, Any]]:
        """The neighbours whose pixels this member's prediction reads."""
        return [_describe(m) for m in self.mosaic.group.neighbours(self.index, self.margin)]

    def close(self) -> None:
        """Close the mosaic reader behind this region."""
        self.mosaic.close()


def _describe(member: Member) -> dict[str, Any]:
    path = Path(member.path)
    size = path.stat().st_size if path.is_file() else None
    return {"name": path.name, "bytes": size, "row": member.row, "col": member.col}
