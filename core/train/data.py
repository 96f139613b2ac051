"""Deterministic, resumable SSL data stream: every sample's augmentation and every batch's masks depend only on
(seed, global sample position), so a resumed run sees exactly the samples an uninterrupted run would have seen,
whatever the number of DataLoader workers, and a run resumed at another world size continues the same global
stream (each rank takes every ``world_size``-th position from the number of samples the job has consumed)."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.data import InfiniteSampler, MaskingGenerator, collate_data_and_cast

# Signals a scheduler sends to every process of a job; the training process handles them (save, then stop) and
# its DataLoader workers must survive them until the main process shuts them down.
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class PositionedSampler(Sampler):
    """Wraps an index stream, yielding ``(global position, index)`` pairs."""

    def __init__(self, base: InfiniteSampler) -> None:
        self.base = base

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in zip(self.base.positions(), self.base, strict=False):
            yield position, int(index)


class AugmentedDataset(Dataset):
    """``(position, index)`` -> the multi-crop dict of sample ``index``, augmented with a per-position seed."""

    def __init__(self, dataset: Dataset, augmentation: Any, seed: int) -> None:
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, dict]:
        position, index = key
        item = self.dataset[index]
        image = item[0] if isinstance(item, tuple) else item
        self.augmentation.reseed([self.seed, position])
        return position, self.augmentation(image)


def _collate(items: list[tuple[int, dict]], *, seed: int, **kwargs: Any) -> dict[str, Any]:
    random.seed(hash((seed, items[0][0])))  # the iBOT mask generator draws from Python's `random`
    return collate_data_and_cast([crops for _, crops in items], **kwargs)


def _worker_init(_: int) -> None:
    for signum in SCHEDULER_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def build_ssl_loader(
    dataset: Dataset,
    augmentation: Any,
    *,
    batch_size: int,
    global_crops_size: int,
    patch_size: int,
    mask_ratio: tuple[float, float],
    mask_probability: float,
    seed: int,
    rank: int,
    world_size: int,
    start_position: int,
    num_workers: int,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Infinite loader of collated multi-crop batches for one rank, starting at global sample ``start_position``.

    ``pin_memory`` pins host batches for non-blocking copies to a GPU (see :mod:`core.distributed.device`);
    ``persistent_workers`` and ``prefetch_factor`` apply only with ``num_workers > 0``.
    """
    grid = global_crops_size // patch_size
    masker = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start_position=start_position)
    collate = partial(
        _collate,
        seed=seed,
        mask_ratio_tuple=tuple(mask_ratio),
        mask_probability=mask_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=masker,
    )
    workers: dict[str, Any] = {}
    if num_workers > 0:
        workers = {
            "persistent_workers": persistent_workers,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": _worker_init,
        }
    return DataLoader(
        AugmentedDataset(dataset, augmentation, seed),
        batch_size=batch_size,
        sampler=PositionedSampler(sampler),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        **workers,
    )


class ChannelsAsSamples(Dataset):
    """Every channel of every image as its own single-channel sample (``H x W x 1``).

    Bag-of-channels backbones encode each channel alone, so Channel-Adaptive DINO pretrains on single channels
    (Cell-DINO's ``SEPARATE_CHANNELS`` mode, facebookresearch/dinov2 PR #575). Item ``i`` is channel ``i % C`` of
    image ``i // C``; ``channel_names`` keeps one generic name.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.channels = len(dataset.channel_names)
        self.channel_names = ["channel"]

    def __len__(self) -> int:
        return len(self.dataset) * self.channels

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i // self.channels]
        image, label = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
        c = i % self.channels
        single = image[..., c : c + 1]
        return single if label is None else (single, label)
