"""Checkpoint families: detection by sentinel keys and one key-remapping function per family.

Every remapper returns a state dict in our canonical (DINOv2 hub-style) key names, ready for a strict load.

Families:
    ``dinoscope``     our export: safetensors + JSON sidecar, canonical keys.
    ``dinov2_hub``    official hub backbones (``dinov2_vits14_pretrain.pth`` ...): canonical keys.
    ``dinov2_train``  official training / eval checkpoints: ``teacher.``/``student.`` and ``backbone.`` prefixes,
                      heads under ``dino_head.``/``ibot_head.``, blocks possibly chunked ``blocks.{chunk}.{i}``.
    ``cell_dino``     Cell-DINO / Channel-Adaptive DINO backbones: no prefix, chunked block names.
    ``hrch``          Meta's HighResCanopyHeight: ``backbone.`` (a patch-16 DINOv2-style ViT) and ``decode_head.``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

from core.errors import DinoscopeError

StateDict = dict[str, Tensor]

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    """Keep only keys starting with ``prefix`` (anchored) and drop it."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def strip_wrappers(sd: StateDict) -> StateDict:
    """Remove DDP/compile/FSDP wrapper prefixes at the start of keys only."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def unchunk_blocks(sd: StateDict) -> StateDict:
    """``blocks.{chunk}.{i}.x`` -> ``blocks.{i}.x``; chunking keeps global block indices, so dropping it suffices."""
    return {_CHUNKED.sub(r"blocks.\2.", k): v for k, v in sd.items()}


def _has_prefix(sd: StateDict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


# Keys only DINOv3 backbones carry (facebookresearch/dinov3: RoPE periods, storage/register tokens).
_DINOV3_MARKERS = ("rope_embed.periods", "storage_tokens")


def detect_format(sd: StateDict) -> str:
    """Name the checkpoint family from its keys (after wrapper prefixes are stripped)."""
    if any(k.endswith(_DINOV3_MARKERS) for k in sd):
        raise DinoscopeError(
            "this is a DINOv3 checkpoint (rotary position embeddings, storage tokens), which dinoscope cannot load yet",
            field="state_dict",
            fix="use a DINOv2 checkpoint (hub or training), Cell-DINO, HighResCanopyHeight or a dinoscope export",
        )
    if _has_prefix(sd, "teacher.") or _has_prefix(sd, "student."):
        return "dinov2_train"
    if _has_prefix(sd, "decode_head."):
        return "hrch"
    if _has_prefix(sd, "dino_head.") or _has_prefix(sd, "ibot_head."):
        return "dinov2_train"
    if _has_prefix(sd, "backbone."):
        pos = sd.get("backbone.pos_embed")
        patch = sd.get("backbone.patch_embed.proj.weight")
        # A bare HRCH backbone: patch 16 and the fixed 14x14 (+cls) table; DINOv2 teacher files always carry heads.
        if pos is not None and patch is not None and pos.shape[1] == 197 and patch.shape[-1] == 16:
            return "hrch"
        return "dinov2_train"
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        return "cell_dino" if any(_CHUNKED.match(k) for k in sd) else "dinov2_hub"
    sample = ", ".join(list(sd)[:5])
    raise DinoscopeError(
        f"the keys do not look like a ViT backbone checkpoint (first keys: {sample})",
        field="state_dict",
        fix="pass a DINOv2 hub/training checkpoint, a Cell-DINO or HighResCanopyHeight checkpoint, "
        "or weights exported by `dinoscope export`",
    )


def remap_dinov2_hub(sd: StateDict, branch: str) -> StateDict:
    """facebookresearch/dinov2 hub backbones: canonical up to block chunking."""
    return unchunk_blocks(sd)


def remap_dinov2_train(sd: StateDict, branch: str) -> StateDict:
    """DINOv2 training checkpoints: keep ``branch`` (teacher or student), drop ``backbone.``, unchunk."""
    if _has_prefix(sd, "teacher.") or _has_prefix(sd, "student."):
        if not _has_prefix(sd, f"{branch}."):
            raise DinoscopeError(
                f"this training checkpoint has no {branch!r} weights",
                field="branch",
                fix="use branch='teacher' or branch='student'",
            )
        sd = strip_prefix(sd, f"{branch}.")
    return unchunk_blocks(strip_prefix(sd, "backbone."))


def remap_cell_dino(sd: StateDict, branch: str) -> StateDict:
    """Cell-DINO backbones: unchunk ``blocks.{chunk}.{i}`` names."""
    return unchunk_blocks(sd)


def remap_hrch(sd: StateDict, branch: str) -> StateDict:
    """facebookresearch/HighResCanopyHeight backbones: drop the ``backbone.`` prefix."""
    return strip_prefix(sd, "backbone.")


def remap_dinoscope(sd: StateDict, branch: str) -> StateDict:
    """Weights exported by dinoscope: already canonical."""
    return sd


REMAPPERS: dict[str, Callable[[StateDict, str], StateDict]] = {
    "dinoscope": remap_dinoscope,
    "dinov2_hub": remap_dinov2_hub,
    "dinov2_train": remap_dinov2_train,
    "cell_dino": remap_cell_dino,
    "hrch": remap_hrch,
}


def to_canonical(sd: StateDict, fmt: str, branch: str = "teacher") -> StateDict:
    """Remap a state dict of family ``fmt`` (a key of :data:`REMAPPERS`) to canonical ViT keys."""
    if fmt not in REMAPPERS:
        raise DinoscopeError(
            f"unknown checkpoint format {fmt!r}", field="format", fix=f"use one of {sorted(REMAPPERS)}"
        )
    return REMAPPERS[fmt](sd, branch)
