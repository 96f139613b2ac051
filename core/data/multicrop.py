"""Multi-crop augmentation for DINOv2 pretraining, for any channel count and dtype.

Geometry follows ``DataAugmentationDINO`` of DINOv2 (Oquab et al., 2024; ``dinov2/data/augmentations.py``): two
global and N local random-resized crops with flips, then scaling to [0, 1] by dtype and per-channel normalisation.
The photometric chain applied to each crop is looked up by ``channel_mode`` (:mod:`core.data.photometric`): core
provides DINOv2's ``rgb`` chain, domains register theirs (geodino ``multispectral``, bio ``fluorescence``). Everything
runs on ``H x W x C`` numpy arrays through albumentations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import albumentations as albu
import cv2
import numpy as np
import torch

from core.config.pretrain import channel_modes
from core.data.datasets import scale_to_unit
from core.data.photometric import ChainSettings, build_chain, chain_factory, check_probability
from core.errors import DinoscopeError

# Effective (global 1, global 2, local) blur probabilities. DINOv2's GaussianBlur passes p to RandomApply as 1 - p,
# so the released checkpoints were trained with 0.0 / 0.9 / 0.5 rather than the nominal 1.0 / 0.1 / 0.5
# (facebookresearch/dinov2 PR #411; dinov3 issue #286 keeps the effective values for the same reason).
BLUR_PROBS = {"released": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5)}
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


class MultiCropAugmentation:
    """Image ``H x W x C`` (uint8, uint16 or float) -> dict of normalised float32 ``C x S x S`` crops.

    Args:
        global_crops_size, global_crops_scale: side and area range of the 2 global crops (DINOv2: 224, 0.32-1).
        local_crops_number, local_crops_size, local_crops_scale: the local crops (DINOv2: 8 of 96, 0.05-0.32; use
            98 with patch 14).
        crop_ratio: aspect-ratio range of the random-resized crops.
        interpolation: one of :data:`INTERPOLATIONS` (DINOv2: bicubic).
        hflip_prob: horizontal-flip probability.
        vflip_prob: vertical-flip probability; None means the chain's default (0 for rgb).
        channel_mode: the photometric chain: ``rgb`` (3 channels) or a registered one
            (:func:`core.config.pretrain.channel_modes`).
        in_chans: expected channel count; checked at construction when given, else on each image.
        mean, std: per-channel normalisation of the [0, 1]-scaled crops (see :func:`compute_channel_stats`).
            Defaults come from the chain: ImageNet for rgb, 0.5 / 0.25 otherwise. Not allowed for chains that
            standardise every crop themselves.
        max_value: divisor that scales integer (or float) inputs to [0, 1]; default by dtype (255, 65535, 1).
        blur_probs: ``"released"`` (default: 0.0 / 0.9 / 0.5 for global 1 / global 2 / local, what the released
            DINOv2 checkpoints were trained with, so results compare with them), ``"paper"`` (1.0 / 0.1 / 0.5, the
            nominal DINO/BYOL values) or an explicit 3-tuple. Chains without blur ignore it.
        blur_kernel_size, blur_sigma: Gaussian blur kernel (DINOv2: 9, sigma 0.1-2.0).
        color_jitter_prob, brightness, contrast, saturation, hue: rgb ColorJitter (0.8; 0.4, 0.4, 0.2, 0.1); other
            chains may use them per channel.
        grayscale_prob, solarize_prob: rgb (0.2, and 0.2 on global crop 2).
        seed: seed of the augmentation streams; DataLoader workers derive their own from it.
        **chain_options: keywords of the chain itself (e.g. fluorescence: ``intensity_jitter_std``,
            ``channel_drop_prob``, ``protected_channels``); a keyword the chain does not take is an error.

    Returns (from ``__call__``): ``{"global_crops": [2 tensors], "global_crops_teacher": the same list,
    "local_crops": [local_crops_number tensors]}``.
    """

    def __init__(
        self,
        *,
        global_crops_size: int = 224,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_number: int = 8,
        local_crops_size: int = 96,
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        hflip_prob: float = 0.5,
        vflip_prob: float | None = None,
        channel_mode: str = "rgb",
        in_chans: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        max_value: float | None = None,
        blur_probs: str | Sequence[float] = "released",
        blur_kernel_size: int = 9,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        color_jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_prob: float = 0.2,
        solarize_prob: float = 0.2,
        seed: int | None = None,
        **chain_options: Any,
    ) -> None:
        chain_factory(channel_mode)  # an unknown mode fails first, listing the registered ones
        if interpolation not in INTERPOLATIONS:
            raise DinoscopeError(
                f"unknown interpolation {interpolation!r}",
                field="interpolation",
                fix=f"use one of: {', '.join(INTERPOLATIONS)}",
            )
        for name, size in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
            if int(size) < 1:
                raise DinoscopeError(f"{name} must be a positive number of pixels, got {size}", field=name)
        if local_crops_number < 0:
            raise DinoscopeError(
                f"local_crops_number must be >= 0, got {local_crops_number}", field="local_crops_number"
            )
        _check_interval("global_crops_scale", global_crops_scale, 0.0, 1.0)
        _check_interval("local_crops_scale", local_crops_scale, 0.0, 1.0)
        _check_interval("crop_ratio", crop_ratio, 0.0, float("inf"))
        _check_interval("blur_sigma", blur_sigma, 0.0, float("inf"))
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise DinoscopeError(
                f"blur_kernel_size must be odd and positive, got {blur_kernel_size}", field="blur_kernel_size"
            )
        probs = {
            "hflip_prob": hflip_prob,
            "color_jitter_prob": color_jitter_prob,
            "grayscale_prob": grayscale_prob,
            "solarize_prob": solarize_prob,
        }
        if vflip_prob is not None:
            probs["vflip_prob"] = vflip_prob
        for name, value in probs.items():
            check_probability(name, value)
        if max_value is not None and max_value <= 0:
            raise DinoscopeError(f"max_value must be positive, got {max_value}", field="max_value")
        self.blur_probs = _resolve_blur_probs(blur_probs)
        self.channel_mode = channel_mode
        self.in_chans = _resolve_channels(in_chans, mean, std)
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.max_value = max_value
        self.local_crops_number = int(local_crops_number)
        self.seed = seed
        settings = ChainSettings(
            in_chans=self.in_chans,
            mean=None if self.mean is None else tuple(self.mean),
            std=None if self.std is None else tuple(self.std),
            max_value=max_value,
            blur_probs=self.blur_probs,
            blur_kernel_size=blur_kernel_size,
            blur_sigma=tuple(blur_sigma),
            color_jitter_prob=color_jitter_prob,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            grayscale_prob=grayscale_prob,
            solarize_prob=solarize_prob,
        )
        self.chain = chain = build_chain(channel_mode, settings, chain_options)
        self._check_chain_fits()
        if vflip_prob is None:
            vflip_prob = chain.vflip_prob

        def geometry(size: int, scale: tuple[float, float]) -> list[albu.BasicTransform]:
            return [
                albu.RandomResizedCrop(
                    size=(int(size), int(size)),
                    scale=tuple(scale),
                    ratio=tuple(crop_ratio),
                    interpolation=INTERPOLATIONS[interpolation],
                    p=1.0,
                ),
                albu.HorizontalFlip(p=hflip_prob),
                albu.VerticalFlip(p=vflip_prob),
                ScaleToUnit(max_value=max_value, clip=chain.clip_unit),
            ]

        sizes = [(global_crops_size, global_crops_scale)] * 2 + [(local_crops_size, local_crops_scale)]
        # chain.shared is deliberately the same instances in all three pipelines (see PhotometricChain.shared).
        self._pipelines = [
            albu.Compose(geometry(*size_scale) + chain.shared + list(extra))
            for size_scale, extra in zip(sizes, chain.per_crop, strict=True)
        ]
        self._seed_pipelines(seed)

    def _check_chain_fits(self) -> None:
        mode, chain = self.channel_mode, self.chain
        if not chain.normalise and (self.mean is not None or self.std is not None):
            raise DinoscopeError(
                f"channel_mode {mode!r} standardises every crop per channel; mean/std do not apply",
                field="mean",
                fix="drop mean/std, or use a channel_mode that normalises",
            )
        if chain.channels is not None and self.in_chans is not None and self.in_chans != chain.channels:
            raise DinoscopeError(
                f"channel_mode {mode!r} needs {chain.channels} channels, got {self.in_chans}",
                field="channel_mode",
                fix=_other_modes_fix(mode),
            )

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(channel_mode={self.channel_mode!r}, in_chans={self.in_chans}, "
            f"local_crops_number={self.local_crops_number}, blur_probs={self.blur_probs})"
        )

    def normalisation(self, num_channels: int) -> tuple[list[float], list[float]] | None:
        """The (mean, std) applied to ``num_channels``-channel crops; None when the chain standardises."""
        if not self.chain.normalise:
            return None
        if self.mean is not None and self.std is not None:
            return list(self.mean), list(self.std)
        return self.chain.default_stats(num_channels)

    def __call__(self, image: np.ndarray) -> dict[str, list[torch.Tensor]]:
        image = self._check_image(image)
        self._reseed_in_worker()
        stats = self.normalisation(image.shape[-1])
        mean, std = (None, None) if stats is None else (np.float32(stats[0]), np.float32(stats[1]))
        global1, global2, local = self._pipelines
        global_crops = [_to_tensor(p(image=image)["image"], mean, std) for p in (global1, global2)]
        local_crops = [_to_tensor(local(image=image)["image"], mean, std) for _ in range(self.local_crops_number)]
        return {"global_crops": global_crops, "global_crops_teacher": global_crops, "local_crops": local_crops}

    def _check_image(self, image: np.ndarray) -> np.ndarray:
        if not isinstance(image, np.ndarray):
            raise DinoscopeError(
                f"expected an H x W x C numpy array, got {type(image).__name__}",
                field="image",
                fix="make the dataset return numpy arrays (see core.data.datasets)",
            )
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise DinoscopeError(f"expected an H x W x C image, got shape {image.shape}", field="image")
        channels = image.shape[-1]
        if self.in_chans is not None and channels != self.in_chans:
            raise DinoscopeError(
                f"the image has {channels} channels but the augmentation expects {self.in_chans}",
                field="in_chans",
                fix="make in_chans / mean / std match the dataset's channels",
            )
        if self.chain.channels is not None and channels != self.chain.channels:
            raise DinoscopeError(
                f"channel_mode {self.channel_mode!r} needs {self.chain.channels} channels, the image has {channels}",
                field="channel_mode",
                fix=_other_modes_fix(self.channel_mode),
            )
        if image.dtype == np.float64 or image.dtype == np.float16:
            image = image.astype(np.float32)
        if image.dtype not in (np.uint8, np.uint16, np.float32):
            raise DinoscopeError(
                f"images of dtype {image.dtype} are not supported",
                field="dtype",
                fix="return uint8, uint16 or float32 arrays from the dataset",
            )
        return image

    def reseed(self, entropy: Sequence[int] | int | None) -> None:
        """Restart the random streams from ``entropy`` (e.g. ``[seed, rank, sample_position]`` for augmentations
        that depend only on a sample's position); None draws fresh OS entropy. Overrides worker reseeding."""
        self._seed_pipelines(entropy)

    def _seed_pipelines(self, entropy: Sequence[int] | int | None) -> None:
        seeds = [None] * 3 if entropy is None else np.random.SeedSequence(entropy).generate_state(3).tolist()
        for pipeline, seed in zip(self._pipelines, seeds, strict=True):
            pipeline.set_random_seed(seed)
        self._seeded_pid = os.getpid()

    def _reseed_in_worker(self) -> None:
        """Give each DataLoader worker its own stream: forked workers would otherwise repeat the parent's draws."""
        if os.getpid() == self._seeded_pid:
            return
        info = torch.utils.data.get_worker_info()
        rank = int(os.environ.get("RANK", "0"))
        if info is not None:
            self._seed_pipelines([self.seed or 0, int(info.seed) % 2**63, rank])
        else:
            self._seed_pipelines(None if self.seed is None else [self.seed, rank])


class ScaleToUnit(albu.ImageOnlyTransform):
    """Cast to float32 in [0, 1] by dtype or ``max_value`` (see :func:`core.data.datasets.scale_to_unit`).

    ``clip`` bounds the result to [0, 1], as PIL-based RGB pipelines implicitly do before colour jitter.
    """

    def __init__(self, max_value: float | None = None, clip: bool = False, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.max_value = max_value
        self.clip = clip

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        """``img [H, W, C]`` -> float32 ``[H, W, C]`` in [0, 1] (by dtype or ``max_value``; clipped if ``clip``)."""
        out = scale_to_unit(img, self.max_value)
        return np.clip(out, 0.0, 1.0, out=out) if self.clip else out


def _to_tensor(crop: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> torch.Tensor:
    if mean is not None:
        crop = (crop - mean) / std
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32))


def _resolve_blur_probs(blur_probs: str | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(blur_probs, str):
        if blur_probs not in BLUR_PROBS:
            raise DinoscopeError(
                f"unknown blur_probs {blur_probs!r}",
                field="blur_probs",
                fix="use 'released', 'paper' or three probabilities (global1, global2, local)",
            )
        return BLUR_PROBS[blur_probs]
    values = tuple(float(p) for p in blur_probs)
    if len(values) != 3:
        raise DinoscopeError(
            f"blur_probs needs 3 values (global1, global2, local), got {len(values)}", field="blur_probs"
        )
    for value in values:
        check_probability("blur_probs", value)
    return values  # type: ignore[return-value]


def _resolve_channels(in_chans: int | None, mean: Sequence[float] | None, std: Sequence[float] | None) -> int | None:
    if (mean is None) != (std is None):
        raise DinoscopeError("give both mean and std, or neither", field="std" if std is None else "mean")
    if mean is not None and std is not None:
        if len(std) != len(mean):
            raise DinoscopeError(
                f"std has {len(std)} values but mean has {len(mean)}",
                field="std",
                fix="give one mean and one std per channel",
            )
        if in_chans is not None and len(mean) != in_chans:
            raise DinoscopeError(
                f"mean has {len(mean)} values but in_chans is {in_chans}",
                field="mean",
                fix=f"give exactly {in_chans} values, one per channel",
            )
        if any(s <= 0 for s in std):
            raise DinoscopeError("std values must be positive", field="std")
        in_chans = len(mean)
    if in_chans is not None and in_chans < 1:
        raise DinoscopeError(f"in_chans must be >= 1, got {in_chans}", field="in_chans")
    return in_chans


def _other_modes_fix(mode: str) -> str:
    others = [m for m in channel_modes() if m != mode]
    return f"use another channel_mode ({', '.join(others)}), or give {mode!r} the channels it needs"


def _check_interval(name: str, interval: Sequence[float], low: float, high: float) -> None:
    if len(interval) != 2 or not low <= interval[0] <= interval[1] <= high or interval[1] <= 0:
        raise DinoscopeError(
            f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {interval}", field=name
        )
