"""Optimizer parameter groups: layer-wise lr decay, no weight decay on norms/biases/LayerScale, frozen last layer.

Each parameter gets an ``lr_multiplier`` ``rate ** (L + 1 - layer_id)`` (``L`` blocks; ``layer_id`` 0 for the patch
embedding and tokens, ``i + 1`` for block ``i``, ``L + 1`` for everything else), times ``patch_embed_lr_mult`` for the
patch embedding; a ``wd_multiplier`` of 0 for biases and names containing ``norm`` or ``gamma``; and ``is_last_layer``
for names containing ``last_layer`` (scheduled with the last-layer lr, 0 while frozen).

References:
    Clark et al., "ELECTRA", arXiv:2003.10555, and Bao et al., "BEiT", arXiv:2106.08254 (layer-wise lr decay).
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193; reference code
    facebookresearch/dinov2 ``dinov2/utils/param_groups.py`` and ``dinov2/train/train.py`` (``apply_optim_scheduler``).
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch
from torch import nn

__all__ = ["ParamGroup", "apply_optim_schedule", "block_index", "fuse_params_groups", "get_params_groups_with_decay"]

_EMBEDDING_NAMES = frozenset({"pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens"})
_FSDP_WRAPPER_PREFIX = "_fsdp_wrapped_module."
_FUSE_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


class ParamGroup(TypedDict):
    """One parameter with its multipliers (before fusing)."""

    params: nn.Parameter
    is_last_layer: bool
    lr_multiplier: float
    wd_multiplier: float
    name: str


def block_index(name: str, chunked: bool | None = None) -> int | None:
    """Global transformer-block index of a parameter name, or None outside the blocks.

    Hub names look like ``blocks.{i}.attn...``; FSDP-chunked names like ``blocks.{chunk}.{i}.attn...`` keep the global
    index ``i`` second. ``chunked=None`` infers the form from the name (two numeric parts in a row means chunked).
    """
    parts = name.split(".")
    for pos in range(len(parts) - 1):
        if parts[pos] != "blocks" or not parts[pos + 1].isdigit():
            continue
        has_second_index = pos + 2 < len(parts) and parts[pos + 2].isdigit()
        if chunked or (chunked is None and has_second_index):
            return int(parts[pos + 2]) if has_second_index else None
        return int(parts[pos + 1])
    return None


def _layer_id(name: str, n_blocks: int, chunked: bool | None) -> int:
    if _EMBEDDING_NAMES.intersection(name.split(".")):
        return 0
    index = block_index(name, chunked)
    return n_blocks + 1 if index is None else index + 1


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[ParamGroup]:
    """One group per trainable parameter of ``model``, named by the module's own parameter names.

    The number of blocks ``L`` is ``model.n_blocks`` when the model defines it, else one more than the largest block
    index found in the names (0 for a head, which then gets multiplier 1 everywhere). ``model.chunked_blocks``, when
    present, says whether names are chunked; otherwise each name's form is inferred.
    """
    named = [(name.replace(_FSDP_WRAPPER_PREFIX, ""), param) for name, param in model.named_parameters()]
    named = [(name, param) for name, param in named if param.requires_grad]
    chunked = getattr(model, "chunked_blocks", None)
    n_blocks = getattr(model, "n_blocks", None)
    if n_blocks is None:
        indices = [index for name, _ in named if (index := block_index(name, chunked)) is not None]
        n_blocks = max(indices) + 1 if indices else 0
    groups: list[ParamGroup] = []
    for name, param in named:
        lr_multiplier = 1.0
        if n_blocks > 0:
            lr_multiplier = lr_decay_rate ** (n_blocks + 1 - _layer_id(name, n_blocks, chunked))
        if "patch_embed" in name:
            lr_multiplier = lr_multiplier * patch_embed_lr_mult
        no_decay = name.split(".")[-1] == "bias" or "norm" in name or "gamma" in name
        groups.append(
            ParamGroup(
                params=param,
                is_last_layer="last_layer" in name,
                lr_multiplier=lr_multiplier,
                wd_multiplier=0.0 if no_decay else 1.0,
                name=name,
            )
        )
    return groups


def fuse_params_groups(groups: list[ParamGroup]) -> list[dict[str, Any]]:
    """Merge groups with equal ``(lr_multiplier, wd_multiplier, is_last_layer)``, in first-seen order.

    Each fused dict holds ``params`` (a list) and the three keys, ready for ``torch.optim.AdamW(fused)``.
    """
    fused: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in groups:
        key = tuple(group[k] for k in _FUSE_KEYS)
        if key not in fused:
            fused[key] = {"params": [], **{k: group[k] for k in _FUSE_KEYS}}
        fused[key]["params"].append(group["params"])
    return list(fused.values())


def apply_optim_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's ``lr`` and ``weight_decay`` for this iteration from its multipliers.

    ``lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier`` and ``weight_decay = wd * wd_multiplier``;
    groups without multiplier keys use 1 and are not last-layer groups.
    """
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
