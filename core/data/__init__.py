"""SSL data pipeline: datasets, multi-crop augmentation, iBOT masking, collate and infinite samplers.

Dataset contract: ``dataset[i]`` is an ``H x W x C`` numpy array (uint8, uint16 or float32), or ``(array, label)``
for labelled datasets, and the dataset has ``channel_names`` (and ``classes`` when labelled).

Names are imported lazily: the augmentation stack (albumentations, OpenCV) loads only when it is used, so masking,
collate and samplers work (and import fast) without it.
"""

from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "collate_data_and_cast": "core.data.collate",
    "DATASET_KINDS": "core.data.datasets",
    "ENTRY_POINT_GROUP": "core.data.datasets",
    "IMAGE_EXTENSIONS": "core.data.images",
    "ImageFolderDataset": "core.data.datasets",
    "SyntheticShapesDataset": "core.data.datasets",
    "build_dataset": "core.data.datasets",
    "compute_channel_stats": "core.data.datasets",
    "dataset_kinds": "core.data.datasets",
    "read_image": "core.data.images",
    "scale_to_unit": "core.data.datasets",
    "MaskingGenerator": "core.data.masking",
    "BLUR_PROBS": "core.data.multicrop",
    "PhotometricChain": "core.data.photometric",
    "build_chain": "core.data.photometric",
    "MultiCropAugmentation": "core.data.multicrop",
    "InfiniteSampler": "core.data.samplers",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("core.data", _EXPORTS)
