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

:class:`StripAccumulator` holds the weighted sums of one strip (``tile`` rows, full width) and :class:`TileBatchReader`
reads and normalises tile batches on background threads, so I/O overlaps the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from core.errors import DinoscopeError
from geodino.raster import RasterSource


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
        faces another tile of the full grid)."""
        gy, gx = y + self.origin[0], x + self.origin[1]
        height, width = self.full
        return _tile_weights(
            self.tile, self.overlap, self.margin, gy > 0, gy + self.tile < height, gx > 0, gx + self.tile < width
        )


def _local_starts(full: int, offset: int, length: int, tile: int, stride: int) -> list[int]:
    """Origins of the full grid's tiles that overlap ``[offset, offset + length)``, relative to ``offset``."""
    return [s - offset for s in grid_starts(full, tile, stride) if s < offset + length and s + tile > offset]


@lru_cache(maxsize=16)
def _tile_weights(tile: int, overlap: int, margin: int, top: bool, bottom: bool, left: bool, right: bool) -> np.ndarray:
    wy = ramp_1d(tile, overlap, margin, taper_start=top, taper_end=bottom)
    wx = ramp_1d(tile, overlap, margin, taper_start=left, taper_end=right)
    weights = np.outer(wy, wx).astype(np.float32)
    weights.setflags(write=False)
    return weights


class StripAccumulator:
    """Weighted sums for the ``tile`` raster rows starting at the current tile row, full raster width.

    Memory is ``tile x width`` per blended quantity, independent of the raster height.

    Args:
        grid: the tile grid.
        n_values: how many per-pixel quantities are blended (height, and optionally its std).
    """

    def __init__(self, grid: TileGrid, n_values: int) -> None:
        self.grid = grid
        self.base = 0
        self.sums = np.zeros((n_values, grid.tile, grid.width), np.float32)
        self.weight = np.zeros((grid.tile, grid.width), np.float32)
        self.valid = np.zeros((grid.tile, grid.width), bool)
        self._live = 0  # leading buffer rows holding sums carried over from the previous tile row

    def add(self, y: int, x: int, values: np.ndarray, valid: np.ndarray) -> None:
        """Add one tile's ``n_values x tile x tile`` prediction and its ``tile x tile`` validity (the part inside
        the raster)."""
        g = self.grid
        y0, y1 = max(y, self.base), min(y + g.tile, g.height)
        x0, x1 = max(x, 0), min(x + g.tile, g.width)
        if y1 <= y0 or x1 <= x0:
            return
        ty, tx = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
        by = slice(y0 - self.base, y1 - self.base)
        weights = g.weights(y, x)[ty, tx]
        self.sums[:, by, x0:x1] += values[:, ty, tx] * weights
        self.weight[by, x0:x1] += weights
        self.valid[by, x0:x1] = valid[ty, tx]

    def pop_rows(self, stop: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Blended values ``n_values x rows x width`` (NaN where invalid) for raster rows ``[base, stop)``.

        Divides ``chunk`` columns at a time so temporaries stay small. The buffers then move down so that ``stop``
        becomes the new base.
        """
        n = stop - self.base
        values = np.empty((self.sums.shape[0], n, self.grid.width), np.float32)
        valid = self.valid[:n] & (self.weight[:n] > 0)
        for c0 in range(0, self.grid.width, chunk):
            cols = slice(c0, c0 + chunk)
            with np.errstate(invalid="ignore", divide="ignore"):
                np.divide(self.sums[:, :n, cols], self.weight[None, :n, cols], out=values[:, :, cols])
            values[:, :, cols][:, ~valid[:, cols]] = np.nan
        self._shift(n)
        self._live = self.grid.tile - n
        self.base = stop
        return values, valid

    def _shift(self, n: int) -> None:
        keep = self.grid.tile - n
        for buf in (self.sums[i] for i in range(self.sums.shape[0])):
            buf[:keep] = buf[n : n + keep].copy()
            buf[keep:] = 0
        self.weight[:keep] = self.weight[n : n + keep].copy()
        self.weight[keep:] = 0
        self.valid[:] = False

    # -- resume --------------------------------------------------------------------------------------------
    def carry(self) -> dict[str, np.ndarray]:
        """The partial sums that outlive the finished rows (the overlap with the next tile row)."""
        keep = self._live
        return {"sums": self.sums[:, :keep].copy(), "weight": self.weight[:keep].copy(), "base": np.int64(self.base)}

    def restore(self, carry: dict[str, np.ndarray]) -> None:
        """Reload sums saved by :meth:`carry` when resuming an interrupted run."""
        keep = carry["weight"].shape[0]
        self.sums[:] = 0
        self.weight[:] = 0
        self.sums[:, :keep] = carry["sums"]
        self.weight[:keep] = carry["weight"]
        self._live = keep
        self.base = int(carry["base"])


class TileBatchReader:
    """Background reading and normalisation of tile batches, one tile row after another, through a bounded queue.

    A producer thread walks the tile rows from ``start_row`` and hands whole batches (never spanning two tile rows)
    to the consumer; ``num_workers`` reader threads each hold their own file handle, since GDAL handles are not
    shared safely between threads. An exception while reading is re-raised in the consumer.
    """

    def __init__(
        self,
        source: RasterSource,
        normaliser: Callable[..., np.ndarray],
        grid: TileGrid,
        start_row: int,
        batch_size: int,
        num_workers: int,
        prefetch: int = 2,
    ) -> None:
        self.grid = grid
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        handles = [source] + [source.reopen() for _ in range(num_workers - 1)]
        self._handles = handles
        self._free: queue.Queue[RasterSource] = queue.Queue()
        for handle in handles:
            self._free.put(handle)
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="tile-reader")
        self._thread = threading.Thread(target=self._produce, args=(start_row,), daemon=True, name="batch-producer")
        self._thread.start()

    def row(self, row_index: int) -> Iterator[tuple[list[int], torch.Tensor, np.ndarray]]:
        """The batches of tile row ``row_index`` (they must be consumed in order)."""
        while True:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            got_row, payload = item
            if got_row != row_index:
                raise RuntimeError(f"tile rows out of order: expected {row_index}, got {got_row}")
            if payload is None:
                return
            yield payload

    def close(self) -> None:
        """Stop the producer (draining the queue so it can exit), then release the extra file handles."""
        self.stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        self._pool.shutdown(wait=True)
        for handle in self._handles[1:]:
            handle.close()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_tile(self, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        handle = self._free.get()
        try:
            data, valid = handle.read(Window(x, y, self.grid.tile, self.grid.tile), boundless=True)
        finally:
            self._free.put(handle)
        return self.normaliser(data, valid), valid

    def _produce(self, start_row: int) -> None:
        try:
            cols = self.grid.cols
            for row_index in range(start_row, len(self.grid.rows)):
                y = self.grid.rows[row_index]
                for i in range(0, len(cols), self.batch_size):
                    chunk = cols[i : i + self.batch_size]
                    tiles = list(self._pool.map(partial(self._read_tile, y), chunk))
                    batch = torch.from_numpy(np.stack([t[0] for t in tiles]))
                    valid = np.stack([t[1] for t in tiles])
                    if not self._put((row_index, (chunk, batch, valid))):
                        return
                if not self._put((row_index, None)):
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it in the main thread
            self._put(err)
