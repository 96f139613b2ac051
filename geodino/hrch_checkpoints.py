"""The public HighResCanopyHeight (HRCH) checkpoints, and the architecture of a checkpoint from its tensor shapes.

Shapes reveal every width and depth of an HRCH model, but not two things the decoder depends on: the number of
attention heads (a width of 1280 could be 20 heads of 64 or 16 of 80) and which backbone blocks feed the DPT decoder
(``out_indices``). The official code hard-codes both per model size (facebookresearch/HighResCanopyHeight
``inference.py``, class ``SSLAE``: ``huge=True`` -> ``SSLVisionTransformer(embed_dim=1280, num_heads=20,
out_indices=(9, 16, 22, 29))`` and ``DPTHead(post_process_channels=[160, 320, 640, 1280])``, otherwise
``embed_dim=1024, num_heads=16, out_indices=(4, 11, 17, 23)``), so :data:`PUBLIC_HRCH` records them per public
checkpoint (Tolan et al., Remote Sensing of Environment 300:113888, 2024; files under
``s3://dataforgood-fb-data/forests/v1/models/saved_checkpoints/``, Apache-2.0). A checkpoint of another layout must
say its blocks (an embedded ``config``, or ``--hrch-blocks``): guessing evenly spaced blocks feeds the decoder
features it was never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from core.errors import DinoscopeError
from core.weights.infer import infer_model_kwargs


@dataclasses.dataclass(frozen=True)
class HRCHCheckpoint:
    """One public HRCH model size: its architecture constants and the files that hold it."""

    size: str
    embed_dim: int
    depth: int
    num_heads: int
    out_indices: tuple[int, ...]
    post_process_channels: tuple[int, ...]
    files: tuple[str, ...]


PUBLIC_HRCH: tuple[HRCHCheckpoint, ...] = (
    HRCHCheckpoint(
        "huge",
        1280,
        32,
        20,
        (9, 16, 22, 29),
        (160, 320, 640, 1280),
        (
            "SSLhuge_satellite.pth (float32, 2.9 GB: loads as it is)",
            "compressed_SSLhuge.pth (int8-quantised: the paper's evaluation model)",
            "compressed_SSLhuge_aerial.pth (int8-quantised, decoder trained on NEON aerial images)",
        ),
    ),
    HRCHCheckpoint(
        "large",
        1024,
        24,
        16,
        (4, 11, 17, 23),
        (128, 256, 512, 1024),
        ("compressed_SSLlarge.pth (int8-quantised ViT-L ablation)",),
    ),
)


def public_checkpoint(embed_dim: int, depth: int) -> HRCHCheckpoint | None:
    """The public HRCH size with this backbone width and depth, or None."""
    return next((c for c in PUBLIC_HRCH if (c.embed_dim, c.depth) == (embed_dim, depth)), None)


def infer_hrch_config(
    shapes: Mapping[str, Sequence[int]], *, num_heads: int | None = None, out_indices: Sequence[int] | None = None
) -> dict[str, Any]:
    """Architecture of a full HRCH state dict from its tensor shapes (``key -> shape``, official key names).

    Returns ``{"backbone": VisionTransformer kwargs, "head": DPTHead kwargs, "out_indices": [...], "public":
    size or None}``. Widths come from the shapes; ``num_heads`` and ``out_indices`` from the arguments, else from
    :data:`PUBLIC_HRCH`; ``num_heads`` otherwise defaults to width / 64, while unknown ``out_indices`` are refused.
    """
    meta = {
        k[len("backbone.") :]: torch.empty(0).new_empty(tuple(s), device="meta")
        for k, s in shapes.items()
        if k.startswith("backbone.")
    }
    try:
        width = int(shapes["backbone.patch_embed.proj.weight"][0])
        depth = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("backbone.blocks."))
        known = public_checkpoint(width, depth)
        heads = num_heads or (known.num_heads if known else None)
        backbone = infer_model_kwargs(meta, "hrch", {"num_heads": heads} if heads else {})
        head = {
            "embed_dim": backbone["embed_dim"],
            "post_process_channels": [
                int(shapes[f"decode_head.reassemble_blocks.projects.{i}.conv.weight"][0]) for i in range(4)
            ],
            "channels": int(shapes["decode_head.convs.0.conv.weight"][0]),
            "n_bins": int(shapes["decode_head.conv_depth.head.4.weight"][0]),
            "hidden": int(shapes["decode_head.conv_depth.head.2.weight"][0]),
        }
    except (KeyError, ValueError) as err:
        key = err.args[0] if isinstance(err, KeyError) else "backbone.blocks"
        raise DinoscopeError(
            f"the HRCH checkpoint has no {key!r} tensor",
            field=str(key),
            fix="pass a full HighResCanopyHeight checkpoint (backbone + decode_head)",
        ) from None
    if out_indices is None:
        if known is None:
            raise DinoscopeError(
                f"this HRCH checkpoint (width {width}, {depth} blocks) is not one of the public ones, so which blocks "
                "feed its decoder cannot be read from the file",
                field="hrch_blocks",
                fix=f"give the 4 block indices it was trained with, e.g. --hrch-blocks "
                f"{','.join(str(depth * (k + 1) // 4 - 1) for k in range(4))} (0-based; the public huge model uses "
                "9,16,22,29, large 4,11,17,23)",
            )
        out_indices = known.out_indices
    out_indices = [int(i) for i in out_indices]
    if len(out_indices) != 4 or min(out_indices) < 0 or max(out_indices) >= depth or out_indices != sorted(out_indices):
        raise DinoscopeError(
            f"out_indices {out_indices} must be 4 increasing block indices in [0, {depth})", field="hrch_blocks"
        )
    return {"backbone": backbone, "head": head, "out_indices": out_indices, "public": known.size if known else None}
