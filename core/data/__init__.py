"""SSL data pipeline: datasets, multi-crop augmentation, iBOT masking, collate and infinite samplers.

Dataset contract: ``dataset[i]`` is an ``H x W x C`` numpy array (uint8, uint16 or float32), or ``(array, label)``
for labelled datasets, and the dataset has ``channel_names`` (and ``classes`` when labelled).
"""

from __future__ import annotations

from core.data.collate import collate_data_and_cast
from core.data.datasets import (
                                DATASET_KINDS,
                                ENTRY_POINT_GROUP,
                                IMAGE_EXTENSIONS,
                                ImageFolderDataset,
                                SyntheticShapesDataset,
                                build_dataset,
                                compute_channel_stats,
                                dataset_kinds,
                                read_image,
                                scale_to_unit,
)
from core.data.masking import MaskingGenerator
from core.data.multicrop import BLUR_PROBS, CELL_DINO_CROPS, CHANNEL_MODES, MultiCropAugmentation
from core.data.samplers import InfiniteSampler

__all__ = [
    "BLUR_PROBS",
    "CELL_DINO_CROPS",
    "CHANNEL_MODES",
    "DATASET_KINDS",
    "ENTRY_POINT_GROUP",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "InfiniteSampler",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "SyntheticShapesDataset",
    "build_dataset",
    "collate_data_and_cast",
    "compute_channel_stats",
    "dataset_kinds",
    "read_image",
    "scale_to_unit",
]
