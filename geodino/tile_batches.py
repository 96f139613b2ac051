"""Tile batches for tiled prediction, read and normalised on background threads while the model runs.

A batch is ``batch_size`` neighbouring tiles of one tile row (never two rows, see :mod:`geodino.predict`). Two
stages prepare it, a few batches ahead of the model:

1. one reading thread reads the window that covers all the batch's tiles, in the file's own dtype, with its
   validity (boundless: pixels outside the raster are invalid zeros). One thread and one file handle, in row order:
   rows shared by consecutive tile rows then come from GDAL's block cache (sized for them by
   :func:`geodino.predict.predict_raster`), so every block of the file is decompressed once; handles read in
   parallel each keep their own cache and decompress the shared blocks again;
2. ``num_workers`` threads convert and normalise the window tile by tile straight into one
   ``B x C x tile x tile`` tensor (one pass per tile, no float copy of the window).

Reading tile by tile instead costs one GDAL call, one mask and one normalisation per tile, and reads the
horizontal overlap of neighbouring tiles twice.

The batch tensor lives in pinned (page-locked) memory when asked, so a CUDA model can copy it to the device
asynchronously (``tensor.to(device, non_blocking=True)``); PyTorch's pinned-memory allocator caches the pages and
does not reuse them until that copy has finished, so every batch can take a fresh tensor. Ordinary batch tensors
are handed back by the consumer once the model is done with them (:meth:`TileBatchReader.recycle`) and refilled:
a fresh tensor per batch costs a page fault every 4 KiB, about as much as copying the tiles into it.

The normaliser must act pixel by pixel (scene-level constants, :mod:`geodino.normalise`), so normalising a tile
gives exactly the values of normalising the whole window.
"""

from __future__ import annotations

import dataclasses
import queue
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from geodino.normalise import BandNormaliser
from geodino.tiling import TileGrid


@dataclasses.dataclass
class TileBatch:
    """The tiles of one batch and the validity of the window they were cut from.

    Attributes:
        row_index: the tile row.
        y: raster row of the tiles' top edge (negative for a part of a mosaic whose tiles start above it).
        cols: raster column of each tile's left edge.
        tiles: ``B x C x tile x tile`` float32 normalised pixels (pinned when the reader was asked to pin).
        valid: ``tile x width`` bool, the window's validity; column 0 is raster column ``cols[0]``.
    """

    row_index: int
    y: int
    cols: list[int]
    tiles: torch.Tensor
    valid: np.ndarray
    buffer: torch.Tensor | None = dataclasses.field(default=None, repr=False)  # what ``tiles`` is cut from

    @property
    def x0(self) -> int:
        """Raster column of ``valid[:, 0]``."""
        return self.cols[0]


class TileBatchReader:
    """Prepares the batches of tile rows ``start_row..`` in two stages (module docstring), ``prefetch`` ahead.

    Batches are handed out in order by :meth:`row`; an exception while reading is re-raised there, in the
    consumer.

    Args:
        source: a :class:`geodino.raster.RasterSource` (or a mosaic source with the same ``read``), read by one
            thread only.
        normaliser: ``(data C x H x W, valid H x W) -> float32``, pixel by pixel.
        grid: the tile grid.
        start_row: the first tile row to read (a resumed run starts later).
        batch_size: tiles per batch.
        num_workers: threads that normalise windows and cut them into tiles (one more thread reads).
        pin_memory: allocate batch tensors in pinned memory (for a CUDA model).
        prefetch: batches in preparation ahead of the consumer (default ``num_workers + 1``, at most 3: windows are
            read by one thread, so more batches in flight would add memory, not speed).
    """

    def __init__(
        self,
        source: Any,
        normaliser: Callable[..., np.ndarray],
        grid: TileGrid,
        start_row: int,
        batch_size: int,
        num_workers: int,
        *,
        pin_memory: bool = False,
        prefetch: int | None = None,
    ) -> None:
        self.grid = grid
        self.source = source
        self.normaliser = normaliser
        self.pin_memory = pin_memory
        self.batch_size = batch_size
        # A BandNormaliser converts the file's values and normalises them in one pass, straight into the batch.
        self._direct = isinstance(normaliser, BandNormaliser) and hasattr(source, "read_raw") and not source.convert
        self._spare: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # recycled batch tensors
        cols = grid.cols
        self._jobs = iter(
            (row_index, cols[i : i + batch_size])
            for row_index in range(start_row, len(grid.rows))
            for i in range(0, len(cols), batch_size)
        )
        self._pending: deque[tuple[int, Future[TileBatch]]] = deque()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader")
        self._cutters = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="tile-cutter")
        for _ in range(prefetch or min(num_workers, 2) + 1):
            self._submit()

    def row(self, row_index: int) -> Iterator[TileBatch]:
        """The batches of tile row ``row_index``, in order (rows must be asked for in order)."""
        if not self._pending or self._pending[0][0] != row_index:
            got = self._pending[0][0] if self._pending else None
            raise RuntimeError(f"tile rows out of order: expected {row_index}, next is {got}")
        while self._pending and self._pending[0][0] == row_index:
            batch = self._pending.popleft()[1].result()
            self._submit()
            yield batch

    def recycle(self, batch: TileBatch, predicted: np.ndarray) -> None:
        """Give ``batch``'s tensor back for a later batch once the model is done with it, unless it is pinned
        (PyTorch caches those itself) or the model's output ``predicted`` shares its memory."""
        if batch.buffer is not None and not np.may_share_memory(batch.buffer.numpy(), predicted):
            self._spare.put(batch.buffer)
        batch.buffer = None

    def close(self) -> None:
        """Drop the batches not started and wait for those in preparation."""
        while self._pending:
            self._pending.popleft()[1].cancel()
        self._cutters.shutdown(wait=True, cancel_futures=True)
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        job = next(self._jobs, None)
        if job is not None:
            window = self._reader.submit(self._read, *job)
            self._pending.append((job[0], self._cutters.submit(self._cut, window, *job)))

    def _read(self, row_index: int, cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        tile = self.grid.tile
        window = Window(cols[0], self.grid.rows[row_index], cols[-1] + tile - cols[0], tile)
        return self.source.read_raw(window) if self._direct else self.source.read(window, boundless=True)

    def _cut(self, window: Future[tuple[np.ndarray, np.ndarray]], row_index: int, cols: list[int]) -> TileBatch:
        data, valid = window.result()
        tile = self.grid.tile
        shape = (self.batch_size, data.shape[0], tile, tile)
        buffer = None if self.pin_memory else self._spare_buffer(shape)
        tiles = torch.empty((len(cols), *shape[1:]), pin_memory=True) if buffer is None else buffer[: len(cols)]
        out = tiles.numpy()
        offsets = [x - cols[0] for x in cols]
        if self._direct:  # the same float32 arithmetic as normalising the window, without the window's float copy
            for k, o in enumerate(offsets):
                self.normaliser(data[:, :, o : o + tile], valid[:, o : o + tile], out=out[k])
        else:
            pixels = self.normaliser(data, valid)
            for k, o in enumerate(offsets):  # one contiguous copy per tile: faster than a gather over strided views
                out[k] = pixels[:, :, o : o + tile]
        return TileBatch(row_index, self.grid.rows[row_index], list(cols), tiles, valid, buffer)

    def _spare_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            buffer = self._spare.get_nowait()
        except queue.Empty:
            return torch.empty(shape)
        return buffer if tuple(buffer.shape) == shape else torch.empty(shape)
