"""``load_backbone``: any supported checkpoint -> (VisionTransformer, WeightMeta), strictly loaded.

Pipeline: read the file (safetensors or ``torch.load(weights_only=True)``) -> unwrap container dicts -> detect the
family by sentinel keys -> one remapping function per family -> infer the architecture from shapes (overrides win)
-> optional input-channel adaptation -> strict load that lists missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from core.errors import DinoscopeError
from core.memory import check_fits_in_memory
from core.models.factories import arch_for_shape
from core.models.vit import VisionTransformer
from core.weights.adapt import adapt_channel_stats, adapt_patch_embed
from core.weights.formats import detect_format, strip_wrappers, to_canonical
from core.weights.infer import infer_model_kwargs
from core.weights.meta import WeightMeta, default_channel_names, default_normalisation, read_sidecar, sidecar_path

# Input statistics that the family's own code applies (not stored in its checkpoints).
HRCH_MEAN = [0.430, 0.411, 0.296]  # HighResCanopyHeight src/transforms.py SSLNorm (GeoTIFF notebook)
HRCH_STD = [0.213, 0.156, 0.143]
CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")
_META_KEYS = {
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "ffn_bias",
    "proj_bias",
    "init_values",
    "ffn_layer",
    "num_register_tokens",
    "interpolate_antialias",
    "interpolate_offset",
    "interpolate_align_corners",
    "channel_adaptive",
    "block_chunks",
}


def read_checkpoint(source: str | os.PathLike | dict) -> tuple[dict[str, Tensor], WeightMeta | None, dict]:
    """Return ``(flat state dict, sidecar meta or None, container dict)`` for a path or an in-memory dict."""
    if isinstance(source, dict):
        container: dict = source
        meta = None
    else:
        path = Path(source)
        if not path.exists():
            raise DinoscopeError("weights file not found", path=path, fix="check the path")
        if path.is_dir():
            raise DinoscopeError(
                "expected a weights file, got a directory",
                path=path,
                fix="point to the .safetensors/.pth file (use `dinoscope export RUN_DIR OUT` for runs)",
            )
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        try:
            container = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt, truncated, not a pickle, or pickled classes
            raise DinoscopeError(
                f"not a readable PyTorch checkpoint ({type(err).__name__}; truncated, corrupt or not a checkpoint)",
                path=path,
                fix="pass a .pth/.pt state dict or a .safetensors file; quantised "
                "HighResCanopyHeight files must be dequantised first",
            ) from None
        meta = None
    if not isinstance(container, dict):
        raise DinoscopeError(
            f"the checkpoint holds a {type(container).__name__}, not a state dict",
            path=None if isinstance(source, dict) else source,
            field="state_dict",
        )
    sd = container
    for key in CONTAINER_KEYS:
        if isinstance(sd.get(key), dict) and not isinstance(sd.get(key), Tensor):
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not sd:
        raise DinoscopeError(
            "the checkpoint contains no tensors", path=None if isinstance(source, dict) else source, field="state_dict"
        )
    return strip_wrappers(sd), meta, container


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], WeightMeta | None, dict]:
    try:
        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise DinoscopeError(f"not a readable safetensors file ({err})", path=path) from None
    side = sidecar_path(path)
    if side.exists():
        meta = read_sidecar(side)
    elif "dinoscope_meta" in header:  # the sidecar is also embedded in the header, in case it got lost
        meta = WeightMeta.from_dict(json.loads(header["dinoscope_meta"]), path)
    else:
        meta = None
    return sd, meta, {}


def load_backbone(
    source: str | os.PathLike | dict,
    *,
    format: str | None = None,
    branch: str = "teacher",
    in_chans: int | None = None,
    channel_strategy: str = "repeat",
    channel_names: list[str] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    **overrides: Any,
) -> tuple[VisionTransformer, WeightMeta]:
    """Load a backbone from a path or state dict.

    Args:
        source: file path (``.safetensors`` with JSON sidecar, ``.pth``/``.pt``) or an in-memory (state) dict.
        format: force a family (see :mod:`core.weights.formats`); detected from the keys by default.
        branch: ``teacher`` or ``student`` for training checkpoints.
        in_chans: adapt the patch embedding to this many input channels with ``channel_strategy``.
        channel_names, mean, std: override the metadata (one value per input channel).
        **overrides: ``VisionTransformer`` keywords (``num_heads`` for non-standard widths, ``drop_path_rate``,
            ``attn_backend``...), applied on top of what the shapes say.
    """
    sd, meta, container = read_checkpoint(source)
    where = None if isinstance(source, dict) else source
    fmt = format or ("dinoscope" if meta is not None else detect_format(sd))
    sd = to_canonical(sd, fmt, branch)
    if meta is not None:
        kwargs = {**meta.model_kwargs, **overrides}
    else:
        embedded = (
            {k: v for k, v in (container.get("config") or {}).items() if k in _META_KEYS}
            if isinstance(container.get("config"), dict)
            else {}
        )
        kwargs = infer_model_kwargs(sd, fmt, {**embedded, **overrides})
    src_chans = int(sd["patch_embed.proj.weight"].shape[1]) if "patch_embed.proj.weight" in sd else kwargs["in_chans"]
    names, mu, sigma = _source_channels(meta, fmt, src_chans)
    if kwargs.get("embed_dim", 0) % max(int(kwargs.get("num_heads", 1)), 1):
        raise DinoscopeError(
            f"embed_dim {kwargs['embed_dim']} is not divisible by num_heads {kwargs['num_heads']}",
            path=where,
            field="num_heads",
            fix=f"use a divisor of {kwargs['embed_dim']} (the head width is 64 in every DINOv2 model)",
        )
    if in_chans is not None and in_chans != src_chans:
        width, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
        check_fits_in_memory(
            in_chans * width * patch * patch * 4 * 3,  # the adapted weight, its source repeat, and the model copy
            what=f"a patch embedding for {in_chans} channels",
            field="in_chans",
            fix="give the number of channels the data has",
        )
        sd = dict(sd)
        sd["patch_embed.proj.weight"] = adapt_patch_embed(sd["patch_embed.proj.weight"], in_chans, channel_strategy)
        mu, sigma = (
            adapt_channel_stats(mu, in_chans, channel_strategy),
            adapt_channel_stats(sigma, in_chans, channel_strategy),
        )
        names = default_channel_names(in_chans)
        kwargs["in_chans"] = in_chans
    model = VisionTransformer(**kwargs)
    strict_load(model, sd, where)
    model.eval()
    out_meta = WeightMeta(
        arch=arch_for_shape(kwargs["embed_dim"], kwargs["depth"]),
        model_kwargs={k: kwargs[k] for k in sorted(kwargs) if k in _META_KEYS},
        channel_names=list(channel_names or names),
        mean=list(mean or mu),
        std=list(std or sigma),
        source_format=fmt,
        extra=dict(meta.extra) if meta is not None else {},
    )
    out_meta.validate(where)
    return model, out_meta


def _source_channels(meta: WeightMeta | None, fmt: str, c: int) -> tuple[list[str], list[float], list[float]]:
    if meta is not None:
        return list(meta.channel_names), list(meta.mean), list(meta.std)
    if fmt == "hrch" and c == 3:
        return default_channel_names(3), list(HRCH_MEAN), list(HRCH_STD)
    if fmt == "cell_dino":
        # Cell-DINO standardises every image per channel itself; fixed statistics are the identity.
        return default_channel_names(c), [0.0] * c, [1.0] * c
    mu, sigma = default_normalisation(c)
    return default_channel_names(c), mu, sigma


def strict_load(model: torch.nn.Module, sd: dict[str, Tensor], where: str | os.PathLike | None = None) -> None:
    """``load_state_dict(strict=True)`` with one clear error listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "") or "none"

        raise DinoscopeError(
            f"weights do not match the architecture: missing keys [{show(missing)}]; unexpected keys "
            f"[{show(unexpected)}]; mis-shaped keys [{show(misshaped)}]",
            path=where,
            field="state_dict",
            fix="check the architecture overrides (num_heads, ffn_layer, num_register_tokens) or the file",
        )
    model.load_state_dict(sd, strict=True)
