"""The ``multispectral`` photometric chain (entry point ``dinoscope.augmentations: multispectral``).

Colour jitter, grayscale and solarisation assume three bounded colour channels; on reflectance bands (NIR, SWIR,
red edge, any count) they would mix bands that mean different physical quantities. This chain keeps DINOv2's
strength and blur schedule but jitters brightness and contrast of every band independently, with ColorJitter's
uniform ranges, and does not clip: reflectance scaled to [0, 1] may legitimately exceed 1.
"""

from __future__ import annotations

from core.data.photometric import ChainSettings, ChannelIntensityJitter, PhotometricChain, blur_per_crop


def multispectral_chain(settings: ChainSettings) -> PhotometricChain:
    """Per-band brightness/contrast jitter (``color_jitter_prob``, ``brightness``, ``contrast``), blur per crop slot
    as in DINOv2, no solarisation; mean/std default to 0.5 / 0.25 per band (better: the data's own statistics)."""
    jitter = ChannelIntensityJitter(
        brightness=settings.brightness, contrast=settings.contrast, distribution="uniform", p=settings.color_jitter_prob
    )
    return PhotometricChain(shared=[jitter], per_crop=blur_per_crop(settings))
