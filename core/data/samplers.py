"""Infinite, seeded, per-rank sharded index stream for iteration-based training.

Conceptually there is one global stream made of consecutive epochs, epoch ``e`` being a permutation of
``range(size)`` seeded by ``(seed, e)``. Rank ``r`` of ``world_size`` takes the global positions
``r, r + world_size, r + 2 * world_size, ...``. Every index therefore depends only on ``(seed, position)``: a run
resumed after ``k`` iterations with ``start_index = k * batch_size_per_rank`` continues exactly where it stopped,
and ranks never share a position. ``start_position`` gives the global position instead, which is what a run resumed
at another world size needs: the stream continues from the number of samples the whole job has consumed. (Same
contract as DINOv2's ``dinov2/data/samplers.py::InfiniteSampler`` with its ``advance`` argument; the permutation
scheme here is our own.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from core.errors import DinoscopeError


class InfiniteSampler(Sampler[int]):
    """Never-ending stream of dataset indices for one rank.

    Args:
        size: dataset length.
        seed: seed of the epoch permutations; all ranks must use the same one.
        rank, world_size: this process's shard of the global stream.
        shuffle: permute each epoch; if False the stream is ``0, 1, ..., size - 1, 0, 1, ...``.
        start_index: number of indices this rank has already consumed (``iterations * batch_size_per_rank``).
        start_position: number of indices the whole job has consumed (overrides ``start_index``); this rank
            continues at global positions ``start_position + rank + k * world_size``.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start_index: int = 0,
        start_position: int | None = None,
    ) -> None:
        if size < 1:
            raise DinoscopeError(
                f"cannot sample from an empty dataset (size {size})",
                field="size",
                fix="check that the dataset found its files",
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise DinoscopeError(f"rank {rank} is not within world_size {world_size}", field="rank")
        if start_index < 0:
            raise DinoscopeError(f"start_index must be >= 0, got {start_index}", field="start_index")
        self.size = int(size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.start_index = int(start_index)
        if start_position is not None and start_position < 0:
            raise DinoscopeError(f"start_position must be >= 0, got {start_position}", field="start_position")
        self.start_position = self.start_index * self.world_size if start_position is None else int(start_position)

    def positions(self) -> Iterator[int]:
        """The global positions this rank reads, in order (paired one to one with :meth:`__iter__`)."""
        position = self.start_position + self.rank
        while True:
            yield position
            position += self.world_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of epoch ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(self.size).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        position = self.start_position + self.rank
        epoch, offset = divmod(position, self.size)
        while True:
            order = self.epoch_order(epoch)
            for index in order[offset :: self.world_size]:
                yield int(index)
            # Continue the rank's stride into the next epoch: the first position there that is congruent to rank.
            consumed = len(range(offset, self.size, self.world_size))
            offset = offset + consumed * self.world_size - self.size
            epoch += 1
            while offset >= self.size:
                offset -= self.size
                epoch += 1
