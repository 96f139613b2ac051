"""Deterministic, resumable SSL data stream: every sample's augmentation and every batch's masks depend only on
(seed, global sample position), so a resumed run sees exactly the batches an uninterrupted run would have seen,
whatever the number of DataLoader workers."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.data import InfiniteSampler, MaskingGenerator, collate_data_and_cast


class PositionedSampler(Sampler):
    """Wraps an index stream, yielding ``(position, index)`` pairs."""

    def __init__(self, base: InfiniteSampler, start_position: int) -> None:
        self.base = base
        self.start = start_position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for offset, index in enumerate(self.base):
            yield self.start + offset, int(index)


class AugmentedDataset(Dataset):
    """``(position, index)`` -> the multi-crop dict of sample ``index``, augmented with a per-position seed."""

    def __init__(self, dataset: Dataset, augmentation: Any, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, dict]:
        position, index = key
        item = self.dataset[index]
        image = item[0] if isinstance(item, tuple) else item
        self.augmentation.reseed([self.seed, self.rank, position])
        return position, self.augmentation(image)


def _collate(items: list[tuple[int, dict]], *, seed: int, rank: int, **kwargs: Any) -> dict[str, Any]:
    random.seed(hash((seed, rank, items[0][0])))  # the iBOT mask generator draws from Python's `random`
    return collate_data_and_cast([crops for _, crops in items], **kwargs)


def build_ssl_loader(dataset: Dataset, augmentation: Any, *, batch_size: int, global_crops_size: int,
                     patch_size: int, mask_ratio: tuple[float, float], mask_probability: float, seed: int,
                     rank: int, world_size: int, start_iteration: int, num_workers: int) -> DataLoader:
    grid = global_crops_size // patch_size
    masker = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    start = start_iteration * batch_size
    sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start_index=start)
    collate = partial(_collate, seed=seed, rank=rank, mask_ratio_tuple=tuple(mask_ratio),
                      mask_probability=mask_probability, dtype=torch.float32, n_tokens=grid * grid,
                      mask_generator=masker)
    return DataLoader(AugmentedDataset(dataset, augmentation, seed, rank), batch_size=batch_size,
                      sampler=PositionedSampler(sampler, start), collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, drop_last=True)


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
        single = image[..., c:c + 1]
        return single if label is None else (single, label)
