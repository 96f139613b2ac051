"""Backbone factories with the official DINOv2 sizes, and the explicit name -> factory table.

Sizes from Oquab et al. (arXiv:2304.07193), Table 15, and facebookresearch/dinov2 ``vision_transformer.py``.
As upstream, the factory default ``patch_size`` is 16; pass ``patch_size=14`` for the released /14 models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.errors import DinoscopeError
from core.models.vit import VisionTransformer

# name -> (embed_dim, depth, num_heads); every size has 64-dimensional heads.
ARCH_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_test": (64, 2, 4),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


def _factory(name: str) -> Callable[..., VisionTransformer]:
    embed_dim, depth, num_heads = ARCH_SIZES[name]

    def build(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> VisionTransformer:
        return VisionTransformer(
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            num_register_tokens=num_register_tokens,
            **kwargs,
        )

    build.__name__ = name
    build.__doc__ = f"{name}: embed_dim {embed_dim}, depth {depth}, {num_heads} heads."
    return build


vit_test = _factory("vit_test")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
vit_giant2 = _factory("vit_giant2")

BACKBONES: dict[str, Callable[..., VisionTransformer]] = {
    "vit_test": vit_test,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}


def build_backbone(arch: str, **kwargs: Any) -> VisionTransformer:
    """Build a backbone by table name; an unknown name lists the valid ones."""
    try:
        factory = BACKBONES[arch]
    except KeyError:
        raise DinoscopeError(
            f"unknown backbone {arch!r}", field="model.arch", fix=f"use one of {sorted(BACKBONES)}"
        ) from None
    return factory(**kwargs)


def arch_for_shape(embed_dim: int, depth: int) -> str:
    """The table name whose width and depth match, or ``custom``."""
    for name, (dim, dep, _) in ARCH_SIZES.items():
        if (dim, dep) == (embed_dim, depth):
            return name
    return "custom"
