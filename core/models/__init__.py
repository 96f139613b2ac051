"""ViT backbones and heads (DINOv2 layout)."""

from core.models.attention import ATTENTION_BACKENDS, Attention, xformers_available
from core.models.block import Block, LayerScale
from core.models.factories import (
    ARCH_SIZES,
    BACKBONES,
    arch_for_shape,
    build_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_test,
)
from core.models.heads import DINOHead, LinearHead, WeightNormLinear, linear_input
from core.models.vit import VisionTransformer

__all__ = [
    "ARCH_SIZES",
    "ATTENTION_BACKENDS",
    "Attention",
    "BACKBONES",
    "Block",
    "DINOHead",
    "LayerScale",
    "LinearHead",
    "VisionTransformer",
    "WeightNormLinear",
    "arch_for_shape",
    "build_backbone",
    "linear_input",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_test",
    "xformers_available",
]
