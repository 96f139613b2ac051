"""Infer ``VisionTransformer`` keyword arguments from the tensor shapes of a canonical state dict."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

from core.errors import DinoscopeError
from core.models.ffn import swiglu_hidden_features

HEAD_DIM = 64  # every DINOv2 size uses 64-dim heads; other widths need num_heads from the caller

# Per-family settings that shapes cannot reveal (see reference: DINOv2 hub builders, HRCH backbone).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "dinov2_hub": {"interpolate_antialias": False, "interpolate_offset": 0.1},
    "dinov2_train": {"interpolate_antialias": False, "interpolate_offset": 0.1},
    "cell_dino": {"interpolate_antialias": False, "interpolate_offset": 0.1},
    "hrch": {"interpolate_align_corners": True, "interpolate_offset": 0.1, "interpolate_antialias": False},
    "dinoscope": {},
}
REGISTER_DEFAULTS = {"interpolate_antialias": True, "interpolate_offset": 0.0}  # hub `_reg` models

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def infer_model_kwargs(sd: dict[str, Tensor], fmt: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor keywords for a state dict; ``overrides`` win over anything inferred."""
    try:
        patch_w = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"]
    except KeyError as err:
        raise DinoscopeError(
            f"the backbone has no {err.args[0]!r} tensor",
            field=err.args[0],
            fix="check that the file is a ViT backbone checkpoint",
        ) from None
    embed_dim, in_chans, patch, _ = patch_w.shape
    depth = 1 + max((int(m[1]) for k in sd if (m := _BLOCK.match(k))), default=-1)
    n_table = pos.shape[1] - 1
    grid = math.isqrt(n_table)
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    kwargs: dict[str, Any] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "init_values": 1.0 if "blocks.0.ls1.gamma" in sd else None,
        "num_register_tokens": registers,
        "block_chunks": 0,
        "channel_adaptive": fmt == "cell_dino" and in_chans == 1,
    }
    if "blocks.0.mlp.w12.weight" in sd:
        hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        kwargs.update(
            ffn_layer="swiglufused", ffn_bias="blocks.0.mlp.w12.bias" in sd, mlp_ratio=_swiglu_ratio(hidden, embed_dim)
        )
    elif "blocks.0.mlp.fc1.weight" in sd:
        kwargs.update(
            ffn_layer="mlp",
            ffn_bias="blocks.0.mlp.fc1.bias" in sd,
            mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        )
    kwargs.update(FAMILY_DEFAULTS.get(fmt, {}))
    if registers and fmt != "hrch":
        kwargs.update(REGISTER_DEFAULTS)
    if "num_heads" not in overrides:
        if embed_dim % HEAD_DIM:
            raise DinoscopeError(
                f"cannot infer num_heads for embed_dim {embed_dim} (not a multiple of {HEAD_DIM})",
                field="num_heads",
                fix="pass num_heads=... (e.g. --num-heads on the CLI)",
            )
        kwargs["num_heads"] = embed_dim // HEAD_DIM
    kwargs.update(overrides)
    return kwargs


def _swiglu_ratio(hidden: int, embed_dim: int) -> float:
    for ratio in (4.0, 8 / 3, 2.0, 3.0, 5.0, 6.0):
        if swiglu_hidden_features(int(embed_dim * ratio)) == hidden:
            return ratio
    raise DinoscopeError(
        f"SwiGLU hidden size {hidden} matches no mlp_ratio for embed_dim {embed_dim}",
        field="mlp_ratio",
        fix="pass mlp_ratio=...",
    )
