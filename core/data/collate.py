"""Batch multi-crop samples and draw the iBOT masks for the global crops.

Follows ``collate_data_and_cast`` of DINOv2 (Oquab et al., 2024; ``dinov2/data/collate.py``): crops are stacked
crop-major, a fixed share of the global crops receives a block mask whose requested ratio is stratified over
``mask_ratio_tuple``, and the masks are shuffled across the batch. The arithmetic on the ratios is done in float32
tensors, as in the reference, so that requested counts and ``upperbound`` match it exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from core.errors import DinoscopeError


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int,
    mask_generator: Callable[[int], np.ndarray],
) -> dict[str, Any]:
    """Collate multi-crop samples into one training batch with iBOT masks.

    Args:
        samples_list: per sample, the dict returned by :class:`core.data.MultiCropAugmentation` or a
            ``(dict, label)`` pair (what a labelled dataset with that transform yields); labels are ignored.
        mask_ratio_tuple: ``(min, max)`` share of patches masked in a masked crop; DINOv2 uses ``(0.1, 0.5)``.
        mask_probability: share of the ``2B`` global crops that receive a mask; DINOv2 uses 0.5.
        dtype: dtype of the collated crops (training passes the compute dtype).
        n_tokens: patches per global crop, ``N = (crop_size / patch_size) ** 2``.
        mask_generator: ``n -> bool array`` with at most ``n`` masked patches, e.g. :class:`MaskingGenerator`.

    Returns:
        ``collated_global_crops [2B,C,S,S]`` (crop 1 of every sample, then crop 2), ``collated_local_crops
        [nB,C,s,s]``, ``collated_masks [2B,N]`` bool, ``mask_indices_list [M]`` (flat indices of masked
        patches), ``masks_weight [M]`` (``1/|M_i|`` of each masked patch's crop), ``upperbound`` (int, the most
        patches the batch can mask, for static buffers) and ``n_masked_patches`` (``[1]`` long tensor, ``M``).
    """
    if not samples_list:
        raise DinoscopeError("cannot collate an empty batch", field="samples_list")
    if not 0.0 <= mask_probability <= 1.0:
        raise DinoscopeError(f"mask_probability must lie in [0, 1], got {mask_probability}", field="mask_probability")
    low, high = mask_ratio_tuple
    if not 0.0 <= low <= high <= 1.0:
        raise DinoscopeError(
            f"mask_ratio_tuple must satisfy 0 <= min <= max <= 1, got {mask_ratio_tuple}", field="mask_ratio_tuple"
        )
    crops = [_crops_of(sample) for sample in samples_list]
    collated_global = _stack_crop_major(crops, "global_crops")
    collated_local = _stack_crop_major(crops, "local_crops")

    n_global = collated_global.shape[0]
    n_masked_crops = int(n_global * mask_probability)
    ratio_edges = torch.linspace(low, high, n_masked_crops + 1)
    upperbound = 0
    masks = []
    for i in range(n_masked_crops):
        ratio_min, ratio_max = ratio_edges[i], ratio_edges[i + 1]
        requested = int(n_tokens * random.uniform(ratio_min, ratio_max))
        masks.append(torch.as_tensor(mask_generator(requested), dtype=torch.bool))
        upperbound += int(n_tokens * ratio_max)
    masks.extend(torch.as_tensor(mask_generator(0), dtype=torch.bool) for _ in range(n_masked_crops, n_global))
    random.shuffle(masks)

    collated_masks = torch.stack(masks).flatten(1)
    if collated_masks.shape[1] != n_tokens:
        raise DinoscopeError(
            f"the mask generator makes {collated_masks.shape[1]} patches per crop but n_tokens is {n_tokens}",
            field="n_tokens",
            fix="build the MaskingGenerator with input_size = crop size // patch size",
        )
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_global_crops": collated_global.to(dtype),
        "collated_local_crops": collated_local.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


def _crops_of(sample: Any) -> Mapping[str, Any]:
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    if not isinstance(sample, Mapping) or "global_crops" not in sample or "local_crops" not in sample:
        raise DinoscopeError(
            "each sample must be the dict made by MultiCropAugmentation (or a (dict, label) "
            f"pair), got {type(sample).__name__}",
            field="samples_list",
            fix="set the dataset's transform to a MultiCropAugmentation",
        )
    return sample


def _stack_crop_major(crops: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    """``[crop0 of every sample; crop1 of every sample; ...]``: each crop index forms one contiguous block."""
    n_crops = len(crops[0][key])
    if any(len(c[key]) != n_crops for c in crops):
        raise DinoscopeError(f"samples disagree on the number of {key}", field=key)
    if n_crops == 0:
        return torch.empty(0)
    return torch.stack([c[key][i] for i in range(n_crops) for c in crops])
