"""Overlapping tile grid and smooth blending weights for seamless tiled prediction.

A raster is cut into ``tile`` x ``tile`` tiles whose origins are ``stride = tile - overlap`` apart; the last row and
column of tiles are pulled back so they end exactly on the raster edge (a raster smaller than a tile gets a single
tile that a boundless read pads). Each tile's prediction is multiplied by a separable weight and the output pixel is
``sum(w * pred) / sum(w)`` over the tiles covering it.

The weight ramps up over the ``overlap`` pixels of every side that faces a neighbouring tile with a raised-cosine
(Hann) profile, the blending window analysed by Pielawski & Wählby, "Introducing Hann windows for reducing edge
effects in patch-based image segmentation", PLOS ONE 15(3): e0229839 (2020). Sides lying on the raster edge are
not tapered: no other tile covers those pixels, so the blended weight is positive everywhere inside the raster.

``margin`` optionally gives the outermost pixels of inner sides weight exactly 0 (a border crop, as TerraTorch's
tiled inference ``delta``). Those pixels are then taken only from the neighbour, whose weight there is positive;
with ``margin`` >= the model's receptive radius a local model's tiled output equals its whole-raster output.

The weights are separable, ``w(y, x) = wy(y) * wx(x)``, and so is their sum over the tiles covering a pixel,
``(sum over tile rows of wy) * (sum over tile columns of wx)``: :class:`StripAccumulator` sums only the weighted
predictions of one strip (``tile`` rows, full width) and divides by the weight sums :meth:`TileGrid.weight_sums`
computes once from the grid, instead of accumulating a weight per pixel for every tile.
:class:`geodino.tile_batches.TileBatchReader` reads and normalises the batches on background threads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from core.errors import DinoscopeError


def grid_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: ``0, stride, 2*stride, ...`` and a last one ending on ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def ramp_1d(
    tile: int, overlap: int, margin: int = 0, *, taper_start: bool = True, taper_end: bool = True
) -> np.ndarray:
    """One axis of the blending weight, float32 of length ``tile``.

    Inside a tapered side: ``margin`` zeros, then ``0.5 - 0.5 cos(pi (i + 0.5) / n)`` over ``n = overlap - margin``
    pixels (a half Hann window that never reaches 0 or 1 exactly), then 1.
    """
    weights = np.ones(tile, np.float64)
    span = overlap - margin
    if span > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(span) + 0.5) / span)
        ramp = np.concatenate([np.zeros(margin), ramp])
        if taper_start:
            weights[:overlap] = np.minimum(weights[:overlap], ramp)
        if taper_end:
            weights[tile - overlap :] = np.minimum(weights[tile - overlap :], ramp[::-1])
    return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The tiles covering a ``height`` x ``width`` raster, processed one tile row (strip) at a time.

    A raster that is one part of a larger mosaic (``origin`` its row and column there, ``extent`` the mosaic's
    height and width) gets the mosaic's tiles that touch it, in its own pixel coordinates: a tile may start above or
    left of it (negative origin) and reach past its end, reading the neighbours' pixels. Every part of a mosaic then
    sees exactly the tiles and weights of the whole mosaic, so parts predicted separately join without seams.

    Attributes:
        rows, cols: tile origins along y and x, in this raster's pixels (see :func:`grid_starts`).
    """

    height: int
    width: int
    tile: int
    overlap: int
    margin: int = 0
    origin: tuple[int, int] = (0, 0)
    extent: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise DinoscopeError(f"tile size must be positive, got {self.tile}", field="tile")
        if not 0 <= self.overlap < self.tile:
            raise DinoscopeError(
                f"overlap must be in [0, tile) = [0, {self.tile}), got {self.overlap}",
                field="overlap",
                fix="use e.g. a quarter of the tile size",
            )
        if self.margin < 0 or (self.margin and 2 * self.margin >= self.overlap):
            raise DinoscopeError(
                f"margin {self.margin} needs an overlap of more than twice the margin (overlap is {self.overlap})",
                field="margin",
                fix="lower the margin or raise the overlap",
            )

    @property
    def stride(self) -> int:
        """Pixels between neighbouring tile origins: ``tile - overlap``."""
        return self.tile - self.overlap

    @property
    def full(self) -> tuple[int, int]:
        """Height and width of the grid the tiles are laid on (the mosaic's, or this raster's own)."""
        return self.extent or (self.height, self.width)

    @property
    def rows(self) -> list[int]:
        """Tile origins along y touching this raster, in its pixels (:func:`grid_starts`)."""
        return _local_starts(self.full[0], self.origin[0], self.height, self.tile, self.stride)

    @property
    def cols(self) -> list[int]:
        """Tile origins along x touching this raster, in its pixels (:func:`grid_starts`)."""
        return _local_starts(self.full[1], self.origin[1], self.width, self.tile, self.stride)

    @property
    def n_tiles(self) -> int:
        """Number of tiles: ``len(rows) * len(cols)``."""
        return len(self.rows) * len(self.cols)

    def finished_rows(self, row_index: int) -> tuple[int, int]:
        """Raster rows ``[start, stop)`` that no tile after tile row ``row_index`` touches (may be empty)."""
        rows = self.rows
        stop = min(max(rows[row_index + 1], 0), self.height) if row_index + 1 < len(rows) else self.height
        return max(rows[row_index], 0), stop

    def weights(self, y: int, x: int) -> np.ndarray:
        """The ``tile`` x ``tile`` float32 weight of the tile with origin ``(y, x)`` (tapered towards every side that
        faces another tile of the full grid): ``outer(row_ramp(y), col_ramp(x))``, read-only."""
        gy, gx = y + self.origin[0], x + self.origin[1]
        height, width = self.full
        return _tile_weights(
            self.tile, self.overlap, self.margin, gy > 0, gy + self.tile < height, gx > 0, gx + self.tile < width
        )

    def row_ramp(self, y: int) -> np.ndarray:
        """The weight along y of the tiles starting at row ``y`` (float32, length ``tile``, read-only)."""
        gy = y + self.origin[0]
        return _ramp(self.tile, self.overlap, self.margin, gy > 0, gy + self.tile < self.full[0])

    def col_ramp(self, x: int) -> np.ndarray:
        """The weight along x of the tiles starting at column ``x`` (float32, length ``tile``, read-only)."""
        gx = x + self.origin[1]
        return _ramp(self.tile, self.overlap, self.margin, gx > 0, gx + self.tile < self.full[1])

    def weight_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Float32 sums of :meth:`row_ramp` over the tile rows covering each raster row, and of :meth:`col_ramp`
        over the tile columns covering each raster column: the blended weight of pixel ``(y, x)`` is their product.

        Summed in float64 in tile order, so a part of a mosaic gets exactly the whole mosaic's sums."""
        return (
            _axis_sums(self.height, self.rows, self.tile, self.row_ramp),
            _axis_sums(self.width, self.cols, self.tile, self.col_ramp),
        )


def _local_starts(full: int, offset: int, length: int, tile: int, stride: int) -> list[int]:
    """Origins of the full grid's tiles that overlap ``[offset, offset + length)``, relative to ``offset``."""
    return [s - offset for s in grid_starts(full, tile, stride) if s < offset + length and s + tile > offset]


def _axis_sums(length: int, starts: Sequence[int], tile: int, ramp_at: Callable[[int], np.ndarray]) -> np.ndarray:
    total = np.zeros(length, np.float64)
    for s in starts:
        lo, hi = max(s, 0), min(s + tile, length)
        if hi > lo:
            total[lo:hi] += ramp_at(s)[lo - s : hi - s]
    return total.astype(np.float32)


@lru_cache(maxsize=64)
def _ramp(tile: int, overlap: int, margin: int, start: bool, end: bool) -> np.ndarray:
    weights = ramp_1d(tile, overlap, margin, taper_start=start, taper_end=end)
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=16)
def _tile_weights(tile: int, overlap: int, margin: int, top: bool, bottom: bool, left: bool, right: bool) -> np.ndarray:
    weights = np.outer(_ramp(tile, overlap, margin, top, bottom), _ramp(tile, overlap, margin, left, right))
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


class StripAccumulator:
    """Weighted prediction sums for the ``tile`` raster rows starting at the current tile row, full raster width.

    Memory is ``n_values x tile x width`` float32 plus a ``tile x width`` mask, independent of the raster height.
    The weights are not accumulated: their sums are separable and come from the grid (module docstring).

    Args:
        grid: the tile grid.
        n_values: how many per-pixel quantities are blended (height, and optionally its std).
    """

    def __init__(self, grid: TileGrid, n_values: int) -> None:
        self.grid = grid
        self.base = 0
        self.sums = np.zeros((n_values, grid.tile, grid.width), np.float32)
        self.valid = np.zeros((grid.tile, grid.width), bool)
        self._live = 0  # leading buffer rows holding sums carried over from the previous tile row
        row_sums, col_sums = grid.weight_sums()
        # Dividing by the weight sum is multiplying by the reciprocals of its two factors (0 where no weight falls).
        with np.errstate(divide="ignore"):
            self._row_scale = np.where(row_sums > 0, np.float32(1) / row_sums, np.float32(0))
            self._col_scale = np.where(col_sums > 0, np.float32(1) / col_sums, np.float32(0))
        self._cols_weighted = None if (col_sums > 0).all() else col_sums > 0
        self._weighted = np.empty((n_values, grid.tile, grid.tile), np.float32)  # one tile, kept in the CPU cache

    def add_batch(self, y: int, cols: Sequence[int], values: np.ndarray, valid: np.ndarray) -> None:
        """Add a batch of tiles of the tile row at ``y``: ``values`` ``n_values x B x tile x tile`` predictions of
        the tiles starting at columns ``cols``, ``valid`` the ``tile x width`` validity of the window they were cut
        from (its column 0 is raster column ``cols[0]``)."""
        g = self.grid
        y0, y1 = max(y, self.base), min(y + g.tile, g.height)
        if y1 <= y0:
            return
        ty, by = slice(y0 - y, y1 - y), slice(y0 - self.base, y1 - self.base)
        # Tile by tile through a small buffer that stays in the CPU cache: measured faster than weighting the whole
        # batch in one array operation and then adding it (which streams the batch through memory twice more).
        ny = y1 - y0
        for k, x in enumerate(cols):
            x0, x1 = max(x, 0), min(x + g.tile, g.width)
            if x1 > x0:
                tx, part = slice(x0 - x, x1 - x), self._weighted[:, :ny, : x1 - x0]
                np.multiply(values[:, k, ty, tx], g.weights(y, x)[ty, tx], out=part)
                self.sums[:, by, x0:x1] += part
        first = cols[0]
        x0, x1 = max(first, 0), min(first + valid.shape[1], g.width)
        if x1 > x0:
            self.valid[by, x0:x1] = valid[ty, x0 - first : x1 - first]

    def pop_rows(self, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Blended values ``n_values x rows x width`` (NaN where invalid) for raster rows ``[base, stop)``; the
        buffers then move down so that ``stop`` becomes the new base."""
        n = stop - self.base
        row_scale = self._row_scale[self.base : stop, None]
        valid = self.valid[:n] & (row_scale > 0)
        if self._cols_weighted is not None:
            valid &= self._cols_weighted
        values = np.multiply(self.sums[:, :n], row_scale)
        values *= self._col_scale
        np.copyto(values, np.float32(np.nan), where=~valid)
        self._shift(n)
        self._live = self.grid.tile - n
        self.base = stop
        return values, valid

    def _shift(self, n: int) -> None:
        keep = self.grid.tile - n
        self.sums[:, :keep] = self.sums[:, n : n + keep].copy()
        self.sums[:, keep:] = 0
        self.valid[:] = False

    # -- resume --------------------------------------------------------------------------------------------
    def carry(self) -> dict[str, np.ndarray]:
        """The partial sums that outlive the finished rows (the overlap with the next tile row)."""
        keep = self._live
        return {"sums": self.sums[:, :keep].copy(), "base": np.int64(self.base)}

    def restore(self, carry: dict[str, np.ndarray]) -> None:
        """Reload sums saved by :meth:`carry` when resuming an interrupted run."""
        keep = carry["sums"].shape[1]
        self.sums[:] = 0
        self.sums[:, :keep] = carry["sums"]
        self._live = keep
        self.base = int(carry["base"])
