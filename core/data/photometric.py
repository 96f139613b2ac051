"""Photometric chains of the multi-crop augmentation: the factory protocol, the registry, generic operations and the
RGB chain of DINOv2.

A chain is what :class:`core.data.multicrop.MultiCropAugmentation` applies to each crop after the geometry (random
resized crop, flips, scaling to [0, 1]). ``crops.channel_mode`` names it. Core builds ``rgb`` itself: the
domain-free ImageNet recipe of ``DataAugmentationDINO`` (Oquab et al., 2024; ``dinov2/data/augmentations.py``):
colour jitter, grayscale, Gaussian blur, solarisation. Domains register theirs in the entry-point group
``dinoscope.augmentations`` (``name = "package.module:factory"``), e.g. ``multispectral`` (geodino) and
``fluorescence`` (bio), so core never imports them.

A factory is called as ``factory(settings, **options)``: :class:`ChainSettings` carries the knobs every chain may use,
``options`` the keywords only that chain understands (unknown ones are rejected here, naming the accepted ones).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import albumentations as albu
import numpy as np

from core.config.pretrain import AUGMENTATIONS_GROUP, channel_modes
from core.errors import DinoscopeError
from core.weights.meta import IMAGENET_MEAN, IMAGENET_STD, default_normalisation

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = AUGMENTATIONS_GROUP  # named as in core.data.datasets; defined with the schema that validates it


@dataclass(frozen=True)
class ChainSettings:
    """What every chain factory receives (already validated by the augmentation).

    Attributes:
        in_chans: expected channel count, or None (any; checked per image).
        mean, std: per-channel normalisation the caller gave, or None.
        max_value: divisor that scaled the inputs to [0, 1], or None (by dtype).
        blur_probs: Gaussian-blur probability of global crop 1, global crop 2 and the local crops.
        blur_kernel_size, blur_sigma: the blur kernel (DINOv2: 9, sigma 0.1-2.0).
        color_jitter_prob, brightness, contrast, saturation, hue: colour jitter (DINOv2: 0.8; 0.4, 0.4, 0.2, 0.1).
        grayscale_prob, solarize_prob: DINOv2: 0.2 each (solarisation on global crop 2).
    """

    in_chans: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_value: float | None = None
    blur_probs: tuple[float, float, float] = (0.0, 0.9, 0.5)
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    solarize_prob: float = 0.2


@dataclass
class PhotometricChain:
    """What a factory returns.

    Attributes:
        shared: transforms for every crop, after the geometry. The same instances serve all three crop slots and so
            draw from one random stream (the local pipeline's, which is seeded last); that is how the chains were
            built before they became pluggable, and keeping it keeps seeded runs bit-identical.
        per_crop: transforms appended for global crop 1, global crop 2 and the local crops (blur, solarisation).
        vflip_prob: vertical-flip probability when the caller gives none (images with a natural "up" use 0).
        clip_unit: clip to [0, 1] after scaling, as PIL-based 8-bit colour pipelines implicitly do before jitter.
        normalise: False when the chain standardises each crop itself (no mean/std may be given then).
        default_stats: ``(mean, std)`` for ``C``-channel crops when the caller gives none.
        channels: the channel count the chain requires (3 for colour operations), or None for any.
    """

    shared: list[albu.BasicTransform] = field(default_factory=list)
    per_crop: tuple[list[albu.BasicTransform], list[albu.BasicTransform], list[albu.BasicTransform]] = field(
        default_factory=lambda: ([], [], [])
    )
    vflip_prob: float = 0.0
    clip_unit: bool = False
    normalise: bool = True
    default_stats: Callable[[int], tuple[list[float], list[float]]] = default_normalisation
    channels: int | None = None


class ChainFactory(Protocol):
    """``factory(settings, **options) -> PhotometricChain``; raise :class:`DinoscopeError` naming the field."""

    def __call__(self, settings: ChainSettings, **options: Any) -> PhotometricChain: ...


# ------------------------------------------------------------------------------------------ generic operations
class ChannelIntensityJitter(albu.ImageOnlyTransform):
    """Independent brightness then contrast factor for every channel.

    ``distribution="uniform"``: factors in ``[1 - b, 1 + b]`` (ColorJitter's ranges, per channel).
    ``distribution="normal"``: factors ``max(N(1, b), min_factor)`` (Cell-DINO's RandomBrightness/RandomContrast).
    Contrast scales each channel's deviation from its own spatial mean. No clipping: reflectance or fluorescence
    values are not bounded the way 8-bit colour is.
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        distribution: str = "uniform",
        min_factor: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast = brightness, contrast
        self.distribution, self.min_factor = distribution, min_factor

    def _factors(self, spread: float, channels: int) -> np.ndarray:
        if self.distribution == "normal":
            return np.maximum(self.random_generator.normal(1.0, spread, channels), self.min_factor)
        return self.random_generator.uniform(max(0.0, 1.0 - spread), 1.0 + spread, channels)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Albumentations hook: one brightness and one contrast factor per channel of ``data["image"]``."""
        channels = data["image"].shape[-1]
        return {
            "brightness_factors": self._factors(self.brightness, channels).astype(np.float32),
            "contrast_factors": self._factors(self.contrast, channels).astype(np.float32),
        }

    def apply(
        self, img: np.ndarray, brightness_factors: np.ndarray, contrast_factors: np.ndarray, **params: Any
    ) -> np.ndarray:
        """``img [H, W, C]`` -> same shape: scale each channel by its brightness factor, then its deviation from its
        spatial mean by its contrast factor.
        """
        img = img * brightness_factors
        channel_mean = img.mean(axis=(0, 1), keepdims=True)
        return (img - channel_mean) * contrast_factors + channel_mean


def gaussian_blur(settings: ChainSettings, p: float) -> albu.GaussianBlur:
    """DINOv2's blur with the configured kernel and sigma range, for any channel count."""
    k = settings.blur_kernel_size
    return albu.GaussianBlur(blur_limit=(k, k), sigma_limit=tuple(settings.blur_sigma), p=p)


def blur_per_crop(settings: ChainSettings) -> tuple[list[albu.BasicTransform], ...]:
    """One blur per crop slot with the slot's probability (global 1, global 2, local)."""
    return tuple([gaussian_blur(settings, p)] for p in settings.blur_probs)


def solarize(p: float) -> albu.Solarize:
    """Invert values above 0.5 ([0, 1] inputs), as DINOv2's solarisation of 8-bit colour at 128."""
    return albu.Solarize(threshold_range=(0.5, 0.5), p=p)


def check_probability(name: str, value: float) -> None:
    """Raise :class:`~core.errors.DinoscopeError` naming ``name`` unless ``0 <= value <= 1``."""
    if not 0.0 <= float(value) <= 1.0:
        raise DinoscopeError(f"{name} must lie in [0, 1], got {value}", field=name)


# ------------------------------------------------------------------------------------------ the RGB chain
def rgb_chain(settings: ChainSettings) -> PhotometricChain:
    """DINOv2's ImageNet chain: colour jitter and grayscale on every crop, blur per slot, solarise global crop 2."""
    s = settings
    jitter = albu.ColorJitter(
        brightness=s.brightness, contrast=s.contrast, saturation=s.saturation, hue=s.hue, p=s.color_jitter_prob
    )
    gray = albu.ToGray(num_output_channels=3, method="weighted_average", p=s.grayscale_prob)
    blur1, blur2, blur_local = blur_per_crop(s)
    return PhotometricChain(
        shared=[jitter, gray],
        per_crop=(blur1, blur2 + [solarize(s.solarize_prob)], blur_local),
        clip_unit=True,
        default_stats=imagenet_stats,
        channels=3,
    )


def imagenet_stats(num_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std (a module-level function, not a lambda, so that spawned DataLoader workers can pickle it)."""
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


CORE_CHAINS: dict[str, ChainFactory] = {"rgb": rgb_chain}


# ------------------------------------------------------------------------------------------ registry
def chain_factories() -> dict[str, Any]:
    """Core chains plus the (not yet imported) entry points of ``dinoscope.augmentations``; core wins a clash."""
    factories: dict[str, Any] = dict(CORE_CHAINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in factories:
            log.warning("channel mode %r from %s is shadowed by core's", ep.name, ep.value)
            continue
        factories[ep.name] = ep
    return factories


def chain_factory(mode: str) -> ChainFactory:
    """The factory registered for ``mode``; an unknown mode raises, listing every registered one."""
    factories = chain_factories()
    if mode not in factories:
        raise DinoscopeError(
            f"unknown channel_mode {mode!r}", field="channel_mode", fix=f"use one of: {', '.join(channel_modes())}"
        )
    factory = factories[mode]
    if not callable(factory) and hasattr(factory, "load"):  # an entry point (duck-typed: backports differ)
        try:
            factory = factory.load()
        except ImportError as err:
            raise DinoscopeError(
                f"the channel_mode {mode!r} could not be imported ({err})",
                field="channel_mode",
                fix=f"install the package that provides {factory.value}",
            ) from None
    return factory


def build_chain(mode: str, settings: ChainSettings, options: Mapping[str, Any] | None = None) -> PhotometricChain:
    """``chain_factory(mode)(settings, **options)``, with unknown options and malformed results reported."""
    factory = chain_factory(mode)
    options = dict(options or {})
    signature = inspect.signature(factory)
    try:
        signature.bind(settings, **options)
    except TypeError as err:
        accepted = [n for n, p in list(signature.parameters.items())[1:] if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(accepted))
        if not unknown:
            raise DinoscopeError(
                f"channel_mode {mode!r} cannot be built with {options}: {err}", field="channel_mode"
            ) from None
        raise DinoscopeError(
            f"channel_mode {mode!r} does not take {', '.join(unknown)}",
            field=unknown[0],
            fix=f"its own options are: {', '.join(accepted) or 'none'}",
        ) from None
    chain = factory(settings, **options)
    if not isinstance(chain, PhotometricChain) or len(chain.per_crop) != 3:
        raise TypeError(f"the factory of channel_mode {mode!r} must return a PhotometricChain with 3 per_crop lists")
    return chain
