"""Backbone weights: loading any supported checkpoint family, channel adaptation, metadata and export."""

from core.weights.adapt import CHANNEL_STRATEGIES, adapt_patch_embed
from core.weights.export import save_backbone
from core.weights.formats import REMAPPERS, detect_format, to_canonical
from core.weights.load import load_backbone, read_checkpoint, strict_load
from core.weights.meta import FORMAT_VERSION, WeightMeta, read_sidecar

__all__ = [
    "CHANNEL_STRATEGIES",
    "FORMAT_VERSION",
    "REMAPPERS",
    "WeightMeta",
    "adapt_patch_embed",
    "detect_format",
    "load_backbone",
    "read_checkpoint",
    "read_sidecar",
    "save_backbone",
    "strict_load",
    "to_canonical",
]
