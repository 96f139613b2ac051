"""Multi-crop augmentation for DINOv2 pretraining, for any channel count and dtype.

Geometry and the RGB photometric chain follow ``DataAugmentationDINO`` of DINOv2 (Oquab et al., 2024;
``dinov2/data/augmentations.py``): two global and N local random-resized crops with horizontal flips, colour jitter,
grayscale, Gaussian blur and solarisation. ``channel_mode`` swaps the photometric chain for one that is valid on
other sensors: per-channel brightness/contrast for multispectral imagery, and the Cell-DINO recipe (Doron et al.,
2025; ``dinov2/data/cell_dino/augmentations.py``) for fluorescence microscopy. Everything runs on ``H x W x C`` numpy
arrays through albumentations; the per-channel steps are small albumentations transforms defined here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from core.data.datasets import scale_to_unit
from core.errors import DinoscopeError
from core.weights.meta import IMAGENET_MEAN, IMAGENET_STD, default_normalisation

CHANNEL_MODES = ("rgb", "multispectral", "fluorescence")
# Effective (global 1, global 2, local) blur probabilities. DINOv2's GaussianBlur passes p to RandomApply as 1 - p,
# so the released checkpoints were trained with 0.0 / 0.9 / 0.5 rather than the nominal 1.0 / 0.1 / 0.5
# (facebookresearch/dinov2 PR #411; dinov3 issue #286 keeps the effective values for the same reason).
BLUR_PROBS = {"released": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5)}
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
# Cell-DINO's crop settings; pass them as ``MultiCropAugmentation(channel_mode="fluorescence", **CELL_DINO_CROPS)``.
CELL_DINO_CROPS: dict[str, Any] = {"global_crops_scale": (0.4, 1.0), "local_crops_scale": (0.005, 0.4),
                                   "interpolation": "bilinear"}


class MultiCropAugmentation:
    """Image ``H x W x C`` (uint8, uint16 or float) -> dict of normalised float32 ``C x S x S`` crops.

    Args:
        global_crops_size, global_crops_scale: side and area range of the 2 global crops (DINOv2: 224, 0.32-1).
        local_crops_number, local_crops_size, local_crops_scale: the local crops (DINOv2: 8 of 96, 0.05-0.32; use
            98 with patch 14).
        crop_ratio: aspect-ratio range of the random-resized crops.
        interpolation: one of :data:`INTERPOLATIONS` (DINOv2: bicubic).
        hflip_prob: horizontal-flip probability.
        vflip_prob: vertical-flip probability; None means 0.5 for ``fluorescence`` (no up/down in a cell image),
            0.0 otherwise.
        channel_mode: ``rgb`` (3 channels only), ``multispectral`` or ``fluorescence``; selects the photometric chain.
        in_chans: expected channel count; checked at construction when given, else on each image.
        mean, std: per-channel normalisation of the [0, 1]-scaled crops (see :func:`compute_channel_stats`).
            Defaults: ImageNet for rgb, 0.5 / 0.25 otherwise. Not allowed for ``fluorescence``, which standardises
            every crop by its own per-channel mean and std instead.
        max_value: divisor that scales integer (or float) inputs to [0, 1]; default by dtype (255, 65535, 1).
        blur_probs: ``"released"`` (default: 0.0 / 0.9 / 0.5 for global 1 / global 2 / local, what the released
            DINOv2 checkpoints were trained with, so results compare with them), ``"paper"`` (1.0 / 0.1 / 0.5, the
            nominal DINO/BYOL values) or an explicit 3-tuple. Ignored for ``fluorescence``.
        blur_kernel_size, blur_sigma: Gaussian blur kernel (DINOv2: 9, sigma 0.1-2.0).
        color_jitter_prob, brightness, contrast, saturation, hue: rgb ColorJitter (0.8; 0.4, 0.4, 0.2, 0.1). The
            multispectral chain uses the probability, brightness and contrast per channel.
        grayscale_prob, solarize_prob: rgb only (0.2, and 0.2 on global crop 2).
        intensity_jitter_std: fluorescence per-channel factors ``max(N(1, std), 0.5)`` (Cell-DINO: 0.2).
        channel_drop_prob, protected_channels: fluorescence: with this probability zero one channel that is not
            protected (Cell-DINO protects the protein channel of HPA images).
        seed: seed of the augmentation streams; DataLoader workers derive their own from it.

    Returns (from ``__call__``): ``{"global_crops": [2 tensors], "global_crops_teacher": the same list,
    "local_crops": [local_crops_number tensors]}``.
    """

    def __init__(self, *, global_crops_size: int = 224, global_crops_scale: tuple[float, float] = (0.32, 1.0),
                 local_crops_number: int = 8, local_crops_size: int = 96,
                 local_crops_scale: tuple[float, float] = (0.05, 0.32),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic",
                 hflip_prob: float = 0.5, vflip_prob: float | None = None, channel_mode: str = "rgb",
                 in_chans: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, max_value: float | None = None,
                 blur_probs: str | Sequence[float] = "released", blur_kernel_size: int = 9,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), color_jitter_prob: float = 0.8,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 grayscale_prob: float = 0.2, solarize_prob: float = 0.2, intensity_jitter_std: float = 0.2,
                 channel_drop_prob: float = 0.0, protected_channels: Sequence[int] = (),
                 seed: int | None = None) -> None:
        if channel_mode not in CHANNEL_MODES:
            raise DinoscopeError(f"unknown channel_mode {channel_mode!r}", field="channel_mode",
                                 fix=f"use one of: {', '.join(CHANNEL_MODES)}")
        if interpolation not in INTERPOLATIONS:
            raise DinoscopeError(f"unknown interpolation {interpolation!r}", field="interpolation",
                                 fix=f"use one of: {', '.join(INTERPOLATIONS)}")
        for name, size in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
            if int(size) < 1:
                raise DinoscopeError(f"{name} must be a positive number of pixels, got {size}", field=name)
        if local_crops_number < 0:
            raise DinoscopeError(f"local_crops_number must be >= 0, got {local_crops_number}",
                                 field="local_crops_number")
        _check_interval("global_crops_scale", global_crops_scale, 0.0, 1.0)
        _check_interval("local_crops_scale", local_crops_scale, 0.0, 1.0)
        _check_interval("crop_ratio", crop_ratio, 0.0, float("inf"))
        _check_interval("blur_sigma", blur_sigma, 0.0, float("inf"))
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise DinoscopeError(f"blur_kernel_size must be odd and positive, got {blur_kernel_size}",
                                 field="blur_kernel_size")
        probs = {"hflip_prob": hflip_prob, "color_jitter_prob": color_jitter_prob, "grayscale_prob": grayscale_prob,
                 "solarize_prob": solarize_prob, "channel_drop_prob": channel_drop_prob}
        if vflip_prob is not None:
            probs["vflip_prob"] = vflip_prob
        for name, value in probs.items():
            _check_probability(name, value)
        if max_value is not None and max_value <= 0:
            raise DinoscopeError(f"max_value must be positive, got {max_value}", field="max_value")
        self.blur_probs = _resolve_blur_probs(blur_probs)
        self.channel_mode = channel_mode
        self.in_chans = _resolve_channels(channel_mode, in_chans, mean, std)
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.max_value = max_value
        self.local_crops_number = int(local_crops_number)
        self.seed = seed
        if vflip_prob is None:
            vflip_prob = 0.5 if channel_mode == "fluorescence" else 0.0

        def geometry(size: int, scale: tuple[float, float]) -> list[A.BasicTransform]:
            return [A.RandomResizedCrop(size=(int(size), int(size)), scale=tuple(scale), ratio=tuple(crop_ratio),
                                        interpolation=INTERPOLATIONS[interpolation], p=1.0),
                    A.HorizontalFlip(p=hflip_prob), A.VerticalFlip(p=vflip_prob),
                    ScaleToUnit(max_value=max_value, clip=channel_mode == "rgb")]

        def blur(p: float) -> list[A.BasicTransform]:
            return [A.GaussianBlur(blur_limit=(blur_kernel_size, blur_kernel_size), sigma_limit=tuple(blur_sigma),
                                   p=p)]

        if channel_mode == "rgb":
            photometric: list[A.BasicTransform] = [
                A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                              p=color_jitter_prob),
                A.ToGray(num_output_channels=3, method="weighted_average", p=grayscale_prob)]
            solarize = [A.Solarize(threshold_range=(0.5, 0.5), p=solarize_prob)]
        elif channel_mode == "multispectral":
            photometric = [ChannelIntensityJitter(brightness=brightness, contrast=contrast,
                                                  distribution="uniform", p=color_jitter_prob)]
            solarize = []
        else:
            photometric = [DropRandomChannel(protected_channels=tuple(protected_channels), p=channel_drop_prob),
                           ChannelIntensityJitter(brightness=intensity_jitter_std, contrast=intensity_jitter_std,
                                                  distribution="normal", p=1.0),
                           SelfStandardize()]
        if channel_mode == "fluorescence":
            chains = [photometric, photometric, photometric]
        else:
            blur1, blur2, blur_local = self.blur_probs
            chains = [photometric + blur(blur1), photometric + blur(blur2) + solarize, photometric + blur(blur_local)]
        sizes = [(global_crops_size, global_crops_scale)] * 2 + [(local_crops_size, local_crops_scale)]
        self._pipelines = [A.Compose(geometry(*size_scale) + chain) for size_scale, chain in zip(sizes, chains)]
        self._seed_pipelines(seed)

    def __repr__(self) -> str:
        return (f"MultiCropAugmentation(channel_mode={self.channel_mode!r}, in_chans={self.in_chans}, "
                f"local_crops_number={self.local_crops_number}, blur_probs={self.blur_probs})")

    def normalisation(self, num_channels: int) -> tuple[list[float], list[float]] | None:
        """The (mean, std) applied to ``num_channels``-channel crops; None for self-standardised fluorescence."""
        if self.channel_mode == "fluorescence":
            return None
        if self.mean is not None and self.std is not None:
            return list(self.mean), list(self.std)
        if self.channel_mode == "rgb":
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return default_normalisation(num_channels)

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
            raise DinoscopeError(f"expected an H x W x C numpy array, got {type(image).__name__}", field="image",
                                 fix="make the dataset return numpy arrays (see core.data.datasets)")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise DinoscopeError(f"expected an H x W x C image, got shape {image.shape}", field="image")
        channels = image.shape[-1]
        if self.in_chans is not None and channels != self.in_chans:
            raise DinoscopeError(f"the image has {channels} channels but the augmentation expects {self.in_chans}",
                                 field="in_chans", fix="make in_chans / mean / std match the dataset's channels")
        if self.channel_mode == "rgb" and channels != 3:
            raise DinoscopeError(f"channel_mode 'rgb' needs 3 channels, the image has {channels}",
                                 field="channel_mode", fix="use channel_mode 'multispectral' or 'fluorescence'")
        if image.dtype == np.float64 or image.dtype == np.float16:
            image = image.astype(np.float32)
        if image.dtype not in (np.uint8, np.uint16, np.float32):
            raise DinoscopeError(f"images of dtype {image.dtype} are not supported", field="dtype",
                                 fix="return uint8, uint16 or float32 arrays from the dataset")
        return image

    def reseed(self, entropy: Sequence[int] | int | None) -> None:
        """Restart the random streams from ``entropy`` (e.g. ``[seed, rank, sample_position]`` for augmentations
        that depend only on a sample's position); None draws fresh OS entropy. Overrides worker reseeding."""
        self._seed_pipelines(entropy)

    def _seed_pipelines(self, entropy: Sequence[int] | int | None) -> None:
        seeds = [None] * 3 if entropy is None else np.random.SeedSequence(entropy).generate_state(3).tolist()
        for pipeline, seed in zip(self._pipelines, seeds):
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


class ScaleToUnit(A.ImageOnlyTransform):
    """Cast to float32 in [0, 1] by dtype or ``max_value`` (see :func:`core.data.datasets.scale_to_unit`).

    ``clip`` bounds the result to [0, 1], as PIL-based RGB pipelines implicitly do before colour jitter.
    """

    def __init__(self, max_value: float | None = None, clip: bool = False, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.max_value = max_value
        self.clip = clip

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        out = scale_to_unit(img, self.max_value)
        return np.clip(out, 0.0, 1.0, out=out) if self.clip else out


class ChannelIntensityJitter(A.ImageOnlyTransform):
    """Independent brightness then contrast factor for every channel.

    ``distribution="uniform"``: factors in ``[1 - b, 1 + b]`` (ColorJitter's ranges, per channel).
    ``distribution="normal"``: factors ``max(N(1, b), 0.5)`` as in Cell-DINO's RandomBrightness/RandomContrast.
    Contrast scales each channel's deviation from its own spatial mean. No clipping: fluorescence and reflectance
    values are not bounded the way 8-bit colour is.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, distribution: str = "uniform",
                 min_factor: float = 0.5, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast = brightness, contrast
        self.distribution, self.min_factor = distribution, min_factor

    def _factors(self, spread: float, channels: int) -> np.ndarray:
        if self.distribution == "normal":
            return np.maximum(self.random_generator.normal(1.0, spread, channels), self.min_factor)
        return self.random_generator.uniform(max(0.0, 1.0 - spread), 1.0 + spread, channels)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        channels = data["image"].shape[-1]
        return {"brightness_factors": self._factors(self.brightness, channels).astype(np.float32),
                "contrast_factors": self._factors(self.contrast, channels).astype(np.float32)}

    def apply(self, img: np.ndarray, brightness_factors: np.ndarray, contrast_factors: np.ndarray,
              **params: Any) -> np.ndarray:
        img = img * brightness_factors
        channel_mean = img.mean(axis=(0, 1), keepdims=True)
        return (img - channel_mean) * contrast_factors + channel_mean


class DropRandomChannel(A.ImageOnlyTransform):
    """Zero one channel chosen among those not in ``protected_channels`` (Cell-DINO's channel removal)."""

    def __init__(self, protected_channels: tuple[int, ...] = (), p: float = 0.2) -> None:
        super().__init__(p=p)
        self.protected_channels = tuple(protected_channels)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        channels = data["image"].shape[-1]
        candidates = [c for c in range(channels) if c not in self.protected_channels]
        # Never blank a single-channel image: nothing would be left to learn from.
        if channels < 2 or not candidates:
            return {"channel": None}
        return {"channel": candidates[int(self.random_generator.integers(len(candidates)))]}

    def apply(self, img: np.ndarray, channel: int | None, **params: Any) -> np.ndarray:
        if channel is None:
            return img
        img = img.copy()
        img[..., channel] = 0.0
        return img


class SelfStandardize(A.ImageOnlyTransform):
    """``(x - mean_HW) / (std_HW + eps)`` per channel of each crop (Cell-DINO's ``SelfNormalizeNoDiv``)."""

    def __init__(self, eps: float = 1e-7, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.eps = eps

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        mean = img.mean(axis=(0, 1), keepdims=True)
        std = img.std(axis=(0, 1), keepdims=True)
        return ((img - mean) / (std + self.eps)).astype(np.float32)


def _to_tensor(crop: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None) -> torch.Tensor:
    if mean is not None:
        crop = (crop - mean) / std
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32))


def _resolve_blur_probs(blur_probs: str | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(blur_probs, str):
        if blur_probs not in BLUR_PROBS:
            raise DinoscopeError(f"unknown blur_probs {blur_probs!r}", field="blur_probs",
                                 fix="use 'released', 'paper' or three probabilities (global1, global2, local)")
        return BLUR_PROBS[blur_probs]
    values = tuple(float(p) for p in blur_probs)
    if len(values) != 3:
        raise DinoscopeError(f"blur_probs needs 3 values (global1, global2, local), got {len(values)}",
                             field="blur_probs")
    for value in values:
        _check_probability("blur_probs", value)
    return values  # type: ignore[return-value]


def _resolve_channels(channel_mode: str, in_chans: int | None, mean: Sequence[float] | None,
                      std: Sequence[float] | None) -> int | None:
    if channel_mode == "fluorescence" and (mean is not None or std is not None):
        raise DinoscopeError("fluorescence mode standardises every crop per channel; mean/std do not apply",
                             field="mean", fix="drop mean/std, or use channel_mode 'multispectral'")
    if (mean is None) != (std is None):
        raise DinoscopeError("give both mean and std, or neither", field="std" if std is None else "mean")
    if mean is not None and std is not None:
        if len(std) != len(mean):
            raise DinoscopeError(f"std has {len(std)} values but mean has {len(mean)}", field="std",
                                 fix="give one mean and one std per channel")
        if in_chans is not None and len(mean) != in_chans:
            raise DinoscopeError(f"mean has {len(mean)} values but in_chans is {in_chans}", field="mean",
                                 fix=f"give exactly {in_chans} values, one per channel")
        if any(s <= 0 for s in std):
            raise DinoscopeError("std values must be positive", field="std")
        in_chans = len(mean)
    if in_chans is not None and in_chans < 1:
        raise DinoscopeError(f"in_chans must be >= 1, got {in_chans}", field="in_chans")
    if channel_mode == "rgb" and in_chans is not None and in_chans != 3:
        raise DinoscopeError(f"channel_mode 'rgb' needs 3 channels, got {in_chans}", field="channel_mode",
                             fix="use channel_mode 'multispectral' (or 'fluorescence' for microscopy)")
    return in_chans


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise DinoscopeError(f"{name} must lie in [0, 1], got {value}", field=name)


def _check_interval(name: str, interval: Sequence[float], low: float, high: float) -> None:
    if len(interval) != 2 or not low <= interval[0] <= interval[1] <= high or interval[1] <= 0:
        raise DinoscopeError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {interval}",
                             field=name)
