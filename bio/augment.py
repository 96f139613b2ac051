"""The ``fluorescence`` photometric chain (entry point ``dinoscope.augmentations: fluorescence``), after Cell-DINO.

Cell-DINO (Doron et al., 2025; ``dinov2/data/cell_dino/augmentations.py``, inherited from DINO4Cells) replaces
DINOv2's colour operations for fluorescence microscopy: stains are independent channels with arbitrary intensity
scales, so each crop gets a per-channel intensity jitter, optionally one channel blanked, then a per-crop, per-channel
z-score (which makes the absolute intensity range irrelevant, so no mean/std apply). A cell image has no "up", so
crops are flipped vertically too; there is no blur or solarisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as albu
import numpy as np

from core.data.photometric import ChainSettings, ChannelIntensityJitter, PhotometricChain, check_probability

# Cell-DINO's crop settings: ``MultiCropAugmentation(channel_mode="fluorescence", **CELL_DINO_CROPS)``.
CELL_DINO_CROPS: dict[str, Any] = {
    "global_crops_scale": (0.4, 1.0),
    "local_crops_scale": (0.005, 0.4),
    "interpolation": "bilinear",
}


def fluorescence_chain(
    settings: ChainSettings,
    *,
    intensity_jitter_std: float = 0.2,
    channel_drop_prob: float = 0.0,
    protected_channels: Sequence[int] = (),
) -> PhotometricChain:
    """The Cell-DINO chain.

    Args:
        settings: the shared settings; only the channel count matters here (blur and colour knobs do not apply).
        intensity_jitter_std: per-channel brightness and contrast factors ``max(N(1, std), 0.5)`` (Cell-DINO: 0.2).
        channel_drop_prob: probability of zeroing one channel that is not protected.
        protected_channels: channels never dropped (Cell-DINO protects the protein channel of HPA images).
    """
    check_probability("channel_drop_prob", channel_drop_prob)
    shared = [
        DropRandomChannel(protected_channels=tuple(protected_channels), p=channel_drop_prob),
        ChannelIntensityJitter(
            brightness=intensity_jitter_std, contrast=intensity_jitter_std, distribution="normal", p=1.0
        ),
        SelfStandardize(),
    ]
    return PhotometricChain(shared=shared, vflip_prob=0.5, normalise=False)


class DropRandomChannel(albu.ImageOnlyTransform):
    """Zero one channel chosen among those not in ``protected_channels`` (Cell-DINO's channel removal)."""

    def __init__(self, protected_channels: tuple[int, ...] = (), p: float = 0.2) -> None:
        super().__init__(p=p)
        self.protected_channels = tuple(protected_channels)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Pick the channel to blank from the ``H x W x C`` image (None for single-channel or all-protected)."""
        channels = data["image"].shape[-1]
        candidates = [c for c in range(channels) if c not in self.protected_channels]
        # Never blank a single-channel image: nothing would be left to learn from.
        if channels < 2 or not candidates:
            return {"channel": None}
        return {"channel": candidates[int(self.random_generator.integers(len(candidates)))]}

    def apply(self, img: np.ndarray, channel: int | None, **params: Any) -> np.ndarray:
        """A copy of ``img`` (``H x W x C``) with ``channel`` set to 0; unchanged when ``channel`` is None."""
        if channel is None:
            return img
        img = img.copy()
        img[..., channel] = 0.0
        return img


class SelfStandardize(albu.ImageOnlyTransform):
    """``(x - mean_HW) / (std_HW + eps)`` per channel of each crop (Cell-DINO's ``SelfNormalizeNoDiv``)."""

    def __init__(self, eps: float = 1e-7, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.eps = eps

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        """Standardise each channel of ``img`` (``H x W x C``) over its pixels; returns float32."""
        mean = img.mean(axis=(0, 1), keepdims=True)
        std = img.std(axis=(0, 1), keepdims=True)
        return ((img - mean) / (std + self.eps)).astype(np.float32)
